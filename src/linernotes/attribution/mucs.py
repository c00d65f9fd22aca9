"""MUCS (SPEC §6, §8): attribution by mirrored unlearning of the query, scored by loss skew.

A copy of the model is fine-tuned on `L_retain − λ·clamp(L_query, max=L_null)` (λ = 0.2): descent
on training batches, ascent on the query bounded by L_null, the loss of an untrained model of the
same architecture; it stops once the query's (clamped) loss reaches (1 − tol)·L_null. This is the
opt-out method `unlearning/mirrored.py` on the shared trainer, with a forget set made of the query
(`QueryDataset`) instead of training tracks. Each training track is then scored by the normalised
difference `(L_u − L_t) / (L_u + L_t + ε)` of its loss under the unlearned (L_u) and the original
(L_t) model at the same fixed draws our other methods use (`ScoreSettings`); L_t is the cached
baseline shared with `unlearning` (never recomputed).

The normalised difference is `(r − 1) / (r + 1)` of the ratio r = L_u / L_t (ε aside), a
monotone function of r, exactly as linernotes' default "log-ratio" score (log r) is: the two
order training tracks identically. MUCS and our attribution by unlearning therefore differ in
*how the model is unlearned* (fine-tuned, floored ascent with retain replay vs one
Fisher-preconditioned Newton step), not in the scoring rule; `score.kind` is not used here.

M_U: with `mask_padding` (default on) the query's ascent term and L_null count real frames only;
the retain terms follow the run's own training loss. A training-track query (`train:<id>`) is left
out of the retain batches. The unlearned copy lives in memory; its optimiser checkpoint sits in
`<out>/.work` while the query is being scored (so a killed run resumes) and is removed after;
the step log and the scoring shards stay.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Subset

from linernotes.artifacts import hash_json
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.losses import ScoreSettings, sharded_losses, track_losses
from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.config import require
from linernotes.run import Run
from linernotes.training import LOSS_LOG
from linernotes.unlearning.mirrored import Mirrored, MirroredSettings
from linernotes.unlearning.trainer import RETAIN_STREAM, diffusion_terms, fit_method, method_context

EPS = 1e-12  # ε of the normalised difference


def normalised_difference(before: np.ndarray, after: np.ndarray, eps: float = EPS) -> np.ndarray:
    """MUCS's score (L_u − L_t) / (L_u + L_t + ε): in [−1, 1] for non-negative losses."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    return (after - before) / (after + before + eps)


@dataclasses.dataclass(frozen=True)
class MucsSettings(MirroredSettings):
    """Mirrored unlearning of one query: λ, tol, L_null (0 = estimate), step cap and rate.

    `batch_size` is the number of (t, noise) draws of the query per step; `mask_padding` is M_U.
    """

    mask_padding: bool = True

    def validate(self) -> None:
        super().validate()
        require(not self.stop_at_gap, "stop_at_gap does not apply to mucs (a query has no "
                "holdout gap); its stopping rule is the query loss reaching (1 - tol) x L_null.")


class QueryDataset(Dataset):
    """Queries as a Dataset of TrackDataset-style items (`index` −1: not a manifest row)."""

    def __init__(self, queries: list[Query]):
        self.queries = list(queries)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, k: int) -> dict:
        q = self.queries[k]
        return {"features": q.features.float(), "mask": q.mask.bool(), "caption": q.caption,
                "track_id": q.key, "index": -1}


class QueryMirrored(Mirrored):
    """Mirrored unlearning whose retain terms are the run's training loss (M_U on the query only).
    Not an opt-out method, so not registered."""

    def retain_terms(self, model, task, batch: dict, step: int) -> torch.Tensor:
        masked = bool(self.ctx.run.config.get("train", {}).get("mask_padding", False))
        return diffusion_terms(task, model, batch, self.s.seed, step, RETAIN_STREAM, masked,
                               self.s.cond_dropout)


def query_fingerprint(query: Query) -> str:
    """Hash of the query's content (so a different clip under the same key is never mixed)."""
    h = hashlib.sha256()
    for part in (query.features.float().contiguous().numpy(), query.mask.bool().numpy()):
        h.update(part.tobytes())
    h.update(query.caption.encode())
    return h.hexdigest()[:16]


class MucsAttributor(Attributor):
    """Scores training tracks for queries by mirrored unlearning (MUCS)."""

    method = "mucs"

    def __init__(
        self, run: Run, manifest: pd.DataFrame, train: Dataset, train_ids: list[str],
        cache_dir: str | Path, settings: MucsSettings | None = None,
        score: ScoreSettings | None = None, progress: bool = True,
    ):
        super().__init__(run.hash, manifest, train_ids)
        self.run, self.train = run, train
        self.settings = settings or MucsSettings()
        self.score = (score or ScoreSettings()).on(run.task, run.model)
        self.progress = progress
        # owns the baseline losses at θ0: the same cache folder as the `unlearning` method
        self.base = UnlearningAttributor(run.task, run.model, run.hash, manifest, train,
                                         train_ids, None, cache_dir, self.score, progress)

    def _retain(self, query: Query) -> tuple[Dataset, bool]:
        """The training set, without the query if it is a training track."""
        if query.track_id is None or query.track_id not in self.train_ids:
            return self.train, False
        keep = [i for i, t in enumerate(self.train_ids) if t != query.track_id]
        return Subset(self.train, keep), True

    def scores(self, query: Query, work: Path, settings: MucsSettings | None = None) -> Scored:
        """Unlearn `query` by mirrored ascent, score every training track."""
        s = settings or self.settings
        before = self.base.baseline()
        key = hash_json({"run": self.run.hash, "query": query.key,
                         "content": query_fingerprint(query), "mucs": s.to_dict(),
                         "draws": self.score.draw_key()})
        work = Path(work) / f"{query.key}-mucs-{key}"
        t0 = time.perf_counter()
        forget = QueryDataset([query])
        retain, left_out = self._retain(query)
        ctx = method_context(self.run, s.group, forget, retain, None, self.manifest,
                             progress=self.progress)
        impl = QueryMirrored(s, ctx)
        impl.prepare()
        # the query's loss at the scoring draws, masked as in its ascent term (M_U)
        draws = self.score.replace(mask_train=s.mask_padding)
        query_before = float(track_losses(self.run.task, ctx.model, forget, draws)[0])
        result = fit_method(impl, work / "unlearn", key, self.progress, f"mucs {query.key}")
        query_after = float(track_losses(self.run.task, ctx.model, forget, draws)[0])
        t1 = time.perf_counter()
        after = sharded_losses(
            self.run.task, ctx.model, self.train, self.train_ids, self.score, work / "losses",
            {**self.base._provenance(), "query": query.key, "mucs": key},
            f"score {query.key}", self.progress,
        )
        t2 = time.perf_counter()
        resumed = len(result.losses) < result.steps
        record = {
            "mucs": s.to_dict(),
            "score": self.score.to_dict(), "score_rule": "(L_u - L_t) / (L_u + L_t + eps)",
            "eps": EPS, "null_loss": impl.null, "steps": result.steps,
            "stopped": result.stopped,
            "stop_reason": impl.stop_reason or ("stopped before a resume" if result.stopped
                                                else f"step cap {s.steps} reached"),
            "resumed": resumed, "last_terms": impl.last,
            "query_loss": {"before": query_before, "after": query_after,
                           "masked": s.mask_padding},
            "query_left_out_of_retain": left_out, "n_retain": len(retain),
            "seconds_unlearn": t1 - t0, "seconds_score": t2 - t1,
        }
        # done: keep the step log, drop the copy's weights and optimiser state
        log = work / "unlearn" / LOSS_LOG
        if log.exists():
            shutil.copyfile(log, work / "steps.jsonl")
        shutil.rmtree(work / "unlearn", ignore_errors=True)
        return Scored(normalised_difference(before, after), record,
                      {"loss_before": before, "loss_after": after})
