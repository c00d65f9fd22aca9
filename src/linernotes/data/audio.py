"""Audio I/O: read any soundfile-readable file as float32 at a target rate (mono, or the channel
count a model expects); write FLAC/WAV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from linernotes.artifacts import atomic_path
from linernotes.errors import LinernotesError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def load_audio(path: str | Path, sample_rate: int, channels: int | None = None) -> np.ndarray:
    """Read `path` resampled to `sample_rate`, float32 in [-1, 1]: mono (n,) by default, or
    (channels, n) with mono duplicated to stereo and stereo averaged to mono as needed."""
    path = Path(path)
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise LinernotesError(f"Cannot read audio file {path}: {exc}") from exc
    audio = audio.T  # (file channels, n)
    if channels is None or channels != audio.shape[0]:
        audio = audio.mean(axis=0, keepdims=True)
        if channels is not None:
            audio = np.repeat(audio, channels, axis=0)
    if sr != sample_rate and audio.shape[1]:
        import librosa

        audio = librosa.resample(audio, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return audio[0] if channels is None else audio


def mono(audio: np.ndarray) -> np.ndarray:
    """(n,) audio as it is; (n, channels) averaged to (n,)."""
    audio = np.asarray(audio, np.float32)
    return audio.mean(axis=1) if audio.ndim == 2 else audio


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
    """Write audio, (n,) mono or (n, channels), atomically; the format follows the suffix (.flac
    or .wav), 16-bit."""
    path = Path(path)
    fmt = {".flac": "FLAC", ".wav": "WAV"}.get(path.suffix.lower())
    if fmt is None:
        raise LinernotesError(f"Cannot write {path}: use a .flac or .wav name.")
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(audio, -1, 1), sample_rate, format=fmt, subtype="PCM_16")
