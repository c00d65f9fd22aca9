"""Unlearn each group from the full model once; cache the result under the run folder.

Folder: `RUN/credit/<by>/<method>-<key>/<group slug>/` with `credit.json` (what was unlearned,
from which run, with which settings, at what cost). The key hashes (run, method, settings, by), so
changed settings make new folders; a run retrained in place clears `RUN/credit` (see
`credit_root`). Methods: `newton` (one Fisher/Newton step per group, below) and every opt-out
method (`unlearning.trainer.optout`, with a short default budget).
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from linernotes import device
from linernotes.artifacts import atomic_path, hash_json, read_json, write_json
from linernotes.config import Settings, require
from linernotes.credit.groups import group_slug, groups
from linernotes.credit.losses import credit_root
from linernotes.curvature import FisherSettings, covering_group
from linernotes.data.manifest import positions
from linernotes.errors import LinernotesError
from linernotes.run import load_run
from linernotes.task import PARAM_GROUPS, trainable

RECORD = "credit.json"
DELTA = "delta.safetensors"
OPTOUT_BUDGET = {"steps": 20}  # the opt-out methods' default budget per group (short)


@dataclasses.dataclass(frozen=True)
class NewtonGroupSettings(Settings):
    """θ_g = θ0 + (α/N)(F + λI)⁻¹ Σ_{i∈g} ∇L_i(θ0): one Fisher/Newton step removing group g.

    α = 1 would be the influence-function estimate of the model retrained without g (N =
    training tracks), but with a diagonal Fisher that step is far too long (on the quick
    benchmark model it multiplies losses by ~1e26). The default α = 0 chooses α per group so
    that the group's own loss at fixed draws rises to `target_ratio` × its loss at θ0: 1.1 is
    about what retraining without an artist does there (+9-10%), and every group is forgotten
    to the same degree. A fixed α > 0 keeps one scale for all groups.
    """

    group: str = "transformer"  # parameters updated (a Task group)
    alpha: float = 0.0
    target_ratio: float = 1.1
    damping: float = 1e-3  # λ = damping × mean(F)
    draws: int = 16  # (t, noise) draws per training track in the group gradient
    seed: int = 0
    mask_padding: bool = False  # the training loss as the model was trained (padding included)
    batch_size: int = 64
    fisher_draws: int = 2

    def validate(self) -> None:
        require(self.group in PARAM_GROUPS, f"group must be one of {', '.join(PARAM_GROUPS)}.")
        require(self.alpha >= 0, "alpha must be >= 0 (0 = choose per group).")
        require(self.alpha > 0 or self.target_ratio > 1, "target_ratio must be > 1.")
        require(self.damping >= 0, "damping must be >= 0.")
        require(self.draws >= 1 and self.batch_size >= 1 and self.fisher_draws >= 1,
                "draws, batch_size and fisher_draws must be >= 1.")


def group_methods() -> list[str]:
    """Names of the group-unlearning methods: newton and every opt-out method."""
    from linernotes.unlearning.trainer import available_methods

    return ["newton", *sorted(available_methods())]


def method_config(method: str, settings: Settings | Mapping[str, Any] | None = None) -> Settings:
    """The settings object of a group-unlearning method (opt-out methods: short budget)."""
    if method == "newton":
        if isinstance(settings, NewtonGroupSettings):
            return settings
        return NewtonGroupSettings.from_dict(dict(settings or {}))
    from linernotes.unlearning.trainer import available_methods, method_settings

    if method not in available_methods():
        raise LinernotesError(
            f"Unknown group-unlearning method {method!r}; choose one of "
            f"{', '.join(group_methods())}."
        )
    if isinstance(settings, Settings):
        return method_settings(method, settings)
    return method_settings(method, {**OPTOUT_BUDGET, **dict(settings or {})})


def by_folder(run, by: str) -> Path:
    return credit_root(run) / (re.sub(r"[^A-Za-z0-9_.-]+", "-", by) or "column")


@dataclasses.dataclass
class GroupModel:
    """One group unlearned from the full model: where it is, what it cost, and how to use it."""

    group: str
    track_ids: list[str]
    method: str
    folder: Path
    record: dict
    cached: bool  # read from disk rather than made by this call

    @property
    def model_key(self) -> str:
        return f"{self.method}/{self.folder.parent.name}/{self.folder.name}"

    @property
    def seconds(self) -> float:
        return float(self.record.get("seconds", 0.0))

    @contextmanager
    def model(self, run, manifest: pd.DataFrame) -> Iterator[nn.Module]:
        """The unlearned model (the run's model with the delta applied, or the opt-out run)."""
        if self.method == "newton":
            from linernotes.unlearning.newton import applied

            delta = device.move(load_file(str(self.folder / DELTA)), device.of(run.model))
            with applied(run.model, delta) as m:
                yield m
        else:
            yield load_run(self.folder, manifest=manifest).model


# ---------------------------------------------------------------- newton


class _Newton:
    """Shared per call: the training set, the Fisher's damped inverse, N."""

    def __init__(self, run, manifest: pd.DataFrame, s: NewtonGroupSettings, progress: bool):
        self.run, self.manifest, self.s = run, manifest, s
        self.store, _, ids = run.train_set(manifest, progress)
        fs = FisherSettings(group=covering_group(s.group), draws=s.fisher_draws)
        self.fisher = run.fisher(manifest, fs, progress)
        inv, self.damp = self.fisher.damped_inverse(s.damping)
        self.inv = device.move(inv, device.of(run.model))
        self.n_train = len(ids)
        self.params = run.task.parameters(run.model, s.group)
        missing = sorted(set(self.params) - set(self.inv))
        if missing:
            raise LinernotesError(f"The Fisher lacks parameter {missing[0]} of group {s.group!r}.")

    def direction(self, track_ids: list[str]) -> dict[str, torch.Tensor]:
        """(F + λI)⁻¹ Σ_i ∇L_i over the group's tracks (each ∇ averaged over `draws` draws)."""
        from linernotes.attribution.front import query_from_spec
        from linernotes.unlearning.newton import query_gradient

        s, task, model = self.s, self.run.task, self.run.model
        total = {n: torch.zeros_like(p) for n, p in self.params.items()}
        with trainable(model, self.params):
            for tid in track_ids:
                q = query_from_spec(f"train:{tid}", self.run, self.store, self.manifest)
                grad, _ = query_gradient(task, model, q, self.params, s.draws, s.seed,
                                         s.mask_padding, s.batch_size)
                for n in total:
                    total[n] += grad[n]
        return {n: self.inv[n] * g for n, g in total.items()}

    def alpha(self, track_ids: list[str], direction: dict[str, torch.Tensor]) -> float:
        """α making the group's loss at fixed draws `target_ratio` × its loss at θ0."""
        from linernotes.attribution.losses import ScoreSettings, track_losses
        from linernotes.data.dataset import TrackDataset
        from linernotes.unlearning.newton import applied

        ds = TrackDataset(self.store, self.manifest, positions(self.manifest, track_ids))
        probe = ScoreSettings(timesteps=5, stride=200, seed=self.s.seed + 3,
                              precision="float32")  # small loss changes
        scale = 1.0 / self.n_train

        def loss(alpha: float) -> float:
            with applied(self.run.model, {n: alpha * scale * d for n, d in direction.items()}):
                return float(track_losses(self.run.task, self.run.model, ds, probe).mean())

        base = loss(0.0)
        target = self.s.target_ratio * base
        lo, hi, a = 0.0, math.inf, 1.0
        for _ in range(30):
            value = loss(a)
            if not math.isfinite(value) or value > target:
                hi = a
            else:
                lo = a
            if abs(value - target) <= 0.05 * (target - base) or hi / max(lo, 1e-30) < 1.05:
                break
            a = a * 8 if math.isinf(hi) else (math.sqrt(lo * hi) if lo > 0 else hi / 8)
        return a

    def build(self, track_ids: list[str], folder: Path) -> dict:
        direction = self.direction(track_ids)
        alpha = self.s.alpha if self.s.alpha > 0 else self.alpha(track_ids, direction)
        delta = {n: (alpha / self.n_train) * d for n, d in direction.items()}
        with atomic_path(folder / DELTA) as tmp:
            save_file({n: d.cpu().contiguous() for n, d in delta.items()}, str(tmp))
        return {"alpha": alpha, "n_train": self.n_train, "damping": self.damp}


# ---------------------------------------------------------------- every method, cached


def group_models(
    run,
    manifest: pd.DataFrame,
    by: str = "artist",
    method: str = "newton",
    settings: Settings | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> list[GroupModel]:
    """Each group of `by` unlearned from the run with `method`: made once, then read back."""
    s = method_config(method, settings)
    parts = groups(manifest, run, by)
    key = hash_json({"run": run.hash, "method": method, "settings": s.to_dict(), "by": by})
    root = by_folder(run, by) / f"{method}-{key[:12]}"
    newton: _Newton | None = None
    out = []
    for name, ids in parts.items():
        folder = root / group_slug(name)
        expect = {"run": run.hash, "method": method, "settings": s.to_dict(), "by": by,
                  "group": name, "tracks": hash_json(ids)}
        path = folder / RECORD
        if path.exists():
            record = read_json(path)
            if {k: record.get(k) for k in expect} == expect:
                out.append(GroupModel(name, ids, method, folder, record, True))
                continue
            shutil.rmtree(folder)  # made for other tracks: stale
        if progress:
            print(f"credit: unlearning {by}={name} ({len(ids)} tracks) with {method}",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if method == "newton":
            newton = newton or _Newton(run, manifest, s, progress)
            facts = newton.build(ids, folder)
            seconds = time.perf_counter() - t0
        else:
            from linernotes.unlearning.forget import ForgetSpec
            from linernotes.unlearning.trainer import optout, read_record

            optout(run, manifest, ForgetSpec(track_ids=tuple(ids)), method, s, folder,
                   progress=progress)
            cost = read_record(folder)["cost"]
            facts = {"steps": cost.get("steps"), "stopped_early": cost.get("stopped_early")}
            seconds = float(cost.get("seconds", time.perf_counter() - t0))
        record = {**expect, "kind": "linernotes-group-unlearning", "n_tracks": len(ids),
                  "seconds": seconds, **facts}
        write_json(path, record)
        out.append(GroupModel(name, ids, method, folder, record, False))
    return out
