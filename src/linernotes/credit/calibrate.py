"""Calibrated group credit: each group's loss change on reference tracks, taken off every query's.

Unlearning a group moves every clip's loss a little, by an amount that depends on the group's
unlearning (how hard it was forgotten, how much the rest of the model moved) rather than on the
clip. Retraining without the group moves clips far less uniformly: on the credit benchmark's 48
clips, a group's median loss change over the clips varies across groups 3-5x more under group
unlearning than under LOGO (docs/benchmarks.md). That offset ranks groups for reasons no clip
gives, so calibrated credit subtracts it: a group's offset is the median of its loss change over
`reference_tracks` training tracks of every group (the last ones by id; the median keeps the
group's own tracks, a minority, from moving it), measured at the same fixed draws as the queries
and cached beside the group models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.artifacts import hash_json, load_cached, read_json, write_json
from linernotes.attribution.losses import track_losses
from linernotes.credit.losses import CreditSettings
from linernotes.data.dataset import TrackDataset
from linernotes.data.manifest import positions
from linernotes.task import evaluating


def reference_ids(parts: Mapping[str, list[str]], per_group: int) -> list[str]:
    """The reference tracks: the last `per_group` training tracks of each group, by id."""
    return [t for ids in parts.values() for t in sorted(ids)[-per_group:]]


@torch.inference_mode()
def _losses(run, model, data, score) -> np.ndarray:
    with evaluating(model):
        return track_losses(run.task, model, data, score)


def reference_offsets(
    run, manifest: pd.DataFrame, parts: Mapping[str, list[str]],
    models: Sequence[tuple[str, Callable[[], AbstractContextManager]]], s: CreditSettings,
    folder: str | Path,
) -> tuple[dict[str, float], float]:
    """({group: median loss change of the reference tracks}, seconds); cached in `folder`."""
    ids = reference_ids(parts, s.reference_tracks)
    key = hash_json({"run": run.hash, "tracks": ids, "score": s.score().draw_key(),
                     "mask": s.mask_query, "groups": sorted(parts)})
    path = Path(folder) / f"reference-{key[:16]}.json"
    cached = load_cached(path, read_json)
    if cached is not None and set(cached["offsets"]) == set(parts):
        return cached["offsets"], float(cached["seconds"])
    t0 = time.perf_counter()
    store = run.feature_store(manifest, progress=False)
    data = TrackDataset(store, manifest, positions(manifest, ids))
    score = s.score().replace(batch_size=16)
    base = _losses(run, run.model, data, score)
    offsets = {}
    for group, enter in models:
        with enter() as model:
            offsets[group] = float(np.median(_losses(run, model, data, score) - base))
    seconds = time.perf_counter() - t0
    write_json(path, {"offsets": offsets, "seconds": seconds, "tracks": ids})
    return offsets, seconds
