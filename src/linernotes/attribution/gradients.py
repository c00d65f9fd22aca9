"""Per-track training gradients at fixed draws, randomly projected, stored once on disk.

Each training track's feature is the gradient of its Task loss (or of D-TRAK's output function,
the mean squared model output) averaged over fixed (timestep, noise) draws keyed by its id, over
one parameter group, optionally scaled per parameter (e.g. by D^{1/2}) and projected to k
dimensions by a seeded Gaussian or Rademacher matrix generated chunk by chunk (never held whole
unless small), or by a seeded sparse map (s non-zeros per parameter, cheap for one vector).
The features are written in shards with provenance and reused by every query.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from linernotes.artifacts import atomic_path, hash_json, load_cached, read_json, write_json
from linernotes.attribution.losses import ScoreSettings, json_roundtrip
from linernotes.attribution.query import Query
from linernotes.config import Settings, require
from linernotes.data.dataset import collate
from linernotes.errors import LinernotesError
from linernotes.task import (
    PARAM_GROUPS,
    Task,
    draw_noise,
    expand_draws,
    fixed_timesteps,
    trainable,
)

if TYPE_CHECKING:
    from linernotes.unlearning.newton import UnlearnSettings

OUTPUTS = ("loss", "dtrak")
PROJECTIONS = ("rademacher", "gaussian", "sparse")
BACKENDS = ("auto", "loop", "vmap")
#: rows of the projection matrix generated from one seed (part of the projection's identity)
CHUNK_ROWS = 4096
#: non-zeros per parameter of the "sparse" projection (see `Projector`): 4 keeps the error
#: tails of heavy-tailed gradients near the dense map's (1 does not; benchmarks/projection.py)
SPARSE_NNZ = 4


@dataclasses.dataclass(frozen=True)
class GradientSettings(Settings):
    """Which gradients are taken (group, output, draws) and how they are projected and stored."""

    group: str = "transformer"
    output: str = "loss"  # "loss": the Task loss; "dtrak": mean squared model output (D-TRAK)
    timesteps: int = 20  # training tracks: fixed timesteps (ScoreSettings' convention)
    stride: int = 50
    seed: int = 0
    mask_train: bool = False  # M_L: mask each training track's padding
    query_draws: int = 256  # queries: random (t, noise) draws keyed by the query (unlearning's)
    query_seed: int = 0
    mask_query: bool = True  # M_U: mask the query's padding
    projection_dim: int = 2048  # k; 0 = no projection (exact gradients)
    projection: str = "rademacher"
    projection_seed: int = 0
    backend: str = "auto"  # per-sample gradients: "loop", "vmap" (torch.func) or "auto"
    batch_size: int = 8  # tracks per micro-batch
    shard_size: int = 256  # tracks per shard on disk
    memory_mb: int = 1024  # budget for buffered gradients and a cached projection matrix

    def validate(self) -> None:
        require(self.group in PARAM_GROUPS, f"Unknown parameter group {self.group!r}; "
                f"choose one of {', '.join(PARAM_GROUPS)}.")
        require(self.output in OUTPUTS, f"output must be one of {OUTPUTS}.")
        require(self.projection in PROJECTIONS, f"projection must be one of {PROJECTIONS}.")
        require(self.backend in BACKENDS, f"backend must be one of {BACKENDS}.")
        require(self.timesteps >= 1 and self.query_draws >= 1, "draws must be >= 1.")
        require(self.stride * (self.timesteps - 1) < 1000, "timesteps x stride must fit in 1000.")
        require(self.projection_dim >= 0, "projection_dim must be >= 0 (0 = exact gradients).")
        require(self.batch_size >= 1 and self.shard_size >= 1 and self.memory_mb >= 1,
                "batch_size, shard_size and memory_mb must be >= 1.")

    @classmethod
    def matching(cls, score: ScoreSettings, unlearn: UnlearnSettings,
                 **changes) -> GradientSettings:
        """Settings giving exactly the gradients of unlearning `unlearn` scored with `score`."""
        return cls(group=unlearn.group, timesteps=score.timesteps, stride=score.stride,
                   seed=score.seed, mask_train=score.mask_train, query_draws=unlearn.draws,
                   query_seed=unlearn.seed, mask_query=unlearn.mask_query, **changes)

    def feature_key(self) -> dict:
        """What the stored training features depend on."""
        keys = ("group", "output", "timesteps", "stride", "seed", "mask_train", "projection_dim",
                "projection", "projection_seed", "shard_size")
        return {k: getattr(self, k) for k in keys}


# ------------------------------------------------------------------------------------ projection


class Projector:
    """x ↦ x R with E[R Rᵀ] = I: dense Gaussian or Rademacher entries / √k, or a sparse map.

    Dense R (P × k) is made in seeded chunks of rows: chunk c depends only on (seed, c, kind, k), so
    queries and training tracks see the same matrix whatever the batching. Held whole only when
    P·k·4 bytes fit `cache_bytes`; otherwise regenerated on every call (P·k random numbers).

    "sparse" is a sparse Johnson-Lindenstrauss map (CountSketch for nnz = 1): parameter j adds
    ±x_j/√s to s buckets, one drawn uniformly in each of s blocks of [0, k) (distinct buckets),
    signs and buckets independent across j. For x, y: E⟨Πx, Πy⟩ = ⟨x, y⟩, with the same
    variance as the dense Rademacher map, (‖x‖²‖y‖² + ⟨x, y⟩² − 2 Σ x_j² y_j²) / k. Its map
    (P·s int32 buckets and int8 signs) is made in the same seeded chunks of CHUNK_ROWS
    parameters, kept after first use, and applied with `index_add_`: O(B·P·s), no P × k matrix.
    `dim == 0` is the identity (exact features).
    """

    def __init__(self, n_params: int, dim: int, kind: str = "rademacher", seed: int = 0,
                 cache_bytes: int = 256 << 20, nnz: int = SPARSE_NNZ):
        if kind not in PROJECTIONS:
            raise LinernotesError(f"Unknown projection {kind!r}; choose one of "
                                  f"{', '.join(PROJECTIONS)}.")
        if kind == "sparse" and nnz < 1:
            raise LinernotesError(f"A sparse projection needs nnz >= 1 non-zeros per parameter, "
                                  f"not {nnz}.")
        self.n_params, self.dim, self.kind, self.seed = n_params, dim, kind, seed
        self.nnz = min(nnz, dim) if kind == "sparse" else 0  # s <= k: s distinct buckets
        self.cache = n_params * dim * 4 <= cache_bytes
        self._chunks: dict[int, torch.Tensor] = {}
        self._map: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def out_dim(self) -> int:
        return self.dim or self.n_params

    @property
    def n_chunks(self) -> int:
        return (self.n_params + CHUNK_ROWS - 1) // CHUNK_ROWS

    def key(self) -> dict:
        key = {"dim": self.dim, "kind": self.kind, "seed": self.seed, "rows": CHUNK_ROWS,
               "n_params": self.n_params}
        if self.kind == "sparse":
            key["nnz"] = self.nnz
        return key

    def _generator(self, c: int) -> torch.Generator:
        ident = f"{self.seed}\x1f{c}\x1f{self.kind}\x1f{self.dim}"
        if self.kind == "sparse":
            ident += f"\x1f{self.nnz}"
        digest = hashlib.blake2b(ident.encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))

    def chunk(self, c: int) -> torch.Tensor:
        """Rows [c·CHUNK_ROWS, (c+1)·CHUNK_ROWS) of dense R / sqrt(k)."""
        if self.kind == "sparse":
            raise LinernotesError("A sparse projection has no dense chunks; use sparse_chunk.")
        if c in self._chunks:
            return self._chunks[c]
        rows = min(CHUNK_ROWS, self.n_params - c * CHUNK_ROWS)
        gen = self._generator(c)
        if self.kind == "gaussian":
            r = torch.randn(rows, self.dim, generator=gen)
        else:
            r = torch.randint(0, 2, (rows, self.dim), generator=gen, dtype=torch.int8).float()
            r.mul_(2).sub_(1)
        r.mul_(self.dim ** -0.5)
        if self.cache:
            self._chunks[c] = r
        return r

    def sparse_chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (rows, s) int32 and signs (rows, s) int8 of parameters in chunk c.

        Column b's bucket is uniform in block b, [b·k//s, (b+1)·k//s), so a parameter's s
        buckets are distinct.
        """
        rows = min(CHUNK_ROWS, self.n_params - c * CHUNK_ROWS)
        gen = self._generator(c)
        s, k = self.nnz, self.dim
        buckets = torch.empty(rows, s, dtype=torch.int32)
        for b in range(s):
            lo, hi = b * k // s, (b + 1) * k // s
            buckets[:, b] = torch.randint(lo, hi, (rows,), generator=gen, dtype=torch.int32)
        signs = torch.randint(0, 2, (rows, s), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
        return buckets, signs

    def sparse_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole sparse map: buckets (P, s) int32 and signs (P, s) int8, made once."""
        if self._map is None:
            parts = [self.sparse_chunk(c) for c in range(self.n_chunks)]
            self._map = (torch.cat([b for b, _ in parts]), torch.cat([s for _, s in parts]))
        return self._map

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        buckets, signs = self.sparse_map()
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32)
        scale = self.nnz ** -0.5
        # columns in blocks: bounded temporaries; each bucket still sums its parameters in
        # index order, so a row's projection does not depend on the rows beside it
        step = max(CHUNK_ROWS, (1 << 22) // max(x.shape[0], 1))
        for lo in range(0, self.n_params, step):
            xs = x[:, lo : lo + step].float()
            for b in range(self.nnz):
                idx = buckets[lo : lo + step, b].long()
                val = signs[lo : lo + step, b].float().mul_(scale)
                out.index_add_(1, idx, xs * val)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows of `x` (B, P) to (B, k)."""
        if self.dim == 0:
            return x
        if x.shape[-1] != self.n_params:
            raise LinernotesError(f"The projection is for {self.n_params} parameters, not "
                                  f"{x.shape[-1]}.")
        if self.kind == "sparse":
            return self._sparse(x)
        out = torch.zeros(x.shape[0], self.dim, dtype=torch.float32)
        for c in range(self.n_chunks):
            lo = c * CHUNK_ROWS
            out.addmm_(x[:, lo : lo + CHUNK_ROWS].float(), self.chunk(c))
        return out


# ---------------------------------------------------------------------- per-sample gradients


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return _first_tensor(out[0])


def per_sample_output(task: Task, model: nn.Module, batch: dict, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """D-TRAK's output function per sample: mean squared model output (all frames), (B,).

    Uses `task.per_sample_output` if the Task defines it; otherwise captures the model's output
    with a forward hook while the Task computes its loss.
    """
    own = getattr(task, "per_sample_output", None)
    if own is not None:
        return own(model, batch, t, noise)
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(_first_tensor(o)))
    try:
        task.per_sample_loss(model, batch, t, noise, False)
    finally:
        handle.remove()
    if not seen:
        raise LinernotesError("The Task never called the model it was given; D-TRAK's output "
                              "function needs `Task.per_sample_output` for this Task.")
    out = seen[-1]
    return out.pow(2).reshape(out.shape[0], -1).mean(1)


def objective(task: Task, model: nn.Module, batch: dict, t: torch.Tensor, noise: torch.Tensor,
              output: str, mask: bool) -> torch.Tensor:
    """Per-sample objective averaged over draws: t (B, D), noise (B, D, ...) -> (B,)."""
    b, d = t.shape
    flat = expand_draws(batch, d)
    tt, nn_ = t.reshape(b * d), noise.reshape(b * d, *noise.shape[2:])
    if output == "dtrak":
        v = per_sample_output(task, model, flat, tt, nn_)
    else:
        v = task.per_sample_loss(model, flat, tt, nn_, mask)
    return v.view(b, d).mean(1)


def matvec(phi: np.ndarray, q: np.ndarray, rows: int = 8192) -> np.ndarray:
    """phi @ q in float64, converting `rows` rows of a float32 matrix at a time."""
    q = np.asarray(q, dtype=np.float64)
    return np.concatenate([phi[lo : lo + rows].astype(np.float64) @ q
                           for lo in range(0, len(phi), rows)] or [np.empty(0)])


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def grads_loop(task: Task, model: nn.Module, params: dict[str, nn.Parameter], batch: dict,
               t: torch.Tensor, noise: torch.Tensor, output: str, mask: bool) -> torch.Tensor:
    """Per-track gradients (B, P), one track (its D draws in one forward) at a time."""
    plist = list(params.values())
    rows = []
    for i in range(t.shape[0]):
        one = {k: (v[i : i + 1] if isinstance(v, (torch.Tensor, list)) else v)
               for k, v in batch.items()}
        value = objective(task, model, one, t[i : i + 1], noise[i : i + 1], output, mask)[0]
        if not torch.isfinite(value):
            raise LinernotesError(f"Non-finite loss for track {batch['track_id'][i]}: check its "
                                  "audio and the model.")
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, plist)]))
    return torch.stack(rows)


class TaskObjective(nn.Module):
    """The Task's objective as a module, so `functional_call` can swap the model's parameters."""

    def __init__(self, task: Task, model: nn.Module, output: str, mask: bool):
        super().__init__()
        self.task, self.model, self.output, self.mask = task, model, output, mask

    def forward(self, batch: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return objective(self.task, self.model, batch, t, noise, self.output, self.mask)


class VmapUnsupported(Exception):
    """This batch or model cannot be vmapped; use the loop."""


def grads_vmap(task: Task, model: nn.Module, params: dict[str, nn.Parameter], batch: dict,
               t: torch.Tensor, noise: torch.Tensor, output: str, mask: bool) -> torch.Tensor:
    """Per-track gradients (B, P) with torch.func: functional_call + vmap(grad) over tracks.

    Only tensors can be vmapped, so list fields (captions) must agree across the batch
    ("track_id" is dropped: a Task must not read it); otherwise raises VmapUnsupported.
    """
    from torch.func import functional_call, grad, vmap

    if t.shape[0] < 2:
        raise VmapUnsupported("a single track")
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    fixed = {}
    for k, v in batch.items():
        if isinstance(v, list) and k != "track_id":
            if any(x != v[0] for x in v):
                raise VmapUnsupported(f"batch field {k!r} differs across samples")
            fixed[k] = v[:1]
    call = TaskObjective(task, model, output, mask)
    detached = {f"model.{n}": p.detach() for n, p in params.items()}

    def one(p, sample, ti, ni):
        b = {**{k: v.unsqueeze(0) for k, v in sample.items()}, **fixed}
        return functional_call(call, p, (b, ti.unsqueeze(0), ni.unsqueeze(0)))[0]

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            g = vmap(grad(one), in_dims=(None, 0, 0, 0), randomness="same")(
                detached, tensors, t, noise)
    except Exception as exc:  # a missing batching rule, data-dependent control flow, ...
        raise VmapUnsupported(f"{type(exc).__name__}: {exc}") from exc
    out = _flat([g[f"model.{n}"] for n in params])
    if not torch.isfinite(out).all():
        raise LinernotesError("Non-finite gradient for a track in "
                              f"{batch.get('track_id')}: check its audio and the model.")
    return out


class GradientEngine:
    """Per-track gradients with the chosen backend; "auto" times vmap against the loop once.

    vmap applies only to batches whose list fields (captions) agree, so with captioned tracks
    "auto" is the loop; on the tiny DiT vmap won only at few draws per track (see the report).
    """

    def __init__(self, task: Task, model: nn.Module, params: dict[str, nn.Parameter],
                 backend: str = "auto"):
        self.task, self.model, self.params, self.backend = task, model, params, backend
        self.choice: str | None = None if backend == "auto" else backend
        self.note = ""

    def __call__(self, batch: dict, t: torch.Tensor, noise: torch.Tensor, output: str,
                 mask: bool) -> torch.Tensor:
        args = (self.task, self.model, self.params, batch, t, noise, output, mask)
        with trainable(self.model, self.params):
            if self.choice == "loop":
                return grads_loop(*args)
            if self.choice == "vmap":
                try:
                    return grads_vmap(*args)
                except VmapUnsupported as exc:
                    if self.backend == "vmap":
                        self.note = f"vmap fell back to the loop ({exc})"
                    return grads_loop(*args)
            try:  # auto, first applicable batch: time both (vmap's tracing included)
                t0 = time.perf_counter()
                by_vmap = grads_vmap(*args)
                t1 = time.perf_counter()
            except VmapUnsupported as exc:
                self.note = f"vmap not applicable ({exc})"
                return grads_loop(*args)
            by_loop = grads_loop(*args)
            t2 = time.perf_counter()
            self.choice = "vmap" if t1 - t0 < t2 - t1 else "loop"
            self.note = f"vmap {t1 - t0:.3f}s vs loop {t2 - t1:.3f}s on the first batch"
            return by_loop if self.choice == "loop" else by_vmap


def mean_gradient(engine: GradientEngine, batch: dict, t: torch.Tensor, noise: torch.Tensor,
                  output: str, mask: bool, chunk: int) -> torch.Tensor:
    """Gradient (P,) of one sample's objective averaged over its D draws, in chunks of draws."""
    d = t.shape[1]
    total = None
    for lo in range(0, d, chunk):
        hi = min(d, lo + chunk)
        with trainable(engine.model, engine.params):
            g = grads_loop(engine.task, engine.model, engine.params, batch, t[:, lo:hi],
                           noise[:, lo:hi], output, mask)[0] * (hi - lo)
        total = g if total is None else total + g
    return total / d


# ---------------------------------------------------------------------------- the on-disk store


def _read_features(path: Path, shape: tuple[int, int]) -> np.ndarray:
    part = np.load(path, mmap_mode="r")
    if part.shape != shape or part.dtype != np.float32:
        raise ValueError(f"holds {part.shape} {part.dtype}, not {shape} float32")
    return part


def sharded_features(
    compute: Callable[[int, int], np.ndarray], n: int, dim: int, shard_size: int,
    folder: str | Path, meta: dict, desc: str = "features", progress: bool = True,
) -> tuple[np.ndarray, int]:
    """Rows [0, n) of a (n, dim) float32 feature matrix, made shard by shard by `compute(lo, hi)`.

    Finished shards are reused (a killed run loses at most the shard in flight); `meta` is
    recorded and checked, so a folder made from other inputs is refused. Returns the features and
    the number of shards computed by this call.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = json_roundtrip({**meta, "n": n, "dim": dim, "shard_size": shard_size})
    meta_path = folder / "meta.json"
    old = load_cached(meta_path, read_json)
    if old is None and meta_path.exists():
        for stale in folder.glob("shard-*.npy"):  # of unknown inputs: not reused
            stale.unlink()
        meta_path.unlink()
    if old is not None:
        if old != meta:
            raise LinernotesError(
                f"{folder} holds features made from other inputs ({old.get('provenance')}); "
                "delete it or choose another cache folder."
            )
    else:
        write_json(meta_path, meta)
    parts, computed = [], 0
    n_shards = (n + shard_size - 1) // shard_size
    bar = tqdm(total=n, desc=desc, disable=not progress)
    for s in range(n_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        path = folder / f"shard-{s:05d}.npy"
        part = load_cached(path, lambda p, shape=(hi - lo, dim): _read_features(p, shape))
        if part is None:
            part = np.ascontiguousarray(compute(lo, hi), dtype=np.float32)
            if part.shape != (hi - lo, dim) or not np.isfinite(part).all():
                raise LinernotesError(f"Features of tracks {lo}..{hi} are not finite or have a "
                                      f"wrong shape {part.shape}; check the model and the audio.")
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, part)
            computed += 1
        parts.append(part)
        bar.update(hi - lo)
    bar.close()
    out = np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
    return out, computed


def tensor_hash(tensors: list[torch.Tensor]) -> str:
    """Short content hash of tensors (for provenance of a scaling such as D^{1/2})."""
    h = hashlib.sha256()
    for x in tensors:
        h.update(x.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


class GradientFeatures:
    """Projected per-track gradients of one model over a training set, and of queries.

    `scale` (parameter name -> tensor) multiplies each gradient before projection (fisher-
    influence passes D^{1/2}). Training features are computed once per (run, tracks, settings,
    scale) under `cache_dir` and read back afterwards.
    """

    def __init__(
        self, task: Task, model: nn.Module, run_hash: str, train: Dataset, train_ids: list[str],
        settings: GradientSettings, cache_dir: str | Path,
        scale: dict[str, torch.Tensor] | None = None, progress: bool = True,
    ):
        if len(train_ids) != len(train):
            raise LinernotesError(f"{len(train_ids)} track ids for {len(train)} training tracks.")
        self.task, self.model, self.run_hash = task, model, run_hash
        self.train, self.train_ids, self.settings = train, train_ids, settings
        self.cache_dir, self.progress = Path(cache_dir), progress
        self.params = task.parameters(model, settings.group)
        if not self.params:
            raise LinernotesError(f"Parameter group {settings.group!r} is empty for this model; "
                                  "choose another group.")
        self.n_params = sum(p.numel() for p in self.params.values())
        if settings.projection_dim == 0 and len(train_ids) * self.n_params * 4 > 8 << 30:
            raise LinernotesError(
                f"Exact gradients of {len(train_ids)} tracks x {self.n_params} parameters need "
                f"{len(train_ids) * self.n_params * 4 / 2**30:.0f} GiB; set projection_dim "
                "(e.g. 2048) or choose a smaller parameter group."
            )
        budget = settings.memory_mb << 20
        self.projector = Projector(self.n_params, settings.projection_dim, settings.projection,
                                   settings.projection_seed, cache_bytes=budget // 2)
        self.scale = None
        self.scale_key = None
        if scale is not None:
            missing = set(self.params) - set(scale)
            if missing:
                raise LinernotesError(f"The scaling lacks {len(missing)} parameter(s) of group "
                                      f"{settings.group!r} (e.g. {sorted(missing)[0]}).")
            parts = [scale[n].reshape(-1).float() for n in self.params]
            self.scale = torch.cat(parts)
            self.scale_key = tensor_hash(parts)
        self.engine = GradientEngine(task, model, self.params, settings.backend)
        # tracks whose (P,) gradients fit half the budget at once: the micro-batch (at most
        # `batch_size`) and the buffer before a projection pass (at least one micro-batch)
        fit = max(1, (budget // 2) // max(4 * self.n_params, 1))
        self.micro = min(settings.batch_size, fit)
        self.block = max(self.micro, min(settings.shard_size, fit))
        self.computed_shards = 0
        self.seconds = 0.0
        self._features: np.ndarray | None = None

    def provenance(self) -> dict:
        names = [(n, list(p.shape)) for n, p in self.params.items()]
        return {"run": self.run_hash, "tracks": hash_json(self.train_ids),
                "features": self.settings.feature_key(), "scale": self.scale_key,
                "params": hash_json(names), "projection": self.projector.key()}

    @property
    def folder(self) -> Path:
        return self.cache_dir / f"gradients-{hash_json(self.provenance())}"

    def _prepare(self, g: torch.Tensor) -> torch.Tensor:
        g = g.cpu()  # gradients come from the model's device; projections are made here
        if self.scale is not None:
            g = g * self.scale
        return self.projector(g)

    def compute_rows(self, lo: int, hi: int) -> np.ndarray:
        """Features of training tracks [lo, hi) (not stored)."""
        s = self.settings
        ts = fixed_timesteps(s.timesteps, s.stride)
        loader = DataLoader(Subset(self.train, range(lo, hi)), batch_size=self.micro,
                            collate_fn=collate)
        out, buf = [], []
        for batch in loader:
            t, noise = draw_noise(batch["track_id"], range(self.task.draws(s.timesteps)),
                                  self.task.latent_shape, seed=s.seed, timesteps=ts)
            buf.append(self.engine(batch, t, noise, s.output, s.mask_train))
            if sum(len(b) for b in buf) >= self.block:
                out.append(self._prepare(torch.cat(buf)))
                buf = []
        if buf:
            out.append(self._prepare(torch.cat(buf)))
        return torch.cat(out).numpy()

    def train_features(self) -> np.ndarray:
        """(N, k) features of the training tracks: computed once, then read from the cache.

        With backend "auto", the backend chosen by timing is recorded beside the shards and
        reused on resume, so a resumed run gives bit-identical features.
        """
        if self._features is None:
            t0 = time.perf_counter()
            chosen = self.folder / "backend.json"
            if self.settings.backend == "auto" and chosen.exists():
                self.engine.choice = read_json(chosen)["backend"]

            def compute(lo: int, hi: int) -> np.ndarray:
                rows = self.compute_rows(lo, hi)
                if self.settings.backend == "auto" and self.engine.choice and not chosen.exists():
                    write_json(chosen, {"backend": self.engine.choice, "note": self.engine.note})
                return rows

            self._features, self.computed_shards = sharded_features(
                compute, len(self.train_ids), self.projector.out_dim,
                self.settings.shard_size, self.folder, {"provenance": self.provenance()},
                "gradients", self.progress,
            )
            self.seconds = time.perf_counter() - t0
        return self._features

    def query_gradient(self, query: Query) -> torch.Tensor:
        """Raw gradient (P,) of the query's objective over its `query_draws` random draws."""
        s = self.settings
        t, noise = draw_noise([query.key], range(self.task.draws(s.query_draws)),
                              self.task.latent_shape, seed=s.query_seed)
        return mean_gradient(self.engine, query.batch(1), t, noise, s.output, s.mask_query,
                             chunk=max(s.batch_size * s.timesteps, 1))

    def query_features(self, query: Query) -> np.ndarray:
        """(k,) feature of a query, with the training tracks' scaling and projection."""
        return self._prepare(self.query_gradient(query).unsqueeze(0))[0].numpy()
