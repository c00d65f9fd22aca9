"""SalUn: a saliency mask (the top half of |∇ forget loss| weights), then random labelling with
retain replay, updating only the masked weights."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import save_file

from linernotes.artifacts import atomic_path
from linernotes.config import require
from linernotes.data.dataset import collate
from linernotes.task import draw_noise, loss_at_draws, trainable
from linernotes.unlearning.random_label import random_label_loss
from linernotes.unlearning.trainer import MethodSettings, UnlearningMethod, register

MASK_FILE = "saliency_mask.safetensors"


@dataclasses.dataclass(frozen=True)
class SalUnSettings(MethodSettings):
    """`mask_ratio` of the group's weights are salient; the mask uses `mask_draws` per track."""

    mask_ratio: float = 0.5
    mask_draws: int = 4
    retain_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        require(0 < self.mask_ratio <= 1, "mask_ratio must be in (0, 1].")
        require(self.mask_draws >= 1, "mask_draws must be >= 1.")
        require(self.retain_weight >= 0, "retain_weight must be >= 0.")


def saliency_mask(method: UnlearningMethod, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """True for the `mask_ratio` largest |∇ forget loss| entries over the whole group."""
    ctx, s = method.ctx, method.s
    named = dict(ctx.model.named_parameters())
    params = {n: named[n] for n in ctx.params}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    with trainable(ctx.model, params):
        for lo in range(0, len(ctx.forget), batch_size):
            items = [ctx.forget[i] for i in range(lo, min(len(ctx.forget), lo + batch_size))]
            batch = collate(items)
            t, noise = draw_noise(batch["track_id"], range(ctx.task.draws(s.mask_draws)),
                                  ctx.task.latent_shape, seed=s.seed + 29)
            loss = loss_at_draws(ctx.task, ctx.model, batch, t, noise, s.mask_padding).sum()
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                grads[n] += g
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    keep = max(1, int(round(s.mask_ratio * flat.numel())))
    threshold = torch.topk(flat, keep, sorted=False).values.min()
    return {n: g.abs() >= threshold for n, g in grads.items()}


@register
class SalUn(UnlearningMethod):
    """Random labelling + retain_weight · L_retain, gradients zeroed outside the saliency mask."""

    name = "salun"
    settings_class = SalUnSettings
    summary = "SalUn: saliency-masked random labelling with retain replay."

    def prepare(self) -> dict:
        self.mask = saliency_mask(self)
        if self.ctx.out_dir is not None:
            with atomic_path(self.ctx.out_dir / MASK_FILE) as tmp:
                save_file({n: m.to(torch.uint8).cpu().contiguous() for n, m in self.mask.items()},
                          str(tmp))
        total = sum(m.numel() for m in self.mask.values())
        chosen = sum(int(m.sum()) for m in self.mask.values())
        return {"mask_fraction": chosen / max(total, 1), "mask_file": MASK_FILE}

    def after_backward(self, model, step: int) -> None:
        named = dict(model.named_parameters())
        for n, m in self.mask.items():
            if named[n].grad is not None:
                named[n].grad.mul_(m)

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        relabelled = random_label_loss(self, model, task, batch["forget"], step).mean()
        retain = self.retain_terms(model, task, batch["retain"], step).mean()
        self.last = {"relabelled": relabelled.item(), "retain": retain.item()}
        return relabelled + self.s.retain_weight * retain
