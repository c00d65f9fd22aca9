"""Attribution by unlearning: unlearn the query, then each training track's loss increase.

score(z_i) = log L(z_i; θ_unlearned) − log L(z_i; θ0) (or the plain difference, the papers'
score, with `ScoreSettings(kind="delta")`), both losses at the same fixed draws. The loss at θ0 is
computed once per (run, draws) and cached; several queries share it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import Dataset

from linernotes.artifacts import hash_json
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.losses import ScoreSettings, score_of, sharded_losses
from linernotes.attribution.query import Query
from linernotes.curvature import Fisher
from linernotes.task import Task
from linernotes.unlearning.newton import UnlearnSettings, applied, unlearn_query


class UnlearningAttributor(Attributor):
    """Scores training tracks for queries by unlearning; owns the cached baseline losses."""

    method = "unlearning"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], fisher: Fisher, cache_dir: str | Path,
        score: ScoreSettings | None = None, progress: bool = True,
        unlearn: UnlearnSettings | None = None,
    ):
        super().__init__(run_hash, manifest, train_ids)
        self.task, self.model, self.train = task, model, train
        self.fisher, self.cache_dir = fisher, Path(cache_dir)
        self.score = score or ScoreSettings()
        self.unlearn = unlearn or UnlearnSettings()
        self.progress = progress
        self._before: np.ndarray | None = None

    def _provenance(self) -> dict:
        return {"run": self.run_hash, "tracks": hash_json(self.train_ids)}

    def baseline(self) -> np.ndarray:
        """Every training track's loss at θ0 (computed once, then read from the cache)."""
        if self._before is None:
            key = hash_json({**self._provenance(), **self.score.draw_key()})
            self._before = sharded_losses(
                self.task, self.model, self.train, self.train_ids, self.score,
                self.cache_dir / f"baseline-{key}", self._provenance(), "baseline", self.progress,
            )
        return self._before

    def scores(self, query: Query, work: Path, settings: UnlearnSettings | None = None) -> Scored:
        """Unlearn `query` (with `settings`, default the attributor's), score every track."""
        settings = settings or self.unlearn
        before = self.baseline()
        t0 = time.perf_counter()
        delta, record = unlearn_query(self.task, self.model, query, self.fisher, settings,
                                      n_train=len(self.train_ids))
        t1 = time.perf_counter()
        key = hash_json([settings.to_dict(), record["alpha"], self.score.draw_key()])
        with applied(self.model, delta):
            after = sharded_losses(
                self.task, self.model, self.train, self.train_ids, self.score,
                Path(work) / f"{query.key}-{key}",
                {**self._provenance(), "query": query.key, "unlearn": settings.to_dict()},
                f"score {query.key}", self.progress,
            )
        t2 = time.perf_counter()
        record.update({"unlearn": settings.to_dict(), "score": self.score.to_dict(),
                       "seconds_unlearn": t1 - t0, "seconds_score": t2 - t1})
        return Scored(score_of(before, after, self.score.kind), record,
                      {"loss_before": before, "loss_after": after})
