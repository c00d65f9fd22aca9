"""`draw_noise` (seed-and-fill loop, vectorised timesteps) gives the same bits as the plain loop."""

import pytest
import torch

from linernotes.task import _key_seed, draw_noise, fixed_timesteps


def plain_loop(keys, draws, shape, seed=0, timesteps=None, t_min=1e-3, t_max=1.0 - 1e-3):
    """The original implementation: one generator seeding and element assignment per draw."""
    t, noise = torch.empty(len(keys), len(draws)), torch.empty(len(keys), len(draws), *shape)
    gen = torch.Generator()
    for i, key in enumerate(keys):
        base = _key_seed(key, seed)
        for j, draw in enumerate(draws):
            gen.manual_seed((base + 1_000_003 * int(draw)) % (1 << 63))
            u = torch.rand((), generator=gen)
            noise[i, j] = torch.randn(shape, generator=gen)
            if timesteps is not None:
                t[i, j] = float(timesteps[int(draw) % len(timesteps)])
            else:
                t[i, j] = t_min + (t_max - t_min) * u
    return t, noise


@pytest.mark.parametrize("timesteps", [None, fixed_timesteps(20, 50)])
@pytest.mark.parametrize("shape", [(5, 2), (64, 16), (3,)])
def test_same_bits_as_the_plain_loop(timesteps, shape):
    keys, draws = ["a", "track-07", "b"], [3, 0, 41, 7]
    for got, want in zip(draw_noise(keys, draws, shape, 5, timesteps),
                         plain_loop(keys, draws, shape, 5, timesteps)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    t, noise = draw_noise(keys, range(0), shape)
    assert t.shape == (3, 0) and noise.shape == (3, 0, *shape)
