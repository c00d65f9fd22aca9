"""Linearised attribution by unlearning: one-step unlearning's score to first order, fast.

Exact one-step unlearning (`unlearning/newton.py`, `attribution/unlearning.py`) moves the weights
by δ = s·D·g_q, with s = α/N (α alone without N-scaling), D = (F + λI)⁻¹ the damped diagonal
Fisher inverse and g_q the query's loss gradient over its random draws (M_U as set), then scores
training track z_i by τ_i = L_i(θ0 + δ) − L_i(θ0), L_i its loss at the fixed scoring draws
(ScoreSettings: timesteps, stride, seed, M_L). L_i is a deterministic function of θ once the draws
are fixed, so Taylor's theorem gives

    τ_i = s · g_iᵀ D g_q + O(s²),    g_i = ∇θ L_i(θ0)  (the same draws, the same masking).

With the log-ratio score (`ScoreSettings.kind = "log-ratio"`), τ_i = log L_i(θ0 + δ) − log L_i(θ0)
= s · g_iᵀ D g_q / L_i(θ0) + O(s²); L_i(θ0) is the exact method's cached baseline (the same
folder, so the two methods share it), computed once.

This module computes that first-order term. The training gradients g_i are taken once, at exactly
the exact method's scoring draws (`GradientSettings.matching`), and stored sharded on disk
(`GradientFeatures`); a query then costs one query gradient, the step-size search and N dot
products, instead of a pass of N × timesteps forwards.

**Projection.** With R ∈ ℝ^{P×k} random and E[R Rᵀ] = I (`Projector`: by default the sparse map,
s = 4 entries ±1/√s per parameter, so projecting one query costs milliseconds whatever k, where
the dense ±1/√k matrix, "rademacher", is regenerated per call: seconds to a minute at P ≈ 1.25M;
both agree equally well with unprojected scores, see benchmarks/projection.py), the stored
feature is φ_i = Rᵀ D^{1/2} g_i and the query's is ψ_q = Rᵀ D^{1/2} g_q, so

    E[φ_iᵀ ψ_q] = g_iᵀ D^{1/2} E[R Rᵀ] D^{1/2} g_q = g_iᵀ D g_q,

and the Johnson-Lindenstrauss error is O(‖D^{1/2} g_i‖ ‖D^{1/2} g_q‖ / √k): the projection
preserves inner products in the metric the score is measured in. Preconditioning only the query
(φ_i = Rᵀ g_i, ψ_q = Rᵀ D g_q) is unbiased too, and its features would not depend on the Fisher,
but its error is O(‖g_i‖ ‖D g_q‖ / √k), much larger when the Fisher's entries span decades.
They do: on the tests' tiny DiT the 1st and 99th percentiles of F are 6e-7 and 0.15, and over 6
queries the mean Spearman of projected against unprojected scores was 0.83 / 0.95 / 0.97
whitened and 0.32 / 0.25 / 0.51 query-only at k = 64 / 256 / 1024. So the whitened form is used.
The price: features belong to one (Fisher, damping); the cache key includes the scaling's hash,
so another damping computes new features. With matching settings these are the same features as
`fisher-influence`'s, and the two share the cache.
With `projection_dim = 0` there is no projection and the score equals the first-order term above
to float precision (tests/test_linear.py checks it against exact unlearning at a tiny α).

**α.** With `UnlearnSettings.alpha = 0` (the default) the step is the one the exact method picks:
the same query gradient (`newton.query_gradient`, the same draws, batch size, group, damping and
M_U) and the same search for the step that makes the query's probe loss `target_ratio` × its loss
at θ0 (`newton.choose_step`), so α is bit-identical to exact unlearning's. With `alpha > 0` that
α is used as given. Either way the score is in the exact score's units, comparable with it; a
ranking does not depend on α. Only one step is linearised (`steps` must be 1).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from linernotes import device
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.gradients import GradientFeatures, GradientSettings, matvec
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.curvature import Fisher
from linernotes.errors import LinernotesError
from linernotes.task import Task, trainable
from linernotes.unlearning.newton import (
    UnlearnSettings,
    applied,
    choose_step,
    query_gradient,
    query_loss,
)


class LinearUnlearningAttributor(Attributor):
    """score_i = (α/N) g_iᵀ (F + λI)⁻¹ g_q from stored (projected) training gradients."""

    method = "unlearning-linear"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], fisher: Fisher, cache_dir: str | Path,
        score: ScoreSettings | None = None, progress: bool = True,
        unlearn: UnlearnSettings | None = None, projection_dim: int = 2048,
        projection: str = "sparse", projection_seed: int = 0, backend: str = "auto",
        batch_size: int = 8, memory_mb: int = 1024,
    ):
        if fisher.run_hash != run_hash:
            raise LinernotesError(f"The Fisher was computed for run {fisher.run_hash}, not for "
                                  f"this run ({run_hash}); recompute it with `linernotes fisher`.")
        super().__init__(run_hash, manifest, train_ids)
        self.task, self.model, self.train = task, model, train
        self.fisher, self.cache_dir = fisher, Path(cache_dir)
        self.score = (score or ScoreSettings()).on(task, model)
        self.unlearn = unlearn or UnlearnSettings()
        self.progress = progress
        self.options = {"projection_dim": projection_dim, "projection": projection,
                        "projection_seed": projection_seed, "backend": backend,
                        "batch_size": batch_size, "memory_mb": memory_mb}
        self._features: dict[tuple[str, float], tuple[GradientFeatures, dict]] = {}
        self._before: np.ndarray | None = None

    def gradient_settings(self, unlearn: UnlearnSettings | None = None) -> GradientSettings:
        """The gradients' settings: the exact method's scoring and query draws, our projection."""
        return GradientSettings.matching(self.score, unlearn or self.unlearn, **self.options)

    def features(self, unlearn: UnlearnSettings | None = None) -> tuple[GradientFeatures, dict]:
        """The training features for `unlearn`'s group and damping (made once), and λ's record."""
        s = unlearn or self.unlearn
        key = (s.group, s.damping)
        if key not in self._features:
            names = self.task.parameter_names(self.model, s.group)
            missing = set(names) - set(self.fisher.diag)
            if missing:
                raise LinernotesError(
                    f"The Fisher covers group {self.fisher.settings.group!r}, which lacks "
                    f"{len(missing)} parameter(s) of group {s.group!r} (e.g. "
                    f"{sorted(missing)[0]}). Recompute it with `linernotes fisher --group "
                    f"{s.group}`."
                )
            inv, damping = self.fisher.damped_inverse(s.damping)
            feats = GradientFeatures(
                self.task, self.model, self.run_hash, self.train, self.train_ids,
                self.gradient_settings(s), self.cache_dir,
                scale={n: inv[n].sqrt() for n in names}, progress=self.progress,
            )
            self._features[key] = (feats, damping)
        return self._features[key]

    def train_features(self, unlearn: UnlearnSettings | None = None) -> np.ndarray:
        """(N, k) projected D^{1/2}-scaled training gradients (computed once, then cached)."""
        return self.features(unlearn)[0].train_features()

    def query_step(self, query: Query, s: UnlearnSettings) -> tuple[torch.Tensor, dict]:
        """The query's raw gradient g_q (P,) and the step s = α/N, exactly as exact unlearning
        takes them (its record: alpha, step, damping, the query's loss before and after)."""
        feats, damping = self.features(s)
        params = feats.params
        inv, _ = self.fisher.damped_inverse(s.damping)
        inv = device.move(inv, device.of(self.model))
        scale = 1.0 / len(self.train_ids) if s.n_scaling else 1.0
        with trainable(self.model, params):
            grad, grad_loss = query_gradient(self.task, self.model, query, params, s.draws,
                                             s.seed, s.mask_query, s.batch_size)
            loss0 = query_loss(self.task, self.model, query, s)
            direction = {n: inv[n] * grad[n] for n in params}
            if s.alpha == 0:
                zero = {n: torch.zeros_like(p) for n, p in params.items()}
                step = choose_step(self.task, self.model, query, s, zero, direction, grad,
                                    loss0)
            else:
                step = s.alpha * scale
            with applied(self.model, {n: step * direction[n] for n in params}):
                loss1 = query_loss(self.task, self.model, query, s)
        flat = torch.cat([grad[n].reshape(-1) for n in params]).cpu()
        record = {"alpha": step / scale, "step": step, "damping": damping,
                  "grad_loss": grad_loss, "query_loss_before": loss0, "query_loss_after": loss1,
                  "ratio": loss1 / loss0 if loss0 else float("nan")}
        return flat, record

    def baseline(self) -> np.ndarray | None:
        """L_i(θ0) at the scoring draws when the score kind needs it (the exact method's cache)."""
        kind = self.score.kind
        if kind == "delta":
            return None
        if kind != "log-ratio":
            raise LinernotesError(f"The linear mode has no first-order form of score kind "
                                  f"{kind!r}; use 'delta' or 'log-ratio'.")
        if self._before is None:
            self._before = UnlearningAttributor(
                self.task, self.model, self.run_hash, self.manifest, self.train, self.train_ids,
                self.fisher, self.cache_dir, self.score, self.progress, self.unlearn,
            ).baseline()
        return self._before

    def scores_from(self, grad: torch.Tensor, step: float,
                    s: UnlearnSettings | None = None) -> np.ndarray:
        """First-order scores (N,) float64: step · φ_iᵀ ψ_q with ψ_q = Rᵀ D^{1/2} g_q, divided by
        L_i(θ0) for the log-ratio score."""
        feats, _ = self.features(s)
        psi = feats._prepare(grad.reshape(1, -1))[0]
        out = step * matvec(feats.train_features(), psi.double().numpy())
        before = self.baseline()
        return out if before is None else out / before

    def scores(self, query: Query, work: Path, settings: UnlearnSettings | None = None) -> Scored:
        """Every training track's first-order score for `query`."""
        s = settings or self.unlearn
        if s.steps != 1:
            raise LinernotesError(f"The linear mode linearises one Newton step; steps={s.steps} "
                                  "needs exact unlearning (method `unlearning`).")
        feats, _ = self.features(s)
        feats.train_features()
        before = self.baseline()
        t0 = time.perf_counter()
        grad, record = self.query_step(query, s)
        scores = self.scores_from(grad, record["step"], s)
        t1 = time.perf_counter()
        extra = {} if before is None else {"loss_before": before}
        record.update({
            "unlearn": s.to_dict(), "score": self.score.to_dict(),
            "gradients": feats.settings.to_dict(), "backend": feats.engine.choice,
            "seconds_query": t1 - t0, "seconds_features": feats.seconds,
            "computed_shards": feats.computed_shards,
            "meaning": "first-order loss increase of one Newton unlearning step at this alpha",
        })
        return Scored(scores, record, extra)
