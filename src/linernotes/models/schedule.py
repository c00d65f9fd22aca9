"""The v-objective with a continuous cosine schedule: alpha = cos(pi t / 2), sigma = sin(pi t / 2).

Also maps the schedule onto diffusers' discrete schedulers (exact `trained_betas` on a grid of
continuous times), so a diffusers sampler integrates the very schedule the model was trained on.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from linernotes.errors import LinernotesError
from linernotes.task import T_RANGE

T_MIN, T_MAX = T_RANGE


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales at continuous time t in (0, 1)."""
    angle = t * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha x0 + sigma noise (t has shape (B,))."""
    a, s = alpha_sigma(t)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = alpha noise - sigma x0."""
    a, s = alpha_sigma(t)
    return _bcast(a, x0) * noise - _bcast(s, x0) * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean estimate from a v prediction: x0 = alpha x_t - sigma v."""
    a, s = alpha_sigma(t)
    return _bcast(a, x_t) * x_t - _bcast(s, x_t) * v


def time_grid(n: int = 1000, t_min: float = T_MIN, t_max: float = T_MAX) -> np.ndarray:
    """Continuous times of a diffusers scheduler's discrete steps 0..n-1 (increasing)."""
    return np.linspace(t_min, t_max, n)


def trained_betas(n: int = 1000) -> list[float]:
    """Betas whose cumulative product of (1 - beta) equals alpha(t)^2 on `time_grid(n)`."""
    ac = np.cos(time_grid(n) * np.pi / 2) ** 2
    prev = np.concatenate([[1.0], ac[:-1]])
    return (1.0 - ac / prev).tolist()


def continuous_t(timesteps: torch.Tensor | np.ndarray | int, n: int = 1000) -> torch.Tensor:
    """Continuous t for diffusers' integer timesteps (on the grid of `trained_betas(n)`)."""
    grid = torch.as_tensor(time_grid(n), dtype=torch.float32)
    return grid[torch.as_tensor(timesteps).long()]


def make_scheduler(kind: str = "dpm", n: int = 1000):
    """A diffusers v-prediction scheduler on this schedule: 'dpm' (DPM-Solver++ 2M) or 'ddim'."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(
        num_train_timesteps=n,
        trained_betas=trained_betas(n),
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    with warnings.catch_warnings():  # diffusers' numpy-2 copy= deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        if kind == "dpm":
            return DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
            )
        if kind == "ddim":
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    raise LinernotesError(f"Unknown sampler '{kind}'; use 'dpm' or 'ddim'.")
