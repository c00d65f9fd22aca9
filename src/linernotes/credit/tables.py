"""Credit tables: one row per group for one query and method, ranked, with shares of credit.

Every credit method (`front.credit`) writes this table. Score = the query's loss change at fixed
draws (after − before); `elbo` the same change of the ELBO-style estimate; `share` clips negative
scores to 0 and divides by the sum, so the shares of the groups with positive credit sum to 1
(equal shares when no group has a positive score); `softmax` is the report's share
(`report.normalise`). `share_low`/`share_high` bound each share with a 95% interval over the
draws the score averages (a paired bootstrap: every group's change at the same resampled draws,
since every model sees the same noise); NaN for methods without draws (the baselines).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from linernotes.attribution.query import Query
from linernotes.attribution.scores import read_table, write_scores
from linernotes.errors import LinernotesError
from linernotes.report.normalise import softmax

CREDIT_COLUMNS = ["query", "method", "by", "group", "n_tracks", "score", "elbo", "rank", "share",
                  "share_low", "share_high", "softmax"]
BOOTSTRAP = 1000  # resamples of the draws behind a share's interval


def positive_shares(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Negative scores clipped to 0, divided by the sum; equal shares if no score is positive.
    Along the last axis: a 2-D array is one set of scores per row."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    total = s.sum(axis=-1, keepdims=True)
    return np.where(total > 0, s / np.where(total > 0, total, 1.0), 1.0 / max(s.shape[-1], 1))


def share_intervals(changes: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of each group's positive share, from its per-draw changes (groups × draws).

    The draws are resampled together (column k is one draw for every group) and the shares
    recomputed per resample; the bounds are the resamples' percentiles. One draw: no interval
    (the share itself at both ends).
    """
    c = np.asarray(changes, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise LinernotesError("share_intervals takes a (groups, draws) array of changes.")
    if c.shape[1] == 1:
        s = positive_shares(c[:, 0])
        return s, s
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.shape[1], size=(resamples, c.shape[1]))
    shares = positive_shares(c[:, idx].mean(axis=2).T)  # (resamples, groups)
    tail = 100 * (1 - level) / 2
    return np.percentile(shares, tail, axis=0), np.percentile(shares, 100 - tail, axis=0)


def describe(method: str, by: str) -> dict[str, str]:
    """How a credit method's scores were made, in words: {how, caption, score} for the report.

    Group unlearning methods and LOGO change the model; `clap-centroid` and `<m>-sum` do not,
    and must not be described as if they did.
    """
    share = (f"Share of this clip's credit per {by} (the shares of the {by}s with positive "
             "credit sum to 100%): ")
    if method == "clap-centroid":
        return {"how": f"by similarity to each {by}'s training audio ({method})",
                "caption": share + "the cosine of the clip's CLAP audio embedding with the "
                f"centroid of each {by}'s training audio; the model is not used. Negative "
                "similarities count as none.", "score": "Similarity"}
    if method.endswith("-sum"):
        return {"how": f"by summing each {by}'s per-track scores ({method})",
                "caption": share + f"the clip's per-track {method[:-4]} scores summed over each "
                f"{by}'s tracks, negative sums counted as none.", "score": "Summed score"}
    if method == "logo":
        return {"how": f"by retraining without each {by} (logo)",
                "caption": share + f"the clip's loss increase under the model retrained without "
                f"the {by}, negative increases counted as none.", "score": "Loss change"}
    return {"how": f"by unlearning each {by} ({method})",
            "caption": share + f"the clip's loss increase when the {by} is unlearned from the "
            f"model ({method}), negative increases counted as none. The interval is how far the "
            "share moves when the noise draws behind the loss are resampled.",
            "score": "Loss change"}


def credit_table(
    query: str, method: str, by: str, scores: Mapping[str, float], n_tracks: Mapping[str, int],
    elbo: Mapping[str, float] | None = None, draws: Mapping[str, Sequence[float]] | None = None,
    **extra: Mapping[str, float],
) -> pd.DataFrame:
    """The ranked table (rank 1 = most credited; ties share the best rank, then by name).

    `draws`: each group's per-draw changes (their mean is its score) for the shares' intervals.
    """
    names = sorted(scores)
    s = np.asarray([scores[g] for g in names], dtype=np.float64)
    if not np.isfinite(s).all():
        raise LinernotesError(f"Non-finite credit score for query {query!r} ({method}).")
    low = high = np.full(len(names), np.nan)
    if draws is not None:
        low, high = share_intervals(np.stack([np.asarray(draws[g], np.float64) for g in names]))
    df = pd.DataFrame({
        "query": query, "method": method, "by": by, "group": names,
        "n_tracks": [int(n_tracks[g]) for g in names], "score": s,
        "elbo": [float(elbo[g]) if elbo is not None else np.nan for g in names],
        "rank": rankdata(-s, method="min").astype(np.int64),
        "share": positive_shares(s), "share_low": low, "share_high": high, "softmax": softmax(s),
    })
    for col, values in extra.items():
        df[col] = [float(values[g]) for g in names]
    return df.sort_values(["rank", "group"], kind="stable").reset_index(drop=True)


def write_credit(table: pd.DataFrame, out_dir: str | Path, record: dict) -> Path:
    """`<out_dir>/<query>.<method>.parquet` and its JSON record beside it."""
    q, m = str(table["query"].iloc[0]), str(table["method"].iloc[0])
    return write_scores(table, Path(out_dir) / f"{q}.{m}.parquet", record)


def read_credit(path: str | Path) -> pd.DataFrame:
    """A credit table written by `write_credit`, checked."""
    return read_table(path, CREDIT_COLUMNS, "credit", "linernotes credit")


def change_tables(
    queries: Sequence[Query], method: str, by: str, parts: Mapping[str, list[str]],
    after: dict, base: dict, offsets: Mapping[str, float] | None = None,
) -> list[pd.DataFrame]:
    """Tables of (loss under the group's model − loss under the full model) per query, less
    each group's `offsets` when given (calibrated credit: `calibrate.py`; column `offset`)."""
    n = {g: len(ids) for g, ids in parts.items()}
    off = {g: float((offsets or {}).get(g, 0.0)) for g in parts}
    extra = {"offset": off} if offsets is not None else {}
    out = []
    for q in queries:
        b, a = base[q.key], after[q.key]
        out.append(credit_table(
            q.key, method, by, {g: a[g]["fixed"] - b["fixed"] - off[g] for g in parts}, n,
            {g: a[g]["elbo"] - b["elbo"] for g in parts},
            {g: np.subtract(a[g]["fixed_draws"], b["fixed_draws"]) - off[g] for g in parts},
            loss_before={g: b["fixed"] for g in parts},
            loss_after={g: a[g]["fixed"] for g in parts}, **extra,
        ))
    return out
