"""One training loop for everything that trains: models, retrains, opt-outs, encoders.

`fit` is the loop: AdamW, EMA weights, gradient clipping, a pluggable per-step loss, atomic
checkpoints and exact resume (data order and noise are pure functions of (seed, step), and the
optimizer/EMA state is saved). A model family's training stages (`models/reference.py`) call it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from linernotes import device
from linernotes.artifacts import atomic_path, hash_json
from linernotes.config import Settings, require, setting
from linernotes.data.dataset import collate, split_rows
from linernotes.errors import LinernotesError
from linernotes.task import expand_draws, trainable

#: A per-step loss: (model, task, batch, step) -> scalar tensor to minimise.
LossFn = Callable[[nn.Module, object, dict, int], torch.Tensor]

CHECKPOINT = "checkpoint.pt"
LOSS_LOG = "losses.jsonl"


@dataclasses.dataclass(frozen=True)
class TrainSettings(Settings):
    """How the denoiser (or a fine-tune of it) is trained."""

    steps: int = setting(1200, "Training steps.")
    batch_size: int = setting(32, "Batch size.")
    lr: float = setting(1e-3, "Peak learning rate.")
    warmup: int = setting(50, "Warm-up steps.")
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = setting(0.995, "EMA decay of the weights kept (0: the raw weights).")
    seed: int = setting(0, "Seed (data order, draws and initial weights).")
    cond_dropout: float = 0.1  # classifier-free guidance training
    mask_padding: bool = setting(False, "Train on real frames only (default: all frames).")
    n_draws: int = 1  # (t, noise) draws per sample per step
    checkpoint_every: int = 200
    split: str = "train"
    param_group: str = setting("all", "Parameters trained (a parameter group).")
    exclude: tuple[str, ...] = ()  # track ids left out (retraining without them)
    duplicate: tuple[tuple[str, int], ...] = ()  # (track id, m): the track appears m times
    keep_checkpoint: bool = False  # keep checkpoint.pt after a finished run
    precision: str = setting("float32", "Forward passes in float32 or bfloat16 (autocast; large "
                             "models on GPUs).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass "
                                           "(less memory, slower; models that support it).")

    def __post_init__(self) -> None:
        dup = self.duplicate.items() if isinstance(self.duplicate, dict) else self.duplicate
        object.__setattr__(self, "duplicate", tuple((str(k), int(m)) for k, m in dup))
        object.__setattr__(self, "exclude", tuple(str(x) for x in self.exclude))
        super().__post_init__()

    def validate(self) -> None:
        require(self.steps >= 0, "steps must be >= 0.")
        require(self.warmup >= 0, "warmup must be >= 0.")
        require(self.batch_size > 0, "batch_size must be > 0.")
        require(self.lr > 0, "lr must be > 0.")
        require(self.lr_schedule in ("cosine", "constant"), "lr_schedule: 'cosine' or 'constant'.")
        require(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1).")
        require(0 <= self.cond_dropout < 1, "cond_dropout must be in [0, 1).")
        require(self.n_draws >= 1, "n_draws must be >= 1.")
        require(self.checkpoint_every > 0, "checkpoint_every must be > 0.")
        require(all(m >= 1 for _, m in self.duplicate), "duplicate counts must be >= 1.")
        require(self.precision in ("float32", "bfloat16"), "precision: float32 or bfloat16.")

    def lr_at(self, step: int) -> float:
        """Learning rate at `step`: linear warmup, then constant or cosine decay."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant" or self.steps <= self.warmup:
            return self.lr
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------- data and losses


def training_rows(manifest: pd.DataFrame, settings: TrainSettings) -> np.ndarray:
    """Manifest positions to train on: the split, minus `exclude`, with `duplicate` repeats."""
    known = set(manifest["track_id"])
    unknown = sorted((set(settings.exclude) | {k for k, _ in settings.duplicate}) - known)
    if unknown:
        raise LinernotesError(
            f"exclude/duplicate name track id(s) not in the manifest: {unknown[:5]}; "
            "check the ids against the manifest's track_id column."
        )
    rows = split_rows(manifest, settings.split, settings.exclude)
    if len(rows) == 0:
        raise LinernotesError(f"No '{settings.split}' tracks left to train on (after exclude).")
    position = {tid: i for i, tid in enumerate(manifest["track_id"])}
    in_split = set(rows.tolist())
    extra = []
    for tid, m in settings.duplicate:
        if position[tid] not in in_split:
            raise LinernotesError(f"duplicate: track {tid} is not in the '{settings.split}' split.")
        extra += [position[tid]] * (m - 1)
    return np.concatenate([rows, np.asarray(extra, dtype=np.int64)])


class StepBatches:
    """Batch of step s = positions [s*B, (s+1)*B) of a stream of seeded epoch permutations."""

    def __init__(self, dataset, batch_size: int, seed: int = 0):
        if len(dataset) == 0:
            raise LinernotesError("Nothing to train on: the dataset is empty.")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=gen).numpy()}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n = len(self.dataset)
        pos = range(step * self.batch_size, (step + 1) * self.batch_size)
        return [int(self._perm(p // n)[p % n]) for p in pos]

    def __call__(self, step: int) -> dict:
        return collate([self.dataset[i] for i in self.indices(step)])


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that is a pure function of (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 31 + stream)


class DiffusionLoss:
    """The default per-step loss: the Task's mean loss over random (t, noise) draws.

    Condition dropout is applied here (as "drop_cond" in the batch), nowhere else.
    """

    def __init__(
        self, seed: int = 0, n_draws: int = 1, cond_dropout: float = 0.1, mask_padding: bool = False
    ):
        self.seed, self.n_draws = seed, n_draws
        self.cond_dropout, self.mask_padding = cond_dropout, mask_padding

    def __call__(self, model: nn.Module, task, batch: dict, step: int) -> torch.Tensor:
        gen = step_generator(self.seed, step)
        b, d = len(batch["caption"]), self.n_draws
        t, noise = task.random_draws(b * d, gen)
        drop = torch.rand(b, generator=gen) < self.cond_dropout
        flat = expand_draws(batch, d) if d > 1 else dict(batch)
        flat["drop_cond"] = drop.repeat_interleave(d)
        return task.per_sample_loss(model, flat, t, noise, self.mask_padding).mean()


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass
class FitResult:
    steps: int  # steps done in total
    ema: dict[str, torch.Tensor] | None  # EMA of the trained parameters (None without EMA)
    losses: list[float]  # per-step losses of this call
    stopped: bool = False  # should_stop ended the loop early


def _optimizer(params: dict[str, nn.Parameter], s: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": s.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2))


def log_seconds(path: Path) -> float:
    """Training seconds recorded in a loss log, without the pauses of interrupted runs.

    A resumed run's wall clock covers only its last part; the log's per-step times cover all of
    it. Gaps over 20x the median step time (a kill and a resume) count as one median step.
    """
    times = np.array([json.loads(line)["time"] for line in Path(path).read_text().splitlines()
                      if line.strip()], dtype=np.float64)
    if len(times) < 2:
        return math.nan
    gaps = np.diff(np.sort(times))
    step = float(np.median(gaps))
    return float(np.where(gaps > 20 * step, step, gaps).sum() + step)


def _trim_log(path: Path, upto: int) -> None:
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] < upto]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))


def fit(
    model: nn.Module,
    batches: Callable[[int], dict],
    loss_fn: LossFn,
    settings: TrainSettings,
    out_dir: str | Path | None = None,
    task=None,
    params: Sequence[str] | None = None,
    key: str = "",
    after_backward: Callable[[nn.Module, int], None] | None = None,
    should_stop: Callable[[int, float], bool] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train `model` for `settings.steps` steps of `loss_fn(model, task, batches(step), step)`.

    Only `params` (names; default all with requires_grad) are updated. With `out_dir`, a checkpoint
    is written every `checkpoint_every` steps and a killed run resumes from it with identical
    results; `key` (e.g. hash of the inputs) must match to resume. `after_backward(model, step)`
    may edit gradients (e.g. saliency masks); `should_stop(step, loss)` may end training early.
    """
    named = dict(model.named_parameters())
    names = list(params) if params is not None else [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in names if n not in named]
    if missing or not names:
        raise LinernotesError(f"fit: no such parameters {missing[:3]} (or none selected).")
    train_params = {n: named[n] for n in names}
    opt = _optimizer(train_params, settings)
    ema = (
        {n: p.detach().clone() for n, p in train_params.items()} if settings.ema_decay > 0 else None
    )
    fingerprint = hash_json({"settings": settings.hash(), "key": key, "params": names})
    out = Path(out_dir) if out_dir is not None else None
    start, stopped = 0, False
    if out is not None and (out / CHECKPOINT).exists():
        start, stopped = _load_checkpoint(out / CHECKPOINT, fingerprint, model, opt, ema)
        _trim_log(out / LOSS_LOG, start)
    losses: list[float] = []
    pending: list[str] = []
    bar = tqdm(
        total=settings.steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True
    )
    if settings.gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise LinernotesError(f"{type(model).__name__} does not support gradient "
                                  "checkpointing; train without it.")
        model.enable_gradient_checkpointing()
    half = torch.autocast(device.of(model).type, dtype=torch.bfloat16,
                          enabled=settings.precision == "bfloat16")
    with bar, trainable(model, train_params, train=True):
        for step in range(start, start if stopped else settings.steps):
            lr = settings.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            with half:
                loss = loss_fn(model, task, batches(step), step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise LinernotesError(
                    f"The training loss became {value} at step {step}; lower the learning rate."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model, step)
            gnorm = (
                torch.nn.utils.clip_grad_norm_(list(train_params.values()), settings.grad_clip)
                if settings.grad_clip > 0
                else torch.tensor(float("nan"))
            )
            opt.step()
            if ema is not None:
                decay = min(settings.ema_decay, (1 + step) / (10 + step))
                with torch.no_grad():
                    for n, p in train_params.items():
                        ema[n].lerp_(p.detach(), 1 - decay)
            losses.append(value)
            pending.append(
                json.dumps(
                    {
                        "step": step,
                        "loss": value,
                        "lr": lr,
                        "grad_norm": float(gnorm),
                        "time": round(time.time(), 3),
                    }
                )
            )
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            done = step + 1
            stopped = should_stop is not None and should_stop(step, value)
            if out is not None and (
                done % settings.checkpoint_every == 0 or stopped or done == settings.steps
            ):
                _flush_log(out / LOSS_LOG, pending)
                _save_checkpoint(out / CHECKPOINT, fingerprint, done, model, opt, ema, stopped)
            if stopped:
                break
    model.eval()
    if settings.gradient_checkpointing:
        model.disable_gradient_checkpointing()
    return FitResult(steps=start + len(losses), ema=ema, losses=losses, stopped=stopped)


def _flush_log(path: Path, pending: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in pending))
    pending.clear()


def _save_checkpoint(
    path: Path, fingerprint: str, step: int, model: nn.Module, opt, ema, stopped: bool
) -> None:
    state = {
        "fingerprint": fingerprint,
        "step": step,
        "stopped": stopped,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "ema": ema,
        "rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, fingerprint: str, model: nn.Module, opt, ema) -> tuple[int, bool]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LinernotesError(
            f"Checkpoint {path} is unreadable ({exc}); delete it to restart."
        ) from exc
    if state.get("fingerprint") != fingerprint:
        raise LinernotesError(
            f"{path} is a checkpoint of a run with other settings or inputs; delete it (or use "
            "another output folder) to train with these settings."
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        for n in ema:
            ema[n].copy_(state["ema"][n])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), bool(state.get("stopped", False))


def ema_state_dict(model: nn.Module, ema: dict[str, torch.Tensor] | None) -> dict:
    """The model's state dict with EMA values in place of the trained parameters."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for n, v in (ema or {}).items():
        state[n] = v.detach().clone()
    return state
