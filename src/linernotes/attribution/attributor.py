"""The one protocol of attribution methods, and the one writer of their score tables.

A method is an `Attributor` built once for a run's training set; `scores(query, work)` returns
every training track's score for one query (`Scored`: the scores, extra columns such as the losses
before and after, and what the method records about how it got them). `attribute` turns that into
the score table (`scores.score_table`), checks it and writes it with its JSON record; nothing else
writes score tables. `work` is a folder for resumable intermediate results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.attribution.query import Query
from linernotes.attribution.scores import score_table, write_scores
from linernotes.errors import LinernotesError


@dataclasses.dataclass
class Scored:
    """One query's scores of every training track (higher = more credited), extra table columns
    and the method's record."""

    scores: np.ndarray
    record: dict = dataclasses.field(default_factory=dict)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Attributor:
    """Base of every attribution method: implement `scores` (and `scores_many` when several
    queries share one pass). `method` names the method in its tables."""

    method = ""
    #: set by `methods.make_attributor`: the registered method and its resolved settings
    spec = None
    sections: dict = {}

    def __init__(self, run_hash: str, manifest: pd.DataFrame, train_ids: Sequence[str]):
        self.run_hash, self.manifest, self.train_ids = run_hash, manifest, list(train_ids)

    @property
    def name(self) -> str:
        """The registered method's name (`linernotes methods`)."""
        return self.spec.name if self.spec is not None else self.method

    @property
    def kind(self) -> str:
        return self.spec.kind if self.spec is not None else ""

    def scores(self, query: Query, work: Path) -> Scored:
        """Every training track's score for `query`, in `train_ids` order."""
        raise NotImplementedError

    def scores_many(self, queries: Sequence[Query], work: Path) -> Iterable[Scored]:
        """Each query's `Scored`, in order (by default one query at a time, as it is done)."""
        for q in queries:
            yield self.scores(q, work)

    def attribute(self, query: Query, out_dir: str | Path, *args, **kwargs) -> pd.DataFrame:
        """Score every training track for `query`; write `<out_dir>/<query key>.parquet` and its
        record (extra arguments go to `scores`)."""
        return self.write(query, self.scores(query, Path(out_dir) / ".work", *args, **kwargs),
                          out_dir)

    def attribute_many(self, queries: Sequence[Query], out_dir: str | Path) -> list[pd.DataFrame]:
        """Score several queries; one table each, written as soon as it is scored."""
        queries = list(queries)
        scored = self.scores_many(queries, Path(out_dir) / ".work") if queries else []
        return [self.write(q, s, out_dir) for q, s in zip(queries, scored)]

    def write(self, query: Query, scored: Scored, out_dir: str | Path) -> pd.DataFrame:
        """The score table of `query` (checked: every score finite), written with its record."""
        bad = ~np.isfinite(np.asarray(scored.scores, dtype=np.float64))
        if bad.any():
            raise LinernotesError(
                f"{self.method} gave {int(bad.sum())} non-finite score(s) for query {query.key!r} "
                f"({query.source or 'no source'}); nothing was written. Check the query (a broken "
                "or silent clip: regenerate it) and the model.")
        df = score_table(query.key, self.method, self.train_ids, scored.scores, self.manifest,
                         **scored.columns)
        record = {"query": query.key, "caption": query.caption, "source": query.source,
                  "method": self.method, "run": self.run_hash, **scored.record}
        write_scores(df, Path(out_dir) / f"{query.key}.parquet", record)
        return df
