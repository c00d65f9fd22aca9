"""Methods side by side: the paper's two views of several methods' scores for the same queries.

(a) The normalised score over ranks: per query, scores are min-max scaled and turned into shares
of credit (softmax), sorted from the top; the curves are averaged over queries (mean ± std,
log axes). (b) The method × method correlation of the scores over the training tracks (Pearson
and Spearman), computed per query and averaged over the queries. The normalisations, correlations
and figures are those of the report (`report.normalise`, `report.plots`), so both agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.artifacts import write_json
from linernotes.attribution.scores import read_scores
from linernotes.errors import LinernotesError
from linernotes.report.normalise import (
    correlation_matrix,
    mean_correlation,
    min_max,
    rank_profile,
    softmax,
)
from linernotes.report.plots import correlation_plot, distribution_plot

NORMALISATIONS = {"min-max": min_max, "softmax": softmax}
CORRELATIONS = ("pearson", "spearman")


def score_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Score-table files: folders expand to their `*.parquet`, in the order given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise LinernotesError(f"{p} holds no score tables (*.parquet); run "
                                      "`linernotes attribute --method ... -o` into it first.")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise LinernotesError(f"No score table or folder at {p}.")
    return out


def read_score_tables(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Every score table under `paths` as one long table (query, method, track_id, score, rank).

    Each file must hold one (query, method) with finite scores; the same pair twice is an error.
    """
    parts, seen = [], {}
    for path in score_paths(paths):
        df = read_scores(path)
        pairs = df[["query", "method"]].astype(str).drop_duplicates()
        if len(pairs) != 1:
            raise LinernotesError(f"{path} mixes queries or methods; write one table per query "
                                  "and method.")
        query, method = pairs.iloc[0]
        if (query, method) in seen:
            raise LinernotesError(f"Query {query!r} has two {method!r} score tables: "
                                  f"{seen[(query, method)]} and {path}; pass only one.")
        seen[(query, method)] = path
        if not np.isfinite(df["score"].to_numpy(dtype=np.float64)).all():
            raise LinernotesError(f"{path} has NaN or infinite scores; re-run the attribution.")
        parts.append(df[["query", "method", "track_id", "score", "rank"]].astype(
            {"query": str, "method": str, "track_id": str}))
    return pd.concat(parts, ignore_index=True)


def _methods(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["method"]))


def rank_distribution(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over queries of each normalised score at ranks 1..N, per method.

    Columns: method, normalisation, rank, mean, std, n_queries. Queries with different numbers
    of tracks are compared over their common ranks.
    """
    rows = []
    for method in _methods(df):
        by_query = [t["score"].to_numpy(np.float64)
                    for _, t in df[df["method"] == method].groupby("query", sort=False)]
        n = min(len(s) for s in by_query)
        for norm, fn in NORMALISATIONS.items():
            curves = np.stack([rank_profile(fn(s))[:n] for s in by_query])
            rows.append(pd.DataFrame({
                "method": method, "normalisation": norm, "rank": np.arange(1, n + 1),
                "mean": curves.mean(0), "std": curves.std(0), "n_queries": len(by_query),
            }))
    return pd.concat(rows, ignore_index=True)


def method_correlations(df: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], int]:
    """Pearson and Spearman method × method matrices averaged over the queries that have two or
    more methods (over the tracks they share), and the number of such queries."""
    methods = _methods(df)
    per_kind: dict[str, list[pd.DataFrame]] = {k: [] for k in CORRELATIONS}
    for _, t in df.groupby("query", sort=False):
        wide = t.pivot_table(index="track_id", columns="method", values="score", aggfunc="first")
        wide = wide[[m for m in methods if m in wide.columns]].dropna()
        if wide.shape[1] < 2 or len(wide) < 2:
            continue
        for kind in CORRELATIONS:
            per_kind[kind].append(correlation_matrix(wide, kind))
    n = len(per_kind["pearson"])
    if n == 0:
        return {}, 0
    mats = {}
    for kind, ms in per_kind.items():
        mean = mean_correlation(ms)
        order = [m for m in methods if m in mean.columns]
        mats[kind] = mean.loc[order, order]
    return mats, n


@dataclasses.dataclass
class Comparison:
    """The two views and the files written."""

    distribution: pd.DataFrame
    correlations: dict[str, pd.DataFrame]
    n_correlated: int  # queries in the correlation average
    queries: dict[str, int]  # method -> number of queries
    files: dict[str, str]

    def summary(self) -> dict:
        top = self.distribution[self.distribution["rank"] == 1]
        return {
            "methods": list(self.queries), "queries": self.queries,
            "n_correlated_queries": self.n_correlated,
            "top1_share": {m: float(v) for m, v in
                           top[top["normalisation"] == "softmax"].set_index("method")["mean"]
                           .items()},
            "correlations": {k: {r: {c: (None if np.isnan(v) else float(v))
                                     for c, v in row.items()} for r, row in m.iterrows()}
                             for k, m in self.correlations.items()},
            "files": self.files,
        }


def compare(paths: Sequence[str | Path], out_dir: str | Path) -> Comparison:
    """Read score tables of several methods and write both views (PNG + CSV) to `out_dir`.

    Files: distribution.png/.csv, correlation.png and pearson.csv/spearman.csv (when two or more
    methods share a query), compare.json (a summary).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = read_score_tables(paths)
    dist = rank_distribution(df)
    files = {"distribution_csv": str(out / "distribution.csv"),
             "distribution_png": str(out / "distribution.png")}
    dist.to_csv(files["distribution_csv"], index=False)
    profiles = {m: {norm: (g["mean"].to_numpy(), g["std"].to_numpy())
                    for norm, g in d.groupby("normalisation", sort=False)}
                for m, d in dist.groupby("method", sort=False)}
    queries = {m: int(df.loc[df["method"] == m, "query"].nunique()) for m in _methods(df)}
    distribution_plot(profiles, files["distribution_png"], max(queries.values()))
    mats, n = method_correlations(df)
    if mats:
        for kind, mat in mats.items():
            files[f"{kind}_csv"] = str(out / f"{kind}.csv")
            mat.to_csv(files[f"{kind}_csv"])
        files["correlation_png"] = str(out / "correlation.png")
        correlation_plot({k.capitalize(): v for k, v in mats.items()},
                               files["correlation_png"])
    result = Comparison(dist, mats, n, queries, files)
    files["summary"] = str(out / "compare.json")
    write_json(files["summary"], result.summary())
    return result
