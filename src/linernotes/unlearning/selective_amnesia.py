"""Selective Amnesia: teach the forget captions a surrogate, replay the retain set, EWC penalty.

The surrogate for a forget track is, by default, the audio of a retain track by another artist
under the forget track's own caption ("noise": Gaussian frames instead), so prompts naming the
artist are redirected rather than destroyed.
"""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.training import step_generator
from linernotes.unlearning.trainer import (
    FORGET_STREAM,
    SWAP_STREAM,
    MethodSettings,
    UnlearningMethod,
    diffusion_terms,
    ewc_penalty,
    register,
    surrogate_audio,
)

SURROGATES = ("other_artist", "noise")


@dataclasses.dataclass(frozen=True)
class SelectiveAmnesiaSettings(MethodSettings):
    """Surrogate kind, replay weight and EWC weight (λ of the (N/2)·F penalty)."""

    lr: float = 3e-4  # a descent: only this rate moved the artist's prompts off the artist
    surrogate: str = "other_artist"
    retain_weight: float = 1.0
    ewc_weight: float = 1e3  # mild: 7e4 pinned this descent on the demo model
    fisher_draws: int = 2

    def validate(self) -> None:
        super().validate()
        require(self.surrogate in SURROGATES, f"surrogate must be one of {SURROGATES}.")
        require(self.retain_weight >= 0 and self.ewc_weight >= 0, "weights must be >= 0.")
        require(self.fisher_draws >= 1, "fisher_draws must be >= 1.")


@register
class SelectiveAmnesia(UnlearningMethod):
    """Minimise L(surrogate | forget caption) + retain_weight·L_retain + ewc_weight·EWC."""

    name = "selective_amnesia"
    settings_class = SelectiveAmnesiaSettings
    summary = "Selective Amnesia: surrogate target + retain replay + EWC penalty."

    def prepare(self) -> dict:
        self.fisher = self.ctx.fisher(self.s.fisher_draws) if self.s.ewc_weight > 0 else None
        return {"fisher_examples": self.fisher.n_examples if self.fisher else 0}

    def surrogate(self, forget: dict, step: int) -> dict:
        if self.s.surrogate == "other_artist":
            return surrogate_audio(self.ctx, forget, self.s.seed, step)
        gen = step_generator(self.s.seed, step, SWAP_STREAM)
        noise = torch.randn(forget["features"].shape, generator=gen)
        return dict(forget, features=noise, mask=torch.ones_like(forget["mask"]))

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        target = self.surrogate(batch["forget"], step)
        surrogate = diffusion_terms(task, model, target, self.s.seed, step, FORGET_STREAM,
                                    self.s.mask_padding).mean()
        retain = self.retain_terms(model, task, batch["retain"], step).mean()
        loss = surrogate + self.s.retain_weight * retain
        self.last = {"surrogate": surrogate.item(), "retain": retain.item()}
        if self.fisher is not None:
            penalty = ewc_penalty(model, self.ctx.theta0, self.fisher, self.ctx.n_train)
            self.last["penalty"] = penalty.item()
            loss = loss + self.s.ewc_weight * penalty
        return loss
