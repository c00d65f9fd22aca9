"""How sure a credit comparison is: bootstrap intervals over queries and paired differences.

The queries are the unit of resampling: one resample draws the queries with replacement, and
every method is measured on the same draw, so the difference between two methods is a paired
difference (their per-query agreement with LOGO varies together with the query). A metric left
undefined for a query (NDCG when LOGO credits no group) is left out of that query's mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from linernotes.errors import LinernotesError

RESAMPLES = 2000


def _matrix(detail: pd.DataFrame, metric: str, methods: Sequence[str]) -> np.ndarray:
    """(queries, methods) of one metric, queries in first-seen order."""
    wide = detail.pivot_table(index="query", columns="method", values=metric, aggfunc="mean",
                              sort=False, dropna=False)
    missing = [m for m in methods if m not in wide.columns]
    if missing:
        raise LinernotesError(f"No rows for method {missing[0]!r} in the comparison.")
    return wide.reindex(columns=list(methods)).to_numpy(dtype=np.float64)


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, methods): the mean of each column over a bootstrap draw of the rows (NaN
    entries left out of their column's mean)."""
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, len(values), size=(resamples, len(values)))]
    counts = np.isfinite(draws).sum(axis=1)
    sums = np.nansum(draws, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def intervals(detail: pd.DataFrame, metrics: Sequence[str], level: float = 0.95,
              resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """One row per method: each metric's mean over queries and its bootstrap interval
    (`<metric>_low`, `<metric>_high`, percentiles of the resampled means)."""
    methods = list(dict.fromkeys(detail["method"]))
    tail = 100 * (1 - level) / 2
    out = pd.DataFrame({"method": methods})
    for metric in metrics:
        values = _matrix(detail, metric, methods)
        boot = _resampled_means(values, resamples, seed)
        with np.errstate(invalid="ignore"):
            out[metric] = np.nanmean(values, axis=0)
            out[f"{metric}_low"] = np.nanpercentile(boot, tail, axis=0)
            out[f"{metric}_high"] = np.nanpercentile(boot, 100 - tail, axis=0)
    return out


def paired_differences(detail: pd.DataFrame, versus: str, metrics: Sequence[str],
                       level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0,
                       ) -> pd.DataFrame:
    """Each method minus `versus`, per metric, on the same queries: the mean difference, its
    bootstrap interval and a one-sided p-value (the share of resamples where the method does
    not beat `versus`). Queries where either is undefined are left out of that metric."""
    methods = [m for m in dict.fromkeys(detail["method"]) if m != versus]
    tail = 100 * (1 - level) / 2
    rows = []
    for metric in metrics:
        values = _matrix(detail, metric, [versus, *methods])
        diff = values[:, 1:] - values[:, :1]
        boot = _resampled_means(diff, resamples, seed)
        for k, m in enumerate(methods):
            col = boot[:, k][np.isfinite(boot[:, k])]
            rows.append({"method": m, "versus": versus, "metric": metric,
                         "difference": float(np.nanmean(diff[:, k])),
                         "low": float(np.percentile(col, tail)) if len(col) else np.nan,
                         "high": float(np.percentile(col, 100 - tail)) if len(col) else np.nan,
                         "p": float(np.mean(col <= 0)) if len(col) else np.nan,
                         "queries": int(np.isfinite(diff[:, k]).sum())})
    return pd.DataFrame(rows)
