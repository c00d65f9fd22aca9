"""Linear datamodeling score (LDS): do a method's scores predict retrained models' query losses?

M models are retrained (same recipe) on random subsets S_j holding `fraction` of the training
tracks. Sign convention: every score table ranks "higher = more credited", i.e. the track is more
responsible for the query, so including it should *lower* the query's loss (for unlearning,
score = the track's loss increase when the query is unlearned). A method's predicted query loss
for S_j is therefore  −Σ_{i ∈ S_j} score_i  (up to an offset and scale, which Spearman ignores),
and LDS(query) = Spearman over j of (predicted, actual loss of the model trained on S_j).
The reported LDS is the mean over queries.

Noise ceiling (what a perfect predictor could reach, given that retraining itself is noisy):
- `ceiling_pairs`: the first `paired_subsets` subsets are also trained with seeds s+1, s+2, ...;
  per query, the Spearman over those subsets between two seeds' losses, averaged over seed
  pairs and then queries: the LDS of a predictor that is another seed's actual losses.
- `ceiling_variance`: the full model trained with `extra_seeds` more seeds gives the seed
  variance σ²_seed of each query's loss; with σ²_S its variance over the subset models,
  r = sqrt(max(0, 1 − σ²_seed/σ²_S)) bounds the Pearson correlation of any subset-determined
  predictor with one seed's losses (seed noise additive and subset-independent), reported as a
  Spearman by the Gaussian relation ρ_S = (6/π)·asin(r/2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from linernotes.artifacts import hash_json
from linernotes.attribution.query import Query
from linernotes.config import Settings, require, setting
from linernotes.errors import LinernotesError
from linernotes.evaluation.counterfactual import EvalDraws, query_loss
from linernotes.evaluation.rows import RowStore
from linernotes.run import BudgetExhausted, Retrainer, Run


@dataclasses.dataclass(frozen=True)
class LdsSettings(Settings):
    """How many subset models, how large, and the ceiling's extra seeds."""

    subsets: int = setting(16, "Models trained on random subsets.")
    fraction: float = setting(0.5, "Share of the training set in each subset.")
    seed: int = setting(0, "Seed of the subsets.")
    extra_seeds: int = setting(2, "Extra seeds of the full model (variance ceiling).")
    paired_subsets: int = setting(0, "Subsets also trained with another seed (pairwise "
                                  "ceiling).")
    paired_seeds: int = setting(1, "Extra seeds per paired subset.")

    def validate(self) -> None:
        require(self.subsets >= 3, "LDS needs at least 3 subset models.")
        require(0 < self.fraction < 1, "fraction must be in (0, 1).")
        require(self.extra_seeds >= 0 and self.paired_seeds >= 1, "seed counts must be >= 0/1.")
        require(0 <= self.paired_subsets <= self.subsets, "paired_subsets must be in "
                "[0, subsets].")
        require(self.paired_subsets == 0 or self.paired_subsets >= 3,
                "paired_subsets: 0 or at least 3 (a Spearman needs 3 points).")


def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(m, n) bool: row j holds exactly round(fraction·n) tracks, drawn with a seeded rng."""
    size = int(round(fraction * n))
    if not 0 < size < n:
        raise LinernotesError(f"A {fraction:g} subset of {n} tracks is empty or everything.")
    rng = np.random.default_rng(seed)
    out = np.zeros((m, n), dtype=bool)
    for j in range(m):
        out[j, rng.choice(n, size=size, replace=False)] = True
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation (Pearson of average ranks); NaN if either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")


def predicted_losses(subsets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(M, Q) predicted query loss (up to offset/scale): −Σ_{i∈S_j} score_i per query."""
    return -(subsets.astype(np.float64) @ np.atleast_2d(scores).T.astype(np.float64))


def lds_from_losses(subsets: np.ndarray, actual: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-query LDS: subsets (M, N) bool, actual losses (M,) or (M, Q), scores (N,) or (Q, N)."""
    subsets = np.asarray(subsets, dtype=bool)
    actual = np.asarray(actual, dtype=np.float64).reshape(len(subsets), -1)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if scores.shape != (actual.shape[1], subsets.shape[1]):
        raise LinernotesError(f"LDS: {actual.shape[1]} queries x {subsets.shape[1]} tracks "
                              f"expected, scores are {scores.shape}.")
    pred = predicted_losses(subsets, scores)
    return np.array([spearman(pred[:, q], actual[:, q]) for q in range(actual.shape[1])])


def score_matrix(scores: pd.DataFrame, method: str, queries: Sequence[str],
                 ids: Sequence[str]) -> np.ndarray:
    """(Q, N) scores of `method`, aligned to `queries` and the training ids `ids`."""
    sub = scores[scores["method"] == method]
    out = np.empty((len(queries), len(ids)))
    for qi, q in enumerate(queries):
        s = sub[sub["query"] == q].set_index("track_id")["score"]
        missing = [t for t in ids if t not in s.index]
        if s.empty or missing:
            raise LinernotesError(f"Method {method!r} has no score for query {q!r}"
                                  + (f" and track {missing[0]!r}" if missing else "")
                                  + "; LDS needs a score for every training track.")
        out[qi] = s.loc[list(ids)].to_numpy(np.float64)
    return out


# ---------------------------------------------------------------- actual losses of retrains


@dataclasses.dataclass
class LdsData:
    """Subset masks over the run's training ids and the measured query losses."""

    ids: list[str]
    subsets: np.ndarray  # (M, N) bool
    queries: list[str]
    losses: np.ndarray  # (M, Q): subset model (recipe seed) query loss; NaN = not trained yet
    paired: np.ndarray  # (P, M', Q) losses of the first M' subsets under P extra seeds
    full: np.ndarray  # (1 + extra_seeds, Q) full model: the run, then extra seeds
    retrains_left: int = 0

    @property
    def complete(self) -> bool:
        return self.retrains_left == 0 and bool(np.isfinite(self.losses).all())


def subset_losses(
    run: Run, manifest: pd.DataFrame, queries: Sequence[Query], folder: str | Path,
    settings: LdsSettings | None = None, retrainer: Retrainer | None = None,
    draws: EvalDraws | None = None, log: Callable[[str], None] | None = print,
) -> LdsData:
    """Retrain the subset (and ceiling) models and measure every query's loss on each.

    Losses are cached one row per (model, query) in `<folder>/lds_losses.parquet`; retrains in
    the retrainer's cache. The budget stops it cleanly (`retrains_left` > 0, NaN losses).
    """
    s, draws = settings or LdsSettings(), draws or EvalDraws()
    say = log or (lambda _msg: None)
    retrainer = retrainer or Retrainer(run, manifest)
    ids = retrainer.ids
    subsets = random_subsets(len(ids), s.subsets, s.fraction, s.seed)
    seed0 = retrainer.base.seed
    jobs = [(("subset", j, 0), [t for t, keep in zip(ids, subsets[j]) if not keep], None)
            for j in range(s.subsets)]
    jobs += [(("paired", j, p), [t for t, keep in zip(ids, subsets[j]) if not keep],
              seed0 + 1 + p) for p in range(s.paired_seeds) for j in range(s.paired_subsets)]
    jobs += [(("full", 0, e), [], seed0 + 1 + e) for e in range(s.extra_seeds)]
    store = RowStore(Path(folder) / "lds_losses.parquet")
    qkeys = [q.key for q in queries]
    values: dict[tuple, float] = {}
    for q in queries:  # the full model at the recipe seed is the run itself
        key = hash_json({"model": run.hash, "query": q.key, "draws": draws.to_dict()})
        row = store.get(key) or store.add({"key": key, "model": run.hash, "query": q.key,
                                           "loss": query_loss(run.task, run.model, q, draws)})
        values[("full", 0, -1, q.key)] = float(row["loss"])
    say(f"LDS: {len(jobs)} retrains ({retrainer.missing([(x, sd) for _, x, sd in jobs])} to "
        "train).")
    left = 0
    for i, (label, exclude, seed) in enumerate(jobs):
        rkey = retrainer.key(exclude, seed)
        keys = {q.key: hash_json({"model": rkey, "query": q.key, "draws": draws.to_dict()})
                for q in queries}
        if not all(k in store for k in keys.values()):
            try:
                model = retrainer(exclude, seed)
            except BudgetExhausted:
                left = retrainer.missing([(x, sd) for _, x, sd in jobs[i:]])
                say(f"Stopped: the retraining budget ({retrainer.budget}) is used up; {left} "
                    "retrains left. Re-run to continue.")
                break
            for q in queries:
                if keys[q.key] not in store:
                    store.add({"key": keys[q.key], "model": rkey, "query": q.key,
                               "loss": query_loss(model.task, model.model, q, draws)})
        for q in queries:
            values[(*label, q.key)] = float(store.get(keys[q.key])["loss"])
    nan = float("nan")
    losses = np.array([[values.get(("subset", j, 0, q), nan) for q in qkeys]
                       for j in range(s.subsets)])
    paired = np.array([[[values.get(("paired", j, p, q), nan) for q in qkeys]
                        for j in range(s.paired_subsets)] for p in range(s.paired_seeds)])
    full = np.array([[values.get(("full", 0, e, q), nan) for q in qkeys]
                     for e in range(-1, s.extra_seeds)])
    return LdsData(list(ids), subsets, qkeys, losses, paired, full, left)


# ---------------------------------------------------------------- scores -> LDS


def ceiling_pairs(data: LdsData) -> float:
    """Mean over queries of the Spearman between seeds' losses over the paired subsets."""
    m = data.paired.shape[1] if data.paired.ndim == 3 else 0
    if m < 3:
        return float("nan")
    seeds = [data.losses[:m]] + list(data.paired)  # (seed, subset, query)
    per_query = []
    for q in range(len(data.queries)):
        pairs = [spearman(a[:, q], b[:, q]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        per_query.append(np.nanmean(pairs) if np.isfinite(pairs).any() else np.nan)
    return float(np.nanmean(per_query)) if np.isfinite(per_query).any() else float("nan")


def ceiling_variance(data: LdsData) -> float:
    """(6/π)·asin(r/2), r = sqrt(1 − σ²_seed/σ²_S), averaged over queries (see module doc)."""
    if len(data.full) < 2 or not np.isfinite(data.full).all():
        return float("nan")
    out = []
    for q in range(len(data.queries)):
        var_seed = float(np.var(data.full[:, q], ddof=1))
        var_s = float(np.nanvar(data.losses[:, q], ddof=1))
        if var_s > 0:
            r = math.sqrt(max(0.0, 1.0 - var_seed / var_s))
            out.append(6 / math.pi * math.asin(r / 2))
    return float(np.mean(out)) if out else float("nan")


def lds_table(data: LdsData, scores: pd.DataFrame,
              methods: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (method, query): its LDS over the subset models measured so far."""
    done = np.isfinite(data.losses).all(axis=1)
    if done.sum() < 3:
        raise LinernotesError(f"Only {int(done.sum())} subset models are trained; LDS needs at "
                              "least 3 (raise the budget and re-run).")
    methods = list(methods) if methods is not None else sorted(scores["method"].unique())
    rows = []
    for m in methods:
        mat = score_matrix(scores, m, data.queries, data.ids)
        per_q = lds_from_losses(data.subsets[done], data.losses[done], mat)
        rows += [{"method": m, "query": q, "lds": float(v), "models": int(done.sum())}
                 for q, v in zip(data.queries, per_q)]
    return pd.DataFrame(rows)


def lds_summary(table: pd.DataFrame, data: LdsData) -> pd.DataFrame:
    """Per method: mean and std of LDS over queries, and the two noise ceilings."""
    g = table.groupby("method")["lds"]
    out = pd.DataFrame({"lds": g.mean(), "lds_std": g.std(ddof=0), "queries": g.count()})
    out["ceiling_pairs"] = ceiling_pairs(data)
    out["ceiling_variance"] = ceiling_variance(data)
    return out.reset_index()
