"""Groups of training tracks: a partition of a run's training set by one manifest column.

Every training track (the run's split, minus tracks it excluded or removed by an opt-out) falls
in exactly one group; tracks with no value in the column form the group `MISSING`.
"""

from __future__ import annotations

import hashlib
import re

import pandas as pd

from linernotes.errors import LinernotesError

MISSING = "(none)"  # the group of tracks with no value in the grouping column


def _value(v) -> str:
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return MISSING
    text = str(v).strip()
    return text if text and text.lower() not in ("nan", "<na>") else MISSING


def groups(manifest: pd.DataFrame, run, by: str = "artist") -> dict[str, list[str]]:
    """{group value: its training track ids}, groups sorted by name; they partition the run's
    training set exactly. `by` is any manifest column (artist, collection, instrument, ...)."""
    if not isinstance(by, str) or by not in manifest.columns:
        raise LinernotesError(
            f"Cannot group by {by!r}: the manifest has no such column. Columns: "
            f"{', '.join(map(str, manifest.columns))}."
        )
    ids = run.train_ids(manifest)
    if not ids:
        raise LinernotesError("The run has no training tracks in this manifest to group.")
    values = manifest.set_index("track_id").loc[ids, by].map(_value)
    out: dict[str, list[str]] = {}
    for tid, value in zip(ids, values):
        out.setdefault(value, []).append(tid)
    return dict(sorted(out.items()))


def group_slug(name: str) -> str:
    """A folder name for a group: readable, and unique (a short hash of the exact name)."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "group"
    return f"{base}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
