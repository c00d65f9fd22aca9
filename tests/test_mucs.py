"""MUCS: attribution by mirrored unlearning of the query, scored by the normalised loss skew."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from typer.testing import CliRunner

from linernotes.attribution.front import query_from_spec
from linernotes.attribution.losses import score_of
from linernotes.attribution.methods import make_attributor, setting_keys
from linernotes.attribution.mucs import normalised_difference
from linernotes.attribution.query import Query
from linernotes.attribution.scores import read_scores
from linernotes.cli import app
from linernotes.errors import LinernotesError

from conftest import make_tiny_run

SCORE = {"timesteps": 5, "stride": 200, "score.batch_size": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mucs")
    # 80 steps: enough that full-length tracks sit below L_null (an untrained model's loss),
    # so the bounded ascent has room to act; 12 training tracks
    run, manifest = make_tiny_run(root, n_per_artist=5, steps=80)
    yield {"root": root, "run": run, "manifest": manifest,
           "train": run.train_set(manifest, progress=False)}
    torch.set_num_threads(threads)


def _generated_query(tiny) -> Query:
    """A clip that is no training track: a holdout track's frames under a new key and caption."""
    store, manifest = tiny["train"][0], tiny["manifest"]
    tid = manifest.loc[manifest["split"] == "holdout", "track_id"].iloc[0]
    i = int(store.index_of([tid])[0])
    return Query(key="clip-0001", features=torch.from_numpy(store.features(i)),
                 mask=torch.from_numpy(np.array(store.mask[i], dtype=bool)),
                 caption="a new tune played on sine", source="generated")


def test_normalised_difference_orders_tracks_as_the_log_ratio():
    rng = np.random.default_rng(0)
    before, after = rng.uniform(0.1, 5, 500), rng.uniform(0.1, 5, 500)
    nd = normalised_difference(before, after)
    assert np.all(np.abs(nd) <= 1)
    assert np.array_equal(rankdata(-nd), rankdata(-score_of(before, after, "log-ratio")))
    assert not np.array_equal(rankdata(-nd), rankdata(-score_of(before, after, "delta")))


def test_training_query_raises_its_loss_and_ranks_itself_first(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    store, _, ids = tiny["train"]
    att = make_attributor("mucs", run, manifest, tiny["train"], {**SCORE, "steps": 120},
                          progress=False)
    assert att.kind == "counterfactual"
    baseline = att.base.baseline()
    # the best-fit track: its loss is below L_null, so the bounded ascent can raise it
    q = ids[int(np.argmin(baseline))]
    df = att.attribute(query_from_spec(f"train:{q}", run, store, manifest), tmp_path)
    n = len(ids)
    assert sorted(df["track_id"]) == sorted(ids) and (df["method"] == "mucs").all()
    assert df["rank"].min() == 1 and df["rank"].max() <= n and df["rank"].is_monotonic_increasing
    assert np.isfinite(df["score"]).all() and df["score"].abs().max() <= 1
    by_id = df.set_index("track_id")
    assert np.allclose(by_id.loc[ids, "loss_before"], baseline)
    assert np.allclose(df["score"], normalised_difference(df["loss_before"], df["loss_after"]))
    rec = json.loads((tmp_path / f"{q}.json").read_text())
    assert rec["query_loss"]["after"] > rec["query_loss"]["before"]  # the query was unlearned
    assert rec["query_left_out_of_retain"] and rec["n_retain"] == n - 1
    assert 1 <= rec["steps"] <= 120 and rec["null_loss"] > 0
    assert rec["seconds_unlearn"] > 0 and rec["seconds_score"] > 0
    # self-influence: on this 12-track run the query ranks itself first (short-track queries,
    # whose masked loss already exceeds L_null here, rank lower: ascent is clamped away)
    assert by_id.loc[q, "rank"] <= 2
    [work] = (tmp_path / ".work").glob(f"{q}-mucs-*")
    assert (work / "losses").is_dir() and not (work / "unlearn").exists()  # copy dropped
    assert read_scores(tmp_path / f"{q}.parquet")["track_id"].tolist() == df["track_id"].tolist()


def test_baseline_is_the_one_unlearning_caches(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    mucs = make_attributor("mucs", run, manifest, tiny["train"], SCORE, progress=False)
    before = mucs.base.baseline()
    folders = sorted((run.path / "cache").glob("baseline-*"))
    unl = make_attributor("unlearning", run, manifest, tiny["train"],
                          {**SCORE, "draws": 16, "probe_draws": 8, "fisher.draws": 1},
                          progress=False)
    assert np.array_equal(unl.baseline(), before)
    assert sorted((run.path / "cache").glob("baseline-*")) == folders  # nothing recomputed


def test_stopping_rule_fires_at_the_floor_and_not_below_it(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    query = _generated_query(tiny)
    # L_null below the query's loss: every clamped term sits at the floor -> stop after step 1
    low = make_attributor("mucs", run, manifest, tiny["train"],
                          {**SCORE, "null_loss": 1e-4, "steps": 30}, progress=False)
    low.attribute(query, tmp_path / "low")
    rec = json.loads((tmp_path / "low" / "clip-0001.json").read_text())
    assert rec["steps"] == 1 and rec["stopped"] and "L_null" in rec["stop_reason"]
    assert rec["null_loss"] == 1e-4 and not rec["query_left_out_of_retain"]
    # an unreachable floor: the cap ends it; a rerun (resumable shards) gives identical scores
    high = make_attributor("mucs", run, manifest, tiny["train"],
                           {**SCORE, "null_loss": 1e6, "steps": 4}, progress=False)
    first = high.attribute(query, tmp_path / "high")
    rec = json.loads((tmp_path / "high" / "clip-0001.json").read_text())
    assert rec["steps"] == 4 and not rec["stopped"] and "cap" in rec["stop_reason"]
    again = high.attribute(query, tmp_path / "high")
    assert np.array_equal(first["score"], again["score"])
    assert len(list((tmp_path / "high" / ".work").glob("clip-0001-mucs-*/losses/shard-*"))) >= 1


def test_bad_settings_are_clear_errors(tiny):
    with pytest.raises(LinernotesError, match="stop_at_gap does not apply to mucs"):
        make_attributor("mucs", tiny["run"], tiny["manifest"], tiny["train"],
                        {"stop_at_gap": "true"})
    with pytest.raises(LinernotesError, match="lam must be > 0"):
        make_attributor("mucs", tiny["run"], tiny["manifest"], tiny["train"], {"lam": "0"})
    keys = setting_keys("mucs")
    assert keys["lam"] == 0.2 and keys["tol"] == 0.05 and keys["mask_padding"] is True
    assert keys["timesteps"] == 20 and "score.seed" in keys


def test_attribute_method_mucs_on_the_command_line(tiny, tmp_path):
    ids = tiny["train"][2]
    out = tmp_path / "scores"
    result = CliRunner().invoke(app, [
        "attribute", f"train:{ids[0]}", "--method", "mucs", "--set", "steps=3",
        "--set", "timesteps=3", "--set", "stride=300", "--run", str(tiny["run"].path),
        "--corpus", str(tiny["root"] / "corpus"), "-o", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    df = read_scores(out / f"{ids[0]}.parquet")
    assert (df["method"] == "mucs").all() and len(df) == len(ids)
    assert json.loads((out / f"{ids[0]}.json").read_text())["mucs"]["steps"] == 3
    listed = CliRunner().invoke(app, ["methods", "mucs"])
    assert listed.exit_code == 0 and "--set lam=0.2" in listed.output
