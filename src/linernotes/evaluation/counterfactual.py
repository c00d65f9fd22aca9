"""Counterfactual checks by retraining: a retrain cache, query measures and leave-K-out.

`Retrainer` retrains a run's exact recipe (recorded TrainSettings, features, denoiser config, the
run's own CLAP, same seed unless given) without some training tracks; each retrain is cached in
`<root>/<hash of (run, sorted exclude ids, seed)>`, resumes after a kill (`train` resumes) and
records exactly what it left out. `budget` caps the retrains one invocation may start.

`leave_k_out` removes each method's top-K tracks for a query (and K random tracks as a control),
retrains, and measures the query's loss increase ΔL at fixed draws (identical draws for both
models) and how much the clip regenerated from the same noise and prompt changes. Rows are written
one at a time (`RowStore`), so a killed evaluation resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.artifacts import hash_json, read_json, write_json
from linernotes.attribution.query import Query
from linernotes.config import Settings, require
from linernotes.data.dataset import split_rows
from linernotes.errors import LinernotesError
from linernotes.evaluation.rows import RowStore
from linernotes.task import draw_noise, fixed_timesteps
from linernotes.training import CHECKPOINT, RUN_CONFIG, Run, TrainSettings, load_run, train

RANDOM = "random"  # the K-random control's method name
RETRAIN_RECORD = "retrain.json"


class BudgetExhausted(LinernotesError):
    """The retraining budget of this invocation is used up (re-run to continue)."""


# ---------------------------------------------------------------- the retrain cache


def train_ids(run: Run, manifest: pd.DataFrame) -> list[str]:
    """The track ids `run` was trained on (its split minus its own exclude list)."""
    s = TrainSettings.from_dict(run.config["train"])
    ids = manifest["track_id"].astype(str).to_numpy()
    return [ids[i] for i in split_rows(manifest, s.split, s.exclude)]


class Retrainer:
    """Retrains of one run without given tracks, cached under `root`, at most `budget` started."""

    def __init__(self, run: Run, manifest: pd.DataFrame, root: str | Path,
                 budget: int | None = None, progress: bool = False):
        if run.config.get("parent"):
            raise LinernotesError(f"{run.path} is a derived (unlearned) model; retrain from the "
                                  "original trained run instead.")
        require(budget is None or budget >= 0, "budget must be >= 0 (None = no limit).")
        self.run, self.manifest, self.root = run, manifest, Path(root)
        self.budget, self.progress = budget, progress
        self.base = TrainSettings.from_dict(run.config["train"])
        self.ids = train_ids(run, manifest)
        self._known = set(self.ids)
        self.started = 0  # retrains started (not found finished) by this object

    def _seed(self, seed: int | None) -> int:
        return self.base.seed if seed is None else int(seed)

    def _exclude(self, exclude_ids: Sequence[str]) -> list[str]:
        ids = sorted({str(x) for x in exclude_ids})
        unknown = [x for x in ids if x not in self._known]
        if unknown:
            raise LinernotesError(f"Cannot retrain {self.run.path} without {unknown[:3]}: not "
                                  "among its training tracks (check the ids / the manifest).")
        if len(ids) >= len(self.ids):
            raise LinernotesError("Cannot retrain without every training track.")
        return ids

    def key(self, exclude_ids: Sequence[str], seed: int | None = None) -> str:
        """The cache key: hash of (run hash, sorted exclude ids, seed)."""
        return hash_json({"run": self.run.hash, "exclude": self._exclude(exclude_ids),
                          "seed": self._seed(seed)})

    def folder(self, exclude_ids: Sequence[str], seed: int | None = None) -> Path:
        return self.root / self.key(exclude_ids, seed)

    def is_cached(self, exclude_ids: Sequence[str], seed: int | None = None) -> bool:
        return (self.folder(exclude_ids, seed) / RUN_CONFIG).exists()

    def missing(self, requests: Sequence[tuple[Sequence[str], int | None]]) -> int:
        """How many distinct retrains of `requests` ((exclude ids, seed) pairs) are not cached."""
        return sum(not (self.root / k / RUN_CONFIG).exists()
                   for k in {self.key(ids, seed) for ids, seed in requests})

    def __call__(self, exclude_ids: Sequence[str], seed: int | None = None) -> Run:
        """The run retrained without `exclude_ids` (from the cache, resumed, or trained now)."""
        ids, seed = self._exclude(exclude_ids), self._seed(seed)
        folder = self.folder(ids, seed)
        if (folder / RUN_CONFIG).exists():
            return load_run(folder, manifest=self.manifest)
        if self.budget is not None and self.started >= self.budget:
            raise BudgetExhausted(f"The retraining budget ({self.budget}) is used up.")
        self.started += 1
        from linernotes.models.denoiser import DenoiserConfig

        s = self.base.replace(exclude=tuple(sorted(set(self.base.exclude) | set(ids))), seed=seed)
        resumed = (folder / CHECKPOINT).exists()
        t0 = time.perf_counter()
        run = train(self.manifest, folder, s,
                    DenoiserConfig.from_dict(self.run.config["model"]["config"]),
                    self.run.features, clap=Path(self.run.path) / "clap", progress=self.progress)
        write_json(folder / RETRAIN_RECORD, {
            "original": self.run.hash, "original_path": str(self.run.path), "excluded": ids,
            "seed": seed, "seconds": time.perf_counter() - t0, "resumed": resumed,
            "train": s.to_dict()})
        return run


def retrain_without(run: Run, manifest: pd.DataFrame, exclude_ids: Sequence[str],
                    folder_root: str | Path, seed: int | None = None,
                    progress: bool = False) -> Run:
    """`run`'s recipe retrained without `exclude_ids` (cached in `folder_root`)."""
    return Retrainer(run, manifest, folder_root, progress=progress)(exclude_ids, seed)


def retrain_record(retrained: Run) -> dict:
    """What a cached retrain recorded: original run, excluded ids, seed, seconds."""
    return read_json(Path(retrained.path) / RETRAIN_RECORD)


# ---------------------------------------------------------------- what is measured on a model


@dataclasses.dataclass(frozen=True)
class EvalDraws(Settings):
    """The query's fixed draws: `timesteps` AbC timesteps × `noises` noises each, keyed by the
    query (common random numbers: identical for every model compared)."""

    timesteps: int = 20
    stride: int = 50
    noises: int = 4
    seed: int = 1000  # apart from the draws the methods themselves use
    mask: bool = True  # loss over the query's real frames only
    batch_size: int = 40

    def validate(self) -> None:
        require(self.timesteps >= 1 and self.noises >= 1, "timesteps and noises must be >= 1.")
        require(self.stride * (self.timesteps - 1) < 1000, "timesteps x stride must fit in 1000.")
        require(self.batch_size >= 1, "batch_size must be >= 1.")


@torch.inference_mode()
def query_loss(task, model, query: Query, draws: EvalDraws) -> float:
    """The query's mean loss over its fixed draws (draw d: timestep d mod T, its own noise)."""
    n = draws.timesteps * draws.noises
    t, noise = draw_noise([query.key], range(n), task.latent_shape, seed=draws.seed,
                          timesteps=fixed_timesteps(draws.timesteps, draws.stride))
    total = 0.0
    for lo in range(0, n, draws.batch_size):
        hi = min(n, lo + draws.batch_size)
        losses = task.per_sample_loss(model, query.batch(hi - lo), t[0, lo:hi],
                                      noise[0, lo:hi], draws.mask)
        total += float(losses.double().sum())
    return total / n


@dataclasses.dataclass(frozen=True)
class Regeneration:
    """How a query's clip is regenerated: prompt, noise seed, real frames, sampler settings."""

    prompt: str
    seed: int
    n_real: int
    steps: int = 25
    guidance: float = 2.0
    sampler: str = "dpm"


def regeneration_of(query: Query, steps: int = 25) -> Regeneration:
    """A generated clip's own prompt, seed and sampler (from its sidecar); otherwise the query's
    caption with a seed derived from its key."""
    path = Path(query.source) if query.source else None
    if path is not None and path.with_suffix(".json").exists():
        from linernotes.models.pipeline import load_clip

        m = load_clip(path).meta
        return Regeneration(m["prompt"], int(m["seed"]), int(m["n_real_frames"]),
                            int(m["steps"]), float(m["guidance"]), str(m["sampler"]))
    seed = int(hash_json(["regenerate", query.key])[:8], 16)
    return Regeneration(query.caption, seed, max(1, int(query.mask.sum())), steps)


def regenerate(run: Run, r: Regeneration) -> torch.Tensor:
    """The (T, M) latent `run` samples for `r` (same noise and prompt for every model)."""
    from linernotes.models.pipeline import GenerateSettings, sample_latents

    s = GenerateSettings(steps=r.steps, guidance=r.guidance, sampler=r.sampler)
    return sample_latents(run, [r.prompt], [r.seed], r.n_real, s)[0]


@torch.no_grad()
def generation_change(clap, a: torch.Tensor, b: torch.Tensor, n_real: int) -> tuple[float, float]:
    """(mean squared difference over real frames, CLAP-audio cosine distance) of two latents."""
    mse = float((a[:n_real] - b[:n_real]).double().pow(2).mean())
    mask = (torch.arange(a.shape[0]) < n_real).unsqueeze(0)
    ea = clap.embed_audio(a.unsqueeze(0).float(), mask)
    eb = clap.embed_audio(b.unsqueeze(0).float(), mask)
    return mse, float(1.0 - (ea * eb).sum())


# ---------------------------------------------------------------- leave-K-out


def resolve_k(k: float | int | str, n_train: int) -> int:
    """A K given as a fraction of the training set (0 < k < 1) or a count (k >= 1)."""
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise LinernotesError(f"K must be a fraction (e.g. 0.02) or a count, not {k!r}.") from None
    if value <= 0:
        raise LinernotesError(f"K must be > 0, not {k!r}.")
    count = max(1, int(round(value * n_train))) if value < 1 else int(value)
    if value >= 1 and value != count:
        raise LinernotesError(f"K = {k!r}: a count must be a whole number (or a fraction < 1).")
    if count >= n_train:
        raise LinernotesError(f"K = {k!r} removes {count} of {n_train} training tracks; "
                              "choose fewer.")
    return count


def top_k_ids(scores: pd.DataFrame, query: str, method: str, k: int) -> list[str]:
    """The K highest-scored training tracks of `method` for `query` (ties: by track id)."""
    sub = scores[(scores["query"] == query) & (scores["method"] == method)]
    if sub.empty:
        raise LinernotesError(f"No scores of method {method!r} for query {query!r}; attribute the "
                              "query with that method first.")
    if sub["track_id"].duplicated().any():
        raise LinernotesError(f"The {method!r} scores for {query!r} name a track twice; pass one "
                              "score table per (query, method).")
    order = sub.assign(_neg=-sub["score"].astype(float)).sort_values(["_neg", "track_id"])
    return order["track_id"].astype(str).head(k).tolist()


def random_k_ids(ids: Sequence[str], k: int, query: str, seed: int = 0) -> list[str]:
    """K training tracks drawn at random, seeded by (seed, query, K): the control."""
    rng = np.random.default_rng(int(hash_json([RANDOM, seed, query, k])[:12], 16))
    return [ids[i] for i in sorted(rng.choice(len(ids), size=k, replace=False))]


@dataclasses.dataclass
class _Request:
    query: Query
    method: str
    k_spec: str
    k: int
    ids: list[str]


def leave_k_out(
    run: Run,
    manifest: pd.DataFrame,
    queries: Sequence[Query],
    scores: pd.DataFrame,
    ks: Sequence[float | int | str],
    folder: str | Path,
    retrainer: Retrainer | None = None,
    draws: EvalDraws | None = None,
    random_control: bool = True,
    random_seed: int = 0,
    generation: bool = True,
    log: Callable[[str], None] | None = print,
) -> pd.DataFrame:
    """Retrain without each method's top-K tracks per query; ΔL and the regenerated clip's change.

    `scores` holds score tables (columns query, method, track_id, score; higher = more credited)
    for every method and query. Returns one row per (query, method, K) done so far: delta_loss =
    query loss of the retrained model − of `run` at the same fixed draws; delta_gen = mean squared
    latent difference over real frames of the clip regenerated from the same noise and prompt;
    delta_gen_clap = CLAP-audio cosine distance between the two clips. `attrs["retrains_left"]`
    counts retrains still needed when the budget stopped it (0 when complete).
    """
    draws = draws or EvalDraws()
    say = log or (lambda _msg: None)
    for col in ("query", "method", "track_id", "score"):
        if col not in scores.columns:
            raise LinernotesError(f"The score tables lack a {col!r} column; pass score tables "
                                  "as written by `linernotes attribute`.")
    methods = sorted(scores["method"].astype(str).unique())
    if random_control and RANDOM in methods:
        raise LinernotesError(f"A score table is named {RANDOM!r}, the control's name; rename it "
                              "or turn the random control off.")
    retrainer = retrainer or Retrainer(run, manifest, Path(folder) / "retrains")
    ids = retrainer.ids
    requests = []
    for q in queries:
        for spec in ks:
            k = resolve_k(spec, len(ids))
            for m in methods:
                requests.append(_Request(q, m, str(spec), k, top_k_ids(scores, q.key, m, k)))
            if random_control:
                requests.append(_Request(q, RANDOM, str(spec), k,
                                         random_k_ids(ids, k, q.key, random_seed)))
    bad = {x for r in requests for x in r.ids} - set(ids)
    if bad:
        raise LinernotesError(f"Score tables name tracks the run was not trained on "
                              f"({sorted(bad)[:3]}); use score tables made for this run.")
    store = RowStore(Path(folder) / "leave_k_out.parquet")
    keys = [_row_key(run, r, retrainer, draws, generation) for r in requests]
    todo = [(r, key) for r, key in zip(requests, keys) if key not in store]
    say(f"leave-K-out: {len(requests)} rows ({len(requests) - len(todo)} cached); "
        f"{retrainer.missing([(r.ids, None) for r, _ in todo])} retrains to train.")
    base: dict[str, tuple] = {}
    left = 0
    for i, (r, key) in enumerate(todo):
        try:
            retrained = retrainer(r.ids)
        except BudgetExhausted:
            left = retrainer.missing([(x.ids, None) for x, _ in todo[i:]])
            say(f"Stopped: the retraining budget ({retrainer.budget}) is used up; {left} "
                "retrains left. Re-run to continue (finished rows are kept).")
            break
        if r.query.key not in base:
            base[r.query.key] = _measure(run, r.query, draws, generation)
        store.add(_row(key, r, retrainer, retrained, base[r.query.key], draws, generation))
    table = store.table(keys)
    table.attrs["retrains_left"] = left
    return table


def _row_key(run: Run, r: _Request, retrainer: Retrainer, draws: EvalDraws,
             generation: bool) -> str:
    return hash_json({"run": run.hash, "query": r.query.key, "method": r.method, "k": r.k_spec,
                      "retrain": retrainer.key(r.ids), "draws": draws.to_dict(),
                      "generation": generation})


def _measure(run: Run, query: Query, draws: EvalDraws, generation: bool) -> tuple:
    loss = query_loss(run.task, run.model, query, draws)
    if not generation:
        return loss, None, None
    regen = regeneration_of(query)
    return loss, regen, regenerate(run, regen)


def _row(key: str, r: _Request, retrainer: Retrainer, retrained: Run, base: tuple,
         draws: EvalDraws, generation: bool) -> dict:
    loss0, regen, latent0 = base
    loss1 = query_loss(retrained.task, retrained.model, r.query, draws)
    d_gen = d_clap = float("nan")
    if generation:
        d_gen, d_clap = generation_change(retrained.clap, latent0, regenerate(retrained, regen),
                                          regen.n_real)
    record = retrain_record(retrained)
    return {"query": r.query.key, "method": r.method, "k_spec": r.k_spec, "k": r.k,
            "delta_loss": loss1 - loss0, "loss_base": loss0, "loss_retrained": loss1,
            "delta_gen": d_gen, "delta_gen_clap": d_clap,
            "retrain": retrainer.key(r.ids), "retrained_run": retrained.hash,
            "seconds_retrain": float(record.get("seconds", float("nan"))),
            "excluded": json.dumps(sorted(r.ids)), "key": key}
