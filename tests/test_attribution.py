import json

import numpy as np
import pandas as pd
import pytest
import torch

from linernotes import device
from linernotes.attribution import losses as losses_mod
from linernotes.attribution.losses import ScoreSettings, sharded_losses, track_losses
from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.curvature import Fisher, FisherSettings, compute_fisher
from linernotes.data.dataset import TrackDataset, collate, split_rows
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.task import draw_noise, fixed_timesteps
from linernotes.unlearning.newton import UnlearnSettings, unlearn_query

from conftest import TINY_FEATURES
from tiny_task import TinyDiTTask

S = TINY_FEATURES
FAST_UNLEARN = UnlearnSettings(draws=64, probe_draws=16, batch_size=32)
FAST_SCORE = ScoreSettings(timesteps=6, stride=150, batch_size=4, shard_size=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tone_corpus

    root = tmp_path_factory.mktemp("attr")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=6)
    store = FeatureStore.open(manifest, S, progress=False)
    rows = split_rows(manifest, "train")
    train = TrackDataset(store, manifest, rows)
    ids = [manifest["track_id"][i] for i in rows]
    task = TinyDiTTask(S.n_frames, S.n_mels)
    model = task.make_model()
    # a short training run so that the model has learned its data
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate([train[k] for k in range(len(train))])
    for step in range(300):
        t, noise = draw_noise(batch["track_id"], [step], task.latent_shape, seed=99)
        loss = task.per_sample_loss(model, batch, t[:, 0], noise[:, 0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fisher = compute_fisher(task, model, train, FisherSettings(draws=2), "run-a", progress=False)
    return dict(manifest=manifest, store=store, train=train, ids=ids, task=task, model=model,
                fisher=fisher, root=root)


def track_query(setup, k: int) -> Query:
    item = setup["train"][k]
    return Query(key=item["track_id"], features=item["features"], mask=item["mask"],
                 caption=item["caption"], track_id=item["track_id"])


def attributor(setup, cache, score=FAST_SCORE):
    return UnlearningAttributor(setup["task"], setup["model"], "run-a", setup["manifest"],
                                setup["train"], setup["ids"], setup["fisher"], cache, score,
                                progress=False)


def test_scores_are_deterministic_and_self_influence_ranks_first(setup, tmp_path):
    att = attributor(setup, tmp_path / "cache")
    ranks = []
    for k in range(len(setup["train"])):
        q = track_query(setup, k)
        df = att.attribute(q, tmp_path / "out", FAST_UNLEARN)
        ranks.append(int(df.set_index("track_id").loc[q.key, "rank"]))
    # self-influence: each track, unlearned, is among its own most credited (chance: 8 of 15)
    assert np.mean(ranks) < 3 and np.mean(np.array(ranks) == 1) >= 0.4, ranks
    again = attributor(setup, tmp_path / "cache2").attribute(track_query(setup, 0),
                                                              tmp_path / "out2", FAST_UNLEARN)
    first = att.attribute(track_query(setup, 0), tmp_path / "out3", FAST_UNLEARN)
    assert np.array_equal(again["score"].to_numpy(), first["score"].to_numpy())
    assert (tmp_path / "out" / f"{track_query(setup, 0).key}.json").exists()


def test_two_stage_scores_the_first_stages_top_tracks_exactly(setup, tmp_path):
    q = track_query(setup, 3)
    exact = attributor(setup, tmp_path / "cache").attribute(q, tmp_path / "exact", FAST_UNLEARN)
    m = 5
    two = attributor(setup, tmp_path / "cache", FAST_SCORE.replace(candidates=m)).attribute(
        q, tmp_path / "two", FAST_UNLEARN)
    assert two["exact"].sum() == m and exact["exact"].all()
    ex, tw = exact.set_index("track_id"), two.set_index("track_id")
    chosen = tw.index[tw["exact"]]
    # the candidates are the first stage's top m, scored exactly as the one-stage pass scores them
    assert set(chosen) == set(tw["coarse_score"].nlargest(m).index)
    np.testing.assert_allclose(tw.loc[chosen, "score"], ex.loc[chosen, "score"], rtol=1e-5,
                               atol=1e-7)
    assert tw.loc[~tw["exact"], ["loss_before", "loss_after"]].isna().all().all()
    # exactly scored tracks rank first, by their exact score; the rest after them
    assert sorted(tw.loc[chosen, "rank"]) == list(range(1, m + 1))
    assert (tw.loc[~tw["exact"], "rank"] > m).all()
    top = tw.loc[chosen].sort_values("rank")
    assert (np.diff(top["score"].to_numpy()) <= 0).all()
    # the first stage is few timesteps spread over the schedule
    assert FAST_SCORE.coarse().timesteps == 1 and FAST_SCORE.coarse().stride == 1000
    four = FAST_SCORE.replace(coarse_timesteps=4).coarse()
    assert (four.timesteps, four.stride, four.batch_size) == (4, 250, 6)
    low = FAST_SCORE.replace(coarse_timesteps=2, coarse_span=0.45).coarse()
    assert fixed_timesteps(low.timesteps, low.stride) == (0.112, 0.337)  # the lower 45%
    with pytest.raises(LinernotesError, match="coarse_span"):
        FAST_SCORE.replace(coarse_span=0.0)
    record = json.loads((tmp_path / "two" / f"{q.key}.json").read_text())
    assert record["two_stage"]["candidates"] == m
    # from an empty cache: only the first stage's baseline is made (not every track's exact
    # one), and the table is the same whatever the cache held before
    alone = attributor(setup, tmp_path / "alone", FAST_SCORE.replace(candidates=m))
    pd.testing.assert_frame_equal(alone.attribute(q, tmp_path / "two-alone", FAST_UNLEARN), two)
    assert len(list((tmp_path / "alone").glob("baseline-*"))) == 1
    alone.baseline_at(FAST_SCORE.coarse())  # "auto" unresolved: the same folder
    assert len(list((tmp_path / "alone").glob("baseline-*"))) == len(alone._baselines) == 1


def test_two_stage_with_every_track_a_candidate_is_exact_attribution(setup, tmp_path):
    q = track_query(setup, 1)
    exact = attributor(setup, tmp_path / "cache").attribute(q, tmp_path / "exact", FAST_UNLEARN)
    for m in (len(setup["ids"]), 10_000):
        all_in = attributor(setup, tmp_path / "cache", FAST_SCORE.replace(candidates=m)
                            ).attribute(q, tmp_path / f"m{m}", FAST_UNLEARN)
        pd.testing.assert_frame_equal(all_in, exact)
    with pytest.raises(LinernotesError, match="candidates must be >= 0"):
        FAST_SCORE.replace(candidates=-1)


def test_large_training_sets_get_two_stages_by_default(setup, tmp_path, monkeypatch):
    n = len(setup["ids"])
    s = ScoreSettings()
    assert s.candidates_for(losses_mod.TWO_STAGE_FROM - 1) == losses_mod.TWO_STAGE_FROM - 1
    big = 100_000
    assert s.candidates_for(big) == max(losses_mod.AUTO_MIN_CANDIDATES,
                                        int(losses_mod.AUTO_CANDIDATE_SHARE * big))
    assert s.replace(exact=True).candidates_for(big) == big
    assert s.replace(candidates=7).candidates_for(big) == 7
    # a training set above the threshold (lowered here) is scored in two stages unless exact
    monkeypatch.setattr(losses_mod, "TWO_STAGE_FROM", n // 2)
    monkeypatch.setattr(losses_mod, "AUTO_MIN_CANDIDATES", 4)
    monkeypatch.setattr(losses_mod, "AUTO_CANDIDATE_SHARE", 0.0)
    q = track_query(setup, 2)
    auto = attributor(setup, tmp_path / "cache").attribute(q, tmp_path / "auto", FAST_UNLEARN)
    assert auto["exact"].sum() == 4
    exact = attributor(setup, tmp_path / "cache", FAST_SCORE.replace(exact=True)).attribute(
        q, tmp_path / "exact", FAST_UNLEARN)
    assert exact["exact"].all()


def test_a_query_scored_again_is_not_unlearned_again(setup, tmp_path, monkeypatch):
    from linernotes.attribution import unlearning as unlearning_mod

    calls = []
    real = unlearning_mod.unlearn_query
    monkeypatch.setattr(unlearning_mod, "unlearn_query",
                        lambda *a, **k: calls.append(a[2].key) or real(*a, **k))
    att = attributor(setup, tmp_path / "cache")
    q = track_query(setup, 1)
    first = att.attribute(q, tmp_path / "a", FAST_UNLEARN)
    att.score = FAST_SCORE.replace(candidates=3)  # other score settings, the same unlearning
    att.attribute(q, tmp_path / "b", FAST_UNLEARN)
    assert calls == [q.key]
    # another caption under the same key is another query; so are other unlearning settings
    att.attribute(Query(q.key, q.features, q.mask, q.caption + " (2)"), tmp_path / "c",
                  FAST_UNLEARN)
    att.score = FAST_SCORE
    again = att.attribute(q, tmp_path / "d", FAST_UNLEARN.replace(seed=FAST_UNLEARN.seed + 1))
    assert calls == [q.key] * 3
    assert not np.array_equal(first["score"].to_numpy(), again["score"].to_numpy())


def test_scores_do_not_change_with_batch_size(setup):
    a = track_losses(setup["task"], setup["model"], setup["train"], FAST_SCORE)
    other = FAST_SCORE.replace(batch_size=7)
    b = track_losses(setup["task"], setup["model"], setup["train"], other)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_scoring_is_close_to_float32_and_keyed_apart(setup, tmp_path):
    f32 = FAST_SCORE.replace(precision="float32")
    a = track_losses(setup["task"], setup["model"], setup["train"], f32)
    bf16 = FAST_SCORE.replace(precision="bfloat16")
    b = track_losses(setup["task"], setup["model"], setup["train"], bf16)
    assert not np.array_equal(a, b)  # autocast did run in bfloat16
    np.testing.assert_allclose(b, a, rtol=0.05)  # bfloat16 keeps 8 bits of mantissa
    assert f32.draw_key() == {k: v for k, v in bf16.draw_key().items() if k != "precision"}
    sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"], f32,
                   tmp_path / "l", {"run": "a"}, progress=False)
    with pytest.raises(LinernotesError, match="other inputs"):  # float32 losses are not reused
        sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"], bf16,
                       tmp_path / "l", {"run": "a"}, progress=False)
    with pytest.raises(LinernotesError, match="precision"):
        ScoreSettings(precision="float16")


def test_auto_precision_is_the_devices_and_keys_as_resolved(setup, tmp_path, monkeypatch):
    task, model = setup["task"], setup["model"]
    native = device.fast_bfloat16(device.of(model))
    resolved = ScoreSettings(precision="auto").on(task, model)
    assert ScoreSettings().precision == "auto"
    assert resolved.precision == ("bfloat16" if native else "float32")
    assert resolved.on(task, model) == resolved and FAST_SCORE.replace(precision="float32").on(
        task, model).precision == "float32"
    monkeypatch.setattr(task, "bfloat16_scoring", False)  # a task that scores in float32
    assert ScoreSettings(precision="auto").on(task, model).precision == "float32"
    monkeypatch.undo()
    AUTO = FAST_SCORE.replace(precision="auto")
    auto = track_losses(setup["task"], model, setup["train"], AUTO)
    same = track_losses(setup["task"], model, setup["train"], AUTO.on(task, model))
    np.testing.assert_array_equal(auto, same)
    # a folder written under "auto" is the resolved precision's folder (and not "auto"'s)
    sharded_losses(setup["task"], model, setup["train"], setup["ids"], AUTO,
                   tmp_path / "l", {"run": "a"}, progress=False)
    sharded_losses(setup["task"], model, setup["train"], setup["ids"], AUTO.on(task, model),
                   tmp_path / "l", {"run": "a"}, progress=False)
    other = "float32" if native else "bfloat16"
    with pytest.raises(LinernotesError, match="other inputs"):
        sharded_losses(setup["task"], model, setup["train"], setup["ids"],
                       FAST_SCORE.replace(precision=other), tmp_path / "l", {"run": "a"},
                       progress=False)


def test_killed_scoring_resumes_with_identical_losses(setup, tmp_path, monkeypatch):
    full = sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"], FAST_SCORE,
                          tmp_path / "ref", {"run": "a"}, progress=False)
    calls = {"n": 0}
    real = losses_mod.track_losses

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(losses_mod, "track_losses", dying)
    with pytest.raises(KeyboardInterrupt):
        sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"], FAST_SCORE,
                       tmp_path / "run", {"run": "a"}, progress=False)
    assert len(list((tmp_path / "run").glob("shard-*.npy"))) == 2
    calls["n"] = -100  # no more deaths
    resumed = sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"],
                             FAST_SCORE, tmp_path / "run", {"run": "a"}, progress=False)
    assert np.array_equal(resumed, full)
    # a folder made for other inputs is refused
    with pytest.raises(LinernotesError, match="other inputs"):
        sharded_losses(setup["task"], setup["model"], setup["train"], setup["ids"], FAST_SCORE,
                       tmp_path / "run", {"run": "b"}, progress=False)


def test_masked_loss_ignores_padding(setup):
    task, model = setup["task"], setup["model"]
    item = setup["train"][0]
    assert not item["mask"].all()  # this track is padded
    batch = collate([item])
    t, noise = draw_noise(batch["track_id"], [0], task.latent_shape)
    changed = collate([dict(item, features=item["features"].clone())])
    changed["features"][0, ~item["mask"]] = 5.0
    with torch.no_grad():
        a = task.per_sample_loss(model, batch, t[:, 0], noise[:, 0], mask_padding=True)
        b = task.per_sample_loss(model, changed, t[:, 0], noise[:, 0], mask_padding=True)
        c = task.per_sample_loss(model, changed, t[:, 0], noise[:, 0], mask_padding=False)
    # attention mixes frames, so padding content can still move real frames' predictions a little;
    # what masking guarantees is that padded frames' own errors are excluded
    assert abs(float(a - b)) < abs(float(a - c))


def test_fisher_from_another_run_is_refused(setup, tmp_path):
    path = tmp_path / "fisher.safetensors"
    setup["fisher"].save(path)
    assert Fisher.load(path, run_hash="run-a").n_examples == setup["fisher"].n_examples
    with pytest.raises(LinernotesError, match="computed for run"):
        Fisher.load(path, run_hash="run-b")


def test_zero_fisher_entries_are_damped_and_reported(setup):
    f = setup["fisher"]
    diag = {n: v.clone() for n, v in f.diag.items()}
    name = next(iter(diag))
    diag[name].view(-1)[:3] = 0
    zeroed = Fisher(diag, f.settings, f.run_hash, f.n_examples)
    inv, info = zeroed.damped_inverse(0.0)
    assert info["zero_entries"] >= 3 and info["lambda"] > 0
    assert all(torch.isfinite(v).all() for v in inv.values())


def test_nan_query_is_a_clear_error(setup):
    q = track_query(setup, 0)
    q.features = q.features.clone()
    q.features[0, 0] = float("nan")
    with pytest.raises(LinernotesError, match="Non-finite"):
        unlearn_query(setup["task"], setup["model"], q, setup["fisher"], FAST_UNLEARN, 10)


def test_group_outside_the_fisher_is_refused(setup):
    narrow = compute_fisher(setup["task"], setup["model"], setup["train"],
                            FisherSettings(group="cross_attn_kv", samples=3, draws=1), "run-a",
                            progress=False)
    with pytest.raises(LinernotesError, match="Recompute"):
        unlearn_query(setup["task"], setup["model"], track_query(setup, 0), narrow,
                      FAST_UNLEARN, 10)


def test_unlearning_raises_query_loss_to_target(setup):
    _, rec = unlearn_query(setup["task"], setup["model"], track_query(setup, 3), setup["fisher"],
                           FAST_UNLEARN, len(setup["ids"]))
    assert rec["alpha"] > 0
    assert abs(rec["ratio"] - FAST_UNLEARN.target_ratio) < 0.05
