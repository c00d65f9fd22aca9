"""Random projections of gradients: the sparse map's statistics and the dense kinds' identity."""

import hashlib

import numpy as np
import pytest
import torch

from linernotes.attribution.gradients import (
    CHUNK_ROWS,
    SPARSE_NNZ,
    GradientSettings,
    Projector,
)
from linernotes.errors import LinernotesError


def pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two correlated vectors with non-zero means and a few heavy coordinates."""
    gen = torch.Generator().manual_seed(seed)
    x = 1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    y = 0.5 * x + torch.randn(n, generator=gen, dtype=torch.float64)
    x[:3] *= 10
    y[1:4] *= -8
    return x, y


@pytest.mark.parametrize("nnz", [1, 3])
def test_sparse_projection_preserves_inner_products_in_expectation(nnz):
    n, k, seeds = 1000, 32, 400
    x, y = pair(n)
    xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
    # the estimate's variance, the same as the dense Rademacher map's
    var = (xx * yy + xy**2 - 2 * float((x**2 * y**2).sum())) / k
    est, norms = [], []
    for seed in range(seeds):
        px, py = Projector(n, k, "sparse", seed=seed, nnz=nnz)(torch.stack([x, y])).double()
        est.append(float(px @ py))
        norms.append(float(px @ px))
    est = np.array(est)
    # mean within 4.5 standard errors: all-positive signs would add (Σx Σy - <x,y>)/k ≈ 6,700,
    # a wrong scale (1/s instead of 1/sqrt(s)) would shrink it 3x
    assert abs(est.mean() - xy) < 4.5 * np.sqrt(var / seeds), (est.mean(), xy)
    assert abs(np.mean(norms) - xx) < 0.05 * xx
    assert 0.75 < est.var() / var < 1.3, (est.var(), var)


def test_sparse_projection_is_unbiased_on_mean_zero_vectors_at_large_k():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20000, generator=gen)
    x[1] = x[0] + 0.5 * x[1]
    exact = x @ x.T
    y = Projector(20000, 8192, "sparse", seed=5)(x)
    norms = exact.diag().sqrt()
    err = (y @ y.T - exact) / (norms[:, None] * norms[None, :])
    assert err.abs().max() < 0.06  # sqrt(2/8192) ≈ 0.016 per entry


def test_sparse_map_is_a_seeded_per_chunk_count_sketch():
    p = Projector(10000, 12, "sparse", seed=2, nnz=3)
    buckets, signs = p.sparse_map()
    assert buckets.shape == signs.shape == (10000, 3)
    assert buckets.dtype == torch.int32 and signs.dtype == torch.int8
    # bucket b lies in block b of [0, k): a parameter's buckets are distinct
    for b in range(3):
        assert buckets[:, b].min() >= 4 * b and buckets[:, b].max() < 4 * (b + 1)
    assert set(signs.unique().tolist()) == {-1, 1}
    # a basis vector lands on its s buckets with signs ±1/sqrt(s)
    j = 4100
    e = torch.zeros(1, 10000)
    e[0, j] = 1.0
    expected = torch.zeros(12)
    expected[buckets[j].long()] = signs[j].float() / np.sqrt(3)
    assert torch.equal(p(e)[0], expected)
    # chunk c depends on (seed, c) only: another parameter count shares the first chunk
    other = Projector(CHUNK_ROWS + 5, 12, "sparse", seed=2, nnz=3).sparse_map()
    assert torch.equal(other[0][:CHUNK_ROWS], buckets[:CHUNK_ROWS])
    assert torch.equal(other[1][:CHUNK_ROWS], signs[:CHUNK_ROWS])
    again = Projector(10000, 12, "sparse", seed=2, nnz=3).sparse_map()
    assert torch.equal(again[0], buckets) and torch.equal(again[1], signs)
    assert not torch.equal(Projector(10000, 12, "sparse", seed=3, nnz=3).sparse_map()[0],
                           buckets)


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_projection_does_not_depend_on_the_batch(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(300, 20000, generator=gen, dtype=torch.float64)
        p = Projector(20000, 64, "sparse", seed=0, nnz=2)
        whole = p(x)  # 300 rows: the columns are taken in two blocks
        assert whole.dtype == torch.float32 and whole.shape == (300, 64)
        for i in (0, 7, 299):
            assert torch.equal(p(x[i : i + 1]), whole[i : i + 1])
        assert torch.equal(torch.cat([p(x[:100]), p(x[100:])]), whole)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "sparse"])
def test_zero_dim_is_the_identity(kind):
    x = torch.randn(3, 50)
    p = Projector(50, 0, kind)
    assert p(x) is x and p.out_dim == 50


# R's first two chunks for (P = 5000, k = 8, seed 3), recorded before the sparse kind existed:
# stored features and their cache keys stay valid
DENSE_SHA = {"rademacher": "b30becb649a43752cce871f23e127040",
             "gaussian": "e16e5d55c4bf024360a29905dde02f7d"}


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_projections_are_unchanged(kind):
    p = Projector(5000, 8, kind, seed=3)
    h = hashlib.sha256()
    for c in range(2):
        h.update(p.chunk(c).numpy().tobytes())
    assert h.hexdigest()[:32] == DENSE_SHA[kind]
    assert p.key() == {"dim": 8, "kind": kind, "seed": 3, "rows": 4096, "n_params": 5000}
    if kind == "rademacher":  # the first row's signs, by hand
        signs = [-1, -1, -1, 1, -1, -1, -1, -1]
        assert p.chunk(0)[0].tolist() == [np.float32(s / np.sqrt(8)) for s in signs]
    x = torch.randn(2, 5000, dtype=torch.float64)
    dense = torch.cat([p.chunk(0), p.chunk(1)]).double()
    np.testing.assert_allclose(p(x).double().numpy(), (x @ dense).numpy(), rtol=1e-4, atol=1e-4)


def test_keys_settings_and_bad_input():
    assert Projector(100, 16, "sparse", seed=1).key() == {
        "dim": 16, "kind": "sparse", "seed": 1, "rows": CHUNK_ROWS, "n_params": 100,
        "nnz": SPARSE_NNZ}
    assert Projector(100, 2, "sparse", nnz=4).key()["nnz"] == 2  # s <= k
    assert Projector(100, 16, "sparse", nnz=1).key() != Projector(100, 16, "sparse", nnz=2).key()
    assert GradientSettings(projection="sparse").projection == "sparse"
    with pytest.raises(LinernotesError, match="projection must be one of"):
        GradientSettings(projection="countsketch")
    with pytest.raises(LinernotesError, match="Unknown projection 'dense'"):
        Projector(100, 16, "dense")
    with pytest.raises(LinernotesError, match="nnz >= 1"):
        Projector(100, 16, "sparse", nnz=0)
    with pytest.raises(LinernotesError, match="for 100 parameters, not 99"):
        Projector(100, 16, "sparse")(torch.zeros(1, 99))


def test_default_sparsity_keeps_the_dense_maps_error_tails_on_heavy_tailed_vectors():
    """One non-zero per parameter (CountSketch) has the dense map's variance but heavy tails when
    a few coordinates dominate; the default s keeps the tails near the dense map's."""
    n, k = 20000, 256
    x = torch.from_numpy(np.random.default_rng(0).standard_t(1.5, (40, n))).float()
    exact = x.double() @ x.double().T
    norm = exact.diag().sqrt()
    off = ~torch.eye(40, dtype=torch.bool)

    def p99(kind: str, nnz: int) -> float:
        errs = []
        for seed in range(6):
            y = Projector(n, k, kind, seed=seed, nnz=nnz)(x).double()
            errs.append(((y @ y.T - exact) / (norm[:, None] * norm[None, :]))[off] * k**0.5)
        return float(torch.cat(errs).abs().quantile(0.99))

    dense = p99("rademacher", 1)
    assert 2.0 < dense < 3.2  # a standard normal's is 2.58
    assert p99("sparse", SPARSE_NNZ) < 1.15 * dense
    assert p99("sparse", 1) > 1.2 * dense
