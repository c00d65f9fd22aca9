"""The Task contract: the one way every method (training, Fisher, unlearning, baselines, opt-out)
talks to a model.

A Task returns **one loss per sample** for a batch: a diffusion loss at the timesteps and noise
given by the caller, or a loss without random draws (an autoregressive model's next-token
cross-entropy: `deterministic`, the draws are ignored and one draw is its value), with the padding
mask applied or not as asked. Nothing outside a Task knows what a DiT or a codebook is.

Common random numbers: `draw_noise` derives each sample's timesteps and noise from
(the sample's key, the draw index, a seed) - never from its position in a batch - so a sample sees
identical draws before and after unlearning, whatever the batch size, order or process.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from linernotes.errors import LinernotesError

#: Parameter groups addressable by name (the music paper's grid); see `Task.parameter_names`.
PARAM_GROUPS = ("cross_attn_kv", "cross_attn", "self_attn", "ffn", "transformer", "all")
#: The range of a random diffusion time t, by default (`Task.random_draws`, `draw_noise`).
T_RANGE = (1e-3, 1.0 - 1e-3)


class Task(abc.ABC):
    """A model's per-sample diffusion loss, and which of its parameters belong to which group.

    Subclass it for your own model: implement `per_sample_loss` and `parameter_names`.
    """

    #: shape of one sample's latent (what the noise has), frames first: (n_frames, ...)
    latent_shape: tuple[int, ...]
    #: True when the loss has no random draws (t and noise are ignored): callers then take one
    #: draw however many they would average (`draws`)
    deterministic: bool = False
    #: whether "auto" scoring precision may run this task's forwards in bfloat16 autocast (the
    #: diffusion tasks: scores at Spearman 1.000 with float32, docs/benchmarks.md)
    bfloat16_scoring: bool = True

    @abc.abstractmethod
    def per_sample_loss(
        self,
        model: nn.Module,
        batch: dict,
        t: torch.Tensor,
        noise: torch.Tensor,
        mask_padding: bool = False,
    ) -> torch.Tensor:
        """Loss of each sample of `batch` at timesteps `t` (B,) in (0, 1) with `noise` (B, ...).

        `batch` holds at least "features" (B, *latent_shape), "mask" (B, n_frames) bool and
        "caption" (list of B strings). With `mask_padding`, padded frames do not count.
        Returns a (B,) tensor. The batch, `t` and `noise` arrive on the CPU: move them to the
        model's device (`linernotes.device.move`). Scoring may call it under bfloat16 autocast
        (`ScoreSettings.precision`): cast the prediction to the input's dtype before the error.
        """

    def prediction(
        self, model: nn.Module, batch: dict, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The model's output (B, ...) for the noised batch: what `per_sample_loss` compares with
        its target. Optional: only methods that steer one caption's predictions towards
        another's need it (opt-out's `concept_ablation`)."""
        raise LinernotesError(f"{type(self).__name__} does not implement Task.prediction, which "
                              "this method needs; implement it (the model's output for the "
                              "noised batch) or choose another method.")

    @abc.abstractmethod
    def parameter_names(self, model: nn.Module, group: str) -> list[str]:
        """Names (as in `model.named_parameters()`) of the parameters in `group` (PARAM_GROUPS)."""

    def draws(self, n: int) -> int:
        """How many of n requested draws are worth taking: n, or 1 for a deterministic loss
        (every draw would give the same value)."""
        return 1 if self.deterministic else n

    def parameters(self, model: nn.Module, group: str) -> dict[str, nn.Parameter]:
        names = set(self.parameter_names(model, group))
        return {n: p for n, p in model.named_parameters() if n in names}

    def random_draws(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time draws of n samples from `generator`: timesteps (n,) uniform in
        T_RANGE, then noise (n, *latent_shape), in that order (the loop's exact resume needs it)."""
        lo, hi = T_RANGE
        t = lo + (hi - lo) * torch.rand(n, generator=generator)
        return t, torch.randn(n, *self.latent_shape, generator=generator)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signal and noise scales of the noise schedule at t (B,). Optional: only methods
        that noise data themselves need it (opt-out's `siss`)."""
        raise LinernotesError(f"{type(self).__name__} does not implement Task.alpha_sigma (its "
                              "noise schedule), which this method needs; implement it or choose "
                              "another method.")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def trainable(model: nn.Module, names: Iterable[str], train: bool = False) -> Iterator[None]:
    """Only the parameters `names` need gradients inside the block, and the model is in train
    (or eval) mode; the flags and the mode are restored after."""
    names = set(names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    model.train(train)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _key_seed(key: str, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_noise(
    keys: Sequence[str],
    draws: Sequence[int],
    shape: tuple[int, ...],
    seed: int = 0,
    timesteps: Sequence[float] | None = None,
    t_min: float = T_RANGE[0],
    t_max: float = T_RANGE[1],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (B, D) and noise (B, D, *shape) for samples `keys` and draw indices `draws`.

    Draw d of sample k is a pure function of (k, d, seed): independent of the other samples and
    draws requested with it. With `timesteps`, draw d uses timesteps[d % len(timesteps)]; otherwise
    t is uniform in [t_min, t_max].
    """
    b, d = len(keys), len(draws)
    draws = [int(x) for x in draws]
    u = torch.empty(b, d)
    noise = torch.empty(b, d, *shape)
    gen = torch.Generator()
    # One generator seeding per (key, draw) is what makes a draw independent of its batch; the
    # loop only seeds and fills in place (the uniform and the noise, in that order), and the
    # timesteps are computed for all draws at once (the same float32 arithmetic, so the same bits).
    for i, key in enumerate(keys):
        base = _key_seed(key, seed)
        u_i, noise_i = u[i], noise[i]
        for j, draw in enumerate(draws):
            gen.manual_seed((base + 1_000_003 * draw) % (1 << 63))
            torch.rand((), generator=gen, out=u_i[j])
            torch.randn(shape, generator=gen, out=noise_i[j])
    if timesteps is not None:
        row = torch.tensor([float(timesteps[x % len(timesteps)]) for x in draws])
        t = row.expand(b, d).clone()
    else:
        t = t_min + (t_max - t_min) * u
    return t, noise


def fixed_timesteps(n: int = 20, stride: int = 50, steps: int = 1000) -> tuple[float, ...]:
    """AbC's scoring timesteps: n discrete steps at `stride` of `steps`, as fractions in (0, 1)."""
    return tuple((stride // 2 + stride * k) / steps for k in range(n))


def expand_draws(batch: dict, n_draws: int) -> dict:
    """Repeat every sample of `batch` n_draws times (sample-major), for folding draws into B."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.repeat_interleave(n_draws, dim=0)
        elif isinstance(v, list):
            out[k] = [x for x in v for _ in range(n_draws)]
        else:
            out[k] = v
    return out


def loss_at_draws(
    task: Task,
    model: nn.Module,
    batch: dict,
    t: torch.Tensor,
    noise: torch.Tensor,
    mask_padding: bool = False,
) -> torch.Tensor:
    """Per-sample loss averaged over D draws: t (B, D), noise (B, D, ...) -> (B,)."""
    b, d = t.shape
    flat = expand_draws(batch, d)
    losses = task.per_sample_loss(
        model, flat, t.reshape(b * d), noise.reshape(b * d, *noise.shape[2:]), mask_padding
    )
    return losses.view(b, d).mean(dim=1)
