"""The one opt-out trainer: every unlearning method is a small loss override on top of it.

`unlearn` copies a run's model, lets the method prepare (saliency mask, Fisher, null loss), then
runs `training.fit` with paired (forget, retain) batches, the method's loss, its gradient edit
(`after_backward`) and its stopping rule (`should_stop`); a killed run resumes from its checkpoint.
The result is a new run folder (`Run.derive`) with a record of what was removed, how, and at
what cost. Methods register by name (`available_methods`), like kronfluence's strategies.
`method_context` and `fit_method` are the two halves of that run, also used by attribution's
MUCS, whose forget set is a generated query rather than training tracks.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from linernotes.artifacts import hash_json, read_json, write_json
from linernotes.config import Settings, require
from linernotes.curvature import Fisher, FisherSettings, covering_group
from linernotes.data.dataset import TrackDataset, collate
from linernotes.data.manifest import positions, read_manifest
from linernotes.errors import LinernotesError
from linernotes.registry import Registry
from linernotes.run import Layout, Run, load_run
from linernotes.task import (
    PARAM_GROUPS,
    draw_noise,
    evaluating,
    fixed_timesteps,
    loss_at_draws,
)
from linernotes.training import (
    LOSS_LOG,
    FitResult,
    StepBatches,
    TrainSettings,
    fit,
    step_generator,
)
from linernotes.unlearning.forget import ForgetSet, ForgetSpec, resolve_forget_set

METHOD_MODULES = (
    "gradient_ascent",
    "random_label",
    "grad_diff",
    "ewc",
    "selective_amnesia",
    "salun",
    "siss",
    "mirrored",
    "concept_ablation",
)

# random streams of one step (see `training.step_generator`)
FORGET_STREAM, RETAIN_STREAM, SWAP_STREAM, MIX_STREAM = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class MethodSettings(Settings):
    """Settings every unlearning method shares; each method's dataclass adds its own."""

    steps: int = 60
    lr: float = 3e-5  # Adam moves every weight ~lr per step: ascent at 1e-4 overshoots in a few
    batch_size: int = 8  # forget tracks per step
    retain_batch_size: int = 8  # retain tracks per step (methods that replay the retain set)
    group: str = "transformer"  # parameters that change (a Task group)
    grad_clip: float = 1.0
    cond_dropout: float = 0.1  # caption dropout on retain terms, as in training
    mask_padding: bool = False  # loss over real frames only
    seed: int = 0
    checkpoint_every: int = 20
    stop_at_gap: bool = False  # stop once the forget loss rose by the train->holdout gap
    stop_tol: float = 0.0  # ... i.e. forget loss >= (1 - stop_tol) x before x holdout/train
    check_every: int = 2  # steps between stopping checks
    gap_tracks: int = 64  # tracks per set measuring the gap (holdout, retain sample)

    def validate(self) -> None:
        require(self.steps >= 1, "steps must be >= 1.")
        require(self.lr > 0, "lr must be > 0.")
        require(self.batch_size >= 1 and self.retain_batch_size >= 1, "batch sizes must be >= 1.")
        require(self.group in PARAM_GROUPS, f"group must be one of {', '.join(PARAM_GROUPS)}.")
        require(0 <= self.cond_dropout < 1, "cond_dropout must be in [0, 1).")
        require(self.checkpoint_every >= 1 and self.check_every >= 1, "intervals must be >= 1.")
        require(self.gap_tracks >= 1, "gap_tracks must be >= 1.")
        require(0 <= self.stop_tol < 1, "stop_tol must be in [0, 1).")

    def train_settings(self) -> TrainSettings:
        """The loop settings: constant rate, no weight decay or EMA (untouched weights stay put)."""
        return TrainSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=0,
            lr_schedule="constant",
            weight_decay=0.0,
            grad_clip=self.grad_clip,
            ema_decay=0.0,
            seed=self.seed,
            cond_dropout=0.0,
            checkpoint_every=self.checkpoint_every,
            param_group=self.group,
        )


# ---------------------------------------------------------------- context shared by the methods


@dataclasses.dataclass
class UnlearningContext:
    """What a method may use: the base run, the model being unlearned, and the three data sets."""

    run: Run
    model: nn.Module
    group: str  # the parameter group that may change
    params: list[str]  # its parameters' names
    forget_set: ForgetSet | None  # None when the forget set is not training tracks (a query)
    forget: Dataset  # TrackDataset items; any Dataset of such items (e.g. generated queries)
    retain: TrackDataset
    holdout: TrackDataset | None  # every holdout track (None if the corpus has none)
    manifest: pd.DataFrame
    theta0: dict[str, torch.Tensor]  # the base weights of `params`
    out_dir: Path | None = None  # the new run folder (methods may save artifacts there)
    progress: bool = True
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def task(self):
        return self.run.task

    @property
    def n_train(self) -> int:
        return len(self.forget) + len(self.retain)

    def fisher(self, draws: int = 2) -> Fisher:
        """The base run's diagonal Fisher covering `params` (cached in the run folder)."""
        settings = FisherSettings(group=covering_group(self.group), draws=draws)
        if settings not in self._cache:
            self._cache[settings] = self.run.fisher(self.manifest, settings, self.progress)
        fisher = self._cache[settings]
        missing = [n for n in self.params if n not in fisher.diag]
        if missing:
            raise LinernotesError(f"The run's Fisher lacks parameter {missing[0]}; recompute it.")
        return fisher

    def other_artist_rows(self, artist: str) -> np.ndarray:
        """Positions in `retain` of tracks by artists other than `artist` (all if none)."""
        key = ("other", artist)
        if key not in self._cache:
            arts = self.manifest["artist"].astype(str).to_numpy()[self.retain.rows]
            rows = np.flatnonzero(arts != artist)
            self._cache[key] = rows if len(rows) else np.arange(len(self.retain))
        return self._cache[key]


# ---------------------------------------------------------------- loss terms shared by methods


def random_draws(task, n: int, seed: int, step: int, stream: int):
    """(t, noise) for n samples: a pure function of (seed, step, stream)."""
    return task.random_draws(n, step_generator(seed, step, stream))


def diffusion_terms(
    task,
    model: nn.Module,
    batch: dict,
    seed: int,
    step: int,
    stream: int,
    mask_padding: bool = False,
    cond_dropout: float = 0.0,
) -> torch.Tensor:
    """Per-sample loss (B,) at this step's random draws (with optional caption dropout)."""
    n = len(batch["caption"])
    t, noise = random_draws(task, n, seed, step, stream)
    if cond_dropout > 0:
        gen = step_generator(seed, step, stream + 100)
        batch = dict(batch, drop_cond=torch.rand(n, generator=gen) < cond_dropout)
    return task.per_sample_loss(model, batch, t, noise, mask_padding)


def _track_artist(ctx: UnlearningContext, batch: dict) -> list[str]:
    return ctx.manifest["artist"].astype(str).to_numpy()[batch["index"].numpy()].tolist()


def mismatched_captions(ctx: UnlearningContext, batch: dict, seed: int, step: int) -> dict:
    """The forget batch with each caption replaced by a retain caption of another artist."""
    gen = step_generator(seed, step, SWAP_STREAM)
    captions = []
    for artist in _track_artist(ctx, batch):
        rows = ctx.other_artist_rows(artist)
        pick = int(rows[int(torch.randint(len(rows), (), generator=gen))])
        captions.append(ctx.retain.captions[int(ctx.retain.rows[pick])])
    return dict(batch, caption=captions)


def surrogate_audio(ctx: UnlearningContext, batch: dict, seed: int, step: int) -> dict:
    """The forget batch with its audio swapped for retain audio of another artist."""
    gen = step_generator(seed, step, SWAP_STREAM)
    items = []
    for artist in _track_artist(ctx, batch):
        rows = ctx.other_artist_rows(artist)
        items.append(ctx.retain[int(rows[int(torch.randint(len(rows), (), generator=gen))])])
    other = collate(items)
    return dict(batch, features=other["features"], mask=other["mask"])


def ewc_penalty(
    model: nn.Module, theta0: Mapping[str, torch.Tensor], fisher: Fisher, n_train: int
) -> torch.Tensor:
    """(N/2) Σ F (θ − θ0)²: the Fisher (Laplace) distance of the current weights from the base."""
    named = dict(model.named_parameters())
    total = torch.zeros(())
    for name, p0 in theta0.items():
        f = fisher.diag[name].to(p0.device)
        total = total + (f * (named[name] - p0).pow(2)).sum()
    return 0.5 * n_train * total


@torch.no_grad()
def fixed_losses(task, model: nn.Module, dataset: Dataset, seed: int, n_draws: int = 4,
                 mask_padding: bool = False, batch_size: int = 16) -> np.ndarray:
    """Each track's loss at n fixed timesteps spread over (0, 1), noise keyed by track id."""
    if dataset is None or len(dataset) == 0:
        return np.empty(0)
    ts = fixed_timesteps(n_draws, 1000 // n_draws)
    out = []
    with evaluating(model):
        for lo in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(lo, min(len(dataset), lo + batch_size))])
            t, noise = draw_noise(batch["track_id"], range(task.draws(n_draws)),
                                  task.latent_shape, seed=seed, timesteps=ts)
            out.append(loss_at_draws(task, model, batch, t, noise, mask_padding).double().cpu()
                       .numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- methods and their registry


class UnlearningMethod:
    """Base of the methods: override `loss`; optionally `prepare`, `after_backward`, `should_stop`.

    `loss(model, task, batch, step)` gets batch = {"forget": ..., "retain": ... or None}.
    """

    name: ClassVar[str] = ""
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    uses_retain: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, settings: MethodSettings, ctx: UnlearningContext):
        self.s, self.ctx = settings, ctx
        self.last: dict[str, float] = {}  # this step's loss terms (for stopping rules and logs)
        self.stop_reason = ""
        self._target: float | None = None

    # -- hooks
    def prepare(self) -> dict:
        """Work done once before training (at the base weights); returns facts for the record."""
        return {}

    def loss(self, model: nn.Module, task, batch: dict, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Edit gradients after backward (e.g. a saliency mask)."""

    def should_stop(self, step: int, loss: float) -> bool:
        """The shared rule: with `stop_at_gap`, stop once the forget set looks unseen."""
        if not self.s.stop_at_gap or (step + 1) % self.s.check_every or self._target is None:
            return False
        now = float(self.gap_losses(self.ctx.forget).mean())
        if now >= (1 - self.s.stop_tol) * self._target:
            self.stop_reason = (f"forget loss {now:.4f} reached the unseen-level target "
                                f"{self._target:.4f} at step {step + 1}")
            return True
        return False

    # -- helpers for the loss definitions
    def forget_terms(self, model: nn.Module, task, batch: dict, step: int) -> torch.Tensor:
        return diffusion_terms(task, model, batch, self.s.seed, step, FORGET_STREAM,
                               self.s.mask_padding)

    def retain_terms(self, model: nn.Module, task, batch: dict, step: int) -> torch.Tensor:
        return diffusion_terms(task, model, batch, self.s.seed, step, RETAIN_STREAM,
                               self.s.mask_padding, self.s.cond_dropout)

    def gap_losses(self, dataset: TrackDataset) -> np.ndarray:
        """Losses at the stopping rule's own fixed draws (not the audit's), as in training."""
        return fixed_losses(self.ctx.task, self.ctx.model, dataset, self.s.seed + 17,
                            mask_padding=self.s.mask_padding)

    def setup_stopping(self) -> dict:
        """The target of the shared stopping rule: forget loss x (holdout / train loss)."""
        if not self.s.stop_at_gap:
            return {}
        holdout = self.ctx.holdout
        if holdout is None or len(holdout) == 0:
            raise LinernotesError(
                "stop_at_gap needs holdout tracks to measure the generalisation gap, and this "
                "corpus has none; set stop_at_gap=false and choose `steps`."
            )
        n = self.s.gap_tracks
        gen = torch.Generator().manual_seed(self.s.seed + 23)
        h_rows = torch.randperm(len(holdout), generator=gen)[:n].tolist()
        r_rows = torch.randperm(len(self.ctx.retain), generator=gen)[:n].tolist()
        h = float(self.gap_losses(Subset(holdout, h_rows)).mean())
        r = float(self.gap_losses(Subset(self.ctx.retain, r_rows)).mean())
        before = float(self.gap_losses(self.ctx.forget).mean())
        self._target = before * h / r
        return {"gap_ratio": h / r, "forget_target": self._target, "forget_start": before}


METHODS = Registry("unlearning method", "Methods",
                   [f"linernotes.unlearning.{m}" for m in METHOD_MODULES])
#: Class decorator: make a method available by its `name`.
register = METHODS.register


def available_methods() -> dict[str, type[UnlearningMethod]]:
    """Every registered unlearning method by name (importing the built-in ones)."""
    return METHODS.all()


#: `optout`'s default method, by kind of loss: the one that came closest to retraining in the
#: audits of docs/benchmarks.md (the diffusion reference's, and the autoregressive reference's);
#: also `credit`'s (for diffusion, the credit benchmark's choice too)
DEFAULT_METHODS = {"diffusion": "concept_ablation", "autoregressive": "mirrored"}


def default_method(task) -> str:
    """`optout`'s default method for a model with this Task."""
    return DEFAULT_METHODS["autoregressive" if task.deterministic else "diffusion"]


def get_method(name: str) -> type[UnlearningMethod]:
    """The method registered as `name`, or a clear error with close names."""
    return METHODS.get(name)


def method_settings(
    name: str, settings: MethodSettings | Mapping[str, Any] | None = None
) -> MethodSettings:
    """Settings for method `name`: its defaults, a dict of overrides, or a settings object."""
    cls = get_method(name).settings_class
    if settings is None:
        return cls()
    if isinstance(settings, MethodSettings):
        if not isinstance(settings, cls):
            raise LinernotesError(
                f"Method {name!r} takes {cls.__name__}, not {type(settings).__name__}."
            )
        return settings
    return cls.from_dict(dict(settings))


# ---------------------------------------------------------------- the trainer


class PairedBatches:
    """Batch of step s: {"forget": forget tracks, "retain": retain tracks or None}."""

    def __init__(self, forget: TrackDataset, retain: TrackDataset | None, s: MethodSettings):
        self.forget = StepBatches(forget, s.batch_size, s.seed)
        self.retain = StepBatches(retain, s.retain_batch_size, s.seed + 1) if retain else None

    def __call__(self, step: int) -> dict:
        return {"forget": self.forget(step), "retain": self.retain(step) if self.retain else None}


def _datasets(run: Run, manifest: pd.DataFrame, forget: ForgetSet, progress: bool):
    store = run.feature_store(manifest, progress=progress)

    def ds(ids):
        return TrackDataset(store, manifest, positions(manifest, ids)) if ids else None

    return ds(forget.forget_ids), ds(forget.retain_ids), ds(run.holdout_ids(manifest))


def method_context(
    run: Run,
    group: str,
    forget: Dataset,
    retain: TrackDataset | None,
    holdout: TrackDataset | None,
    manifest: pd.DataFrame,
    forget_set: ForgetSet | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
) -> UnlearningContext:
    """A fresh copy of the run's model (parameters `group` free to change) and the data a method
    sees. `forget` may hold items that are not training tracks (attribution's queries)."""
    model = copy.deepcopy(run.model)
    params = run.task.parameter_names(model, group)
    named = dict(model.named_parameters())
    return UnlearningContext(
        run=run, model=model, group=group, params=params, forget_set=forget_set, forget=forget,
        retain=retain, holdout=holdout, manifest=manifest,
        theta0={n: named[n].detach().clone() for n in params}, out_dir=out_dir, progress=progress,
    )


def fit_method(
    impl: UnlearningMethod, work: Path | None, key: str, progress: bool = True, desc: str = ""
) -> FitResult:
    """Run a prepared method on its context's model (checkpointed in `work`, resumable)."""
    ctx, s = impl.ctx, impl.s
    return fit(
        ctx.model,
        PairedBatches(ctx.forget, ctx.retain if impl.uses_retain else None, s),
        impl.loss,
        s.train_settings(),
        out_dir=work,
        task=ctx.task,
        params=ctx.params,
        key=key,
        after_backward=impl.after_backward,
        should_stop=impl.should_stop,
        progress=progress,
        desc=desc or f"unlearn {impl.name}",
    )


def unlearn(
    run: Run,
    manifest: pd.DataFrame,
    forget: ForgetSet,
    method: str,
    settings: MethodSettings | Mapping[str, Any] | None,
    out_dir: str | Path,
    progress: bool = True,
) -> Run:
    """Unlearn `forget` from `run` with `method` into the new run folder `out_dir`.

    Resumes an interrupted run; returns the finished run at once if `out_dir` already holds it.
    """
    cls = get_method(method)
    s = method_settings(method, settings)
    out = Layout(out_dir)
    key = hash_json({"base": run.hash, "forget": sorted(forget.forget_ids), "method": method,
                     "settings": s.to_dict()})
    if out.optout_record.exists():
        record = read_json(out.optout_record)
        if record.get("key") != key:
            raise LinernotesError(
                f"{out.path} already holds another opt-out ({record.get('method')} of "
                f"{record.get('removed', {}).get('artists')}); choose another folder or delete it."
            )
        return load_run(out.path, manifest=manifest)
    if out.is_run:
        raise LinernotesError(f"{out.path} already holds a run that is not an opt-out; choose "
                              "another folder.")
    started = time.perf_counter()
    f_ds, r_ds, h_ds = _datasets(run, manifest, forget, progress)
    ctx = method_context(run, s.group, f_ds, r_ds, h_ds, manifest, forget, out.path, progress)
    impl, model = cls(s, ctx), ctx.model
    prepared = {**impl.prepare(), **impl.setup_stopping()}
    check_seed = s.seed + 17
    forget_before = float(fixed_losses(run.task, model, f_ds, check_seed).mean())
    setup_seconds = time.perf_counter() - started
    fit_started = time.perf_counter()
    result = fit_method(impl, out.optout_work, key, progress, f"unlearn {method}")
    fit_seconds = time.perf_counter() - fit_started
    this_call = max(1, len(result.losses))
    forget_after = float(fixed_losses(run.task, model, f_ds, check_seed).mean())
    prev = run.removed_tracks()
    record = {
        "kind": "linernotes-optout",
        "key": key,
        "base": {"path": str(run.path), "hash": run.hash},
        "removed": forget.to_dict(),
        "removed_total": sorted(set(prev) | set(forget.forget_ids)),
        "method": method,
        "settings": s.to_dict(),
        "prepared": prepared,
        "cost": {
            "seconds": setup_seconds + fit_seconds * result.steps / this_call,
            "setup_seconds": setup_seconds,
            "steps": result.steps,
            "resumed": len(result.losses) < result.steps,
            "stopped_early": result.stopped,
            "stop_reason": impl.stop_reason,
        },
        "forget_loss": {"before": forget_before, "after": forget_after, "seed": check_seed},
    }
    new = run.derive(model, out.path, note=record)
    write_json(out.optout_record, {**record, "run_hash": new.hash})
    log = out.optout_work / LOSS_LOG
    if log.exists():
        shutil.copyfile(log, out.optout_log)
    shutil.rmtree(out.optout_work, ignore_errors=True)
    return new


def optout(
    run_path: str | Path | Run,
    manifest: str | Path | pd.DataFrame,
    forget_spec: ForgetSpec | str | Mapping,
    method: str,
    settings: MethodSettings | Mapping[str, Any] | None,
    out_dir: str | Path,
    progress: bool = True,
) -> Run:
    """Remove the tracks of `forget_spec` from the run at `run_path` with `method`; a new run.

    The base may itself be an opt-out (tracks removed earlier stay out of the retain set).
    """
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    run = run_path if isinstance(run_path, Run) else load_run(run_path, manifest=df)
    exclude = run.config.get("train", {}).get("exclude", []) or []
    forget = resolve_forget_set(df, forget_spec, exclude, run.removed_tracks())
    return unlearn(run, df, forget, method, settings, out_dir, progress)


def read_record(run: Run | str | Path) -> dict:
    """The opt-out record of an unlearned run folder."""
    path = Layout(run.path if isinstance(run, Run) else run).optout_record
    if not path.exists():
        raise LinernotesError(f"{path.parent} is not an opt-out run ({path.name} missing); make "
                              "one with `optout`.")
    return read_json(path)
