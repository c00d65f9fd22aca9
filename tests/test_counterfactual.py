"""Counterfactual evaluation: the retrain cache, leave-K-out, LDS and the grid search."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from linernotes.attribution.front import query_from_spec
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.scores import score_table, write_scores
from linernotes.clips import generate
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.evaluation.counterfactual import (
    RANDOM,
    EvalDraws,
    leave_k_out,
    random_k_ids,
    resolve_k,
)
from linernotes.evaluation.grid import SelfRankMetric, best_point, grid_points, grid_search
from linernotes.evaluation.lds import (
    LdsData,
    LdsSettings,
    lds_from_losses,
    lds_summary,
    lds_table,
    random_subsets,
    subset_losses,
)
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.run import BudgetExhausted, Retrainer, load_run, retrain_record
from linernotes.training import TrainSettings
from linernotes.unlearning.newton import UnlearnSettings

from conftest import TINY_FEATURES, make_tone_corpus

TINY_DIT = DenoiserConfig(layers=1, heads=2, head_dim=16, kv_heads=1, cross_dim=32,
                          time_proj_dim=32, max_words=12)
TINY_CLAP = ClapSettings(dim=32, hidden=32, layers=2, steps=20, batch_size=8,
                         checkpoint_every=1000)
TINY_TRAIN = TrainSettings(steps=12, batch_size=8, lr=2e-3, warmup=3, checkpoint_every=5)
DRAWS = EvalDraws(timesteps=4, stride=200, noises=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three artists x 4 tone tracks (9 train, 3 holdout), a tiny run and two queries."""
    root = tmp_path_factory.mktemp("cf")
    manifest = make_tone_corpus(root / "corpus")
    store = FeatureStore.open(manifest, TINY_FEATURES, progress=False, workers=1)
    run = train(manifest, root / "run", TINY_TRAIN, TINY_DIT, TINY_FEATURES,
                clap_settings=TINY_CLAP, progress=False)
    clip = generate(run, ["Morning, a tune by Alpha played on sine"], root / "clips", seeds=3,
                    settings=GenerateSettings(steps=3, griffin_lim_iters=2), progress=False)[0]
    queries = [query_from_spec(str(clip), run, store, manifest),
               query_from_spec("train:beta-00", run, store, manifest)]
    ids = manifest.loc[manifest["split"] == "train", "track_id"].tolist()
    rng = np.random.default_rng(5)
    scores = pd.concat([score_table(q.key, "m1", ids, rng.normal(size=len(ids)), manifest)
                        for q in queries])
    return {"root": root, "manifest": manifest, "run": run, "queries": queries, "ids": ids,
            "scores": scores}


def test_resolve_k_fractions_and_counts():
    assert resolve_k(0.02, 200) == 4 and resolve_k("0.001", 200) == 1 and resolve_k(3, 200) == 3
    for bad in (0, -1, 2.5, 200, "x"):
        with pytest.raises(LinernotesError):
            resolve_k(bad, 200)


def test_leave_k_out_removes_the_named_tracks_caches_and_resumes(setup, tmp_path):
    run, df, queries, scores = setup["run"], setup["manifest"], setup["queries"], setup["scores"]
    cache = setup["root"] / "retrains"
    q = queries[0]
    expected_top = (scores[scores["query"] == q.key].sort_values("score", ascending=False)
                    ["track_id"].head(2).tolist())
    # killed after one retrain: a budget of 1 stops cleanly and says how many are left
    first = leave_k_out(run, df, [q], scores, [2], tmp_path / "lko",
                        Retrainer(run, df, cache, budget=1), DRAWS, log=None)
    assert len(first) == 1 and first.attrs["retrains_left"] == 1
    full = leave_k_out(run, df, [q], scores, [2], tmp_path / "lko", Retrainer(run, df, cache),
                       DRAWS, log=None)
    assert list(full["method"]) == ["m1", RANDOM] and full.attrs["retrains_left"] == 0
    top = full.iloc[0]
    assert json.loads(top["excluded"]) == sorted(expected_top)
    retrained = load_run(cache / top["retrain"])
    assert list(retrained.config["train"]["exclude"]) == sorted(expected_top)
    assert retrain_record(retrained)["excluded"] == sorted(expected_top)
    assert retrained.config["clap_hash"] == run.config["clap_hash"]  # the same conditioning
    rand = full.iloc[1]
    assert json.loads(rand["excluded"]) == random_k_ids(setup["ids"], 2, q.key, seed=0)
    assert random_k_ids(setup["ids"], 2, q.key, 0) == random_k_ids(setup["ids"], 2, q.key, 0)
    assert np.isfinite(full[["delta_loss", "delta_gen", "delta_gen_clap"]].to_numpy()).all()
    assert (full["delta_gen"] > 0).all()  # the regenerated clip changed
    # the same request is served from the cache (a zero budget would refuse a new retrain)
    zero = Retrainer(run, df, cache, budget=0)
    again = zero(list(reversed(expected_top)))
    assert again.path == retrained.path and zero.started == 0
    assert Retrainer(run, df, cache)(expected_top).hash == retrained.hash
    with pytest.raises(BudgetExhausted):
        zero(setup["ids"][:3])
    # a rerun reads the cached rows; a fresh folder recomputes identical numbers
    rerun = leave_k_out(run, df, [q], scores, [2], tmp_path / "lko", zero, DRAWS, log=None)
    pd.testing.assert_frame_equal(rerun, full)
    fresh = leave_k_out(run, df, [q], scores, [2], tmp_path / "lko2", zero, DRAWS, log=None)
    pd.testing.assert_frame_equal(fresh.drop(columns="seconds_retrain"),
                                  full.drop(columns="seconds_retrain"))


def test_leave_k_out_rejects_foreign_tracks_and_unknown_ids(setup, tmp_path):
    run, df = setup["run"], setup["manifest"]
    bad = setup["scores"].copy()
    bad.loc[bad["score"].idxmax(), "track_id"] = "alpha-03"  # a holdout track
    with pytest.raises(LinernotesError, match="not trained on|twice"):
        leave_k_out(run, df, setup["queries"][:1], bad, [1], tmp_path, draws=DRAWS, log=None)
    with pytest.raises(LinernotesError, match="not among its training tracks"):
        Retrainer(run, df, tmp_path).key(["alpha-03"])


def test_lds_of_the_true_linear_model_is_one_and_of_random_scores_zero():
    rng = np.random.default_rng(0)
    n, m, q = 120, 40, 16
    subsets = random_subsets(n, m, 0.5, seed=1)
    assert (subsets.sum(1) == 60).all()
    assert np.array_equal(subsets, random_subsets(n, m, 0.5, seed=1))
    w = rng.gamma(1.0, size=(q, n))  # each track's (helpful) effect on each query's loss
    actual = 5.0 - subsets @ w.T + 0.05 * rng.standard_normal((m, q))  # including helps
    assert lds_from_losses(subsets, actual, w).min() > 0.95
    assert lds_from_losses(subsets, actual, -w).max() < -0.95  # the sign convention matters
    random_lds = lds_from_losses(subsets, actual, rng.standard_normal((q, n)))
    assert abs(random_lds.mean()) < 0.12
    # the DataFrame path: score tables in, per-method LDS out
    ids = [f"t{i}" for i in range(n)]
    keys = [f"q{j}" for j in range(q)]
    tables = pd.DataFrame([{"method": meth, "query": keys[j], "track_id": ids[i], "score": s[j, i]}
                           for meth, s in (("true", w), ("noise", rng.standard_normal((q, n))))
                           for j in range(q) for i in range(n)])
    data = LdsData(ids, subsets, keys, actual, np.empty((1, 0, q)), np.empty((1, q)))
    summary = lds_summary(lds_table(data, tables), data).set_index("method")
    assert summary.loc["true", "lds"] > 0.95 and abs(summary.loc["noise", "lds"]) < 0.15


def test_lds_subset_models_and_ceiling_resume(setup, tmp_path):
    run, df, queries = setup["run"], setup["manifest"], setup["queries"]
    s = LdsSettings(subsets=3, extra_seeds=1, paired_subsets=0)
    cache = setup["root"] / "retrains"
    part = subset_losses(run, df, queries, tmp_path, s, Retrainer(run, df, cache, budget=1),
                         DRAWS, log=None)
    assert part.retrains_left >= 1 and not part.complete
    data = subset_losses(run, df, queries, tmp_path, s, Retrainer(run, df, cache), DRAWS,
                         log=None)
    assert data.complete and data.losses.shape == (3, 2) and data.full.shape == (2, 2)
    assert np.isfinite(data.full).all() and not np.allclose(data.full[0], data.full[1])
    again = subset_losses(run, df, queries, tmp_path, s, Retrainer(run, df, cache, budget=0),
                          DRAWS, log=None)
    assert np.array_equal(again.losses, data.losses)
    table = lds_table(data, setup["scores"])
    assert set(table["method"]) == {"m1"} and len(table) == 2


def test_grid_search_resumes_and_refuses_evaluated_queries(setup, tmp_path):
    run, df = setup["run"], setup["manifest"]
    metric = SelfRankMetric(run, df, ["alpha-00", "gamma-01"])
    base = UnlearnSettings(draws=16, probe_draws=8, batch_size=16)
    points = grid_points({"mask_query": [True, False], "mask_train": [False]}, base,
                         ScoreSettings(timesteps=3, stride=300, batch_size=8))
    assert len(points) == 2 and points[1][0].mask_query is False
    calls = []

    def counted(unlearn, score, out):
        calls.append(unlearn.mask_query)
        return metric(unlearn, score, out)

    counted.primary, counted.higher_is_better = metric.primary, metric.higher_is_better
    counted.query_keys, counted.key = metric.query_keys, metric.key
    table = grid_search(points, counted, tmp_path / "grid", log=None)
    assert len(table) == 2 and len(calls) == 2
    assert table["mean_self_rank"].between(1, 9).all()
    assert list(table["mean_self_rank"]) == sorted(table["mean_self_rank"])
    again = grid_search(points, counted, tmp_path / "grid", log=None)
    assert len(calls) == 2  # every row came from the cache
    pd.testing.assert_frame_equal(again, table)
    assert best_point(table)[0].mask_query == bool(table.iloc[0]["mask_query"])
    with pytest.raises(LinernotesError, match="evaluated"):
        grid_search(points, metric, tmp_path / "g2", evaluated=["alpha-00"], log=None)
    with pytest.raises(LinernotesError, match="Unknown grid axis"):
        grid_points({"colour": [1]})


def test_cli_leave_k_out_reads_score_folders(setup, tmp_path):
    from typer.testing import CliRunner

    from linernotes.cli import app

    q = setup["queries"][1]
    folder = tmp_path / "scores"
    write_scores(setup["scores"][setup["scores"]["query"] == q.key], folder / f"{q.key}.parquet")
    corpus = setup["root"] / "corpus"
    res = CliRunner().invoke(app, [
        "evaluate", "leave-k-out", "train:beta-00", "--run", str(setup["run"].path),
        "--corpus", str(corpus), "--scores", str(folder), "--k", "1", "--no-random",
        "--timesteps", "4", "--stride", "200", "--noises", "2", "--no-generation",
        "--retrains", str(setup["root"] / "retrains"), "--out", str(tmp_path / "lko")])
    assert res.exit_code == 0, res.output
    out = pd.read_parquet(tmp_path / "lko" / "leave_k_out.parquet")
    assert list(out["method"]) == ["m1"] and out["k"].tolist() == [1]
    assert "delta_loss" in res.output
