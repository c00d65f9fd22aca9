"""Group credit against LOGO: Top-1 agreement, NDCG@k, Spearman, MRR and compute per method.

Per query, a method's ranking of the groups is compared with LOGO's (the query's loss increase
when the model is retrained without each group, at fixed draws). Gains for NDCG are LOGO's
positive loss increases; a query where no group has a positive LOGO credit has no NDCG (NaN,
left out of the mean). Retraining on fewer tracks also shifts a query's loss by an amount common
to every group (seen on the quick benchmark model: ~-0.05 for some holdout tracks, as large as
the credit itself), so `ndcg_centred` takes gains relative to the median group's LOGO credit.
Ties are broken by group name, identically for every method.

With LOGO trained under several seeds the gold standard is the seed-averaged change, and two
rows read it against itself: `logo: seed vs seed` (one seed's ranking against another's, every
ordered pair: the ceiling of agreement at this scale, since no method can be expected to agree
with LOGO better than LOGO agrees with itself) and `logo: one seed` (the recipe seed's LOGO, what a
single retraining gives, against the seed average). Every mean comes with a bootstrap interval
over the queries (`stats.py`).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from linernotes.artifacts import write_json
from linernotes.attribution.query import Query
from linernotes.credit.losses import CreditSettings
from linernotes.credit.stats import RESAMPLES, intervals
from linernotes.credit.tables import write_credit
from linernotes.credit.unlearn import group_methods
from linernotes.errors import LinernotesError

METRICS = ("top1", "ndcg", "ndcg_centred", "spearman", "mrr")


def ranking(scores: Mapping[str, float]) -> list[str]:
    """Groups from most to least credited (ties by name)."""
    return sorted(scores, key=lambda g: (-float(scores[g]), g))


def ranking_metrics(scores: Mapping[str, float], gold: Mapping[str, float], k: int = 3
                    ) -> dict[str, float]:
    """Top-1 agreement, NDCG@k (gains = positive gold scores; `ndcg_centred`: gold minus its
    median, positive part), Spearman and the reciprocal rank of gold's top group, for one
    query's group scores against the gold scores."""
    if set(scores) != set(gold):
        raise LinernotesError(f"The method scores groups {sorted(scores)} but LOGO scores "
                              f"{sorted(gold)}; compare the same grouping.")
    order, gold_order = ranking(scores), ranking(gold)
    disc = 1.0 / np.log2(np.arange(2, k + 2))

    def ndcg(offset: float) -> float:
        gain = {g: max(float(gold[g]) - offset, 0.0) for g in gold}
        dcg = sum(gain[g] * d for g, d in zip(order[:k], disc))
        ideal = sum(gain[g] * d for g, d in zip(gold_order[:k], disc))
        return dcg / ideal if ideal > 0 else math.nan

    names = sorted(gold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = spearmanr([scores[g] for g in names], [gold[g] for g in names])[0]
    return {
        "top1": float(order[0] == gold_order[0]),
        "ndcg": ndcg(0.0),
        "ndcg_centred": ndcg(float(np.median([float(v) for v in gold.values()]))),
        "spearman": float(rho) if np.isfinite(rho) else math.nan,
        "mrr": 1.0 / (order.index(gold_order[0]) + 1),
    }


def _scores(table: pd.DataFrame, column: str) -> dict[str, float]:
    return dict(zip(table["group"].astype(str), table[column].astype(float)))


def compare(tables: Mapping[str, Sequence[pd.DataFrame]], gold: Sequence[pd.DataFrame],
            k: int = 3, column: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Per (query, method) metrics: `tables` maps a method label to its per-query tables
    (aligned with `gold`); `column` picks the score column per label (default "score")."""
    rows = []
    for label, per_query in tables.items():
        col = (column or {}).get(label, "score")
        for t, g in zip(per_query, gold, strict=True):
            s, gs = _scores(t, col), _scores(g, "score")
            rows.append({"query": str(g["query"].iloc[0]), "method": label,
                         "top_group": ranking(s)[0], "logo_top": ranking(gs)[0],
                         **ranking_metrics(s, gs, k)})
    return pd.DataFrame(rows)


SEED_VS_SEED = "logo: seed vs seed"
ONE_SEED = "logo: one seed"


def seed_ceiling(gold: Sequence[pd.DataFrame], k: int = 3) -> pd.DataFrame:
    """Detail rows of LOGO against itself, from the `seed_<s>` columns of seed-averaged LOGO
    tables: `logo: seed vs seed` (per query, the mean over ordered pairs of seeds of one seed's
    ranking against another's) and `logo: one seed` (the first seed against the average).
    Empty with fewer than two seeds."""
    rows = []
    for g in gold:
        cols = [c for c in g.columns if c.startswith("seed_")]
        if len(cols) < 2:
            return pd.DataFrame()
        per = {c: _scores(g, c) for c in cols}
        pairs = [ranking_metrics(per[a], per[b], k) for a in cols for b in cols if a != b]
        mean = {m: float(np.nanmean([p[m] for p in pairs]))
                if any(np.isfinite(p[m]) for p in pairs) else math.nan for m in METRICS}
        q, gs = str(g["query"].iloc[0]), _scores(g, "score")
        rows.append({"query": q, "method": SEED_VS_SEED, "top_group": "", "logo_top":
                     ranking(gs)[0], **mean})
        rows.append({"query": q, "method": ONE_SEED, "top_group": ranking(per[cols[0]])[0],
                     "logo_top": ranking(gs)[0], **ranking_metrics(per[cols[0]], gs, k)})
    return pd.DataFrame(rows)


def summarise(detail: pd.DataFrame, seconds: Mapping[str, tuple[float, float]],
              logo_seconds: float, k: int = 3, resamples: int = RESAMPLES) -> pd.DataFrame:
    """One row per method: mean metrics over queries with bootstrap intervals (`<metric>_low`,
    `<metric>_high`); `seconds` (the one-off work on the groups: unlearning every group, or
    LOGO's retraining) and its fraction of LOGO's; `seconds_per_query` (scoring a query under
    every group's model: the same kind of work for LOGO and group unlearning). `seconds` maps a
    method to (group seconds, seconds per query)."""
    agg = detail.groupby("method", sort=False).agg(
        queries=("query", "count"), ndcg_queries=("ndcg", "count")).reset_index()
    agg = agg.merge(intervals(detail, METRICS, resamples=resamples), on="method")
    agg["seconds"] = [float(seconds.get(m, (math.nan, math.nan))[0]) for m in agg["method"]]
    agg["seconds_per_query"] = [float(seconds.get(m, (math.nan, math.nan))[1])
                                for m in agg["method"]]
    agg["fraction_of_logo"] = agg["seconds"] / logo_seconds if logo_seconds > 0 else math.nan
    return agg.rename(columns=lambda c: c.replace("ndcg", f"ndcg@{k}")
                      .replace(f"ndcg@{k}_queries", "ndcg_queries"))


def _method_specs(methods: Sequence[str] | Mapping[str, Any]
                  ) -> dict[str, tuple[str, Any, dict]]:
    """{label: (method, settings, CreditSettings changes)}."""
    if isinstance(methods, Mapping):
        return {label: (spec, None, {}) if isinstance(spec, str) else
                (spec[0], spec[1], dict(spec[2]) if len(spec) > 2 else {})
                for label, spec in methods.items()}
    return {m: (m, None, {}) for m in methods}


def evaluate_credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query],
    methods: Sequence[str] | Mapping[str, Any] = ("newton",), by: str = "artist",
    score: CreditSettings | None = None, out_dir: str | Path | None = None, k: int = 3,
    elbo: bool = True, progress: bool = True, seeds: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method's group ranking against LOGO, per query and on average.

    `methods`: names, or {label: name, (name, settings) or (name, settings, changes to
    `score` for this method, such as {"reference_tracks": 2})}. Group-unlearning methods also get a
    row ranked by their ELBO-style estimate (`<label> [elbo]`) when `elbo` (not when calibrated:
    the calibration is of the fixed-draw change). Returns (summary:
    one row per method with Top-1, NDCG@k, Spearman, MRR, seconds and fraction of LOGO's
    retraining seconds; detail: one row per query and method). `seeds`: LOGO's training seeds
    (the gold standard is their average; with 2 or more the summary holds LOGO's own ceiling,
    `seed_ceiling`). A method's seconds are its one-off group unlearning (a baseline's: its
    whole work), the fraction is of one seed's LOGO retraining, and scoring each query is
    `seconds_per_query`. With `out_dir`, both are written there as Parquet with a JSON record.
    """
    from linernotes.credit.front import credit

    if not queries:
        raise LinernotesError("evaluate credit: give at least one query.")
    s = score or CreditSettings()
    specs = {k: v for k, v in _method_specs(methods).items() if k != "logo"}  # the reference
    gold = credit(run, manifest, queries, "logo", by=by, score=s, progress=progress,
                  settings={"seeds": seeds})
    grec = gold[0].attrs["record"]
    logo_seconds = float(grec["seconds_groups"])  # one seed's retraining
    per_query = grec["seconds_queries"] / len(grec["seeds"]) / len(queries)
    tables: dict[str, list[pd.DataFrame]] = {}
    column: dict[str, str] = {}
    seconds = {m: (logo_seconds, per_query) for m in ("logo", ONE_SEED, SEED_VS_SEED)}
    for label, (name, settings, changes) in specs.items():
        if progress:
            print(f"evaluate credit: {label}", file=sys.stderr, flush=True)
        got = credit(run, manifest, queries, name, by=by, settings=settings,
                     score=s.replace(**changes), progress=progress)
        rec = got[0].attrs["record"]
        if "seconds_groups" in rec:
            secs = (float(rec["seconds_groups"]), float(rec["seconds_queries"]) / len(queries))
        else:  # a baseline: its whole work is per query
            secs = (float(rec.get("seconds_queries", 0.0)), math.nan)
        tables[label], seconds[label] = got, secs
        if elbo and name in group_methods() and not changes.get("reference_tracks"):
            tables[f"{label} [elbo]"], column[f"{label} [elbo]"] = got, "elbo"
            seconds[f"{label} [elbo]"] = secs
        if out_dir is not None:
            for q, t in zip(queries, got):
                write_credit(t.assign(method=label), Path(out_dir) / "tables",
                             {**rec, "query": q.key, "caption": q.caption, "source": q.source})
    tables["logo"] = gold  # the reference against itself (sanity: all metrics 1)
    detail = pd.concat([compare(tables, gold, k, column), seed_ceiling(gold, k)],
                       ignore_index=True)
    summary = summarise(detail, seconds, logo_seconds, k)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary.to_parquet(out / "credit_eval.parquet", index=False)
        detail.to_parquet(out / "credit_eval_detail.parquet", index=False)
        for q, t in zip(queries, gold):
            write_credit(t, out / "tables", {**grec, "query": q.key, "caption": q.caption,
                                             "source": q.source})
        write_json(out / "credit_eval.json", {
            "run": run.hash, "by": by, "k": k, "score": s.to_dict(),
            "queries": [q.key for q in queries], "methods": {lab: n for lab, (n, _, _) in
                                                              specs.items()},
            "logo_seeds": grec["seeds"],
            "logo_seconds": logo_seconds, "summary": summary.to_dict("records")})
    return summary, detail
