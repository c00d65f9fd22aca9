"""Counterfactual checks by retraining: query measures and leave-K-out.

Retrains come from the run's one retrain cache (`run.retrain.Retrainer`: the run's exact recipe
without some training tracks, cached, resumable, with a budget per invocation).

`leave_k_out` removes each method's top-K tracks for a query (and K random tracks as a control),
retrains, and measures the query's loss increase ΔL at fixed draws (identical draws for both
models) and how much the clip regenerated from the same noise and prompt changes. Rows are written
one at a time (`RowStore`), so a killed evaluation resumes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.artifacts import hash_json
from linernotes.attribution.query import Query
from linernotes.clips import load_clip, sampler_settings
from linernotes.config import Settings, require, setting
from linernotes.errors import LinernotesError
from linernotes.evaluation.rows import RowStore
from linernotes.run import BudgetExhausted, Retrainer, Run, retrain_seconds
from linernotes.task import draw_noise, fixed_timesteps

RANDOM = "random"  # the K-random control's method name


# ---------------------------------------------------------------- what is measured on a model


@dataclasses.dataclass(frozen=True)
class EvalDraws(Settings):
    """The query's fixed draws: `timesteps` AbC timesteps × `noises` noises each, keyed by the
    query (common random numbers: identical for every model compared)."""

    timesteps: int = setting(20, "Fixed timesteps of the query loss.")
    stride: int = setting(50, "Stride of those timesteps (of 1000).")
    noises: int = setting(4, "Noises per timestep.")
    seed: int = setting(1000, "Seed of the query's draws (apart from the methods' own).")
    mask: bool = setting(True, "Loss over the query's real frames only.")
    batch_size: int = setting(40, "Draws per forward.")

    def validate(self) -> None:
        require(min(self.timesteps, self.noises, self.stride) >= 1,
                "timesteps, noises and stride must be >= 1.")
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
    """How a query's clip is regenerated: prompt, noise seed, real frames and the sampler's
    settings (fields of the run's family's generate settings; the rest are its defaults)."""

    prompt: str
    seed: int
    n_real: int
    sampler: dict = dataclasses.field(default_factory=dict)


def regeneration_of(query: Query, steps: int = 25) -> Regeneration:
    """A generated clip's own prompt, seed and sampler (from its sidecar); otherwise the query's
    caption with a seed derived from its key, sampled in `steps` steps."""
    path = Path(query.source) if query.source else None
    if path is not None and path.with_suffix(".json").exists():
        m = load_clip(path).meta
        return Regeneration(m["prompt"], int(m["seed"]), int(m["n_real_frames"]), dict(m))
    seed = int(hash_json(["regenerate", query.key])[:8], 16)
    return Regeneration(query.caption, seed, max(1, int(query.mask.sum())), {"steps": steps})


def regenerate(run: Run, r: Regeneration) -> torch.Tensor:
    """The latent (T, ...) `run` samples for `r` (same noise and prompt for every model)."""
    s = sampler_settings(run, r.sampler)
    return run.family.sample([r.prompt], [r.seed], r.n_real, s)[0]


@torch.no_grad()
def generation_change(run: Run, a: torch.Tensor, b: torch.Tensor,
                      n_real: int) -> tuple[float, float]:
    """(mean squared difference over real frames, audio-embedding cosine distance) of two
    latents, embedded by `run`'s family."""
    mse = float((a[:n_real] - b[:n_real]).double().pow(2).mean())
    mask = (torch.arange(a.shape[0]) < n_real).unsqueeze(0)
    ea = run.family.embed_audio(a.unsqueeze(0).float(), mask)
    eb = run.family.embed_audio(b.unsqueeze(0).float(), mask)
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
    retrainer = retrainer or Retrainer(run, manifest)
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
        d_gen, d_clap = generation_change(retrained, latent0, regenerate(retrained, regen),
                                          regen.n_real)
    return {"query": r.query.key, "method": r.method, "k_spec": r.k_spec, "k": r.k,
            "delta_loss": loss1 - loss0, "loss_base": loss0, "loss_retrained": loss1,
            "delta_gen": d_gen, "delta_gen_clap": d_clap,
            "retrain": retrainer.key(r.ids), "retrained_run": retrained.hash,
            "seconds_retrain": retrain_seconds(retrained),
            "excluded": json.dumps(sorted(r.ids)), "key": key}
