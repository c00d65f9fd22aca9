"""Leave-one-group-out (LOGO) retraining: the counterfactual gold standard of group credit.

Each group's model is the run's own recipe retrained without the group's tracks by the run's one
retrain cache (`run.retrain.Retrainer`, shared with leave-K-out, LDS and the opt-out audit, which
retrains without an artist the same way), resumed after a kill. The LOGO credit of group g for
query q under training seed s is q's loss under the model without g minus its loss under the
full model, both trained with seed s, at the same fixed draws.

One seed is noisy at small scale (retraining with another seed moves a clip's loss by as much as
removing an artist does), so `logo_credit(seeds=n)` trains every group's model and the full model
with n seeds (the recipe's seed, then the next ones; the full model at the recipe's seed is the
run itself) and scores each group by the seed-averaged change. The table keeps each seed's change
(`seed_<s>` columns): one seed's ranking against another's is the ceiling any method can be held
to (`evaluate.seed_ceiling`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial

import numpy as np
import pandas as pd

from linernotes.attribution.query import Query
from linernotes.config import Settings, require
from linernotes.credit.groups import groups
from linernotes.credit.losses import CreditSettings, loss_changes
from linernotes.credit.tables import credit_table
from linernotes.errors import LinernotesError
from linernotes.run import Retrainer, retrain_seconds

FULL = ""  # the group name standing for the full model (no group left out)


@dataclasses.dataclass(frozen=True)
class LogoSettings(Settings):
    """How many training seeds LOGO averages over (`credit --method logo --set seeds=3`)."""

    seeds: int = 1

    def validate(self) -> None:
        require(self.seeds >= 1, "seeds must be >= 1.")


def logo_seeds(run, n: int) -> list[int]:
    """The n training seeds of a LOGO: the recipe's seed, then the next n - 1."""
    require(n >= 1, "LOGO needs at least one seed.")
    first = int(run.config["train"]["seed"])
    return [first + k for k in range(n)]


def seed_column(seed: int) -> str:
    """The credit-table column holding one training seed's LOGO change."""
    return f"seed_{seed}"


def logo_runs(run, manifest: pd.DataFrame, by: str = "artist", progress: bool = True,
              only: Sequence[str] | None = None, seed: int | None = None,
              full: bool = False) -> dict[str, tuple[object, float]]:
    """{group: (the run retrained without it, its training seconds)}; cached and resumable.

    `only` limits the retrains to some groups (by name); `seed` trains them with another seed
    than the recipe's. `full` adds the full model at that seed under the name `FULL` (the run
    itself at the recipe's seed, with 0 s). The full model's seconds are not counted as LOGO's
    cost by `logo_credit`.
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
    recipe_seed = seed is None or int(seed) == int(run.config["train"]["seed"])
    out: dict[str, tuple[object, float]] = {}
    if full and recipe_seed:
        out[FULL] = (run, 0.0)
    elif full:
        whole = retrainer([], seed)
        out[FULL] = (whole, retrain_seconds(whole))
    names = [g for g in parts if only is None or g in only]
    at = "" if recipe_seed else f", seed {seed}"
    for k, name in enumerate(names):
        if progress:
            print(f"LOGO {k + 1}/{len(names)}: the run without {by}={name} "
                  f"({len(parts[name])} tracks{at})", file=sys.stderr, flush=True)
        retrained = retrainer(parts[name], seed)
        out[name] = (retrained, retrain_seconds(retrained))
    return out


def logo_credit(run, manifest: pd.DataFrame, queries: Sequence[Query], by: str = "artist",
                score: CreditSettings | None = None, progress: bool = True, seeds: int = 1,
                ) -> tuple[list[pd.DataFrame], dict]:
    """LOGO credit tables for each query (method "logo") and a record with the seconds.

    With `seeds` > 1, every model is trained with each seed and a group's score is the mean over
    seeds of (loss without the group − loss of the full model), each seed's change kept in its
    `seed_<s>` column. The record's `seconds_groups` is one seed's retraining (what a LOGO costs);
    `seconds_all_seeds` all of it.
    """
    s = score or CreditSettings()
    parts = groups(manifest, run, by)
    entries, per_seed, retrained_paths = [], {}, {}
    for k, seed in enumerate(logo_seeds(run, seeds)):
        retrained = logo_runs(run, manifest, by, progress, seed=seed, full=seeds > 1)
        per_seed[seed] = sum(sec for g, (_, sec) in retrained.items() if g != FULL)
        retrained_paths.update({  # {group: path} at the recipe seed, as with one seed
            (g or "full model") + (f" (seed {seed})" if k else ""): str(r.path)
            for g, (r, _) in retrained.items() if r is not run})
        entries += [((g, seed), f"run/{r.hash}", _entering(r)) for g, (r, _) in retrained.items()
                    if r is not run]  # the run itself is the base of `loss_changes`
    after, base, seconds = loss_changes(run, manifest, queries, entries, s)
    seed_list = list(per_seed)
    n = {g: len(ids) for g, ids in parts.items()}
    tables = []
    for q in queries:
        a = after[q.key]
        full = {seed: a.get((FULL, seed), base[q.key]) for seed in seed_list}
        over_seeds = partial(_over_seeds, a, full, parts)
        tables.append(credit_table(
            q.key, "logo", by, over_seeds(lambda x, f: x["fixed"] - f["fixed"]), n,
            over_seeds(lambda x, f: x["elbo"] - f["elbo"]),
            over_seeds(lambda x, f: np.subtract(x["fixed_draws"], f["fixed_draws"])),
            loss_before=over_seeds(lambda x, f: f["fixed"]),
            loss_after=over_seeds(lambda x, f: x["fixed"]),
            **{seed_column(seed): {g: a[(g, seed)]["fixed"] - full[seed]["fixed"] for g in parts}
               for seed in seed_list}))
    record = {"seconds_groups": float(sum(per_seed.values()) / len(per_seed)),
              "seconds_all_seeds": float(sum(per_seed.values())),
              "seconds_queries": seconds, "seeds": seed_list, "retrained": retrained_paths}
    return tables, record


def _over_seeds(after: dict, full: dict, parts, value) -> dict:
    """{group: the mean over seeds of value(the group's losses, the full model's)}; `full` maps
    each seed to the full model's losses, `after` (group, seed) to the group model's."""
    return {g: np.mean([value(after[(g, seed)], losses) for seed, losses in full.items()],
                       axis=0) for g in parts}


def _entering(r):
    @contextmanager
    def use():
        yield r.model

    return use
