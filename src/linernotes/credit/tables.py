"""Credit tables: one row per group for one query and method, ranked, with shares of credit.

Every credit method (`front.credit`) writes this table. Score = the query's loss change at fixed
draws (after − before); `elbo` the same change of the ELBO-style estimate; `share` clips negative
scores to 0 and divides by the sum (equal shares when no group has a positive score); `softmax`
is the report's share (`report.normalise`).
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
                  "softmax"]


def positive_shares(scores: Sequence[float]) -> np.ndarray:
    """Negative scores clipped to 0, divided by the sum; equal shares if no score is positive."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    return s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / max(len(s), 1))


def describe(method: str, by: str) -> dict[str, str]:
    """How a credit method's scores were made, in words: {how, caption, score} for the report.

    Group unlearning methods and LOGO change the model; `clap-centroid` and `<m>-sum` do not,
    and must not be described as if they did.
    """
    share = f"Share of this clip's credit per {by}: "
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
            f"model ({method}), negative increases counted as none.", "score": "Loss change"}


def credit_table(
    query: str, method: str, by: str, scores: Mapping[str, float], n_tracks: Mapping[str, int],
    elbo: Mapping[str, float] | None = None, **extra: Mapping[str, float],
) -> pd.DataFrame:
    """The ranked table (rank 1 = most credited; ties share the best rank, then by name)."""
    names = sorted(scores)
    s = np.asarray([scores[g] for g in names], dtype=np.float64)
    if not np.isfinite(s).all():
        raise LinernotesError(f"Non-finite credit score for query {query!r} ({method}).")
    df = pd.DataFrame({
        "query": query, "method": method, "by": by, "group": names,
        "n_tracks": [int(n_tracks[g]) for g in names], "score": s,
        "elbo": [float(elbo[g]) if elbo is not None else np.nan for g in names],
        "rank": rankdata(-s, method="min").astype(np.int64),
        "share": positive_shares(s), "softmax": softmax(s),
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
    after: dict, base: dict,
) -> list[pd.DataFrame]:
    """Tables of (loss under the group's model − loss under the full model) per query."""
    n = {g: len(ids) for g, ids in parts.items()}
    out = []
    for q in queries:
        b, a = base[q.key], after[q.key]
        out.append(credit_table(
            q.key, method, by, {g: a[g]["fixed"] - b["fixed"] for g in parts}, n,
            {g: a[g]["elbo"] - b["elbo"] for g in parts},
            loss_before={g: b["fixed"] for g in parts},
            loss_after={g: a[g]["fixed"] for g in parts},
        ))
    return out
