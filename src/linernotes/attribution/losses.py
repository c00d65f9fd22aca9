"""Per-track losses at fixed draws over a training set: batched, sharded on disk, resumable.

This is the scoring engine's hot loop. The same draws (AbC's fixed timesteps, noise keyed by
track id) are used before and after unlearning, so score = after - before is a paired difference.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from linernotes import device, distributed
from linernotes.artifacts import atomic_path, hash_json, load_cached, read_json, write_json
from linernotes.config import Settings, require, setting
from linernotes.data.dataset import collate
from linernotes.errors import LinernotesError
from linernotes.task import Task, draw_noise, fixed_timesteps, loss_at_draws

SCORE_KINDS = ("log-ratio", "delta")
#: two-stage scoring by default from this many training tracks, the second stage scoring the
#: larger of AUTO_MIN_CANDIDATES and AUTO_CANDIDATE_SHARE of them. On the whole music21 corpus
#: (13,355 tracks, 12 clips; docs/benchmarks.md, two-stage section) 3% recovered exact
#: attribution's top 10 at 0.983 (0.9 at worst) and its top 100 at 0.944 (0.78 at worst), 8.6x
#: faster than exact; 2% recovered 0.88 of the top 100 at 10.5x, 5% 0.987 at 6.3x. 400 (4x the
#: top 100) for sets just above the threshold
TWO_STAGE_FROM = 5000
AUTO_MIN_CANDIDATES = 400
AUTO_CANDIDATE_SHARE = 0.03
PRECISIONS = ("auto", "float32", "bfloat16")


def score_of(before: np.ndarray, after: np.ndarray, kind: str = "log-ratio") -> np.ndarray:
    """A track's score from its loss before and after unlearning (same draws).

    "delta" is the loss increase, the papers' score. "log-ratio" is log(after / before): the
    relative increase, which divides out each track's own loss level. On the demo model a
    planted (20x duplicated) track ranks 2nd by delta for all 6 of its generations, behind a
    high-loss track, and 1st by log-ratio; self-influence ranks are equal or better
    (docs/benchmarks.md). It orders tracks exactly as MUCS's normalised difference
    (after − before) / (after + before) does (SPEC §8), a monotone function of the ratio.
    """
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if kind == "delta":
        return after - before
    if kind == "log-ratio":
        tiny = np.finfo(np.float64).tiny
        return np.log(np.maximum(after, tiny)) - np.log(np.maximum(before, tiny))
    raise LinernotesError(f"Unknown score kind {kind!r} (one of {', '.join(SCORE_KINDS)}).")


@dataclasses.dataclass(frozen=True)
class ScoreSettings(Settings):
    """How each training track's loss is measured (identically before and after unlearning)."""

    timesteps: int = setting(20, "Fixed scoring timesteps per track (AbC: 20 at stride 50).")
    stride: int = setting(50, "Stride of the scoring timesteps (of 1000).")
    seed: int = setting(0, "Seed of the scoring noise.")
    mask_train: bool = setting(False, "M_L: mask training tracks' padding in their scoring loss.")
    # 4: 1.2x (bfloat16) to 1.35x (float32) the losses/s of 16 on this repository's CPU in a
    # batch-size sweep (smaller activations stay in cache; docs/benchmarks.md, exact attribution
    # speed, measures the result); raise it on a GPU
    batch_size: int = setting(4, "Tracks per batch (x timesteps rows per forward).")
    shard_size: int = setting(512, "Tracks per shard on disk.")
    kind: str = setting("log-ratio", "Score from each track's losses before and after "
                        "unlearning: log-ratio, or delta (the papers').")
    # auto: bfloat16 scored 2.2x the losses/s of float32 (old defaults) on this repository's
    # CPU at Spearman 0.999 (docs/benchmarks.md, exact attribution speed); a killed and resumed
    # bfloat16 pass gives the uninterrupted pass's bytes (tests/test_resume.py)
    precision: str = setting("auto", "Scoring forwards in float32 or bfloat16 (autocast), or "
                             "auto: bfloat16 where the device runs it natively (GPUs, CPUs "
                             "with AVX512-BF16 or AMX) and the task allows it, else float32.")
    candidates: int = setting(0, "Two-stage scoring: every track at coarse_timesteps first, "
                              "then only this many top tracks at every timestep (0: automatic, "
                              f"two stages from {TWO_STAGE_FROM:,} training tracks).")
    # 1 (t = 0.5): the same recall as 2 and 4 on the whole music21 corpus, at half and a
    # quarter of the first stage's cost (docs/benchmarks.md, full-corpus section)
    coarse_timesteps: int = setting(1, "Timesteps of the first stage of two-stage scoring "
                                    "(spread over the schedule).")
    # 1: a single first-stage timestep at t = 0.225 (span 0.45; the best single timestep on
    # the clip t = 0.5 served worst) gave the same mean recall over 5 clips, better on one,
    # worse on two (docs/benchmarks.md, full-corpus section)
    coarse_span: float = setting(1.0, "The share of the schedule (from t = 0) the first "
                                 "stage's timesteps are spread over.")
    exact: bool = setting(False, "Score every track at every timestep, however large the "
                          "training set (no first stage).")

    def validate(self) -> None:
        require(self.kind in SCORE_KINDS, f"score kind must be one of {', '.join(SCORE_KINDS)}.")
        require(self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}.")
        require(self.timesteps >= 1 and self.stride >= 1, "timesteps and stride must be >= 1.")
        require(self.stride * (self.timesteps - 1) < 1000, "timesteps x stride must fit in 1000.")
        require(self.batch_size >= 1 and self.shard_size >= 1,
                "batch and shard sizes must be >= 1.")
        require(self.candidates >= 0, "candidates must be >= 0 (0: automatic).")
        require(1 <= self.coarse_timesteps <= 1000, "coarse_timesteps must be in 1..1000.")
        require(0 < self.coarse_span <= 1 and self.coarse_span * 1000 >= self.coarse_timesteps,
                "coarse_span must be in (0, 1], with room for coarse_timesteps.")

    def candidates_for(self, n: int) -> int:
        """How many of `n` training tracks the second stage scores (n: one stage, exact).

        Automatic (candidates = 0): one stage below TWO_STAGE_FROM tracks, else the larger of
        AUTO_MIN_CANDIDATES and AUTO_CANDIDATE_SHARE of the tracks."""
        if self.exact:
            return n
        if self.candidates:
            return min(self.candidates, n)
        if n < TWO_STAGE_FROM:
            return n
        return min(n, max(AUTO_MIN_CANDIDATES, math.ceil(AUTO_CANDIDATE_SHARE * n)))

    def coarse(self) -> ScoreSettings:
        """The first stage of two-stage scoring: `coarse_timesteps` spread over the first
        `coarse_span` of the schedule, as many rows per forward as here (more tracks per batch:
        at 4 tracks x 1 timestep a pass ran at 0.6x the losses/s of 4 x 20 on the whole-corpus
        model), the rest as here."""
        k = self.coarse_timesteps
        return self.replace(timesteps=k, stride=round(1000 * self.coarse_span) // k, exact=True,
                            batch_size=max(1, self.batch_size * self.timesteps // k))

    def on(self, task: Task, model: nn.Module) -> ScoreSettings:
        """These settings with the precision scoring will use ("auto" resolved)."""
        precision = resolve_precision(self.precision, task, model)
        return self if precision == self.precision else self.replace(precision=precision)

    def draw_key(self) -> dict:
        """What the losses depend on (the draws, the masking and a non-default precision;
        resolve "auto" with `on(task, model)` first, or the key names "auto")."""
        key = {"timesteps": self.timesteps, "stride": self.stride, "seed": self.seed,
               "mask_train": self.mask_train}
        if self.precision != "float32":
            key["precision"] = self.precision
        return key


def resolve_precision(precision: str, task: Task, model: nn.Module) -> str:
    """`precision` for `task`'s scoring forwards: "auto" is bfloat16 where the model's device runs
    it natively and the task scores well in it (`Task.bfloat16_scoring`), else float32."""
    if precision != "auto":
        return precision
    fast = task.bfloat16_scoring and device.fast_bfloat16(device.of(model))
    return "bfloat16" if fast else "float32"


def autocast(task: Task, model: nn.Module, precision: str):
    """The autocast context of `precision` on the model's device (a no-op for float32)."""
    return torch.autocast(device.of(model).type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, task, model) == "bfloat16")


@torch.inference_mode()
def track_losses(
    task: Task, model: nn.Module, dataset: Dataset, settings: ScoreSettings
) -> np.ndarray:
    """Loss of every track of `dataset` averaged over the fixed draws; (len(dataset),) float64."""
    ts = fixed_timesteps(settings.timesteps, settings.stride)
    out = np.empty(len(dataset), dtype=np.float64)
    loader = DataLoader(dataset, batch_size=settings.batch_size, collate_fn=collate)
    pos = 0
    for batch in loader:
        t, noise = draw_noise(batch["track_id"], range(task.draws(settings.timesteps)),
                              task.latent_shape, seed=settings.seed, timesteps=ts)
        with autocast(task, model, settings.precision):
            losses = loss_at_draws(task, model, batch, t, noise, settings.mask_train)
        out[pos : pos + len(losses)] = losses.double().cpu().numpy()
        pos += len(losses)
    return out


def sharded_losses(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    track_ids: list[str],
    settings: ScoreSettings,
    folder: str | Path,
    provenance: dict,
    desc: str = "losses",
    progress: bool = True,
) -> np.ndarray:
    """`track_losses`, written shard by shard into `folder`; a rerun reuses finished shards.

    `provenance` (run hash, settings, ...) is recorded and checked: a folder made for other
    inputs is refused rather than silently mixed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = settings.on(task, model)  # the key names the precision actually used
    meta = {"provenance": provenance, "draws": settings.draw_key(), "n": len(track_ids),
            "tracks": hash_json(track_ids), "shard_size": settings.shard_size}
    meta_path = folder / "meta.json"
    old = load_cached(meta_path, read_json)
    if old is None and meta_path.exists() and distributed.rank() == 0:
        for stale in folder.glob("shard-*.npy"):  # of unknown inputs: not reused
            stale.unlink()
        meta_path.unlink()
    if old is not None:
        if old != json_roundtrip(meta):
            raise LinernotesError(
                f"{folder} holds losses made from other inputs ({old.get('provenance')}); "
                "delete it or choose another output folder."
            )
    elif distributed.rank() == 0:
        write_json(meta_path, meta)
    distributed.barrier()
    n_shards = (len(track_ids) + settings.shard_size - 1) // settings.shard_size
    bounds = [(s * settings.shard_size, min(len(track_ids), (s + 1) * settings.shard_size))
              for s in range(n_shards)]
    mine = range(distributed.rank(), n_shards, distributed.world_size())
    bar = tqdm(total=sum(hi - lo for s in mine for lo, hi in [bounds[s]]), desc=desc,
               disable=not progress or distributed.rank() != 0)

    def shard(s: int) -> np.ndarray:
        """Shard s's losses: read when finished and readable, else computed and written."""
        lo, hi = bounds[s]
        path = folder / f"shard-{s:05d}.npy"
        part = load_cached(path, lambda p: _read_losses(p, hi - lo))
        if part is None:
            part = track_losses(task, model, Subset(dataset, range(lo, hi)), settings)
            if not np.isfinite(part).all():
                bad = [track_ids[lo + i] for i in np.flatnonzero(~np.isfinite(part))[:5]]
                raise LinernotesError(f"Non-finite loss for track(s) {bad}: check their audio.")
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, part)
        return part

    for s in mine:
        shard(s)
        bar.update(bounds[s][1] - bounds[s][0])
    bar.close()
    distributed.barrier()
    parts = [shard(s) for s in range(n_shards)]  # other ranks' shards, now on disk
    return np.concatenate(parts) if parts else np.empty(0)


def _read_losses(path: Path, n: int) -> np.ndarray:
    part = np.load(path)
    if part.shape != (n,) or part.dtype != np.float64:
        raise ValueError(f"holds {part.shape} {part.dtype}, not ({n},) float64")
    return part


def json_roundtrip(obj: dict) -> dict:
    import json

    return json.loads(json.dumps(obj, sort_keys=True, default=str))
