"""A torch Dataset over a FeatureStore: (features, mask, caption, track id, index)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from linernotes.data.features import FeatureStore


class TrackDataset(Dataset):
    """Tracks `rows` (manifest positions) of a FeatureStore; items are dicts.

    `features` is (n_frames, n_mels) float32 normalised, `mask` (n_frames,) bool, `index` the
    manifest position (stable across subsets, so noise and scores can be keyed by it).
    """

    def __init__(self, store: FeatureStore, manifest: pd.DataFrame, rows: Sequence[int]):
        self.store = store
        self.rows = np.asarray(rows, dtype=np.int64)
        self.captions = manifest["caption"].tolist()
        self.track_ids = manifest["track_id"].tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        i = int(self.rows[k])
        return {
            "features": torch.from_numpy(self.store.features(i)),
            "mask": torch.from_numpy(np.array(self.store.mask[i], dtype=bool)),
            "caption": self.captions[i],
            "track_id": self.track_ids[i],
            "index": i,
        }


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep strings as lists; `index` becomes a LongTensor."""
    return {
        "features": torch.stack([it["features"] for it in items]),
        "mask": torch.stack([it["mask"] for it in items]),
        "caption": [it["caption"] for it in items],
        "track_id": [it["track_id"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }


def split_rows(manifest: pd.DataFrame, split: str, exclude: Sequence[str] = ()) -> np.ndarray:
    """Manifest positions of a split, without the excluded track ids."""
    keep = (manifest["split"] == split) & ~manifest["track_id"].isin(list(exclude))
    return np.flatnonzero(keep.to_numpy())
