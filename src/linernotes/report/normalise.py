"""Score normalisation (min-max, softmax share), rank profiles, credit per group, correlations.

Small pure functions over numpy arrays and score tables; the report and the evaluation use them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import rankdata


def _finite(scores: np.ndarray | pd.Series | list[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"expected a 1-d array of scores, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def min_max(scores: np.ndarray | pd.Series | list[float]) -> np.ndarray:
    """Scale to [0, 1] (top track = 1); constant scores give all zeros (no track stands out)."""
    s = _finite(scores)
    if len(s) == 0:
        return s
    span = s.max() - s.min()
    if span <= 0:
        return np.zeros_like(s)
    return (s - s.min()) / span


def softmax(
    scores: np.ndarray | pd.Series | list[float], temperature: float | None = None
) -> np.ndarray:
    """Share of credit over all tracks (sums to 1); constant scores give equal shares.

    `temperature=None` uses the scores' standard deviation, so the share does not depend on a
    method's units (a loss difference and a cosine similarity become comparable); pass 1.0 for
    the plain softmax.
    """
    s = _finite(scores)
    if len(s) == 0:
        return s
    if temperature is None:
        scale = float(np.abs(s).max())  # std without overflow for huge scores
        temperature = float((s / scale).std()) * scale if scale > 0 else 0.0
    if temperature <= 0:
        return np.full_like(s, 1.0 / len(s))
    z = (s - s.max()) / temperature
    e = np.exp(z)
    return e / e.sum()


def normalise_scores(df: pd.DataFrame, by: tuple[str, ...] = ("query", "method")) -> pd.DataFrame:
    """Copy of a score table with `minmax` and `share` columns, normalised within each group."""
    out = df.copy()
    grouped = out.groupby(list(by), sort=False)["score"]
    out["minmax"] = grouped.transform(lambda s: min_max(s.to_numpy()))
    out["share"] = grouped.transform(lambda s: softmax(s.to_numpy()))
    return out


def rank_profile(values: np.ndarray) -> np.ndarray:
    """Normalised scores sorted from the top-ranked track down (one query's curve vs rank)."""
    return np.sort(np.asarray(values, dtype=np.float64))[::-1]


def credit_by(df: pd.DataFrame, key: str = "artist", share: str = "share") -> pd.DataFrame:
    """Share of total credit per `key` (e.g. artist) and method, averaged over queries.

    Expects `share` to sum to 1 within each (query, method); the result sums to 1 per method.
    Rows: `key` values sorted by their mean share; columns: methods.
    """
    per_query = df.groupby(["method", "query", key], sort=False)[share].sum()
    table = per_query.groupby(level=["method", key]).sum() / df.groupby("method")["query"].nunique()
    wide = table.unstack("method").fillna(0.0)
    wide = wide.loc[wide.mean(axis=1).sort_values(ascending=False).index]
    wide.columns.name = None
    return wide


def correlation_matrix(wide: pd.DataFrame, kind: str = "pearson") -> pd.DataFrame:
    """Correlation between the columns (methods) of a track × method table; NaN if constant."""
    if kind not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation {kind!r}; use 'pearson' or 'spearman'")
    values = wide.to_numpy(dtype=np.float64)
    if kind == "spearman":
        values = np.column_stack([rankdata(c) for c in values.T]) if values.size else values
    with np.errstate(invalid="ignore", divide="ignore"):
        c = values - values.mean(axis=0)
        norm = np.sqrt((c**2).sum(axis=0))
        corr = (c.T @ c) / np.outer(norm, norm)
    corr[~np.isfinite(corr)] = np.nan
    return pd.DataFrame(corr, index=wide.columns, columns=wide.columns)


def mean_correlation(matrices: list[pd.DataFrame]) -> pd.DataFrame:
    """Average of per-query correlation matrices (ignoring NaN entries), aligned on methods."""
    if not matrices:
        return pd.DataFrame()
    methods = list(dict.fromkeys(m for mat in matrices for m in mat.columns))
    stack = np.stack([mat.reindex(index=methods, columns=methods).to_numpy() for mat in matrices])
    with warnings.catch_warnings():  # an all-NaN entry stays NaN without a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(stack, axis=0)
    return pd.DataFrame(mean, index=methods, columns=methods)
