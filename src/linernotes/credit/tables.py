"""Credit tables: one row per group for one query and method, ranked, with shares of credit.

`credit` is the front door (`linernotes credit`): group unlearning (any opt-out method;
grad_diff by default, the counterfactual method closest to leave-one-artist-out retraining in
docs/benchmarks.md; or newton), the baselines (`baselines.py`) or LOGO retraining
(`logo.py`), all in the same table.
Score = the query's loss change at fixed draws (after − before); `elbo` the same change of the
ELBO-style estimate; `share` clips negative scores to 0 and divides by the sum (equal shares
when no group has a positive score); `softmax` is the report's share (`report.normalise`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from linernotes.attribution.query import Query
from linernotes.attribution.scores import read_table, write_scores
from linernotes.config import Settings
from linernotes.credit.groups import groups
from linernotes.credit.losses import CreditSettings, LossCache
from linernotes.credit.unlearn import credit_root, group_methods, group_models, method_config
from linernotes.errors import LinernotesError
from linernotes.report.normalise import softmax

CREDIT_COLUMNS = ["query", "method", "by", "group", "n_tracks", "score", "elbo", "rank", "share",
                  "softmax"]


def positive_shares(scores: Sequence[float]) -> np.ndarray:
    """Negative scores clipped to 0, divided by the sum; equal shares if no score is positive."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    return s / s.sum() if s.sum() > 0 else np.full(len(s), 1.0 / max(len(s), 1))


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


def loss_changes(
    run, manifest: pd.DataFrame, queries: Sequence[Query], models: Sequence[tuple[str, str, Any]],
    s: CreditSettings,
) -> tuple[dict, dict, float]:
    """Per query: {group: losses} under each model and the full model's losses, and seconds.

    `models` holds (group, model key, context factory yielding the model); a model is loaded
    only if some query's losses under it are not cached yet.
    """
    cache = LossCache(credit_root(run) / "losses", s)
    base = {q.key: cache.get(run.task, run.model, q, f"run/{run.hash}") for q in queries}
    after: dict[str, dict[str, dict]] = {q.key: {} for q in queries}
    for group, key, enter in models:
        todo = [q for q in queries if cache.peek(q, key) is None]
        if todo:
            with enter() as model:
                for q in todo:
                    cache.get(run.task, model, q, key)
        for q in queries:
            after[q.key][group] = cache.peek(q, key)
    seconds = sum(v["seconds"] for v in base.values())
    seconds += sum(e["seconds"] for per in after.values() for e in per.values())
    return after, base, seconds


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


def unlearning_credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query], method: str = "grad_diff",
    by: str = "artist", settings: Settings | Mapping[str, Any] | None = None,
    score: CreditSettings | None = None, progress: bool = True,
) -> tuple[list[pd.DataFrame], dict]:
    """Group-unlearning credit for each query, and a record (settings, seconds)."""
    s = score or CreditSettings()
    parts = groups(manifest, run, by)
    models = group_models(run, manifest, by, method, settings, progress)
    entries = [(gm.group, gm.model_key, lambda gm=gm: gm.model(run, manifest)) for gm in models]
    after, base, seconds = loss_changes(run, manifest, queries, entries, s)
    record = {"settings": method_config(method, settings).to_dict(),
              "seconds_groups": sum(gm.seconds for gm in models), "seconds_queries": seconds,
              "cached_groups": sum(gm.cached for gm in models)}
    return change_tables(queries, method, by, parts, after, base), record


def settings_class(method: str) -> type[Settings] | None:
    """The settings dataclass of a group-unlearning method (None for the others)."""
    from linernotes.credit.unlearn import NewtonGroupSettings

    if method == "newton":
        return NewtonGroupSettings
    if method in group_methods():
        from linernotes.unlearning.trainer import get_method

        return get_method(method).settings_class
    return None  # baselines: `<method>-sum` takes the per-track method's flat overrides


def credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query], method: str = "grad_diff", *,
    by: str = "artist", settings: Settings | Mapping[str, Any] | None = None,
    score: CreditSettings | None = None, out_dir: str | Path | None = None,
    progress: bool = True, track_tables: Mapping[str, pd.DataFrame | str | Path] | None = None,
) -> list[pd.DataFrame]:
    """One credit table per query for `method`: a group-unlearning method, a baseline
    (`clap-centroid`, `<per-track method>-sum` such as `unlearning-sum` or `trak-sum`) or
    `logo`; written to `out_dir` when given. `settings`: the method's settings (a Settings
    object or a dict of fields; for `-sum` baselines the per-track method's flat overrides).
    `track_tables` (query key → per-track score table or its path) feeds a `-sum` baseline
    instead of attributing the query again."""
    from linernotes.credit import baselines, logo

    s = score or CreditSettings()
    t0 = time.perf_counter()
    if method in group_methods():
        tables, record = unlearning_credit(run, manifest, queries, method, by, settings, s,
                                           progress)
    elif method == "logo":
        tables, record = logo.logo_credit(run, manifest, queries, by, s, progress)
    elif method in baselines.baseline_methods():
        tables, record = baselines.baseline_credit(run, manifest, queries, method, by, settings,
                                                   track_tables, progress)
    else:
        known = group_methods() + baselines.baseline_methods() + ["logo"]
        raise LinernotesError(f"Unknown credit method {method!r}; choose one of "
                              f"{', '.join(known)}.")
    record = {"run": run.hash, "method": method, "by": by, "score": s.to_dict(),
              "seconds_call": time.perf_counter() - t0, **record}
    if out_dir is not None:
        for q, t in zip(queries, tables):
            write_credit(t, out_dir, {**record, "query": q.key, "caption": q.caption,
                                      "source": q.source})
    for t in tables:
        t.attrs["record"] = record
    return tables
