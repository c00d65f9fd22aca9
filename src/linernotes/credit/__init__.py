"""Artist-level (group) credit: unlearn each group, score the query's loss change, check vs LOGO.

`groups` partitions a run's training set by a manifest column; `credit` ranks the groups for
queries with a group-unlearning method (`newton` or any opt-out method), a baseline or LOGO;
`evaluate_credit` compares every method's ranking with leave-one-group-out retraining.
"""

from linernotes.credit.evaluate import evaluate_credit, ranking_metrics
from linernotes.credit.front import credit
from linernotes.credit.groups import groups
from linernotes.credit.logo import logo_credit, logo_runs
from linernotes.credit.losses import CreditSettings
from linernotes.credit.tables import read_credit, write_credit
from linernotes.credit.unlearn import NewtonGroupSettings, group_methods, group_models

__all__ = [
    "CreditSettings",
    "NewtonGroupSettings",
    "credit",
    "evaluate_credit",
    "group_methods",
    "group_models",
    "groups",
    "logo_credit",
    "logo_runs",
    "ranking_metrics",
    "read_credit",
    "write_credit",
]
