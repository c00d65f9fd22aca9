"""Grid search over unlearning settings, judged by a caller-chosen metric; one row per setting.

A setting is a pair (UnlearnSettings, ScoreSettings): parameter group, M_U (`mask_query`), α or
`target_ratio`, steps, draws, damping on the unlearning side; M_L (`mask_train`) on the scoring
side. Metrics: `SelfRankMetric` (training tracks as queries: mean self-rank, lower is better) and
`LdsMetric` (held-out queries against subset-trained models, higher is better). `grid_search`
refuses a metric whose queries are among the `evaluated` ones: tune on held-out queries, never
on those the comparison reports.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.artifacts import hash_json
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.errors import LinernotesError
from linernotes.evaluation.lds import LdsData, lds_from_losses, score_matrix
from linernotes.evaluation.rows import RowStore
from linernotes.unlearning.newton import UnlearnSettings

UNLEARN_AXES = ("group", "mask_query", "alpha", "target_ratio", "steps", "draws", "damping",
                "n_scaling")
SCORE_AXES = ("mask_train", "timesteps", "stride")

Point = tuple[UnlearnSettings, ScoreSettings]


def grid_points(axes: Mapping[str, Sequence], unlearn: UnlearnSettings | None = None,
                score: ScoreSettings | None = None) -> list[Point]:
    """Every combination of the values in `axes` (names in UNLEARN_AXES / SCORE_AXES)."""
    unlearn, score = unlearn or UnlearnSettings(), score or ScoreSettings()
    unknown = sorted(set(axes) - set(UNLEARN_AXES) - set(SCORE_AXES))
    if unknown:
        raise LinernotesError(f"Unknown grid axis {unknown}; choose from "
                              f"{', '.join(UNLEARN_AXES + SCORE_AXES)}.")
    names = list(axes)
    points = []
    for values in itertools.product(*(list(axes[n]) for n in names)):
        change = dict(zip(names, values))
        points.append((unlearn.replace(**{k: v for k, v in change.items() if k in UNLEARN_AXES}),
                       score.replace(**{k: v for k, v in change.items() if k in SCORE_AXES})))
    return points


class _Unlearning:
    """Unlearning attributors of one run, one per (Fisher group, score settings), cached."""

    def __init__(self, run, manifest: pd.DataFrame, progress: bool = False):
        self.run, self.manifest, self.progress = run, manifest, progress
        self.store, self.train, self.ids = run.train_set(manifest, progress)
        self._cache: dict = {}

    def query(self, spec: str) -> Query:
        from linernotes.attribution.front import query_from_spec

        return query_from_spec(spec, self.run, self.store, self.manifest)

    def attributor(self, unlearn: UnlearnSettings, score: ScoreSettings):
        from linernotes.attribution.unlearning import UnlearningAttributor
        from linernotes.curvature import FisherSettings, covering_group

        group = covering_group(unlearn.group)
        key = (group, score.hash())
        if key not in self._cache:
            fisher = self.run.fisher(self.manifest, FisherSettings(group=group), self.progress)
            self._cache[key] = UnlearningAttributor(
                self.run.task, self.run.model, self.run.hash, self.manifest, self.train,
                self.ids, fisher, self.run.cache_dir, score, self.progress)
        return self._cache[key]


class SelfRankMetric:
    """Training tracks as queries: each one's own rank among all tracks (1 = perfect)."""

    primary, higher_is_better = "mean_self_rank", False

    def __init__(self, run, manifest: pd.DataFrame, track_ids: Sequence[str],
                 progress: bool = False):
        self.unlearning = _Unlearning(run, manifest, progress)
        self.queries = [self.unlearning.query(f"train:{t}") for t in track_ids]
        self.query_keys = [q.key for q in self.queries]
        self.key = {"metric": "self-rank", "run": run.hash, "queries": self.query_keys}

    def __call__(self, unlearn: UnlearnSettings, score: ScoreSettings, out_dir: Path) -> dict:
        from linernotes.evaluation.consistency import self_influence

        result = self_influence(self.unlearning.attributor(unlearn, score), self.queries,
                                unlearn, out_dir)
        s = result.summary()
        return {"mean_self_rank": s["mean_self_rank"], "rank1_fraction": s["rank1_fraction"],
                "seconds_per_query": s["seconds_per_query"]}


class LdsMetric:
    """Held-out queries: mean LDS of unlearning scores against `data`'s subset-trained models."""

    primary, higher_is_better = "lds", True

    def __init__(self, run, manifest: pd.DataFrame, queries: Sequence[Query], data: LdsData,
                 progress: bool = False):
        if [q.key for q in queries] != list(data.queries):
            raise LinernotesError("LdsMetric: the queries differ from those `data` measured.")
        self.done = np.isfinite(data.losses).all(axis=1)
        if self.done.sum() < 3:
            raise LinernotesError("LdsMetric needs at least 3 trained subset models.")
        self.unlearning = _Unlearning(run, manifest, progress)
        self.queries, self.data = list(queries), data
        self.query_keys = [q.key for q in queries]
        self.key = {"metric": "lds", "run": run.hash, "queries": self.query_keys,
                    "subsets": hash_json(data.subsets.tolist()), "models": int(self.done.sum())}

    def __call__(self, unlearn: UnlearnSettings, score: ScoreSettings, out_dir: Path) -> dict:
        att = self.unlearning.attributor(unlearn, score)
        tables = pd.concat([att.attribute(q, out_dir, unlearn) for q in self.queries])
        mat = score_matrix(tables, att.method, self.query_keys, self.data.ids)
        per_q = lds_from_losses(self.data.subsets[self.done], self.data.losses[self.done], mat)
        return {"lds": float(np.nanmean(per_q)), "lds_std": float(np.nanstd(per_q))}


def grid_search(points: Sequence[Point], metric, folder: str | Path,
                evaluated: Sequence[str] = (), log=print) -> pd.DataFrame:
    """Evaluate `metric` at every point; one Parquet row per finished point (a rerun resumes).

    Returns the results table, best first by `metric.primary`.
    """
    overlap = sorted(set(metric.query_keys) & set(evaluated))
    if overlap:
        raise LinernotesError(f"The grid's metric uses evaluated queries {overlap[:3]}; tune on "
                              "held-out queries (or training tracks), never on the evaluated ones.")
    say = log or (lambda _msg: None)
    folder = Path(folder)
    store = RowStore(folder / "grid.parquet")
    keys = []
    for i, (unlearn, score) in enumerate(points):
        key = hash_json({"unlearn": unlearn.to_dict(), "score": score.to_dict(), **metric.key})
        keys.append(key)
        if key in store:
            continue
        t0 = time.perf_counter()
        values = metric(unlearn, score, folder / "points" / key)
        row = {**{a: getattr(unlearn, a) for a in UNLEARN_AXES},
               **{a: getattr(score, a) for a in SCORE_AXES}, **values,
               "seconds": time.perf_counter() - t0,
               "unlearn": json.dumps(unlearn.to_dict(), sort_keys=True),
               "score": json.dumps(score.to_dict(), sort_keys=True), "key": key}
        store.add(row)
        say(f"grid {i + 1}/{len(points)}: {metric.primary} = {values[metric.primary]:.4g}")
    table = store.table(keys)
    return table.sort_values(metric.primary, ascending=not metric.higher_is_better,
                             kind="stable").reset_index(drop=True)


def best_point(table: pd.DataFrame) -> Point:
    """The settings of a results table's first (best) row."""
    row = table.iloc[0]
    return (UnlearnSettings.from_dict(json.loads(row["unlearn"])),
            ScoreSettings.from_dict(json.loads(row["score"])))
