"""Gradient-based attribution methods: TRAK, D-TRAK, TracIn, fisher-influence, representer points.

Each is an `Attributor` built once per (run, training set): `scores(query)` for one query, the
score table written by `Attributor.attribute`. Training features are stored once (see
`gradients.py`) and reused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.linalg import cho_factor, cho_solve
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from linernotes.artifacts import hash_json
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.gradients import (
    GradientFeatures,
    GradientSettings,
    matvec,
    sharded_features,
)
from linernotes.attribution.query import Query
from linernotes.curvature import Fisher
from linernotes.data.dataset import collate
from linernotes.errors import LinernotesError
from linernotes.task import Task, draw_noise, expand_draws, fixed_timesteps, trainable


class GradientMethod(Attributor):
    """Shared parts: the gradient settings, and the record every gradient method writes."""

    def __init__(self, run_hash: str, manifest: pd.DataFrame, train_ids: list[str],
                 settings: GradientSettings | None, progress: bool):
        super().__init__(run_hash, manifest, train_ids)
        self.settings = settings or GradientSettings()
        self.progress = progress

    def _scored(self, scores: np.ndarray, record: dict, t0: float) -> Scored:
        return Scored(scores, {"gradients": self.settings.to_dict(),
                               "seconds": time.perf_counter() - t0, **record})


class TrakAttributor(GradientMethod):
    """TRAK: score_i = φ_q (ΦᵀΦ + λI)⁻¹ φ_i over projected loss gradients (λ = damping × mean
    diagonal of ΦᵀΦ); the N × N dual form is used when k > N."""

    method = "trak"
    output = "loss"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], cache_dir: str | Path,
        settings: GradientSettings | None = None, damping: float = 1e-3, progress: bool = True,
    ):
        super().__init__(run_hash, manifest, train_ids, settings, progress)
        if self.settings.output != self.output:
            self.settings = self.settings.replace(output=self.output)
        if damping <= 0:
            raise LinernotesError("TRAK's damping must be > 0 (the kernel may be singular).")
        self.damping = damping
        self.features = GradientFeatures(task, model, run_hash, train, self.train_ids,
                                         self.settings, cache_dir, progress=progress)
        self._kernel: tuple | None = None

    def kernel(self) -> tuple:
        """Cholesky factor of ΦᵀΦ + λI (or of ΦΦᵀ + λI when k > N), and λ."""
        if self._kernel is None:
            phi = self.features.train_features()
            n, k = phi.shape
            dual = k > n
            if dual:  # k > N: small N, the N × N Gram matrix
                full = phi.astype(np.float64)
                gram = full @ full.T
            else:
                gram = np.zeros((k, k))
                for lo in range(0, n, 4096):
                    block = phi[lo : lo + 4096].astype(np.float64)
                    gram += block.T @ block
            lam = self.damping * float(np.trace(gram)) / k
            gram[np.diag_indices_from(gram)] += lam
            self._kernel = (cho_factor(gram), lam, dual)
        return self._kernel

    def scores(self, query: Query, work: Path) -> Scored:
        t0 = time.perf_counter()
        phi = self.features.train_features()
        cho, lam, dual = self.kernel()
        q = self.features.query_features(query).astype(np.float64)
        if dual:
            scores = cho_solve(cho, matvec(phi, q))
        else:
            scores = matvec(phi, cho_solve(cho, q))
        return self._scored(scores, {
            "lambda": lam, "damping": self.damping, "dual": dual,
            "backend": self.features.engine.choice, "backend_note": self.features.engine.note,
        }, t0)


class DTrakAttributor(TrakAttributor):
    """D-TRAK: TRAK with the gradient of the mean squared model output instead of the loss."""

    method = "dtrak"
    output = "dtrak"


@dataclasses.dataclass
class Checkpoint:
    """One model state for TracIn, weighted by the learning rate used after it."""

    model: nn.Module
    run_hash: str
    lr: float = 1.0


class TracInAttributor(GradientMethod):
    """TracIn: score_i = Σ_c lr_c · φ_i(θ_c) · φ_q(θ_c) (one checkpoint: a gradient dot product)."""

    method = "tracin"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], cache_dir: str | Path,
        settings: GradientSettings | None = None,
        checkpoints: Sequence[Checkpoint] | None = None, progress: bool = True,
    ):
        super().__init__(run_hash, manifest, train_ids, settings, progress)
        self.checkpoints = list(checkpoints) if checkpoints else [Checkpoint(model, run_hash)]
        self.features = [
            GradientFeatures(task, c.model, c.run_hash, train, self.train_ids, self.settings,
                             cache_dir, progress=progress)
            for c in self.checkpoints
        ]

    def scores(self, query: Query, work: Path) -> Scored:
        t0 = time.perf_counter()
        scores = np.zeros(len(self.train_ids))
        for c, f in zip(self.checkpoints, self.features):
            scores += c.lr * matvec(f.train_features(), f.query_features(query))
        return self._scored(scores, {
            "checkpoints": [{"run": c.run_hash, "lr": c.lr} for c in self.checkpoints],
        }, t0)


class FisherInfluenceAttributor(GradientMethod):
    """(1/N) g_iᵀ (F + λI)⁻¹ g_q with the diagonal Fisher: one-step unlearning, linearised.

    The features are projections of D^{1/2} g (D = (F + λI)⁻¹, λ as in unlearning): with
    `projection_dim = 0` the score equals the first-order loss increase of one Newton unlearning
    step per unit alpha; with a projection it is the fast "linear unlearning" mode.
    """

    method = "fisher-influence"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], fisher: Fisher, cache_dir: str | Path,
        settings: GradientSettings | None = None, damping: float = 1e-3, progress: bool = True,
    ):
        super().__init__(run_hash, manifest, train_ids, settings, progress)
        if fisher.run_hash != run_hash:
            raise LinernotesError(f"The Fisher was computed for run {fisher.run_hash}, not for "
                                  f"this run ({run_hash}); recompute it with `linernotes fisher`.")
        names = task.parameter_names(model, self.settings.group)
        missing = set(names) - set(fisher.diag)
        if missing:
            raise LinernotesError(
                f"The Fisher covers group {fisher.settings.group!r}, which lacks {len(missing)} "
                f"parameter(s) of group {self.settings.group!r} (e.g. {sorted(missing)[0]}). "
                f"Recompute it with `linernotes fisher --group {self.settings.group}`."
            )
        inv, self.damping_info = fisher.damped_inverse(damping)
        self.damping = damping
        scale = {n: inv[n].sqrt() for n in names}
        self.features = GradientFeatures(task, model, run_hash, train, self.train_ids,
                                         self.settings, cache_dir, scale=scale, progress=progress)

    def scores(self, query: Query, work: Path) -> Scored:
        t0 = time.perf_counter()
        phi = self.features.train_features()
        scores = matvec(phi, self.features.query_features(query)) / len(self.train_ids)
        return self._scored(scores, {
            "damping": self.damping_info, "projection_dim": self.settings.projection_dim,
            "meaning": "first-order loss increase per unit alpha of one Newton unlearning step",
        }, t0)


# ---------------------------------------------------------------------------- representer points


def final_linear(task: Task, model: nn.Module, batch: dict) -> str:
    """Name of the last nn.Linear module the model runs in a forward pass of `batch`."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        t, noise = draw_noise(batch["track_id"][:1], [0], task.latent_shape)
        one = {k: (v[:1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        with torch.no_grad():
            task.per_sample_loss(model, one, t[:, 0], noise[:, 0])
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise LinernotesError("The model has no nn.Linear layer; give the representer's layer "
                              "by name.")
    return order[-1]


def layer_features(task: Task, model: nn.Module, layer: nn.Module, batch: dict,
                   t: torch.Tensor, noise: torch.Tensor, mask: bool) -> torch.Tensor:
    """Per sample (B, H + C): the layer's input activations averaged over positions and draws,
    then the loss gradient w.r.t. its output summed over positions, averaged over draws."""
    b, d = t.shape
    seen: dict[str, torch.Tensor] = {}

    def hook(module, inputs, out):
        if "o" in seen:
            raise LinernotesError("The representer's layer runs more than once per forward; "
                                  "choose another layer.")
        seen["h"] = inputs[0].detach()
        seen["o"] = out.detach().requires_grad_(True)
        return seen["o"]

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            flat = expand_draws(batch, d)
            losses = task.per_sample_loss(model, flat, t.reshape(b * d),
                                          noise.reshape(b * d, *noise.shape[2:]), mask)
            (dout,) = torch.autograd.grad(losses.sum(), seen["o"])
    finally:
        handle.remove()
    h = seen["h"].reshape(b * d, -1, seen["h"].shape[-1]).mean(1).view(b, d, -1).mean(1)
    g = dout.reshape(b * d, -1, dout.shape[-1]).sum(1).view(b, d, -1).mean(1)
    return torch.cat([h, g], dim=1).float().cpu()


class RepresenterAttributor(GradientMethod):
    """Representer points: score_i = (f_i · f_q)(δ_i · δ_q), f the final layer's input activations
    and δ the loss gradient w.r.t. its output (α_i ∝ −δ_i in Yeh et al.; constants dropped)."""

    method = "representer"

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], cache_dir: str | Path,
        settings: GradientSettings | None = None, layer: str | None = None,
        progress: bool = True,
    ):
        super().__init__(run_hash, manifest, train_ids, settings, progress)
        self.task, self.model, self.train = task, model, train
        self.cache_dir = Path(cache_dir)
        self.layer = layer or final_linear(task, model, collate([train[0]]))
        modules = dict(model.named_modules())
        if self.layer not in modules:
            raise LinernotesError(f"The model has no module {self.layer!r}.")
        self.module = modules[self.layer]
        self.computed_shards = 0
        self._features: np.ndarray | None = None
        self._split: int | None = None  # H: where the output-gradient part of a feature starts

    def provenance(self) -> dict:
        s = self.settings
        return {"run": self.run_hash, "tracks": hash_json(self.train_ids), "layer": self.layer,
                "draws": {"timesteps": s.timesteps, "stride": s.stride, "seed": s.seed,
                          "mask_train": s.mask_train}, "shard_size": s.shard_size}

    def _features_of(self, batch: dict, t: torch.Tensor, noise: torch.Tensor,
                     mask: bool) -> torch.Tensor:
        with trainable(self.model, {}):
            return layer_features(self.task, self.model, self.module, batch, t, noise, mask)

    def compute_rows(self, lo: int, hi: int) -> np.ndarray:
        """Features of training tracks [lo, hi) (not stored)."""
        s = self.settings
        ts = fixed_timesteps(s.timesteps, s.stride)
        out = []
        for batch in DataLoader(Subset(self.train, range(lo, hi)), batch_size=s.batch_size,
                                collate_fn=collate):
            t, noise = draw_noise(batch["track_id"], range(self.task.draws(s.timesteps)),
                                  self.task.latent_shape, seed=s.seed, timesteps=ts)
            out.append(self._features_of(batch, t, noise, s.mask_train))
        return torch.cat(out).numpy()

    def query_features(self, query: Query) -> np.ndarray:
        """(H + C,) features of a query over its random draws."""
        s = self.settings
        n = self.task.draws(s.query_draws)
        t, noise = draw_noise([query.key], range(n), self.task.latent_shape, seed=s.query_seed)
        chunk, total = max(s.batch_size * s.timesteps, 1), None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            f = self._features_of(query.batch(1), t[:, lo:hi], noise[:, lo:hi],
                                  s.mask_query)[0] * (hi - lo)
            total = f if total is None else total + f
        return (total / n).numpy()

    def train_features(self) -> np.ndarray:
        """(N, H + C) features of the training tracks, computed once then read from the cache."""
        if self._features is None:
            if isinstance(self.module, nn.Linear):
                self._split = self.module.in_features
                dim = self.module.in_features + self.module.out_features
            else:  # probe one track for the sizes
                probe = self.compute_rows(0, 1)
                dim = probe.shape[1]
                self._split = dim - self._out_dim(probe)
            folder = self.cache_dir / f"representer-{hash_json(self.provenance())}"
            self._features, self.computed_shards = sharded_features(
                self.compute_rows, len(self.train_ids), dim, self.settings.shard_size, folder,
                {"provenance": self.provenance()}, "representer", self.progress,
            )
        return self._features

    def scores(self, query: Query, work: Path) -> Scored:
        t0 = time.perf_counter()
        feats, q = self.train_features(), self.query_features(query)
        n_h = self._split
        scores = matvec(feats[:, :n_h], q[:n_h]) * matvec(feats[:, n_h:], q[n_h:])
        return self._scored(scores, {"layer": self.layer}, t0)

    def _out_dim(self, probe: np.ndarray) -> int:
        weight = getattr(self.module, "weight", None)
        if weight is None or weight.shape[0] >= probe.shape[1]:
            raise LinernotesError(f"Cannot size the representer's layer {self.layer!r}; "
                                  "choose an nn.Linear layer.")
        return int(weight.shape[0])


GRADIENT_METHODS = {
    "trak": TrakAttributor,
    "dtrak": DTrakAttributor,
    "tracin": TracInAttributor,
    "fisher-influence": FisherInfluenceAttributor,
    "representer": RepresenterAttributor,
}
