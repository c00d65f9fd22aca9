"""A query's loss under one model: at fixed draws, and an ELBO-style estimate over many times.

Both use common random numbers keyed by the query, so the loss change between two models (full
vs group-unlearned, full vs retrained without the group) is a paired difference. Results are
cached per (query content, settings, model) in the run's credit folder.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from linernotes.artifacts import hash_json, load_cached, read_json, write_json
from linernotes.attribution.gradients import tensor_hash
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.config import Settings, require
from linernotes.task import Task, draw_noise, evaluating, fixed_timesteps

ELBO_WEIGHTS = ("v", "elbo")


@dataclasses.dataclass(frozen=True)
class CreditSettings(Settings):
    """How a query's loss is measured under every model (identically for all of them).

    Fixed draws: the scoring convention of attribution (`timesteps` at `stride` of 1000, one noise
    per timestep). ELBO-style: a uniform midpoint grid of `elbo_timesteps` times in (0, 1) with
    `elbo_noise` noises each; weight "v" averages the v-loss uniformly over t (for the cosine
    schedule a weighted ELBO with a monotone weight), "elbo" weights it by (π/2)·cot(πt/2), the
    unweighted ELBO of a v-model on the cosine schedule (weights scaled to mean 1).
    """

    timesteps: int = 20
    stride: int = 50
    seed: int = 0
    mask_query: bool = True  # the query's real frames only
    elbo_timesteps: int = 32
    elbo_noise: int = 2
    elbo_weight: str = "v"
    batch_size: int = 64  # rows per forward
    reference_tracks: int = 0  # per group, for calibrated group unlearning (`calibrate.py`)

    def validate(self) -> None:
        require(self.timesteps >= 1 and self.elbo_timesteps >= 1 and self.elbo_noise >= 1,
                "timesteps, elbo_timesteps and elbo_noise must be >= 1.")
        require(self.stride * (self.timesteps - 1) < 1000, "timesteps x stride must fit in 1000.")
        require(self.elbo_weight in ELBO_WEIGHTS,
                f"elbo_weight must be one of {', '.join(ELBO_WEIGHTS)}.")
        require(self.batch_size >= 1, "batch_size must be >= 1.")
        require(self.reference_tracks >= 0, "reference_tracks must be >= 0 (0 = no "
                "calibration).")

    def loss_key(self) -> str:
        """Hash of what a query's losses depend on (not how they are calibrated afterwards)."""
        return hash_json({"class": type(self).__name__, **{
            k: v for k, v in self.to_dict().items() if k != "reference_tracks"}})

    def score(self) -> ScoreSettings:
        return ScoreSettings(timesteps=self.timesteps, stride=self.stride, seed=self.seed,
                             mask_train=self.mask_query, batch_size=1,
                             precision="float32")  # its measured numbers are float32


def credit_root(run) -> Path:
    """The run's credit folder, emptied when it was made for another version of the run."""
    root = run.credit_dir
    stamp = root / "run.json"
    if stamp.exists() and read_json(stamp).get("run") != run.hash:
        shutil.rmtree(root)
    if not stamp.exists():
        write_json(stamp, {"run": run.hash})
    return root


def elbo_grid(s: CreditSettings) -> tuple[np.ndarray, np.ndarray]:
    """The ELBO-style estimate's times (midpoint grid) and weights (mean 1)."""
    k = s.elbo_timesteps
    t = (np.arange(k) + 0.5) / k
    w = np.ones(k) if s.elbo_weight == "v" else (math.pi / 2) / np.tan(math.pi * t / 2)
    return t, w / w.mean()


def _per_draw(task: Task, model: nn.Module, query: Query, t: torch.Tensor, noise: torch.Tensor,
              s: CreditSettings) -> np.ndarray:
    """The query's loss at each draw (t (1, D), noise (1, D, ...)), in batches; (D,) float64."""
    n = t.shape[1]
    out = [task.per_sample_loss(model, query.batch(hi - lo), t[0, lo:hi], noise[0, lo:hi],
                                s.mask_query)
           for lo in range(0, n, s.batch_size) for hi in [min(n, lo + s.batch_size)]]
    return torch.cat(out).double().cpu().numpy()


@torch.inference_mode()
def query_losses(task: Task, model: nn.Module, query: Query, s: CreditSettings) -> dict:
    """The query's losses under one model: "fixed" (the mean over the fixed draws), "elbo" (the
    ELBO-style estimate), and each draw's term ("fixed_draws", "elbo_draws": weighted, so that
    their means are the estimates) for intervals over the draws."""
    with evaluating(model):
        n = task.draws(s.timesteps)
        t, noise = draw_noise([query.key], range(n), task.latent_shape, seed=s.seed,
                              timesteps=fixed_timesteps(s.timesteps, s.stride))
        fixed = _per_draw(task, model, query, t, noise, s)
        if task.deterministic:  # the draws are ignored: every estimate is the one loss
            terms = fixed
        else:
            grid, weights = elbo_grid(s)
            m = len(grid) * s.elbo_noise
            t, noise = draw_noise([query.key], range(m), task.latent_shape, seed=s.seed + 7919,
                                  timesteps=grid.tolist())
            terms = _per_draw(task, model, query, t, noise, s) * weights[np.arange(m) % len(grid)]
    return {"fixed": float(fixed.mean()), "elbo": float(terms.mean()),
            "fixed_draws": fixed.tolist(), "elbo_draws": terms.tolist()}


def query_hash(query: Query) -> str:
    """Content hash of a query (its key, caption, frames and mask)."""
    return hash_json([query.key, query.caption, tensor_hash([query.features, query.mask.float()])])


class LossCache:
    """Per-query losses of many models: one JSON file per (model, query, settings) under
    `folder/<model key hash>/`, so processes filling the cache for different models (or
    queries) at once never overwrite each other's results."""

    def __init__(self, folder: str | Path, settings: CreditSettings):
        self.folder, self.s = Path(folder), settings

    def _path(self, query: Query, model_key: str) -> Path:
        return (self.folder / hash_json(model_key)[:16]
                / f"{query_hash(query)}-{self.s.loss_key()}.json")

    def peek(self, query: Query, model_key: str) -> dict | None:
        """The cached losses of `query` under `model_key`, or None."""
        path = self._path(query, model_key)
        return load_cached(path, read_json) if path.exists() else None

    def get(self, task: Task, model: nn.Module, query: Query, model_key: str) -> dict:
        """The query's losses under `model` (named `model_key`), computed once."""
        entry = self.peek(query, model_key)
        if entry is None:
            t0 = time.perf_counter()
            entry = query_losses(task, model, query, self.s)
            entry["seconds"] = time.perf_counter() - t0
            write_json(self._path(query, model_key), {"query": query.key, "model": model_key,
                                                     **entry})
        return entry


def loss_changes(
    run, manifest: pd.DataFrame, queries: Sequence[Query], models: Sequence[tuple[str, str, Any]],
    s: CreditSettings,
) -> tuple[dict, dict, float]:
    """Per query: {group: losses} under each model and the full model's losses, and seconds.

    `models` holds (group, model key, context factory yielding the model); a model is loaded
    only if some query's losses under it are not cached yet.
    """
    cache = LossCache(credit_root(run) / "losses", s)
    base = {q.key: cache.get(run.task, run.model, q, f"run/{run.hash}") for q in queries}
    after: dict[str, dict[str, dict]] = {q.key: {} for q in queries}
    for group, key, enter in models:
        todo = [q for q in queries if cache.peek(q, key) is None]
        if todo:
            with enter() as model:
                for q in todo:
                    cache.get(run.task, model, q, key)
        for q in queries:
            after[q.key][group] = cache.peek(q, key)
    seconds = sum(v["seconds"] for v in base.values())
    seconds += sum(e["seconds"] for per in after.values() for e in per.values())
    return after, base, seconds
