"""The stable-audio family's features: each track's audio encoded once by the pipeline's own VAE.

A track is read at the VAE's sample rate and channel count (resampled; mono duplicated to stereo,
stereo averaged to mono), zero-padded (or cut) to the run's length, as Stable Audio pads short
training tracks, and encoded to the VAE posterior's mean: the deterministic latent of the audio
(stable-audio-tools samples from the posterior while training; the mean is what the track *is*).
The real-frame mask counts the latent frames that hold real audio. The store
(`data.features.FeatureStore`) keeps the latents, chunk by chunk and resumable; they are used as
they are (no normalisation).
"""

from __future__ import annotations

import numpy as np
import torch

from linernotes import device
from linernotes.data.features import FixedLengthAudio


class VaeLatents(FixedLengthAudio):
    """The feature encoder of `FeatureStore` for a VAE: (n_frames, latent channels) per track."""

    def __init__(self, vae, n_frames: int, fingerprint: str, batch_size: int = 4):
        self.vae, self.n_frames, self.fingerprint = vae, n_frames, fingerprint
        self.hop = int(vae.hop_length)
        self.sample_rate = int(vae.config.sampling_rate)
        self.channels = int(vae.config.audio_channels)
        self.dim = int(vae.config.decoder_input_channels)
        self.batch_size = batch_size

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_frames, self.dim)

    def cache_key(self) -> dict:
        return {"vae": self.fingerprint, "n_frames": self.n_frames, "format": 1}

    @torch.no_grad()
    def encode(self, waveforms: np.ndarray) -> np.ndarray:
        """Latents (B, n_frames, dim) of waveforms (B, channels, n_frames * hop)."""
        dev = device.of(self.vae)
        x = torch.from_numpy(np.asarray(waveforms, dtype=np.float32)).to(dev)
        z = self.vae.encode(x).latent_dist.mean  # (B, dim, frames)
        return z[:, :, : self.n_frames].transpose(1, 2).float().cpu().numpy()
