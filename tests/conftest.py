"""Shared fixtures: tiny synthetic corpora of real audio files, made on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from linernotes.data.manifest import read_manifest, write_manifest
from linernotes.models.mel import FeatureSettings

TITLES = ["Morning", "River", "Lantern", "Harbour", "Orchard", "Meadow", "Falcon", "Ember"]
TINY_FEATURES = FeatureSettings(seconds=2.0, n_fft=512, hop_length=500, n_mels=16, fmax=4000.0)


def make_tone_corpus(root: Path, n_per_artist: int = 4, sr: int = 16000) -> pd.DataFrame:
    """Write WAVs of tones whose pitch set depends on the artist, and their manifest."""
    rng = np.random.default_rng(0)
    artists = {"Alpha": 220.0, "Beta": 330.0, "Gamma": 495.0}
    rows = []
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for artist, f0 in artists.items():
        for k in range(n_per_artist):
            seconds = [0.7, 1.2, 1.6, 2.5][k % 4]
            t = np.arange(int(seconds * sr)) / sr
            f = f0 * 2 ** (k / 12)  # a distinct pitch per track
            audio = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(len(t))
            tid = f"{artist.lower()}-{k:02d}"
            path = f"audio/{tid}.wav"
            sf.write(root / path, audio.astype(np.float32), sr)
            rows.append({
                "track_id": tid, "path": path, "artist": artist, "instrument": "sine",
                "caption": f"{TITLES[k % len(TITLES)]}, a tune by {artist} played on sine at a "
                f"{'slow' if k % 2 else 'fast'} tempo",
                "title": TITLES[k % len(TITLES)],
                "duration": len(t) / sr, "sample_rate": sr,
                "split": "holdout" if k == n_per_artist - 1 else "train",
            })
    write_manifest(pd.DataFrame(rows), root)
    return read_manifest(root)


@pytest.fixture
def tone_corpus(tmp_path: Path) -> pd.DataFrame:
    return make_tone_corpus(tmp_path / "corpus")


def make_tiny_run(root: Path, n_per_artist: int = 5, steps: int = 4):
    """A tone corpus under `root/corpus` and a tiny reference run (`root/run`) trained on it for a
    few steps (enough for every method to run, not to learn): (run, manifest)."""
    from linernotes.models.clap import ClapSettings
    from linernotes.models.denoiser import DenoiserConfig
    from linernotes.models.reference import train
    from linernotes.training import TrainSettings

    make_tone_corpus(root / "corpus", n_per_artist=n_per_artist)
    manifest = read_manifest(root / "corpus")
    run = train(
        manifest, root / "run",
        TrainSettings(steps=steps, batch_size=8, warmup=2, checkpoint_every=100),
        DenoiserConfig(layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=32,
                       time_proj_dim=32, max_words=12),
        TINY_FEATURES,
        clap_settings=ClapSettings(dim=16, hidden=24, layers=1, steps=4, batch_size=8),
        progress=False,
    )
    return run, manifest


def make_tiny_musicgen(folder: Path, sample_rate: int = 8000, channels: int = 1) -> Path:
    """A tiny random `MusicgenForConditionalGeneration` of the real classes (tiny T5, EnCodec
    and decoder; 2 codebooks per channel of 64 codes at 50 frames/s) with a word-level tokenizer
    over the tone corpus's captions, saved with `save_pretrained` as a user's folder would be."""
    from linernotes.models.musicgen.shaped import save_random_musicgen

    words = [*" ".join(TITLES).split(), "a", "tune", "by", "alpha", "beta", "gamma", "played",
             "on", "sine", "at", "slow", "fast", "tempo", ","]
    # 64 codes at 50 frames/s: 300 bit/s per codebook, so 0.6 kbit/s gives 2 codebooks
    return save_random_musicgen(
        folder, words,
        text=dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8),
        codec=dict(sampling_rate=sample_rate, num_filters=4, hidden_size=16, codebook_size=64,
                   codebook_dim=16, upsampling_ratios=[8, 5, 4], num_lstm_layers=1,
                   target_bandwidths=[0.6]),
        decoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                     num_codebooks=2 * channels, vocab_size=64, max_position_embeddings=256),
        channels=channels)


def assert_a_reload_reads_the_captions_kept(path: Path, captions: list[str], text) -> None:
    """A run loaded again reads, byte for byte, the caption encodings an earlier load of it made
    and kept in its cache folder (`text(task, captions)`: the Task's conditioning of them)."""
    import torch

    from linernotes.run import load_run

    first = load_run(path)
    for part in first.task.captions.folder.glob("part-*.pt"):
        part.unlink()
    want = text(first.task, captions)
    first.task.captions.save()
    again = load_run(path)

    def never(caption):
        raise AssertionError(f"encoded {caption!r} again")

    again.task.captions.encode = never
    got = text(again.task, captions)
    for w, g in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got)), strict=True):
        assert w.dtype == g.dtype and torch.equal(w, g)
