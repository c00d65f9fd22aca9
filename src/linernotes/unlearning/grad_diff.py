"""GradDiff: gradient ascent on the forget set plus ordinary descent on the retain set."""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.unlearning.trainer import MethodSettings, UnlearningMethod, register


@dataclasses.dataclass(frozen=True)
class GradDiffSettings(MethodSettings):
    """Weights of the two terms; stops once the forget set looks unseen."""

    forget_weight: float = 1.0
    retain_weight: float = 1.0
    stop_at_gap: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.forget_weight > 0 and self.retain_weight >= 0, "weights must be positive.")


@register
class GradDiff(UnlearningMethod):
    """Minimise retain_weight · L_retain − forget_weight · L_forget."""

    name = "grad_diff"
    settings_class = GradDiffSettings
    summary = "GradDiff: ascent on the forget set + descent on the retain set."

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        forget = self.forget_terms(model, task, batch["forget"], step).mean()
        retain = self.retain_terms(model, task, batch["retain"], step).mean()
        self.last = {"forget": forget.item(), "retain": retain.item()}
        return self.s.retain_weight * retain - self.s.forget_weight * forget
