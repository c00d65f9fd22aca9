"""The front door of artist-level credit (`linernotes credit`): one credit table per query.

Methods: group unlearning (any opt-out method, or newton, `unlearn.py`; by default the opt-out
default of the model's kind, `unlearning.trainer.default_method`, at 20 steps per artist: for a
diffusion model concept_ablation, the method docs/benchmarks.md's credit section chose on its
tuning clips within 10% of leave-one-artist-out retraining's compute), the baselines
(`baselines.py`) or LOGO retraining (`logo.py`), all in the same table (`tables.py`).
`CreditSettings.reference_tracks` calibrates group unlearning (`calibrate.py`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from linernotes.attribution.query import Query
from linernotes.config import Settings
from linernotes.credit.baselines import baseline_credit, baseline_methods
from linernotes.credit.calibrate import reference_offsets
from linernotes.credit.groups import groups
from linernotes.credit.logo import LogoSettings, logo_credit
from linernotes.credit.losses import CreditSettings, loss_changes
from linernotes.credit.tables import change_tables, write_credit
from linernotes.credit.unlearn import (
    NewtonGroupSettings,
    group_methods,
    group_models,
    method_config,
)
from linernotes.errors import LinernotesError
from linernotes.unlearning.trainer import default_method


def unlearning_credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query], method: str | None = None,
    by: str = "artist", settings: Settings | Mapping[str, Any] | None = None,
    score: CreditSettings | None = None, progress: bool = True,
) -> tuple[list[pd.DataFrame], dict]:
    """Group-unlearning credit for each query, and a record (settings, seconds)."""
    s = score or CreditSettings()
    method = method or default_method(run.task)
    parts = groups(manifest, run, by)
    models = group_models(run, manifest, by, method, settings, progress)
    entries = [(gm.group, gm.model_key, lambda gm=gm: gm.model(run, manifest)) for gm in models]
    after, base, seconds = loss_changes(run, manifest, queries, entries, s)
    offsets, calibration = None, 0.0
    if s.reference_tracks > 0:  # calibrated: each group's change on reference tracks taken off
        offsets, calibration = reference_offsets(
            run, manifest, parts, [(g, enter) for g, _, enter in entries], s,
            models[0].folder.parent)
    record = {"settings": method_config(method, settings).to_dict(),
              "seconds_groups": sum(gm.seconds for gm in models) + calibration,
              "seconds_calibration": calibration, "seconds_queries": seconds,
              "cached_groups": sum(gm.cached for gm in models)}
    return change_tables(queries, method, by, parts, after, base, offsets), record


def settings_class(method: str) -> type[Settings] | None:
    """The settings dataclass of a group-unlearning method (None for the others)."""
    if method == "newton":
        return NewtonGroupSettings
    if method == "logo":
        return LogoSettings
    if method in group_methods():
        from linernotes.unlearning.trainer import get_method

        return get_method(method).settings_class
    return None  # baselines: `<method>-sum` takes the per-track method's flat overrides


def credit(
    run, manifest: pd.DataFrame, queries: Sequence[Query], method: str | None = None, *,
    by: str = "artist", settings: Settings | Mapping[str, Any] | None = None,
    score: CreditSettings | None = None, out_dir: str | Path | None = None,
    progress: bool = True, track_tables: Mapping[str, pd.DataFrame | str | Path] | None = None,
) -> list[pd.DataFrame]:
    """One credit table per query for `method` (default: `default_method` of the run's Task,
    concept_ablation for a diffusion model): a group-unlearning method, a baseline
    (`clap-centroid`, `<per-track method>-sum` such as `unlearning-sum` or `trak-sum`) or
    `logo`; written to `out_dir` when given. `settings`: the method's settings (a Settings
    object or a dict of fields; for `-sum` baselines the per-track method's flat overrides).
    `track_tables` (query key → per-track score table or its path) feeds a `-sum` baseline
    instead of attributing the query again. `logo` takes {"seeds": n}: every model trained with n
    seeds and the changes averaged (`logo.py`)."""
    s = score or CreditSettings()
    method = method or default_method(run.task)
    t0 = time.perf_counter()
    if method in group_methods():
        tables, record = unlearning_credit(run, manifest, queries, method, by, settings, s,
                                           progress)
    elif method == "logo":
        ls = settings if isinstance(settings, LogoSettings) else LogoSettings.from_dict(
            dict(settings or {}))
        tables, record = logo_credit(run, manifest, queries, by, s, progress, ls.seeds)
    elif method in baseline_methods():
        tables, record = baseline_credit(run, manifest, queries, method, by, settings,
                                                   track_tables, progress)
    else:
        known = group_methods() + baseline_methods() + ["logo"]
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
