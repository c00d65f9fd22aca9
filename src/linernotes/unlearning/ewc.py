"""Fisher/EWC-regularised ascent: raise the forget loss while staying close in the Fisher metric.

The same objective as attribution by unlearning (SPEC §2), `−L_forget + λ (N/2) Σ F (θ − θ0)²`,
reusing the run's diagonal Fisher (cached in the run folder).
"""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.unlearning.trainer import MethodSettings, UnlearningMethod, ewc_penalty, register


@dataclasses.dataclass(frozen=True)
class EwcSettings(MethodSettings):
    """`ewc_weight` λ scales the (N/2)·F penalty; `fisher_draws` as in `linernotes fisher`.

    With Adam the penalty only bounds the ascent when strong: on the demo model λ ≤ 3e4 left it
    unbounded and λ ≥ 1e5 pinned the weights; 7e4 lands in between.
    """

    ewc_weight: float = 7e4
    fisher_draws: int = 2
    stop_at_gap: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.ewc_weight >= 0, "ewc_weight must be >= 0.")
        require(self.fisher_draws >= 1, "fisher_draws must be >= 1.")


@register
class Ewc(UnlearningMethod):
    """Minimise −L_forget + ewc_weight · (N/2) Σ F (θ − θ0)²."""

    name = "ewc"
    settings_class = EwcSettings
    uses_retain = False
    summary = "EWC: Fisher-regularised gradient ascent (the attribution objective)."

    def prepare(self) -> dict:
        self.fisher = self.ctx.fisher(self.s.fisher_draws)
        return {"fisher_examples": self.fisher.n_examples, "n_train": self.ctx.n_train}

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        forget = self.forget_terms(model, task, batch["forget"], step).mean()
        penalty = ewc_penalty(model, self.ctx.theta0, self.fisher, self.ctx.n_train)
        self.last = {"forget": forget.item(), "penalty": penalty.item()}
        return -forget + self.s.ewc_weight * penalty
