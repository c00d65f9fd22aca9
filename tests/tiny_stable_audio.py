"""A tiny random StableAudioPipeline of the real diffusers and transformers classes, built offline,
and a corpus whose tracks a random VAE tells apart (they differ in loudness over time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from linernotes.data.manifest import read_manifest, write_manifest

TITLES = ["Morning", "River", "Lantern", "Harbour", "Orchard", "Meadow", "Falcon", "Ember"]
WORDS = ("a tune by alpha beta gamma played on sine at slow fast tempo "
         + " ".join(t.lower() for t in TITLES)).split()


def make_tiny_pipeline(path: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """Save a tiny StableAudioPipeline (Oobleck VAE at 4 kHz stereo, hop 64; a 1-layer T5 with a
    word-level tokenizer built here; a 2-block DiT over 128 latent frames) to `path`."""
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[8, 8],
                             channel_multiples=[1, 2], decoder_channels=8,
                             decoder_input_channels=4, audio_channels=2, sampling_rate=4000)
    with torch.no_grad():  # latents of about unit scale, as a trained VAE's are
        vae.encoder.conv2.weight_g.mul_(15.0)
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", ",", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=16)
    text = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32,
                                   num_layers=1, num_heads=2))
    projection = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=16,
                                            min_value=0, max_value=4)
    dit = StableAudioDiTModel(sample_size=128, in_channels=4, num_layers=2,
                              attention_head_dim=head_dim, num_attention_heads=2,
                              num_key_value_attention_heads=1, out_channels=4,
                              cross_attention_dim=16, time_proj_dim=16,
                              global_states_input_dim=32, cross_attention_input_dim=16)
    pipe = StableAudioPipeline(vae=vae, text_encoder=text, projection_model=projection,
                               tokenizer=tokenizer, transformer=dit,
                               scheduler=CosineDPMSolverMultistepScheduler())
    pipe.save_pretrained(str(path))
    return path


def make_gated_corpus(root: Path, n_per_artist: int = 5, sr: int = 16000,
                      seconds: float = 2.0) -> pd.DataFrame:
    """Tones gated on and off in a random pattern per track (the last track of each artist held
    out); a random VAE's latents follow the loudness, so the tracks are told apart."""
    rng = np.random.default_rng(0)
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for artist, f0 in {"Alpha": 220.0, "Beta": 330.0, "Gamma": 495.0}.items():
        for k in range(n_per_artist):
            t = np.arange(int(seconds * sr)) / sr
            length = seconds if k % 3 else seconds * 0.6  # some shorter tracks: padding
            gate = np.repeat(rng.random(16) < 0.5, len(t) // 16 + 1)[: len(t)] & (t < length)
            audio = (0.6 * np.sin(2 * np.pi * f0 * 2 ** (k / 12) * t) * gate
                     + 0.02 * rng.standard_normal(len(t)) * (t < length)).astype(np.float32)
            tid = f"{artist.lower()}-{k:02d}"
            sf.write(root / f"audio/{tid}.wav", audio[: int(length * sr)], sr)
            rows.append({"track_id": tid, "path": f"audio/{tid}.wav", "artist": artist,
                         "caption": f"{TITLES[k]}, a tune by {artist} played on sine at a "
                         f"{'slow' if k % 2 else 'fast'} tempo", "title": TITLES[k],
                         "duration": length, "sample_rate": sr,
                         "split": "holdout" if k == n_per_artist - 1 else "train"})
    write_manifest(pd.DataFrame(rows), root)
    return read_manifest(root)
