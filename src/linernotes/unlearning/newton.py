"""Unlearn one query with Fisher-preconditioned (EWC / Newton) steps.

θ ← θ0 + (α/N) (F + λI)⁻¹ ∇L(ẑ; θ0): the ascent on the query's loss that stays close to θ0 in the
Fisher metric (SPEC §2). The query gradient is averaged over many (timestep, noise) draws keyed by
the query, and K ≥ 1 steps re-take the gradient at the new weights. With `alpha = 0` the step size
is chosen per query so that the query's own loss rises to `target_ratio` × its loss at θ0, which
makes settings comparable across queries and models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from linernotes import device
from linernotes.attribution.query import Query
from linernotes.config import Settings, require, setting
from linernotes.curvature import Fisher
from linernotes.errors import LinernotesError
from linernotes.task import PARAM_GROUPS, Task, draw_noise, trainable

Delta = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class UnlearnSettings(Settings):
    """The unlearning step. Defaults: the music paper's best (all transformer blocks, M_U on)."""

    group: str = setting("transformer", "Parameters unlearned (a parameter group).")
    alpha: float = setting(0.0, "Step size (0 = reach --target-ratio).")
    target_ratio: float = setting(1.5, "With alpha 0: the query's loss after / before the first "
                                  "step.")
    n_scaling: bool = setting(True, "Divide alpha by the number of training tracks N.")
    damping: float = setting(1e-3, "Fisher damping (x mean F).")
    draws: int = setting(1024, "Draws (timestep, noise) in the query gradient.")
    steps: int = setting(1, "Unlearning steps.")
    mask_query: bool = setting(True, "M_U: mask the query's padding in its unlearning loss.")
    seed: int = setting(0, "Seed of the query's draws.")
    batch_size: int = setting(64, "Draws per forward/backward.")
    probe_draws: int = setting(64, "Draws measuring the query's loss when choosing alpha.")

    def validate(self) -> None:
        require(self.group in PARAM_GROUPS, f"Unknown parameter group {self.group!r}; "
                f"choose one of {', '.join(PARAM_GROUPS)}.")
        require(self.alpha >= 0, "alpha must be >= 0 (0 = automatic).")
        require(self.alpha > 0 or self.target_ratio > 1, "target_ratio must be > 1.")
        require(self.damping >= 0, "damping must be >= 0.")
        require(self.draws >= 1 and self.steps >= 1 and self.batch_size >= 1, "draws, steps and "
                "batch_size must be >= 1.")


def query_gradient(
    task: Task, model: nn.Module, query: Query, params: dict[str, nn.Parameter],
    draws: int, seed: int, mask: bool, batch_size: int,
) -> tuple[dict[str, torch.Tensor], float]:
    """∇ of the query's loss averaged over `draws` draws, and that mean loss."""
    draws = task.draws(draws)
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    total = 0.0
    for lo in range(0, draws, batch_size):
        ids = range(lo, min(draws, lo + batch_size))
        t, noise = draw_noise([query.key], ids, task.latent_shape, seed=seed)
        batch = query.batch(len(ids))
        loss = task.per_sample_loss(model, batch, t[0], noise[0], mask).sum()
        if not torch.isfinite(loss):
            raise LinernotesError(f"Non-finite loss for query {query.key}: cannot unlearn it.")
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            grads[n] += g
        total += float(loss.detach())
    return {n: g / draws for n, g in grads.items()}, total / draws


@torch.inference_mode()
def query_loss(task: Task, model: nn.Module, query: Query, s: UnlearnSettings) -> float:
    """The query's loss at `probe_draws` fixed draws (its own seed stream)."""
    n = task.draws(s.probe_draws)
    t, noise = draw_noise([query.key], range(n), task.latent_shape, seed=s.seed + 1)
    out = []
    for lo in range(0, n, s.batch_size):
        hi = min(n, lo + s.batch_size)
        out.append(task.per_sample_loss(model, query.batch(hi - lo), t[0, lo:hi],
                                        noise[0, lo:hi], s.mask_query))
    return float(torch.cat(out).mean())


@contextmanager
def applied(model: nn.Module, delta: Delta) -> Iterator[nn.Module]:
    """Add `delta` to the model's parameters inside the block; restore the exact originals after."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in delta}
    try:
        with torch.no_grad():
            for n, d in delta.items():
                params[n].add_(d)
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def unlearn_query(
    task: Task, model: nn.Module, query: Query, fisher: Fisher, settings: UnlearnSettings,
    n_train: int,
) -> tuple[Delta, dict]:
    """The weight change that unlearns `query`, and a record (alpha, losses, damping)."""
    params = task.parameters(model, settings.group)
    missing = set(params) - set(fisher.diag)
    if missing:
        raise LinernotesError(
            f"The Fisher covers group {fisher.settings.group!r}, which lacks {len(missing)} "
            f"parameter(s) of group {settings.group!r} (e.g. {sorted(missing)[0]}). Recompute it "
            f"with `linernotes fisher --group {settings.group}`."
        )
    inv, damp = fisher.damped_inverse(settings.damping)
    inv = device.move(inv, device.of(model))
    scale = 1.0 / n_train if settings.n_scaling else 1.0
    delta: Delta = {n: torch.zeros_like(p) for n, p in params.items()}
    record: dict = {"damping": damp, "steps": []}
    with trainable(model, params):
        loss0 = query_loss(task, model, query, settings)
        step_size = settings.alpha * scale
        for k in range(settings.steps):
            with applied(model, delta):
                grad, grad_loss = query_gradient(
                    task, model, query, params, settings.draws, settings.seed,
                    settings.mask_query, settings.batch_size,
                )
            direction = {n: inv[n] * grad[n] for n in params}
            if k == 0 and settings.alpha == 0:
                step_size = choose_step(task, model, query, settings, delta, direction, grad,
                                        loss0)
            for n in params:
                delta[n] = delta[n] + step_size * direction[n]
            record["steps"].append({"grad_loss": grad_loss})
        with applied(model, delta):
            loss1 = query_loss(task, model, query, settings)
    record.update({"alpha": step_size / scale, "query_loss_before": loss0,
                   "query_loss_after": loss1, "ratio": loss1 / loss0 if loss0 else math.nan})
    return delta, record


def choose_step(task, model, query, s: UnlearnSettings, delta, direction, grad, loss0) -> float:
    """Step size along `direction` that makes the query's loss `target_ratio` × loss0.

    Starts from the linear prediction, then brackets and bisects in log space (≤ 24 loss evals).
    """
    slope = sum(float((grad[n] * direction[n]).sum()) for n in direction)
    if not slope > 0:
        raise LinernotesError(f"The query {query.key} has no ascent direction in this group "
                              "(zero gradient); choose another --group.")
    target = s.target_ratio * loss0

    def ratio_at(step: float) -> float:
        trial = {n: delta[n] + step * direction[n] for n in direction}
        with applied(model, trial):
            return query_loss(task, model, query, s)

    step = (target - loss0) / slope
    lo, hi = 0.0, math.inf
    for _ in range(24):
        loss = ratio_at(step)
        if not math.isfinite(loss) or loss > target:
            hi = step
        else:
            lo = step
        if math.isfinite(loss) and abs(loss - target) <= 0.02 * (target - loss0):
            return step
        step = math.sqrt(lo * hi) if lo > 0 and math.isfinite(hi) else (
            step * 4 if not math.isfinite(hi) else hi / 4)
    return lo if lo > 0 else step
