"""The reference text-to-music model: CLAP-style encoder, DiT denoiser, schedule, vocoder."""
