import torch

from linernotes.task import draw_noise, expand_draws, fixed_timesteps


def test_draws_depend_only_on_key_and_draw_index():
    keys = ["a", "b", "c", "d"]
    t, noise = draw_noise(keys, range(3), (5, 2), seed=7)
    # asking for a subset, in another order, gives the same draws for each (key, draw)
    t2, noise2 = draw_noise(["c", "a"], [2, 0], (5, 2), seed=7)
    assert torch.equal(noise2[0, 0], noise[2, 2]) and torch.equal(noise2[1, 1], noise[0, 0])
    assert t2[0, 0] == t[2, 2]
    # different keys, draws and seeds differ
    assert not torch.equal(noise[0, 0], noise[1, 0])
    assert not torch.equal(noise[0, 0], noise[0, 1])
    _, other = draw_noise(keys, range(3), (5, 2), seed=8)
    assert not torch.equal(other, noise)
    assert ((t > 0) & (t < 1)).all()


def test_fixed_timesteps_cycle():
    ts = fixed_timesteps(20, 50, 1000)
    assert len(ts) == 20 and ts[0] == 0.025 and abs(ts[-1] - 0.975) < 1e-12
    t, _ = draw_noise(["x"], range(25), (1,), timesteps=ts)
    assert t[0, 21].item() == torch.tensor(ts[1]).item()


def test_expand_draws_is_sample_major():
    batch = {"features": torch.arange(3).view(3, 1), "caption": ["a", "b", "c"], "n": 1}
    out = expand_draws(batch, 2)
    assert out["features"].view(-1).tolist() == [0, 0, 1, 1, 2, 2]
    assert out["caption"] == ["a", "a", "b", "b", "c", "c"] and out["n"] == 1
