"""NegGrad: gradient ascent on the forget set's diffusion loss (No Encore's first method)."""

from __future__ import annotations

import dataclasses

import torch

from linernotes.unlearning.trainer import MethodSettings, UnlearningMethod, register


@dataclasses.dataclass(frozen=True)
class GradientAscentSettings(MethodSettings):
    """Ascent is unbounded, so by default it stops once the forget set looks unseen."""

    stop_at_gap: bool = True


@register
class GradientAscent(UnlearningMethod):
    """Maximise the forget tracks' loss: minimise −L_forget."""

    name = "gradient_ascent"
    settings_class = GradientAscentSettings
    uses_retain = False
    summary = "NegGrad: ascend the forget set's diffusion loss."

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        forget = self.forget_terms(model, task, batch["forget"], step).mean()
        self.last = {"forget": forget.item()}
        return -forget
