"""A Parquet table written one finished row at a time, so a killed evaluation resumes.

Each row carries a `key` (a hash of everything the row depends on); a rerun reads the rows
already there and computes only the missing ones.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from linernotes.artifacts import atomic_path
from linernotes.errors import LinernotesError


class RowStore:
    """Rows keyed by their "key" column, in one Parquet file rewritten atomically per row."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._rows: dict[str, dict] = {}
        if self.path.exists():
            try:
                df = pd.read_parquet(self.path)
            except Exception as exc:
                raise LinernotesError(f"{self.path} is unreadable ({exc}); delete it to recompute "
                                      "its rows.") from exc
            if "key" not in df.columns:
                raise LinernotesError(f"{self.path} is not a row table (no 'key' column); delete "
                                      "it or choose another output folder.")
            self._rows = {str(r["key"]): r for r in df.to_dict("records")}

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> dict | None:
        return self._rows.get(key)

    def add(self, row: dict) -> dict:
        """Record a finished row (it must hold "key") and write the table."""
        if "key" not in row:
            raise LinernotesError("RowStore.add: a row needs a 'key'.")
        self._rows[str(row["key"])] = dict(row)
        with atomic_path(self.path) as tmp:
            self.table().to_parquet(tmp, index=False)
        return row

    def table(self, keys: list[str] | None = None) -> pd.DataFrame:
        """The rows (those of `keys`, in that order, when given) as a DataFrame."""
        rows = list(self._rows.values()) if keys is None else [
            self._rows[k] for k in keys if k in self._rows]
        return pd.DataFrame(rows)
