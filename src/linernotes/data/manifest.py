"""The manifest: one row per track, stored as Parquet; the single description of a corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.artifacts import atomic_path, hash_json
from linernotes.errors import LinernotesError

MANIFEST_NAME = "manifest.parquet"

#: Column -> pandas dtype. Every manifest has all of them (empty string / NaN where unknown).
COLUMNS: dict[str, str] = {
    "track_id": "string",  # stable id, unique; excerpts of one file share `parent_id`
    "parent_id": "string",
    "path": "string",  # audio path relative to the manifest's folder (or absolute)
    "caption": "string",
    "artist": "string",
    "collection": "string",
    "title": "string",
    "key": "string",
    "meter": "string",
    "tempo": "float64",  # beats per minute
    "instrument": "string",
    "duration": "float64",  # seconds of real audio
    "sample_rate": "int64",
    "source": "string",  # where it came from (music21 corpus path, or the user's file)
    "licence": "string",
    "split": "string",  # "train" or "holdout"
}
SPLITS = ("train", "holdout")


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing optional columns, order and type all columns, and check invariants."""
    df = df.copy()
    for col, dtype in COLUMNS.items():
        if col not in df.columns:
            if col in ("track_id", "path", "caption"):
                raise LinernotesError(f"Manifest is missing the required column '{col}'.")
            df[col] = pd.Series([None] * len(df), dtype=dtype, index=df.index)
    df = df[list(COLUMNS)].astype(COLUMNS).reset_index(drop=True)
    for col in ("artist", "collection", "title", "key", "meter", "instrument", "source",
                "licence", "parent_id"):
        df[col] = df[col].fillna("")
    df.loc[df["parent_id"] == "", "parent_id"] = df["track_id"]
    df["split"] = df["split"].fillna("train")
    dup = df["track_id"][df["track_id"].duplicated()]
    if len(dup):
        raise LinernotesError(f"Manifest has duplicate track ids: {', '.join(dup[:5])}.")
    bad = sorted(set(df["split"]) - set(SPLITS))
    if bad:
        raise LinernotesError(f"Manifest has unknown split(s) {bad}; use {SPLITS}.")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a normalised manifest atomically; `path` is a file or a folder."""
    path = Path(path)
    if path.suffix != ".parquet":
        path = path / MANIFEST_NAME
    df = normalise(df)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (file, or folder holding manifest.parquet) with a clear error if absent."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise LinernotesError(
            f"No manifest at {path}. Build one with `linernotes corpus build` or "
            "`linernotes corpus import`."
        )
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise LinernotesError(f"{path} is not a readable Parquet manifest: {exc}") from exc
    df = normalise(df)
    df.attrs["root"] = str(path.parent)
    df.attrs["path"] = str(path)
    return df


def manifest_hash(df: pd.DataFrame) -> str:
    """Hash of the manifest's content (what a model or feature cache was made from)."""
    cols = ["track_id", "path", "caption", "duration", "sample_rate", "split"]
    return hash_json(df[cols].astype(str).values.tolist())


def positions(df: pd.DataFrame, track_ids) -> np.ndarray:
    """Manifest positions of `track_ids`, in their order."""
    pos = {t: i for i, t in enumerate(df["track_id"].astype(str))}
    return np.asarray([pos[str(t)] for t in track_ids], dtype=np.int64)


def audio_path(df: pd.DataFrame, row: pd.Series) -> Path:
    """Absolute audio path of a manifest row."""
    p = Path(row["path"])
    return p if p.is_absolute() else Path(df.attrs.get("root", ".")) / p
