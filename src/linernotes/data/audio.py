"""Audio I/O: read any soundfile-readable file as mono float32 at a target rate; write FLAC/WAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from linernotes.artifacts import atomic_path
from linernotes.errors import LinernotesError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read `path`, downmix to mono and resample to `sample_rate`; float32 in [-1, 1]."""
    path = Path(path)
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise LinernotesError(f"Cannot read audio file {path}: {exc}") from exc
    audio = audio.mean(axis=1)
    if sr != sample_rate and len(audio):
        import librosa

        audio = librosa.resample(audio, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def loudness_normalise(audio: np.ndarray, target_rms_db: float = -20.0) -> np.ndarray:
    """Scale to a target RMS level (dBFS), then keep the peak below 0.99."""
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if len(audio) else 0.0
    if rms < 1e-8:
        return audio
    out = audio * (10 ** (target_rms_db / 20) / rms)
    peak = float(np.abs(out).max())
    if peak > 0.99:
        out = out * (0.99 / peak)
    return out.astype(np.float32)


def write_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono audio atomically; the format follows the suffix (.flac or .wav), 16-bit."""
    path = Path(path)
    fmt = {".flac": "FLAC", ".wav": "WAV"}.get(path.suffix.lower())
    if fmt is None:
        raise LinernotesError(f"Cannot write {path}: use a .flac or .wav name.")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1, 1), sample_rate, format=fmt, subtype="PCM_16")
