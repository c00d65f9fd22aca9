import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from linernotes.attribution import gradients as grad_mod
from linernotes.attribution.gradient_methods import (
    Checkpoint,
    DTrakAttributor,
    FisherInfluenceAttributor,
    RepresenterAttributor,
    TracInAttributor,
    TrakAttributor,
)
from linernotes.attribution.gradients import (
    GradientEngine,
    GradientFeatures,
    GradientSettings,
    Projector,
    grads_loop,
    grads_vmap,
    sharded_features,
)
from linernotes.attribution.losses import ScoreSettings, track_losses
from linernotes.attribution.query import Query
from linernotes.curvature import FisherSettings, compute_fisher
from linernotes.data.dataset import TrackDataset, collate, split_rows
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.task import draw_noise, fixed_timesteps, loss_at_draws, trainable
from linernotes.unlearning.newton import UnlearnSettings, applied, query_gradient, unlearn_query

from conftest import TINY_FEATURES
from tiny_task import TinyDiTTask

S = TINY_FEATURES
FAST = GradientSettings(timesteps=4, stride=200, query_draws=32, projection_dim=128,
                        batch_size=4, shard_size=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tone_corpus

    # tiny models: one thread avoids OpenMP oversubscription (16x slower on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grad")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=6)
    store = FeatureStore.open(manifest, S, progress=False)
    rows = split_rows(manifest, "train")
    train = TrackDataset(store, manifest, rows)
    ids = [manifest["track_id"][i] for i in rows]
    task = TinyDiTTask(S.n_frames, S.n_mels)
    model = task.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate([train[k] for k in range(len(train))])
    for step in range(150):
        t, noise = draw_noise(batch["track_id"], [step], task.latent_shape, seed=99)
        loss = task.per_sample_loss(model, batch, t[:, 0], noise[:, 0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fisher = compute_fisher(task, model, train, FisherSettings(draws=2), "run-a", progress=False)
    yield dict(manifest=manifest, train=train, ids=ids, task=task, model=model, fisher=fisher)
    torch.set_num_threads(threads)


def track_query(setup, k: int) -> Query:
    item = setup["train"][k]
    return Query(key=item["track_id"], features=item["features"], mask=item["mask"],
                 caption=item["caption"], track_id=item["track_id"])


def common(setup):
    return (setup["task"], setup["model"], "run-a", setup["manifest"], setup["train"],
            setup["ids"])


def test_every_method_returns_a_valid_score_table(setup, tmp_path):
    args = common(setup)
    methods = [
        TrakAttributor(*args, tmp_path / "cache", FAST, progress=False),
        DTrakAttributor(*args, tmp_path / "cache", FAST, progress=False),
        TracInAttributor(*args, tmp_path / "cache", FAST, progress=False),
        FisherInfluenceAttributor(*args, setup["fisher"], tmp_path / "cache", FAST,
                                  progress=False),
        RepresenterAttributor(*args, tmp_path / "cache", FAST, progress=False),
    ]
    q = track_query(setup, 2)
    n = len(setup["ids"])
    for m in methods:
        df = m.attribute(q, tmp_path / "out" / m.method)
        assert (df["method"] == m.method).all() and (df["query"] == q.key).all()
        assert sorted(df["track_id"]) == sorted(setup["ids"])
        assert np.isfinite(df["score"]).all()
        assert df["rank"].min() == 1 and df["rank"].max() <= n
        assert df["rank"].is_monotonic_increasing
        assert (tmp_path / "out" / m.method / f"{q.key}.parquet").exists()
        assert (tmp_path / "out" / m.method / f"{q.key}.json").exists()
    assert methods[-1].layer == "proj_out"


def test_gradients_are_stored_once_and_reused(setup, tmp_path):
    args = (setup["task"], setup["model"], "run-a", setup["train"], setup["ids"], FAST,
            tmp_path)
    first = GradientFeatures(*args, progress=False)
    a = first.train_features()
    assert first.computed_shards == 3 and a.shape == (len(setup["ids"]), FAST.projection_dim)
    second = GradientFeatures(*args, progress=False)
    b = second.train_features()
    assert second.computed_shards == 0 and np.array_equal(a, b)
    # an attributor reuses them across queries and methods
    tracin = TracInAttributor(*common(setup), tmp_path, FAST, progress=False)
    for k in (0, 1):
        tracin.attribute(track_query(setup, k), tmp_path / "out")
    assert tracin.features[0].computed_shards == 0
    # another projection is another artifact
    other = GradientFeatures(*args[:5], FAST.replace(projection_seed=1), tmp_path,
                             progress=False)
    other.train_features()
    assert other.computed_shards == 3 and other.folder != first.folder


def test_killed_featurisation_resumes_with_identical_features(setup, tmp_path, monkeypatch):
    args = (setup["task"], setup["model"], "run-a", setup["train"], setup["ids"], FAST)
    full = GradientFeatures(*args, tmp_path / "ref", progress=False).train_features()
    calls = {"n": 0}
    real = GradientFeatures.compute_rows

    def dying(self, lo, hi):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, lo, hi)

    monkeypatch.setattr(GradientFeatures, "compute_rows", dying)
    killed = GradientFeatures(*args, tmp_path / "run", progress=False)
    with pytest.raises(KeyboardInterrupt):
        killed.train_features()
    assert len(list(killed.folder.glob("shard-*.npy"))) == 2
    assert not list(killed.folder.glob("*.tmp"))
    calls["n"] = -100
    resumed = GradientFeatures(*args, tmp_path / "run", progress=False)
    out = resumed.train_features()
    assert resumed.computed_shards == 1
    assert np.array_equal(out, full)
    with pytest.raises(LinernotesError, match="other inputs"):
        sharded_features(lambda lo, hi: np.zeros((hi - lo, 2), np.float32), 15, 2, 5,
                         resumed.folder, {"provenance": {"run": "b"}}, progress=False)


def exact_fisher_pieces(setup, settings: GradientSettings, query: Query, damping: float):
    """Hand-computed per-track gradients, query gradient and D = (F + λI)⁻¹ (flattened)."""
    task, model = setup["task"], setup["model"]
    params = task.parameters(model, settings.group)
    inv, _ = setup["fisher"].damped_inverse(damping)
    d = torch.cat([inv[n].reshape(-1) for n in params])
    ts = fixed_timesteps(settings.timesteps, settings.stride)
    rows = []
    with trainable(model, params):
        for k in range(len(setup["train"])):
            batch = collate([setup["train"][k]])
            t, noise = draw_noise(batch["track_id"], range(settings.timesteps), task.latent_shape,
                                  seed=settings.seed, timesteps=ts)
            loss = loss_at_draws(task, model, batch, t, noise, settings.mask_train)[0]
            grads = torch.autograd.grad(loss, list(params.values()))
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        gq, _ = query_gradient(task, model, query, params, settings.query_draws,
                               settings.query_seed, settings.mask_query, 16)
    gq = torch.cat([gq[n].reshape(-1) for n in params])
    return torch.stack(rows).double(), gq.double(), d.double()


def test_exact_fisher_influence_is_the_hand_computed_form(setup, tmp_path):
    exact = FAST.replace(projection_dim=0)
    q = track_query(setup, 4)
    att = FisherInfluenceAttributor(*common(setup), setup["fisher"], tmp_path, exact,
                                    damping=1e-3, progress=False)
    df = att.attribute(q, tmp_path / "out").set_index("track_id").loc[setup["ids"]]
    g, gq, d = exact_fisher_pieces(setup, exact, q, 1e-3)
    expected = (g @ (d * gq)).numpy() / len(setup["ids"])
    np.testing.assert_allclose(df["score"].to_numpy(), expected, rtol=1e-4,
                               atol=1e-6 * np.abs(expected).max())


def test_exact_fisher_influence_predicts_one_step_unlearning(setup, tmp_path):
    task, model, ids = setup["task"], setup["model"], setup["ids"]
    # float32: the step moves losses by 1e-3 of their size, below bfloat16's resolution
    score = ScoreSettings(timesteps=4, stride=200, batch_size=8, precision="float32")
    unlearn = UnlearnSettings(draws=64, batch_size=32, probe_draws=8, steps=1, alpha=1.0)
    exact = GradientSettings.matching(score, unlearn, projection_dim=0, batch_size=4,
                                      shard_size=8)
    q = track_query(setup, 5)
    att = FisherInfluenceAttributor(*common(setup), setup["fisher"], tmp_path, exact,
                                    damping=unlearn.damping, progress=False)
    predicted = att.attribute(q, tmp_path / "out").set_index("track_id").loc[ids, "score"]
    predicted = predicted.to_numpy()
    before = track_losses(task, model, setup["train"], score)
    # a tiny step: the largest predicted loss change is 1e-3 of the mean loss
    alpha = 1e-3 * before.mean() / np.abs(predicted).max()
    delta, _ = unlearn_query(task, model, q, setup["fisher"], unlearn.replace(alpha=alpha),
                             n_train=len(ids))
    with applied(model, delta):
        after = track_losses(task, model, setup["train"], score)
    measured = after - before
    rho = spearmanr(measured, predicted).statistic
    rel = np.abs(measured - alpha * predicted).max() / np.abs(alpha * predicted).max()
    assert rho > 0.99 and rel < 0.05, (rho, rel)


def test_projection_preserves_inner_products():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9000, generator=gen)
    x[1] = x[0] + 0.5 * x[1]  # some correlated pairs
    exact = x @ x.T
    for kind in ("rademacher", "gaussian"):
        proj = Projector(9000, 4096, kind, seed=3)
        y = proj(x)
        approx = y @ y.T
        norms = exact.diag().sqrt()
        err = (approx - exact) / (norms[:, None] * norms[None, :])
        assert err.abs().max() < 0.08, kind
        # the same matrix whatever the batch: rows projected alone equal rows projected together
        np.testing.assert_allclose(proj(x[2:3]).numpy(), y[2:3].numpy(), rtol=1e-4, atol=1e-5)


def test_projected_scores_stay_within_the_projection_error(setup, tmp_path):
    q = track_query(setup, 1)
    exact = TracInAttributor(*common(setup), tmp_path, FAST.replace(projection_dim=0),
                             progress=False)
    proj = TracInAttributor(*common(setup), tmp_path, FAST.replace(projection_dim=1024),
                            progress=False)
    a = exact.attribute(q, tmp_path / "a").set_index("track_id").loc[setup["ids"], "score"]
    b = proj.attribute(q, tmp_path / "b").set_index("track_id").loc[setup["ids"], "score"]
    # JL: the error of a projected inner product has std <= sqrt(2/k) |g_i| |g_q|
    norms = np.linalg.norm(exact.features[0].train_features(), axis=1)
    bound = 4 * np.sqrt(2 / 1024) * norms * np.linalg.norm(exact.features[0].query_features(q))
    assert (np.abs(a.to_numpy() - b.to_numpy()) < bound).all()


@pytest.mark.parametrize("k", [8, 64])  # 8 < N: the k x k kernel; 64 > N: the N x N dual
def test_trak_scores_are_the_kernel_formula(setup, tmp_path, k):
    q = track_query(setup, 2)
    att = TrakAttributor(*common(setup), tmp_path, FAST.replace(projection_dim=k),
                         damping=1e-2, progress=False)
    df = att.attribute(q, tmp_path / "out").set_index("track_id").loc[setup["ids"]]
    phi = att.features.train_features().astype(np.float64)
    lam = 1e-2 * (phi**2).sum() / k
    kernel = phi.T @ phi + lam * np.eye(k)
    expected = phi @ np.linalg.solve(kernel, att.features.query_features(q).astype(np.float64))
    assert att.kernel()[2] == (k > len(setup["ids"]))
    np.testing.assert_allclose(df["score"].to_numpy(), expected, rtol=1e-6,
                               atol=1e-9 * np.abs(expected).max())


def test_tracin_sums_checkpoints_with_learning_rates(setup, tmp_path):
    q = track_query(setup, 0)
    one = TracInAttributor(*common(setup), tmp_path, FAST, progress=False).attribute(
        q, tmp_path / "one")
    ckpts = [Checkpoint(setup["model"], "run-a", 0.25), Checkpoint(setup["model"], "run-a", 0.5)]
    two = TracInAttributor(*common(setup), tmp_path, FAST, checkpoints=ckpts,
                           progress=False).attribute(q, tmp_path / "two")
    a = one.set_index("track_id").loc[setup["ids"], "score"].to_numpy()
    b = two.set_index("track_id").loc[setup["ids"], "score"].to_numpy()
    np.testing.assert_allclose(b, 0.75 * a, rtol=1e-6)


def test_vmap_and_loop_gradients_agree(setup):
    task, model = setup["task"], setup["model"]
    params = task.parameters(model, "transformer")
    items = [setup["train"][k] for k in range(3)]
    same = collate([dict(it, caption=items[0]["caption"]) for it in items])
    t, noise = draw_noise(same["track_id"], range(3), task.latent_shape, seed=0)
    with trainable(model, params):
        a = grads_loop(task, model, params, same, t, noise, "loss", False)
        b = grads_vmap(task, model, params, same, t, noise, "loss", False)
        c = grads_loop(task, model, params, same, t, noise, "dtrak", False)
        d = grads_vmap(task, model, params, same, t, noise, "dtrak", False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c, d, rtol=1e-4, atol=1e-6)
    # different captions cannot be vmapped: "auto" falls back to the loop cleanly
    mixed = collate(items)
    engine = GradientEngine(task, model, params, "auto")
    out = engine(mixed, t, noise, "loss", False)
    assert "not applicable" in engine.note and out.shape == a.shape


def hand_dot_products(setup, settings: GradientSettings, names: list[str], query: Query):
    """Plain gradient dot products over the parameters `names`, at the methods' draws."""
    task, model = setup["task"], setup["model"]
    params = {n: p for n, p in model.named_parameters() if n in set(names)}
    engine = GradientEngine(task, model, params, "loop")
    ts = fixed_timesteps(settings.timesteps, settings.stride)
    batch = collate([setup["train"][k] for k in range(len(setup["train"]))])
    t, noise = draw_noise(batch["track_id"], range(settings.timesteps), task.latent_shape,
                          seed=settings.seed, timesteps=ts)
    g = engine(batch, t, noise, "loss", settings.mask_train).double()
    tq, nq = draw_noise([query.key], range(settings.query_draws), task.latent_shape,
                        seed=settings.query_seed)
    gq = grad_mod.mean_gradient(engine, query.batch(1), tq, nq, "loss", settings.mask_query,
                                chunk=64).double()
    return (g @ gq).numpy()


def test_peer_kronfluence_identity_equals_gradient_dot_products(setup, tmp_path):
    peers = pytest.importorskip("linernotes.attribution.peers")
    if not peers.available("kronfluence"):
        pytest.skip("kronfluence is not installed: " + peers.INSTALL["kronfluence"])
    settings = FAST.replace(projection_dim=0, timesteps=2, query_draws=8)
    queries = [track_query(setup, 0), track_query(setup, 7)]
    runner = peers.PeerAttributor("kronfluence-identity", *common(setup), tmp_path / "kf",
                                  settings)
    tables = runner.attribute_many(queries, tmp_path / "out")
    names = peers.tracked_parameters(setup["model"], runner.params)
    assert names and len(names) < len(runner.params)  # Linear layers only (no norms)
    for q, df in zip(queries, tables):
        assert df["method"].iloc[0] == "peer:kronfluence-identity"
        theirs = df.set_index("track_id").loc[setup["ids"], "score"].to_numpy()
        ours = hand_dot_products(setup, settings, names, q)
        np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-5 * np.abs(ours).max())


@pytest.mark.parametrize("method", ["dattri-trak", "kronfluence-diagonal", "kronfluence-ekfac"])
def test_peer_methods_return_valid_tables(setup, tmp_path, method):
    peers = pytest.importorskip("linernotes.attribution.peers")
    lib = method.split("-")[0]
    if not peers.available(lib):
        pytest.skip(f"{lib} is not installed: " + peers.INSTALL[lib])
    settings = FAST.replace(projection_dim=0 if lib == "kronfluence" else 256, timesteps=1,
                            query_draws=4)
    runner = peers.PeerAttributor(method, *common(setup), tmp_path / "peer", settings)
    q = track_query(setup, 3)
    df = runner.attribute(q, tmp_path / "out")
    assert sorted(df["track_id"]) == sorted(setup["ids"])
    assert np.isfinite(df["score"]).all() and df["rank"].min() == 1
    assert df["method"].iloc[0] == f"peer:{method}"


def test_peer_dattri_tracin_exact_equals_gradient_dot_products(setup, tmp_path):
    peers = pytest.importorskip("linernotes.attribution.peers")
    if not peers.available("dattri"):
        pytest.skip("dattri is not installed: " + peers.INSTALL["dattri"])
    settings = FAST.replace(projection_dim=0, timesteps=2, query_draws=8)
    q = track_query(setup, 6)
    df = peers.PeerAttributor("dattri-tracin", *common(setup), tmp_path / "d", settings
                              ).attribute(q, tmp_path / "out")
    assert df["method"].iloc[0] == "peer:dattri-tracin" and df["rank"].min() == 1
    theirs = df.set_index("track_id").loc[setup["ids"], "score"].to_numpy()
    names = setup["task"].parameter_names(setup["model"], settings.group)
    ours = hand_dot_products(setup, settings, names, q)
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-5 * np.abs(ours).max())


def test_missing_peer_names_the_install_command(monkeypatch):
    peers = pytest.importorskip("linernotes.attribution.peers")
    monkeypatch.setattr(peers, "available", lambda lib: False)
    with pytest.raises(LinernotesError, match="pip install"):
        peers.require("kronfluence")


def test_bad_settings_are_refused():
    with pytest.raises(LinernotesError):
        GradientSettings(output="logits")
    with pytest.raises(LinernotesError):
        GradientSettings(projection_dim=-1)
    assert grad_mod.BACKENDS == ("auto", "loop", "vmap")
