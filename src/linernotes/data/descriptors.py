"""Audio descriptors that need no model: chroma + MFCC statistics (the `chroma-mfcc` similarity,
and the audio embedding of families without an audio encoder)."""

from __future__ import annotations

import numpy as np

CHROMA_MFCC_DIM = 2 * (12 + 20)


def chroma_mfcc(audio: np.ndarray, sample_rate: int, n_fft: int = 2048,
                hop_length: int = 512) -> np.ndarray:
    """Means and stds over time of librosa chroma (12) and MFCC (20): (CHROMA_MFCC_DIM,)."""
    import librosa

    y = np.asarray(audio, np.float32)
    if len(y) < n_fft:
        y = np.pad(y, (0, n_fft - len(y)))
    chroma = librosa.feature.chroma_stft(y=y, sr=sample_rate, n_fft=n_fft, hop_length=hop_length)
    mfcc = librosa.feature.mfcc(y=y, sr=sample_rate, n_mfcc=20, n_fft=n_fft,
                                hop_length=hop_length)
    parts = [chroma.mean(1), chroma.std(1), mfcc.mean(1), mfcc.std(1)]
    return np.concatenate(parts).astype(np.float32)
