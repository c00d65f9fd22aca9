"""The reference family's sampler: prompts -> normalised latent frames, with diffusers'
v-prediction schedulers on the model's own schedule and classifier-free guidance. The frames become
audio through the family's vocoder, and clips are written by `linernotes.clips`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from linernotes import device
from linernotes.config import Settings, require, setting
from linernotes.models.schedule import continuous_t, make_scheduler


@dataclasses.dataclass(frozen=True)
class GenerateSettings(Settings):
    """How clips are sampled."""

    steps: int = setting(25, "Sampler steps.")
    guidance: float = setting(2.0, "Classifier-free guidance scale.")
    sampler: str = setting("dpm", "dpm (DPM-Solver++ 2M) or ddim.")
    seconds: float | None = setting(None, "Clip length (default: the model's length).")
    griffin_lim_iters: int = setting(32, "Vocoder (Griffin-Lim) iterations per clip.")
    batch_size: int = setting(8, "Clips sampled together.")

    def validate(self) -> None:
        require(self.steps >= 1, "steps must be >= 1.")
        require(self.guidance >= 0, "guidance must be >= 0.")
        require(self.sampler in ("dpm", "ddim"), "sampler must be 'dpm' or 'ddim'.")
        require(self.seconds is None or 0 < self.seconds <= 600, "seconds must be in (0, 600].")
        require(self.griffin_lim_iters >= 1 and self.batch_size >= 1, "iters/batch must be >= 1.")


@torch.no_grad()
def sample_latents(
    model,
    task,
    prompts: Sequence[str],
    seeds: Sequence[int],
    n_real: int,
    s: GenerateSettings,
    progress: bool = False,
) -> torch.Tensor:
    """Sample normalised latents (B, T, M) for prompts with per-clip seeded noise: `model` a
    `Denoiser`, `task` its `ReferenceTask` (the text conditioning)."""
    n_frames, n_mels = task.latent_shape
    b = len(prompts)
    dev = device.of(model)
    x = torch.stack(
        [
            torch.randn(n_frames, n_mels, generator=torch.Generator().manual_seed(int(sd)))
            for sd in seeds
        ]
    ).to(dev)  # the noise is drawn on the CPU: the same bits on every device
    cond = device.move(task.text_condition(list(prompts), model.config.max_words), dev)
    cond["frac"] = torch.full((b,), n_real / n_frames, device=dev)
    guided = s.guidance != 1.0
    if guided:
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]
                         ).to(dev)
    else:
        drop = None
    sched = make_scheduler(s.sampler)
    sched.set_timesteps(s.steps)
    x = x * sched.init_noise_sigma
    for ts in tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False):
        inp = torch.cat([x, x]) if guided else x
        t = continuous_t(ts).expand(inp.shape[0]).to(dev)
        v = model(sched.scale_model_input(inp, ts), t, cond, drop)
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + s.guidance * (v_cond - v_null)
        x = sched.step(v, ts, x).prev_sample
    return x.cpu()
