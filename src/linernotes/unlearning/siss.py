"""SISS (subtracted importance-sampled scores): one noisy sample from a mixture of a retain track
and a forget track is scored against both, each term importance-weighted; the forget term's
gradient is rescaled every step to `forget_scale` x the retain term's gradient norm.

Differences from the paper: the "all data" side is drawn from the retain set (so retain batches
never hold forget tracks), which makes the n/(n−k) and k/(n−k) constants redundant with the
per-step gradient scaling. The noise schedule comes from the Task (`Task.alpha_sigma`).
"""

from __future__ import annotations

import dataclasses

import torch

from linernotes.config import require
from linernotes.training import step_generator
from linernotes.unlearning.trainer import (
    MIX_STREAM,
    MethodSettings,
    UnlearningMethod,
    random_draws,
    register,
)


@dataclasses.dataclass(frozen=True)
class SissSettings(MethodSettings):
    """`mix` λ: chance of noising the forget track; `forget_scale`: forget/retain grad norm."""

    mix: float = 0.5
    forget_scale: float = 0.5

    def validate(self) -> None:
        super().validate()
        require(0 < self.mix < 1, "mix must be in (0, 1).")
        require(self.forget_scale > 0, "forget_scale must be > 0.")


def _expand(shape_like: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (shape_like.ndim - 1))


@register
class Siss(UnlearningMethod):
    """Minimise E_mix[w_x ℓ(x)] − s · E_mix[w_a ℓ(a)], s set so ‖s∇forget‖ = scale · ‖∇retain‖."""

    name = "siss"
    settings_class = SissSettings
    summary = "SISS: importance-sampled retain/forget mixture, forget gradient norm-scaled."

    def loss(self, model, task, batch: dict, step: int) -> torch.Tensor:
        retain, forget = batch["retain"], batch["forget"]
        n = len(retain["caption"])
        pick = torch.arange(n) % len(forget["caption"])
        a = {k: (v[pick] if isinstance(v, torch.Tensor) else [v[int(i)] for i in pick])
             for k, v in forget.items()}
        x0, a0 = retain["features"].float(), a["features"].float()
        t, eps = random_draws(task, n, self.s.seed, step, MIX_STREAM)
        gen = step_generator(self.s.seed, step, MIX_STREAM + 10)
        from_forget = torch.rand(n, generator=gen) < self.s.mix
        alpha, sigma = task.alpha_sigma(t)
        al, si = _expand(x0, alpha), _expand(x0, sigma)
        x_t = al * torch.where(_expand(x0, from_forget), a0, x0) + si * eps
        eps_x, eps_a = (x_t - al * x0) / si, (x_t - al * a0) / si
        # log q(x_t | x) − log q(x_t | a), for the importance weights of the defensive mixture
        dims = tuple(range(1, x0.ndim))
        diff = (eps_a.pow(2).sum(dims) - eps_x.pow(2).sum(dims)) / 2
        lam = self.s.mix
        w_x = 1.0 / ((1 - lam) + lam * torch.exp((-diff).clamp(max=80)))
        w_a = 1.0 / ((1 - lam) * torch.exp(diff.clamp(max=80)) + lam)
        # negligible weights become exact zeros: tiny ones fill the backward pass with denormal
        # numbers, which are very slow on CPUs
        w_x, w_a = (torch.where(w < 1e-6, torch.zeros_like(w), w) for w in (w_x, w_a))
        drop = torch.rand(n, generator=gen) < self.s.cond_dropout
        l_x = task.per_sample_loss(model, dict(retain, drop_cond=drop), t, eps_x,
                                   self.s.mask_padding)
        l_a = task.per_sample_loss(model, a, t, eps_a, self.s.mask_padding)
        w_x, w_a = w_x.to(l_x.device), w_a.to(l_a.device)
        retain_term, forget_term = (w_x * l_x).mean(), (w_a * l_a).mean()
        params = [p for p in model.parameters() if p.requires_grad]
        g_r = torch.autograd.grad(retain_term, params, retain_graph=True, allow_unused=True)
        g_f = torch.autograd.grad(forget_term, params, allow_unused=True)
        norm_r = torch.sqrt(sum((g.pow(2).sum() for g in g_r if g is not None), torch.zeros(())))
        norm_f = torch.sqrt(sum((g.pow(2).sum() for g in g_f if g is not None), torch.zeros(())))
        scale = (self.s.forget_scale * norm_r / norm_f).item() if norm_f > 0 else 0.0
        # gradients are assembled here and installed in `after_backward` (two backward passes
        # instead of three); the returned value is the objective, for the log
        self._grads = [
            None if gr is None and gf is None else
            (gr if gr is not None else 0) - scale * (gf if gf is not None else 0)
            for gr, gf in zip(g_r, g_f)
        ]
        self._params = params
        self.last = {"retain": retain_term.item(), "forget": forget_term.item(), "scale": scale}
        value = (retain_term - scale * forget_term).detach()
        return value.requires_grad_()

    def after_backward(self, model, step: int) -> None:
        for p, g in zip(self._params, self._grads):
            p.grad = None if g is None else g.detach().clone()
        self._grads = []
