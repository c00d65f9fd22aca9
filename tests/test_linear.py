"""The linear unlearning mode is exact one-step unlearning to first order (tiny float64 DiT)."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from linernotes.attribution.linear import LinearUnlearningAttributor
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.attribution.scores import SCORE_COLUMNS, read_scores
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.curvature import FisherSettings, compute_fisher
from linernotes.data.dataset import TrackDataset, collate, split_rows
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.task import draw_noise
from linernotes.unlearning.newton import UnlearnSettings

from conftest import TINY_FEATURES as S
from tiny_task import TinyDiTTask

UNLEARN = UnlearnSettings(draws=64, probe_draws=16, batch_size=32)
SCORE = ScoreSettings(timesteps=6, stride=150, batch_size=4, shard_size=5)


class Float64Task(TinyDiTTask):
    """The tiny DiT in float64, so exact loss differences resolve a tiny step."""

    def embed(self, captions):
        return super().embed(captions).double()

    def per_sample_loss(self, model, batch, t, noise, mask_padding=False):
        batch = {**batch, "features": batch["features"].double()}
        return super().per_sample_loss(model, batch, t.double(), noise.double(), mask_padding)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tone_corpus

    root = tmp_path_factory.mktemp("linear")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=6)
    store = FeatureStore.open(manifest, S, progress=False)
    rows = split_rows(manifest, "train")
    train = TrackDataset(store, manifest, rows)
    ids = [manifest["track_id"][i] for i in rows]
    task = Float64Task(S.n_frames, S.n_mels)
    model = task.make_model().double()
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
    item = train[0]
    query = Query(item["track_id"], item["features"], item["mask"], item["caption"],
                  track_id=item["track_id"])
    return dict(manifest=manifest, train=train, ids=ids, task=task, model=model, fisher=fisher,
                query=query, root=root)


def scores(df, ids):
    return df.set_index("track_id").loc[ids, "score"].to_numpy()


def linear(setup, cache, dim=0, score=SCORE, **kw):
    return LinearUnlearningAttributor(setup["task"], setup["model"], "run-a", setup["manifest"],
                                      setup["train"], setup["ids"], setup["fisher"], cache,
                                      score, False, UNLEARN, projection_dim=dim, **kw)


@pytest.mark.parametrize("kind", ["delta", "log-ratio"])
def test_unprojected_linear_scores_are_exact_unlearning_to_first_order(setup, tmp_path, kind):
    ids, q = setup["ids"], setup["query"]
    score = SCORE.replace(kind=kind)
    exact = UnlearningAttributor(setup["task"], setup["model"], "run-a", setup["manifest"],
                                 setup["train"], ids, setup["fisher"], tmp_path / "cache", score,
                                 progress=False)
    lin = linear(setup, tmp_path / "cache", score=score)
    errors = []
    for alpha in (1e-6, 1e-7):
        s = UNLEARN.replace(alpha=alpha)
        e = scores(exact.attribute(q, tmp_path / "exact", s), ids)
        df = lin.attribute(q, tmp_path / "linear", s)
        a = scores(df, ids)
        scale = np.abs(a).max()
        assert scale > 0
        errors.append(np.abs(e - a).max() / scale)
        # the linear score is proportional to alpha
        assert np.isclose(json.loads((tmp_path / "linear" / f"{q.key}.json").read_text())
                          ["alpha"], alpha, rtol=1e-12)
    assert errors[1] < 1e-3, errors
    # the gap is the second-order term: it shrinks with alpha (a wrong first-order term would not)
    assert errors[1] < errors[0] / 4, errors
    table = read_scores(tmp_path / "linear" / f"{q.key}.parquet")
    assert list(table.columns[: len(SCORE_COLUMNS)]) == SCORE_COLUMNS
    assert (table["method"] == "unlearning-linear").all()
    # the log-ratio form reuses the exact method's cached baseline (no second folder)
    assert len(list((tmp_path / "cache").glob("baseline-*"))) == 1


def test_automatic_alpha_is_the_exact_methods_and_projection_keeps_the_ranking(setup, tmp_path):
    ids, q = setup["ids"], setup["query"]
    exact = UnlearningAttributor(setup["task"], setup["model"], "run-a", setup["manifest"],
                                 setup["train"], ids, setup["fisher"], tmp_path / "cache", SCORE,
                                 progress=False)
    exact.attribute(q, tmp_path / "exact", UNLEARN)
    full = linear(setup, tmp_path / "cache")
    a = scores(full.attribute(q, tmp_path / "linear"), ids)
    rec_e = json.loads((tmp_path / "exact" / f"{q.key}.json").read_text())
    rec_l = json.loads((tmp_path / "linear" / f"{q.key}.json").read_text())
    assert rec_l["alpha"] == rec_e["alpha"] and rec_l["query_loss_after"] == pytest.approx(
        rec_e["query_loss_after"], rel=1e-9)
    proj = linear(setup, tmp_path / "cache", dim=2048)
    b = scores(proj.attribute(q, tmp_path / "projected"), ids)
    assert spearmanr(a, b)[0] > 0.9
    # features are stored once and reused: a second attributor computes no shard
    again = linear(setup, tmp_path / "cache", dim=2048)
    c = scores(again.attribute(q, tmp_path / "again"), ids)
    assert again.features()[0].computed_shards == 0 and np.array_equal(b, c)


def test_refuses_several_steps_and_another_runs_fisher(setup, tmp_path):
    lin = linear(setup, tmp_path / "cache")
    with pytest.raises(LinernotesError, match="one Newton step"):
        lin.attribute(setup["query"], tmp_path / "o", UNLEARN.replace(steps=2))
    with pytest.raises(LinernotesError, match="not for this run"):
        LinearUnlearningAttributor(setup["task"], setup["model"], "run-b", setup["manifest"],
                                   setup["train"], setup["ids"], setup["fisher"], tmp_path)
