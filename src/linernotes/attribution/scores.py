"""The score table every method writes: one row per (query, training track), as Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from linernotes.artifacts import atomic_path, write_json

SCORE_COLUMNS = ["query", "method", "track_id", "score", "rank", "artist", "title", "caption"]


def score_table(
    query: str, method: str, track_ids: list[str], scores: np.ndarray, manifest: pd.DataFrame,
    **extra: np.ndarray,
) -> pd.DataFrame:
    """Scores with rank 1 = most credited (ties share the best rank), joined with metadata.

    With an `exact` column (two-stage scoring), the exactly scored tracks rank first, by score,
    and the others after them, by their (first-stage) score.
    """
    meta = manifest.set_index("track_id").loc[track_ids]
    s = np.asarray(scores, dtype=np.float64)
    rank = rankdata(-s, method="min").astype(np.int64)
    if "exact" in extra and not np.all(extra["exact"]):
        first = np.asarray(extra["exact"], dtype=bool)
        rank[first] = rankdata(-s[first], method="min")
        rank[~first] = rankdata(-s[~first], method="min") + int(first.sum())
    df = pd.DataFrame({
        "query": query,
        "method": method,
        "track_id": track_ids,
        "score": s,
        "rank": rank,
        "artist": meta["artist"].to_numpy(),
        "title": meta["title"].to_numpy(),
        "caption": meta["caption"].to_numpy(),
    })
    for name, values in extra.items():
        df[name] = values
    return df.sort_values(["rank", "track_id"], kind="stable").reset_index(drop=True)


def write_scores(df: pd.DataFrame, path: str | Path, record: dict | None = None) -> Path:
    """Write a score table (and its record as JSON beside it) atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    if record is not None:
        write_json(path.with_suffix(".json"), record)
    return path


def read_table(path: str | Path, columns: list[str], what: str, command: str) -> pd.DataFrame:
    """A Parquet table with at least `columns`, or a clear error naming the command to run."""
    from linernotes.errors import LinernotesError

    path = Path(path)
    if not path.exists():
        raise LinernotesError(f"No {what} table at {path}; run `{command}` first.")
    df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LinernotesError(f"{path} is not a linernotes {what} table (missing {missing}).")
    return df


def read_scores(path: str | Path) -> pd.DataFrame:
    return read_table(path, SCORE_COLUMNS, "score", "linernotes attribute")
