"""Report figures with matplotlib (Agg): log-mel spectrograms, score distribution, correlations."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import sparse

from linernotes.artifacts import atomic_path

PAPER = "#fbf8f1"
INK = "#2b2621"
COLOURS = ["#8a2c1d", "#1f5f7a", "#c28a1e", "#4d7a3a", "#6b4b8a", "#5c5c5c"]
SPEC_CMAP = "magma"
TOP_DB = 80.0


def log_mel(
    audio: np.ndarray, sample_rate: int, n_mels: int = 80, max_frames: int | None = None
) -> np.ndarray:
    """Log-mel power spectrogram in dB relative to the clip's peak, shape (n_mels, frames).

    `max_frames` widens the hop for long audio (a picture needs no finer time resolution).
    """
    n_fft = 2048 if sample_rate > 24000 else 1024
    hop = n_fft // 4
    if max_frames:
        hop = max(hop, -(-len(audio) // max_frames))
    audio = np.asarray(audio, dtype=np.float32)
    audio = np.pad(audio, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(audio))))
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop]
    # periodic Hann window
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    spectrum = np.fft.rfft(frames * window, axis=1)
    power = spectrum.real**2 + spectrum.imag**2
    mel = np.asarray(mel_filters(sample_rate, n_fft, n_mels) @ power.T)
    db = 10 * np.log10(np.maximum(mel, 1e-12) / max(float(mel.max()), 1e-12))
    return np.maximum(db, -TOP_DB)


@functools.lru_cache(maxsize=16)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> sparse.csr_matrix:
    """Triangular mel filter bank (HTK mel scale, 0 Hz to Nyquist), (n_mels, n_fft//2+1).

    Sparse: each filter spans a few bins, and a dense BLAS product is slow on a busy machine.
    """
    hz = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower = (bins[None, :] - hz[:-2, None]) / np.maximum(hz[1:-1] - hz[:-2], 1e-9)[:, None]
    upper = (hz[2:, None] - bins[None, :]) / np.maximum(hz[2:] - hz[1:-1], 1e-9)[:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return sparse.csr_matrix((weights * (2.0 / (hz[2:] - hz[:-2]))[:, None]).astype(np.float32))


def hz_to_mel(hz: float | np.ndarray) -> float | np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_to_hz(mel: float | np.ndarray) -> float | np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def _pool_columns(spec: np.ndarray, width: int) -> np.ndarray:
    """Average adjacent frames so the image is at most `width` columns wide."""
    frames = spec.shape[1]
    if frames <= width:
        return spec
    edges = np.linspace(0, frames, width + 1).astype(int)
    return np.add.reduceat(spec, edges[:-1], axis=1) / np.diff(edges)


def spectrogram_thumbnail(
    audio: np.ndarray, sample_rate: int, path: str | Path, width: int = 320
) -> Path:
    """A small log-mel image (no axes, low frequencies at the bottom) for a track listing."""
    spec = _pool_columns(log_mel(audio, sample_rate, n_mels=64, max_frames=2 * width), width)
    index = np.round((spec[::-1] + TOP_DB) / TOP_DB * 255).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(_palette(SPEC_CMAP))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path


@functools.lru_cache(maxsize=4)
def _palette(cmap: str) -> list[int]:
    rgb = matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3]
    return [int(v) for v in np.round(rgb * 255).ravel()]


def spectrogram_figure(
    audio: np.ndarray, sample_rate: int, path: str | Path, size: tuple[float, float] = (9, 2.6)
) -> Path:
    """A labelled log-mel spectrogram (time in s, frequency in Hz, dB colour bar); inches."""
    spec = log_mel(audio, sample_rate, n_mels=96, max_frames=1000)
    seconds = len(audio) / sample_rate
    w, h = size  # fixed margins in inches: no layout engine (3x faster for many clips)
    fig = _figure(size)
    ax = fig.add_axes((0.75 / w, 0.5 / h, 1 - 1.7 / w, 1 - 0.62 / h))
    cax = fig.add_axes((1 - 0.85 / w, 0.5 / h, 0.12 / w, 1 - 0.62 / h))
    img = ax.imshow(
        spec,
        origin="lower",
        aspect="auto",
        cmap=SPEC_CMAP,
        vmin=-TOP_DB,
        vmax=0,
        extent=(0, seconds, 0, spec.shape[0]),
        interpolation="nearest",
    )
    hz = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), spec.shape[0]))
    ticks = [t for t in (250, 500, 1000, 2000, 4000, 8000, 16000) if t < sample_rate / 2]
    ax.set_yticks([np.searchsorted(hz, t) for t in ticks])
    ax.set_yticklabels([f"{t // 1000}k" if t >= 1000 else str(t) for t in ticks])
    ax.set_xlabel("time (s)", color=INK)
    ax.set_ylabel("Hz (mel scale)", color=INK)
    _style(ax)
    cbar = fig.colorbar(img, cax=cax)
    cbar.set_label("dB", color=INK)
    cbar.ax.tick_params(labelsize=8, colors=INK)
    return _save(fig, path)


def distribution_plot(
    profiles: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: str | Path, n_queries: int
) -> Path:
    """Normalised score vs rank, mean ± std over queries, log-log; one panel per normalisation.

    `profiles[method][normalisation] = (mean, std)` over ranks 1..N.
    """
    norms = list(dict.fromkeys(n for p in profiles.values() for n in p))
    fig = _figure((4.6 * len(norms), 3.4), constrained=True)
    axes = fig.subplots(1, len(norms), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        curves = {m: p[norm] for m, p in profiles.items() if norm in p}
        positive = [c[0][c[0] > 0].min() for c in curves.values() if (c[0] > 0).any()]
        floor = 0.5 * min(positive) if positive else 1e-12  # where mean − std ≤ 0 on log axes
        for colour, (method, (mean, std)) in zip(_cycle(COLOURS), curves.items()):
            keep = _log_spaced(len(mean), 400)
            r, m, s = np.arange(1, len(mean) + 1)[keep], mean[keep], std[keep]
            ok = m > 0
            ax.plot(r[ok], m[ok], color=colour, lw=1.8, label=method)
            lo = np.where(m - s > 0, m - s, floor)
            ax.fill_between(r[ok], lo[ok], (m + s)[ok], color=colour, alpha=0.18, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        n_ranks = max(len(c[0]) for c in curves.values()) if curves else 1
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(
            ticker.FuncFormatter(lambda v, _: f"{v:g}") if n_ranks <= 10 else ticker.NullFormatter()
        )
        ax.set_xlabel("rank", color=INK)
        ax.set_ylabel(_NORM_LABELS.get(norm, norm), color=INK)
        ax.set_title(
            f"{norm} (mean ± std, {n_queries} quer{'y' if n_queries == 1 else 'ies'})",
            fontsize=10,
            color=INK,
        )
        _style(ax)
        ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


_NORM_LABELS = {"min-max": "min-max normalised score", "softmax": "share of credit (softmax)"}


def correlation_plot(matrices: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Heat maps of method × method correlation matrices (e.g. Pearson and Spearman)."""
    fig = _figure((3.9 * len(matrices), 3.5), constrained=True)
    axes = fig.subplots(1, len(matrices), squeeze=False)
    for ax, (name, mat) in zip(axes[0], matrices.items()):
        values = mat.to_numpy(dtype=np.float64)
        img = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
        labels = list(mat.columns)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=9)
        for i in range(len(labels)):
            for j in range(len(labels)):
                v = values[i, j]
                text = "—" if np.isnan(v) else f"{v:.2f}"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if abs(np.nan_to_num(v)) > 0.6 else INK,
                )
        ax.set_title(name, fontsize=10, color=INK)
        ax.tick_params(colors=INK)
        fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=8)
    return _save(fig, path)


def _log_spaced(n: int, k: int) -> np.ndarray:
    """At most about `k` indices into range(n), evenly spaced on a log axis (all when n ≤ k)."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.geomspace(1, n, k).astype(int) - 1)


def _cycle(items: list[str]):
    while True:
        yield from items


def _style(ax) -> None:
    ax.set_facecolor(PAPER)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8, colors=INK)


def _figure(size: tuple[float, float], constrained: bool = False) -> Figure:
    """A figure outside pyplot (no global state: safe to draw in several threads)."""
    fig = Figure(
        figsize=size, dpi=100, facecolor=PAPER, layout="constrained" if constrained else None
    )
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Render the figure once and write it as a 256-colour PNG (a third of the RGBA size)."""
    path = Path(path)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    image = Image.fromarray(np.ascontiguousarray(rgb)).quantize(256)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=True)
    return path
