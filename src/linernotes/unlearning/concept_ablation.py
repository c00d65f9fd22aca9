"""Concept ablation: the forget captions learn to predict what other artists' captions predict.

Kumari et al. (ICCV 2023) ablate a concept from a text-to-image diffusion model by distilling, at
the same noisy input, the frozen model's prediction for an anchor prompt into the prompt of the
concept. Here the concept's prompts are the forget tracks' own captions, the noisy inputs are made
from the forget audio, and the anchor of each track is the caption of a retain track by another
artist ("null": the empty caption), with retain replay. Afterwards a prompt naming the artist
generates what the model makes for other artists, and the forget audio is predicted as if it had
another artist's caption: what a model that never saw the artist does with them.

It needs the Task's `prediction` (the model's output at a noisy input).
"""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.unlearning.trainer import (
    FORGET_STREAM,
    MethodSettings,
    UnlearningMethod,
    mismatched_captions,
    random_draws,
    register,
)

ANCHORS = ("other_artist", "null")


@dataclasses.dataclass(frozen=True)
class ConceptAblationSettings(MethodSettings):
    """The anchor captions and the weight of retain replay.

    The forget loss rises towards a plateau (the anchors' predictions are fixed targets), so
    more steps do not overshoot as ascent does. 200 steps was chosen on the J.S. Bach audit of
    the demo model (forget loss gap to retrained: -3.1% at 120 steps, -1.5% at 200) and checked
    on O'Neill's (docs/benchmarks.md).
    """

    steps: int = 200
    lr: float = 1e-4  # a descent towards fixed targets (like selective_amnesia, not an ascent)
    anchor: str = "other_artist"
    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(self.anchor in ANCHORS, f"anchor must be one of {ANCHORS}.")
        require(self.retain_weight >= 0, "retain_weight must be >= 0.")


@register
class ConceptAblation(UnlearningMethod):
    """Minimise ‖f_θ(x_t, forget caption) − f_θ0(x_t, anchor caption)‖² + w · L_retain."""

    name = "concept_ablation"
    settings_class = ConceptAblationSettings
    summary = ("Concept ablation: forget captions distilled to other artists' captions' "
               "predictions, with retain replay.")

    @property
    def uses_retain(self) -> bool:  # type: ignore[override]
        return self.s.retain_weight > 0

    def anchor(self, forget: dict, step: int) -> dict:
        if self.s.anchor == "null":
            return dict(forget, drop_cond=torch.ones(len(forget["caption"]), dtype=torch.bool))
        return mismatched_captions(self.ctx, forget, self.s.seed, step)

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        forget = batch["forget"]
        t, noise = random_draws(task, len(forget["caption"]), self.s.seed, step, FORGET_STREAM)
        with torch.no_grad():
            target = task.prediction(self.ctx.run.model, self.anchor(forget, step), t, noise)
        pred = task.prediction(model, forget, t, noise)
        ablation = (pred.float() - target.float()).pow(2).flatten(1).mean(1).mean()
        self.last = {"ablation": ablation.item()}
        loss = ablation
        if self.s.retain_weight > 0:
            retain = self.retain_terms(model, task, batch["retain"], step).mean()
            self.last["retain"] = retain.item()
            loss = loss + self.s.retain_weight * retain
        return loss
