"""Quality measures over embeddings: Fréchet distance and nearest-artist-centroid assignment.

Shared by the opt-out audit and the benchmarks: embeddings are (N, D) arrays (CLAP audio,
basic-pitch, ...), artists one label per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy import linalg

from linernotes.errors import LinernotesError


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` and `b` (float64).

    ||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½); when the matrix square root is not finite,
    complex or inaccurate (singular covariances, e.g. fewer rows than dimensions), `eps`·I is
    added to both covariances (the usual regularisation) and it is retried.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise LinernotesError(f"frechet_distance needs two (N, D) arrays of one D; got "
                              f"{a.shape} and {b.shape}.")
    if len(a) < 2 or len(b) < 2:
        raise LinernotesError("frechet_distance needs at least 2 rows in each set.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = _sqrtm(cov_a @ cov_b)
    if root is None:
        offset = eps * np.eye(len(cov_a))
        root = _sqrtm((cov_a + offset) @ (cov_b + offset))
        if root is None:
            raise LinernotesError("frechet_distance: the covariance product has no usable "
                                  "square root even after regularisation.")
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                  - 2.0 * np.trace(root))
    return max(value, 0.0)


def _sqrtm(m: np.ndarray, tol: float = 1e-4) -> np.ndarray | None:
    """Real part of sqrtm(m), or None if it is not finite, clearly complex or inaccurate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = linalg.sqrtm(m)
    if not np.isfinite(root).all():
        return None
    scale = max(1e-12, float(np.abs(m).max()))
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > 1e-3 * max(1.0, float(np.abs(root.real).max())):
            return None
        root = root.real
    if np.abs(root @ root - m).max() > tol * scale:
        return None
    return root


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def artist_centroids(embeddings: np.ndarray, artists: Sequence[str]) -> dict[str, np.ndarray]:
    """Unit-norm mean embedding per artist (artists sorted; rows without an artist skipped)."""
    emb = _unit(np.asarray(embeddings, np.float64))
    labels = np.asarray(["" if a is None else str(a) for a in artists], dtype=object)
    if len(labels) != len(emb):
        raise LinernotesError(f"{len(emb)} embeddings but {len(labels)} artist labels.")
    names = sorted({a for a in labels if a and a != "nan"})
    if not names:
        raise LinernotesError("No artist labels: centroids need the manifest's artist column.")
    return {a: _unit(emb[labels == a].mean(0)) for a in names}


def assign_artists(emb: np.ndarray, centroids: dict[str, np.ndarray]) -> np.ndarray:
    """The nearest centroid's artist (cosine) for each row of `emb`."""
    names = list(centroids)
    mat = np.stack([centroids[a] for a in names])
    sims = _unit(np.atleast_2d(np.asarray(emb, np.float64))) @ mat.T
    return np.asarray(names, dtype=object)[sims.argmax(1)]


def assignment_accuracy(
    emb: np.ndarray, artists: Sequence[str], centroids: dict[str, np.ndarray]
) -> tuple[float, float]:
    """Share of rows assigned to their own artist, and chance (1 / number of centroids)."""
    pred = assign_artists(emb, centroids)
    return float(np.mean(pred == np.asarray(artists, dtype=object))), 1.0 / len(centroids)


def leave_one_out_accuracy(embeddings: np.ndarray, artists: Sequence[str]) -> float:
    """Nearest-centroid accuracy where each row is left out of its own artist's centroid."""
    emb = _unit(np.asarray(embeddings, np.float64))
    labels = np.asarray(artists, dtype=object)
    names = sorted(set(labels))
    sums = {a: emb[labels == a].sum(0) for a in names}
    counts = {a: int((labels == a).sum()) for a in names}
    hits = 0
    for x, a in zip(emb, labels):
        sims = []
        for b in names:
            s, n = (sums[b] - x, counts[b] - 1) if b == a else (sums[b], counts[b])
            sims.append(-np.inf if n == 0 else float(_unit(s) @ x))
        hits += names[int(np.argmax(sims))] == a
    return hits / len(emb)
