"""Audio embeddings of training tracks and queries in the run's family's embedding space (the
reference family: its CLAP), the training tracks' cached per run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from linernotes.artifacts import atomic_path, hash_json, load_cached
from linernotes.data.features import FeatureStore


def audio_embeddings(run, features: torch.Tensor, mask: torch.Tensor,
                     batch: int = 64) -> np.ndarray:
    """Unit-norm audio embeddings (N, D) of normalised features (N, T, ...)."""
    out = [run.family.embed_audio(features[i : i + batch].float(), mask[i : i + batch])
           for i in range(0, len(features), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def track_embeddings(run, store: FeatureStore, rows: Sequence[int], batch: int = 64) -> np.ndarray:
    """Audio embeddings of manifest rows, cached beside the run (keyed by run and rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    path = run.cache_dir / f"clap-audio-{hash_json([run.hash, rows.tolist()])}.npy"
    cached = load_cached(path, np.load)
    if cached is not None and cached.shape[0] == len(rows):
        return cached
    parts = []
    for lo in range(0, len(rows), batch):
        r = rows[lo : lo + batch]
        feats = torch.from_numpy(np.stack([store.features(int(i)) for i in r]))
        mask = torch.from_numpy(np.asarray(store.mask[r], dtype=bool))
        parts.append(audio_embeddings(run, feats, mask, batch))
    emb = np.concatenate(parts)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, emb)
    return emb
