"""Attribution by unlearning: unlearn the query, then each training track's loss increase.

score(z_i) = log L(z_i; θ_unlearned) − log L(z_i; θ0) (or the plain difference, the papers'
score, with `ScoreSettings(kind="delta")`), both losses at the same fixed draws. The loss at θ0 is
computed once per (run, draws) and cached; several queries share it.

Two-stage scoring (`ScoreSettings.candidates_for`: M, fewer than the training tracks; the default
from TWO_STAGE_FROM tracks): the same unlearned model scores every track at `coarse_timesteps` (a
few, spread over the schedule), then only the M best of that first stage at every timestep. The
table's `exact` column marks those M; they rank first, by their exact score (`scores.score_table`),
the rest after them by their coarse score (`coarse_score` holds every track's). Each stage is
sharded and resumable like one pass. Two-stage scoring never needs every track's exact baseline
(a one-off as costly as an exact pass): only the first stage's (at its few timesteps), and the
candidates' exact losses at θ0, scored per query in the same batches as their losses after.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import Dataset, Subset

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
        self.score = (score or ScoreSettings()).on(task, model)
        self.unlearn = unlearn or UnlearnSettings()
        self.progress = progress
        self._baselines: dict[str, np.ndarray] = {}  # by draw key
        self._last_unlearned: tuple = (None, None)  # (query, settings), (delta, record)

    def _provenance(self) -> dict:
        return {"run": self.run_hash, "tracks": hash_json(self.train_ids)}

    def baseline(self) -> np.ndarray:
        """Every training track's loss at θ0 (computed once, then read from the cache)."""
        return self.baseline_at(self.score)

    def baseline_at(self, score: ScoreSettings) -> np.ndarray:
        """Every training track's loss at θ0 under `score`'s draws: computed once (on disk,
        shared by every attributor of the run), then kept for this attributor's queries."""
        score = score.on(self.task, self.model)  # keyed by the precision it runs in
        key = hash_json({**self._provenance(), **score.draw_key()})
        if key not in self._baselines:
            self._baselines[key] = sharded_losses(
                self.task, self.model, self.train, self.train_ids, score,
                self.cache_dir / f"baseline-{key}", self._provenance(), "baseline",
                self.progress)
        return self._baselines[key]

    def unlearned(self, query: Query, settings: UnlearnSettings) -> tuple[dict, dict]:
        """The unlearning step of `query` (weight delta, record); the last one is kept, so the
        same query scored again under other score settings is not unlearned twice."""
        content = hashlib.sha1(query.features.float().contiguous().numpy().tobytes()
                               + query.mask.numpy().tobytes() + query.caption.encode())
        key = (query.key, content.hexdigest(), hash_json(settings.to_dict()))
        if self._last_unlearned[0] != key:
            delta, record = unlearn_query(self.task, self.model, query, self.fisher, settings,
                                          n_train=len(self.train_ids))
            self._last_unlearned = (key, (delta, record))
        delta, record = self._last_unlearned[1]
        return delta, dict(record)

    def scores(self, query: Query, work: Path, settings: UnlearnSettings | None = None) -> Scored:
        """Unlearn `query` (with `settings`, default the attributor's), score every track."""
        settings = settings or self.unlearn
        n = len(self.train_ids)
        m = self.score.candidates_for(n)
        if m >= n:
            before = self.baseline()
        else:  # the first stage's (a one-off, as the exact one is): not in the timed passes
            self.baseline_at(self.score.coarse())
        t0 = time.perf_counter()
        delta, record = self.unlearned(query, settings)
        t1 = time.perf_counter()
        key = hash_json([settings.to_dict(), record["alpha"], self.score.draw_key()])
        provenance = {**self._provenance(), "query": query.key, "unlearn": settings.to_dict()}
        if m >= n:  # every track at every timestep
            with applied(self.model, delta):
                after = sharded_losses(
                    self.task, self.model, self.train, self.train_ids, self.score,
                    Path(work) / f"{query.key}-{key}", provenance, f"score {query.key}",
                    self.progress)
            columns = {"loss_before": before, "loss_after": after,
                       "exact": np.ones(n, dtype=bool)}
            scores = score_of(before, after, self.score.kind)
        else:
            scores, columns = self._two_stage(query, work, key, provenance, delta, m, record)
        t2 = time.perf_counter()
        record.update({"unlearn": settings.to_dict(), "score": self.score.to_dict(),
                       "seconds_unlearn": t1 - t0, "seconds_score": t2 - t1})
        return Scored(scores, record, columns)

    def _two_stage(self, query: Query, work: Path, key: str, provenance: dict, delta: dict,
                   m: int, record: dict) -> tuple[np.ndarray, dict]:
        """Coarse scores of every track, exact scores of the first stage's top m: their losses
        at θ0 and unlearned, each in one pass over the same batches (a paired difference that
        does not depend on which queries came before)."""
        coarse = self.score.coarse()
        t0 = time.perf_counter()
        with applied(self.model, delta):
            after_c = sharded_losses(
                self.task, self.model, self.train, self.train_ids, coarse,
                Path(work) / f"{query.key}-{key}-coarse{coarse.timesteps}",
                provenance, f"score {query.key} (first stage)", self.progress)
        coarse_scores = score_of(self.baseline_at(coarse), after_c, coarse.kind)
        top = np.sort(np.argsort(-coarse_scores, kind="stable")[:m])
        subset, ids = Subset(self.train, top.tolist()), [self.train_ids[i] for i in top]
        folder = Path(work) / f"{query.key}-{key}-top{m}-{hash_json(top.tolist())[:8]}"
        t1 = time.perf_counter()
        before_top = sharded_losses(
            self.task, self.model, subset, ids, self.score, Path(f"{folder}-before"),
            self._provenance(), f"score {query.key} (top {m}, before)", self.progress)
        t2 = time.perf_counter()
        with applied(self.model, delta):
            after_top = sharded_losses(
                self.task, self.model, subset, ids, self.score, folder, provenance,
                f"score {query.key} (top {m})", self.progress)
        scores = coarse_scores.copy()
        scores[top] = score_of(before_top, after_top, self.score.kind)
        before, after = np.full(len(scores), np.nan), np.full(len(scores), np.nan)
        before[top], after[top] = before_top, after_top
        exact = np.zeros(len(scores), dtype=bool)
        exact[top] = True
        record.update({"two_stage": {"candidates": m, "coarse_timesteps": coarse.timesteps,
                                     "seconds_first": t1 - t0,
                                     "seconds_baseline": t2 - t1,
                                     "seconds_second": time.perf_counter() - t2}})
        return scores, {"loss_before": before, "loss_after": after, "exact": exact,
                        "coarse_score": coarse_scores}
