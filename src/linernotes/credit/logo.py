"""Leave-one-group-out (LOGO) retraining: the counterfactual gold standard of group credit.

Each group's model is the run's own recipe retrained without the group's tracks by the run's one
retrain cache (`run.retrain.Retrainer`, shared with leave-K-out, LDS and the opt-out audit, which
retrains without an artist the same way), resumed after a kill. The LOGO credit of group g for
query q is q's loss under the model without g minus its loss under the full run, at the same
fixed draws.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager

import pandas as pd

from linernotes.attribution.query import Query
from linernotes.credit.groups import groups
from linernotes.credit.losses import CreditSettings, loss_changes
from linernotes.credit.tables import change_tables
from linernotes.errors import LinernotesError
from linernotes.run import Retrainer, retrain_seconds


def logo_runs(run, manifest: pd.DataFrame, by: str = "artist", progress: bool = True,
              only: Sequence[str] | None = None) -> dict[str, tuple[object, float]]:
    """{group: (the run retrained without it, its training seconds)}; cached and resumable.

    `only` limits the retrains to some groups (by name).
    """
    if run.parent:
        raise LinernotesError(
            f"{run.path} is derived from run {run.config['parent']} (an opt-out); LOGO retrains "
            "a trained run's recipe, so give the original run."
        )
    parts = groups(manifest, run, by)
    unknown = sorted(set(only or ()) - set(parts))
    if unknown:
        raise LinernotesError(f"No group {unknown[0]!r} in column {by!r}; groups: "
                              f"{', '.join(parts)}.")
    retrainer = Retrainer(run, manifest, progress=progress)
    out = {}
    names = [g for g in parts if only is None or g in only]
    for k, name in enumerate(names):
        if progress:
            print(f"LOGO {k + 1}/{len(names)}: the run without {by}={name} "
                  f"({len(parts[name])} tracks)", file=sys.stderr, flush=True)
        retrained = retrainer(parts[name])
        out[name] = (retrained, retrain_seconds(retrained))
    return out


def logo_credit(run, manifest: pd.DataFrame, queries: Sequence[Query], by: str = "artist",
                score: CreditSettings | None = None, progress: bool = True,
                ) -> tuple[list[pd.DataFrame], dict]:
    """LOGO credit tables for each query (method "logo") and a record with the seconds."""
    s = score or CreditSettings()
    retrained = logo_runs(run, manifest, by, progress)

    def enter(r):
        @contextmanager
        def use():
            yield r.model

        return use

    models = [(g, f"run/{r.hash}", enter(r)) for g, (r, _) in retrained.items()]
    after, base, seconds = loss_changes(run, manifest, queries, models, s)
    record = {"seconds_groups": float(sum(sec for _, sec in retrained.values())),
              "seconds_queries": seconds,
              "retrained": {g: str(r.path) for g, (r, _) in retrained.items()}}
    return change_tables(queries, "logo", by, groups(manifest, run, by), after, base), record
