"""Random labelling: learn the forget audio under mismatched captions (as in No Encore)."""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.unlearning.trainer import (
    FORGET_STREAM,
    MethodSettings,
    UnlearningMethod,
    diffusion_terms,
    mismatched_captions,
    register,
)


@dataclasses.dataclass(frozen=True)
class RandomLabelSettings(MethodSettings):
    """`retain_weight` > 0 adds retain-set replay (0 = the plain method)."""

    retain_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        require(self.retain_weight >= 0, "retain_weight must be >= 0.")


def random_label_loss(method: UnlearningMethod, model, task, forget: dict, step: int):
    """Diffusion loss of the forget audio paired with other artists' captions (B,)."""
    swapped = mismatched_captions(method.ctx, forget, method.s.seed, step)
    return diffusion_terms(task, model, swapped, method.s.seed, step, FORGET_STREAM,
                           method.s.mask_padding)


@register
class RandomLabel(UnlearningMethod):
    """Minimise L(forget audio | another artist's caption) [+ retain_weight · L_retain]."""

    name = "random_label"
    settings_class = RandomLabelSettings
    summary = "Random labelling: forget audio trained under other artists' captions."

    @property
    def uses_retain(self) -> bool:  # type: ignore[override]
        return self.s.retain_weight > 0

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        loss = random_label_loss(self, model, task, batch["forget"], step).mean()
        self.last = {"relabelled": loss.item()}
        if self.s.retain_weight > 0:
            retain = self.retain_terms(model, task, batch["retain"], step).mean()
            self.last["retain"] = retain.item()
            loss = loss + self.s.retain_weight * retain
        return loss
