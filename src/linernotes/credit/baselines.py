"""Baselines for group credit, in the same table as group unlearning.

- `<method>-sum` for every per-track method of `attribution.methods` (`unlearning-sum`,
  `trak-sum`, `mucs-sum`, ...): the query's per-track scores (`linernotes attribute`) summed
  over each group's tracks;
- `clap-centroid`: cosine of the query's CLAP audio embedding with each group's centroid of
  training-audio embeddings (`evaluation.quality.artist_centroids`).

Per-track tables are cached under `RUN/credit/tracks/<method>-<settings>/<query hash>/`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from linernotes.artifacts import hash_json, read_json
from linernotes.attribution.query import Query
from linernotes.attribution.scores import read_scores
from linernotes.credit.groups import groups
from linernotes.credit.losses import credit_root, query_hash
from linernotes.credit.tables import credit_table
from linernotes.data.manifest import positions
from linernotes.errors import LinernotesError


def baseline_methods() -> list[str]:
    """clap-centroid and `<m>-sum` for every per-track attribution method m."""
    from linernotes.attribution.methods import METHODS

    return ["clap-centroid", *[f"{m}-sum" for m in METHODS]]


def summed_scores(table: pd.DataFrame, parts: Mapping[str, list[str]]) -> dict[str, float]:
    """Per-track scores summed over each group's tracks (every group track must be scored)."""
    scores = table.drop_duplicates("track_id").set_index("track_id")["score"]
    out = {}
    for g, ids in parts.items():
        missing = [t for t in ids if t not in scores.index]
        if missing:
            raise LinernotesError(
                f"The per-track score table lacks {len(missing)} training track(s) of group "
                f"{g!r} (e.g. {missing[0]}); score it against this run's training set."
            )
        out[g] = float(scores.loc[ids].sum())
    return out


def clap_centroid_scores(run, manifest: pd.DataFrame, parts: Mapping[str, list[str]],
                         queries: Sequence[Query]) -> list[dict[str, float]]:
    """Cosine of each query's CLAP audio embedding with each group's centroid."""
    from linernotes.attribution.embeddings import audio_embeddings, track_embeddings
    from linernotes.evaluation.quality import artist_centroids

    store = run.feature_store(manifest, progress=False)
    ids = [t for g in parts for t in parts[g]]
    labels = [g for g in parts for _ in parts[g]]
    emb = track_embeddings(run, store, positions(manifest, ids))
    cents = artist_centroids(emb, labels)
    out = []
    for q in queries:
        e = audio_embeddings(run, q.features[None], q.mask[None])[0].astype(np.float64)
        e = e / max(float(np.linalg.norm(e)), 1e-12)
        out.append({g: float(cents[g] @ e) for g in parts})
    return out


def _table_seconds(path: Path) -> float:
    rec = read_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
    return float(rec.get("seconds", rec.get("seconds_unlearn", 0.0) + rec.get("seconds_score",
                                                                                0.0)))


class TrackScorer:
    """Per-track score tables of one attribution method (`attribution.methods.METHODS`) for
    queries, cached in the run's credit folder; the method is built only when a table is new."""

    def __init__(self, run, manifest: pd.DataFrame, method: str,
                 overrides: Mapping[str, Any] | None, progress: bool):
        from linernotes.attribution.methods import resolve_settings

        self.run, self.manifest, self.method, self.progress = run, manifest, method, progress
        self.overrides = dict(overrides or {})
        self.settings = {k: v.to_dict() for k, v in
                         resolve_settings(method, self.overrides).items()}
        key = hash_json([run.hash, method, self.settings])[:12]
        self.folder = credit_root(run) / "tracks" / f"{method}-{key}"
        self._attributor = None

    def table(self, query: Query) -> tuple[pd.DataFrame, float]:
        """The query's per-track score table and the seconds it took (when it was made)."""
        from linernotes.attribution.methods import make_attributor

        out = self.folder / query_hash(query)
        path = out / f"{query.key}.parquet"
        if not path.exists():
            if self._attributor is None:
                self._attributor = make_attributor(self.method, self.run, self.manifest,
                                                   overrides=self.overrides,
                                                   progress=self.progress)
            self._attributor.attribute(query, out)
        return read_scores(path), _table_seconds(path)


def baseline_credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query], method: str, by: str,
    settings: Mapping[str, Any] | None = None,
    track_tables: Mapping[str, pd.DataFrame | str | Path] | None = None, progress: bool = True,
) -> tuple[list[pd.DataFrame], dict]:
    """Credit tables of a baseline for each query, and a record (settings, seconds).

    `settings`: for `<method>-sum`, overrides of the per-track method (as `attribute --set`).
    """
    parts = groups(manifest, run, by)
    n = {g: len(ids) for g, ids in parts.items()}
    t0 = time.perf_counter()
    if method == "clap-centroid":
        scores = clap_centroid_scores(run, manifest, parts, queries)
        return ([credit_table(q.key, method, by, sc, n) for q, sc in zip(queries, scores)],
                {"seconds_queries": time.perf_counter() - t0})
    scorer = TrackScorer(run, manifest, method.removesuffix("-sum"), settings, progress)
    tables, seconds = [], 0.0
    for q in queries:
        given = (track_tables or {}).get(q.key)
        if given is None:
            table, secs = scorer.table(q)
        else:
            table = given if isinstance(given, pd.DataFrame) else read_scores(given)
            secs = 0.0 if isinstance(given, pd.DataFrame) else _table_seconds(Path(given))
        seconds += secs
        tables.append(credit_table(q.key, method, by, summed_scores(table, parts), n))
    return tables, {"settings": scorer.settings, "seconds_queries": seconds}
