"""Diagonal empirical Fisher: mean over (sample, draw) of squared per-sample loss gradients.

Stored once per model (safetensors, with provenance) and reused by every query and opt-out. The
running sums are checkpointed while it is computed: a killed computation resumes at the last
checkpoint and gives the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from linernotes import distributed
from linernotes.artifacts import atomic_path, load_cached
from linernotes.config import Settings, require, setting
from linernotes.data.dataset import collate
from linernotes.errors import LinernotesError
from linernotes.task import PARAM_GROUPS, Task, draw_noise, trainable


@dataclasses.dataclass(frozen=True)
class FisherSettings(Settings):
    """Which samples and draws estimate the Fisher, over which parameter group."""

    group: str = setting("transformer", "Parameter group.")
    samples: int = setting(0, "Training samples (0 = all).")
    draws: int = setting(2, "Random (timestep, noise) draws per sample.")
    seed: int = setting(1234, "Seed of the samples and draws.")
    mask_padding: bool = setting(False, "Mask padding (default: the loss as the model trained).")
    batch_size: int = setting(8, "Micro-batch for the per-sample gradients.")

    def validate(self) -> None:
        require(self.group in PARAM_GROUPS, f"Unknown parameter group {self.group!r}; "
                f"choose one of {', '.join(PARAM_GROUPS)}.")
        require(self.samples >= 0 and self.draws >= 1, "samples >= 0 and draws >= 1 required.")


#: Parameters above which the Fisher is summed in float32 rather than float64.
LARGE_GROUP = 50_000_000


def covering_group(group: str) -> str:
    """The Fisher group that covers parameter group `group` (one file then serves several)."""
    return "all" if group == "all" else "transformer"


@dataclasses.dataclass
class Fisher:
    """Diagonal Fisher per parameter name, with what it was made from."""

    diag: dict[str, torch.Tensor]
    settings: FisherSettings
    run_hash: str
    n_examples: int

    def damped_inverse(self, damping: float) -> tuple[dict[str, torch.Tensor], dict]:
        """(F + λI)⁻¹ with λ = damping × mean(F); reports zero entries and the λ used. The
        inverse is on the Fisher's device (`to`)."""
        total = sum(float(f.sum()) for f in self.diag.values())
        count = sum(f.numel() for f in self.diag.values())
        zeros = sum(int((f == 0).sum()) for f in self.diag.values())
        mean = total / max(count, 1)
        lam = damping * mean
        if lam <= 0 and zeros:
            lam = 1e-8 * mean if mean > 0 else 1e-12
        if mean <= 0:
            raise LinernotesError(
                "The Fisher is zero everywhere: the parameter group gets no gradient. "
                "Recompute it with another --group."
            )
        inv = {n: 1.0 / (f + lam) for n, f in self.diag.items()}
        return inv, {"lambda": lam, "fisher_mean": mean, "zero_entries": zeros}

    def to(self, device: torch.device) -> Fisher:
        """The same Fisher with its diagonal on `device`."""
        return dataclasses.replace(self, diag={n: f.to(device) for n, f in self.diag.items()})

    def save(self, path: str | Path) -> None:
        meta = {
            "settings": json.dumps(self.settings.to_dict()),
            "run_hash": self.run_hash,
            "n_examples": str(self.n_examples),
        }
        with atomic_path(path) as tmp:
            save_file({n: t.cpu().contiguous() for n, t in self.diag.items()}, str(tmp),
                      metadata=meta)

    @classmethod
    def load(cls, path: str | Path, run_hash: str | None = None) -> Fisher:
        path = Path(path)
        if not path.exists():
            raise LinernotesError(f"No Fisher at {path}; compute it with `linernotes fisher`.")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            diag = load_file(str(path))
        except Exception as exc:
            raise LinernotesError(f"{path} is not a readable Fisher file ({exc}); "
                                  "delete it and recompute.") from exc
        if run_hash is not None and meta.get("run_hash") != run_hash:
            raise LinernotesError(
                f"The Fisher {path} was computed for run {meta.get('run_hash')}, not for this run "
                f"({run_hash}); a run's own Fisher is recomputed in its place by `linernotes "
                "fisher --run RUN --force` (or any command that needs it)."
            )
        settings = FisherSettings.from_dict(json.loads(meta["settings"]))
        return cls(diag, settings, meta["run_hash"], int(meta["n_examples"]))


def _write_partial(path: str | Path, stamp: dict, acc: dict[str, torch.Tensor], count: int,
                   done: int) -> None:
    meta = {"stamp": json.dumps(stamp, sort_keys=True), "count": str(count), "done": str(done)}
    with atomic_path(path) as tmp:
        save_file({n: a.cpu().contiguous() for n, a in acc.items()}, str(tmp), metadata=meta)


def _read_partial(path: str | Path, stamp: dict, like: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], int, int]:
    """(sums, count, samples done) of a checkpoint made for the same computation."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("stamp") != json.dumps(stamp, sort_keys=True):
        raise ValueError("a checkpoint of another Fisher computation")
    sums = load_file(str(path))
    if {n: (t.shape, t.dtype) for n, t in sums.items()} != {
            n: (t.shape, t.dtype) for n, t in like.items()}:
        raise ValueError("sums of other shapes")
    dev = next(iter(like.values())).device
    return {n: sums[n].to(dev) for n in like}, int(meta["count"]), int(meta["done"])


def compute_fisher(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    settings: FisherSettings,
    run_hash: str,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_seconds: float = 300.0,
) -> Fisher:
    """Empirical diagonal Fisher of `settings.group` over `dataset` (random draws, keyed by id).

    Per-sample gradients come from micro-batches of one (sample, draw) each, accumulated as
    squares; the draws are common random numbers, so the estimate is reproducible. With
    `checkpoint` (a file per rank), the running sums are saved there after a batch once
    `checkpoint_seconds` have passed since the last save, and a rerun resumes from them (the
    caller deletes the file once the Fisher is saved).
    """
    params = task.parameters(model, settings.group)
    if not params:
        raise LinernotesError(f"Parameter group {settings.group!r} is empty for this model.")
    n = len(dataset) if settings.samples == 0 else min(settings.samples, len(dataset))
    g = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    order = order[distributed.rank() :: distributed.world_size()]  # this rank's share
    # float64 sums (8 bytes per parameter) unless the group is large: a 1B-parameter DiT's
    # would need 8 GB beside its weights and gradients, so large groups sum in float32
    large = sum(p.numel() for p in params.values()) > LARGE_GROUP
    acc = {name: torch.zeros_like(p, dtype=torch.float32 if large else torch.float64)
           for name, p in params.items()}
    count, done = 0, 0  # (sample, draw) pairs summed; samples of `order` done
    stamp = {"settings": settings.to_dict(), "run_hash": run_hash, "n": len(order),
             "rank": distributed.rank(), "world": distributed.world_size()}
    if checkpoint is not None:
        saved = load_cached(checkpoint, lambda p: _read_partial(p, stamp, acc))
        if saved is not None:
            acc, count, done = saved
    sub = torch.utils.data.Subset(dataset, order[done:])  # `done` ends a batch: same batches
    loader = DataLoader(sub, batch_size=settings.batch_size, collate_fn=collate)
    draws = task.draws(settings.draws)
    bar = tqdm(total=len(order) * draws, initial=count, desc="fisher",
               disable=not progress or distributed.rank() != 0)
    last = time.monotonic()
    with bar, trainable(model, params):
        for batch in loader:
            t, noise = draw_noise(batch["track_id"], range(draws), task.latent_shape,
                                  seed=settings.seed)
            for i in range(len(batch["track_id"])):
                one = {k: (v[i : i + 1] if isinstance(v, (torch.Tensor, list)) else v)
                       for k, v in batch.items()}
                for d in range(draws):
                    loss = task.per_sample_loss(model, one, t[i, d : d + 1], noise[i, d : d + 1],
                                                settings.mask_padding)
                    if not torch.isfinite(loss).all():
                        raise LinernotesError(
                            f"Non-finite loss for track {batch['track_id'][i]} (draw {d}) while "
                            "computing the Fisher: the model or its features are broken."
                        )
                    grads = torch.autograd.grad(loss.sum(), list(params.values()))
                    for (name, _), gr in zip(params.items(), grads):
                        acc[name] += gr.to(acc[name].dtype) ** 2
                    count += 1
                    bar.update(1)
            done += len(batch["track_id"])
            if checkpoint is not None and time.monotonic() - last >= checkpoint_seconds:
                _write_partial(checkpoint, stamp, acc, count, done)
                last = time.monotonic()
    for a in acc.values():
        distributed.all_reduce_sum(a)
    dev = next(iter(acc.values())).device
    count = int(distributed.all_reduce_sum(torch.tensor(float(count), dtype=torch.float64,
                                                        device=dev)))
    diag = {name: (a / count).float().cpu() for name, a in acc.items()}
    return Fisher(diag, settings, run_hash, count)
