"""The one retrain cache: a run's recipe retrained without some training tracks.

Leave-K-out, LDS, the opt-out audit and leave-one-artist-out (LOGO) all ask the same question of
a run: what would the model be without these tracks? `Retrainer` answers it once per question.
A retrain is keyed by exactly what it is trained from (the family's recipe, the manifest and the
final training settings: exclude list, seed, steps), kept in `<run>/retrains/<key>/` with a
record of what it left out and what it cost, resumed after a kill, and shared by every caller.
`budget` caps the retrains one invocation may start.

A derived run (an opt-out) is retrained from its recipe, which its config keeps: the tracks
removed along its chain of opt-outs stay out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from linernotes.artifacts import hash_json, read_json, write_json
from linernotes.config import require
from linernotes.errors import LinernotesError
from linernotes.run.folder import Layout, Run, load_run
from linernotes.training import CHECKPOINT, LOSS_LOG, TrainSettings, log_seconds

RECORD = "retrain.json"


class BudgetExhausted(LinernotesError):
    """The retraining budget of this invocation is used up (re-run to continue)."""


class Retrainer:
    """Retrains of one run's recipe without given tracks, cached under `root` (default
    `<run>/retrains`), at most `budget` started by this object."""

    def __init__(self, run: Run, manifest: pd.DataFrame, root: str | Path | None = None,
                 budget: int | None = None, progress: bool = False):
        require(budget is None or budget >= 0, "budget must be >= 0 (None = no limit).")
        self.run, self.manifest = run, manifest
        self.root = Path(root) if root is not None else run.retrains_dir
        self.budget, self.progress = budget, progress
        self.base = TrainSettings.from_dict(run.config["train"])
        self.ids = run.train_ids(manifest)
        self._known = set(self.ids)
        self.started = 0  # retrains started (not found finished) by this object

    def _exclude(self, exclude_ids: Sequence[str]) -> list[str]:
        ids = sorted({str(x) for x in exclude_ids})
        unknown = [x for x in ids if x not in self._known]
        if unknown:
            raise LinernotesError(f"Cannot retrain {self.run.path} without {unknown[:3]}: not "
                                  "among its training tracks (check the ids / the manifest).")
        if len(ids) >= len(self.ids):
            raise LinernotesError("Cannot retrain without every training track.")
        return ids

    def settings(self, exclude_ids: Sequence[str], seed: int | None = None,
                 steps: int | None = None) -> TrainSettings:
        """The recipe's training settings without `exclude_ids` (and the tracks the run never
        learned from), at `seed` and `steps` (default: the recipe's)."""
        gone = set(self.base.exclude) | set(self.run.removed_tracks()) | set(
            self._exclude(exclude_ids))
        changes: dict = {"exclude": tuple(sorted(gone))}
        if seed is not None:
            changes["seed"] = int(seed)
        if steps:
            changes["steps"] = int(steps)
        return self.base.replace(**changes)

    def key(self, exclude_ids: Sequence[str], seed: int | None = None,
            steps: int | None = None) -> str:
        """The cache key: hash of everything the retrain is trained from."""
        return hash_json({"family": self.run.family.name, "recipe": self.run.family.recipe_key(),
                          "manifest": self.run.manifest_hash,
                          "train": self.settings(exclude_ids, seed, steps).to_dict()})

    def folder(self, exclude_ids: Sequence[str], seed: int | None = None,
               steps: int | None = None) -> Path:
        return self.root / self.key(exclude_ids, seed, steps)

    def is_cached(self, exclude_ids: Sequence[str], seed: int | None = None) -> bool:
        return Layout(self.folder(exclude_ids, seed)).is_run

    def missing(self, requests: Sequence[tuple[Sequence[str], int | None]]) -> int:
        """How many distinct retrains of `requests` ((exclude ids, seed) pairs) are not cached."""
        return sum(not Layout(self.root / k).is_run
                   for k in {self.key(ids, seed) for ids, seed in requests})

    def __call__(self, exclude_ids: Sequence[str], seed: int | None = None,
                 steps: int | None = None) -> Run:
        """The run retrained without `exclude_ids` (from the cache, resumed, or trained now)."""
        folder = self.folder(exclude_ids, seed, steps)
        if Layout(folder).is_run:
            return load_run(folder, manifest=self.manifest)
        if self.budget is not None and self.started >= self.budget:
            raise BudgetExhausted(f"The retraining budget ({self.budget}) is used up.")
        self.started += 1
        s = self.settings(exclude_ids, seed, steps)
        resumed = (folder / CHECKPOINT).exists()
        t0 = time.perf_counter()
        self.run.family.retrain(self.manifest, folder, s, progress=self.progress)
        seconds = time.perf_counter() - t0
        if resumed:  # this call's wall clock covers only the part after the resume
            seconds = log_seconds(folder / LOSS_LOG)
        write_json(folder / RECORD, {
            "original": self.run.hash, "original_path": str(self.run.path),
            "excluded": self._exclude(exclude_ids), "seed": s.seed, "seconds": seconds,
            "resumed": resumed, "train": s.to_dict()})
        return load_run(folder, manifest=self.manifest)


def retrain_record(retrained: Run) -> dict:
    """What a cached retrain recorded: original run, excluded ids, seed, seconds."""
    path = retrained.path / RECORD
    return read_json(path) if path.exists() else {}


def retrain_seconds(retrained: Run) -> float:
    """Training seconds of a cached retrain (NaN when it recorded none)."""
    return float(retrain_record(retrained).get("seconds", math.nan))
