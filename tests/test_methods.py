"""One front door for every attribution method, and the methods-side-by-side views."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from linernotes.attribution.front import attribute_run, query_from_spec
from linernotes.attribution.methods import (
    METHODS,
    make_attributor,
    method_spec,
    resolve_settings,
    setting_keys,
)
from linernotes.attribution.scores import SCORE_COLUMNS, read_scores, score_table, write_scores
from linernotes.cli import app
from linernotes.config import parse_assignments
from linernotes.errors import LinernotesError
from linernotes.evaluation.compare import (
    compare,
    method_correlations,
    rank_distribution,
    read_score_tables,
)
from linernotes.unlearning.newton import UnlearnSettings

from conftest import make_tiny_run

GRADS = {"timesteps": 2, "stride": 300, "query_draws": 8, "batch_size": 4, "shard_size": 4}
FAST = {
    "unlearning": {"draws": 32, "probe_draws": 16, "batch_size": 32, "timesteps": 3,
                   "stride": 300, "score.batch_size": 4, "fisher.draws": 1},
    "trak": {**GRADS, "projection_dim": 64},
    "dtrak": {**GRADS, "projection_dim": 64},
    "tracin": {**GRADS, "projection_dim": 64},
    "fisher-influence": {**GRADS, "projection_dim": 64, "fisher.draws": 1},
    "representer": GRADS,
    "lpips-dit": {"timesteps": "0.3,0.7", "batch_size": 4},
    "dattri-trak": {**GRADS, "projection_dim": 32},
}
for _peer in ("dattri-tracin", "kronfluence-identity", "kronfluence-diagonal",
              "kronfluence-kfac", "kronfluence-ekfac"):
    FAST[_peer] = {**GRADS, "query_draws": 4}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread avoids oversubscription
    root = tmp_path_factory.mktemp("methods")
    run, manifest = make_tiny_run(root, n_per_artist=4)
    yield {"root": root, "run": run, "manifest": manifest, "train": run.train_set(manifest,
                                                                             progress=False)}
    torch.set_num_threads(threads)


def _params():
    for name, spec in METHODS.items():
        why = spec.missing()
        yield pytest.param(name, id=name,
                           marks=[pytest.mark.skipif(why is not None, reason=str(why))])


@pytest.mark.parametrize("name", list(_params()))
def test_every_method_returns_a_valid_score_table(tiny, tmp_path, name):
    run, manifest = tiny["run"], tiny["manifest"]
    store, _, ids = tiny["train"]
    att = make_attributor(name, run, manifest, tiny["train"], FAST.get(name), progress=False)
    assert att.name == name and att.kind == METHODS[name].kind
    query = query_from_spec(f"train:{ids[0]}", run, store, manifest)
    df = att.attribute(query, tmp_path)
    assert len(df) == len(ids) and sorted(df["track_id"]) == sorted(ids)
    assert np.isfinite(df["score"]).all()
    assert df["rank"].min() == 1 and df["rank"].max() <= len(ids)
    assert df["rank"].is_monotonic_increasing and (df["query"] == ids[0]).all()
    assert df["method"].nunique() == 1
    stored = read_scores(tmp_path / f"{ids[0]}.parquet")
    assert list(stored.columns[: len(SCORE_COLUMNS)]) == SCORE_COLUMNS
    assert json.loads((tmp_path / f"{ids[0]}.json").read_text())["query"] == ids[0]


def test_gradient_features_are_stored_under_the_run_and_reused(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    store, _, ids = tiny["train"]
    query = query_from_spec(f"train:{ids[1]}", run, store, manifest)
    settings = {**GRADS, "projection_dim": 48, "seed": 7}
    first = make_attributor("trak", run, manifest, tiny["train"], settings, progress=False)
    a = first.attribute(query, tmp_path / "a")
    assert first.features.computed_shards > 0
    assert first.features.folder.parent == run.path / "cache"
    again = make_attributor("trak", run, manifest, None, settings, progress=False)
    b = again.attribute(query, tmp_path / "b")
    assert again.features.computed_shards == 0  # read back from the run's cache
    assert np.allclose(a["score"], b["score"])


def test_attribute_run_routes_through_the_factory(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    _, _, ids = tiny["train"]
    specs = [f"train:{i}" for i in ids[:2]]
    tables = attribute_run(run, manifest, specs, tmp_path, progress=False, method="chroma-mfcc")
    assert [t["query"][0] for t in tables] == ids[:2]
    assert (tables[0]["method"] == "chroma-mfcc").all()
    with pytest.raises(LinernotesError, match="has no unlearn settings"):
        attribute_run(run, manifest, specs, tmp_path, UnlearnSettings(), method="trak",
                      progress=False)


def test_default_method_is_the_unlearning_attribution_as_before(tiny, tmp_path):
    from linernotes.attribution.losses import ScoreSettings
    from linernotes.attribution.unlearning import UnlearningAttributor
    from linernotes.curvature import FisherSettings, covering_group

    run, manifest = tiny["run"], tiny["manifest"]
    store, train, ids = tiny["train"]
    unlearn = UnlearnSettings(draws=32, probe_draws=16, batch_size=32)
    score = ScoreSettings(timesteps=3, stride=300, batch_size=4)
    [new] = attribute_run(run, manifest, [f"train:{ids[3]}"], tmp_path / "new", unlearn, score,
                          progress=False)
    fisher = run.fisher(manifest, FisherSettings(group=covering_group(unlearn.group)), False)
    by_hand = UnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids, fisher,
                                   run.path / "cache", score, progress=False)
    old = by_hand.attribute(query_from_spec(f"train:{ids[3]}", run, store, manifest),
                            tmp_path / "old", unlearn)
    assert (new["method"] == "unlearning").all()
    pd.testing.assert_frame_equal(new, old)


def test_unknown_method_and_settings_are_clear_errors(tiny):
    with pytest.raises(LinernotesError, match="Did you mean 'tracin'"):
        method_spec("tracim")
    with pytest.raises(LinernotesError, match=r"Unknown setting 'projektion'.*projection_dim"):
        resolve_settings("trak", {"projektion": 1})
    with pytest.raises(LinernotesError, match="Unknown setting 'fisher.nope'.*fisher.draws"):
        resolve_settings("unlearning", {"fisher.nope": 1})
    with pytest.raises(LinernotesError, match="takes no settings"):
        resolve_settings("clap-audio", {"x": 1})
    with pytest.raises(LinernotesError, match="projection_dim takes an integer"):
        resolve_settings("trak", {"projection_dim": "many"})
    with pytest.raises(LinernotesError, match="alpha must be >= 0"):
        resolve_settings("unlearning", {"alpha": "-1"})
    with pytest.raises(LinernotesError, match="key=value"):
        parse_assignments(["alpha"])
    with pytest.raises(LinernotesError, match="Unknown attribution method"):
        make_attributor("nope", tiny["run"], tiny["manifest"])


def test_overrides_reach_the_right_section():
    s = resolve_settings("unlearning", {"alpha": "1e-6", "timesteps": "4", "fisher.draws": "3",
                                        "mask_query": "false", "seed": 5, "score.seed": 6})
    assert s["unlearn"].alpha == 1e-6 and s["unlearn"].mask_query is False
    assert s["unlearn"].seed == 5 and s["score"].seed == 6 and s["score"].timesteps == 4
    assert s["fisher"].draws == 3 and s["fisher"].group == "transformer"
    assert resolve_settings("unlearning", {"group": "all"})["fisher"].group == "all"
    s = resolve_settings("fisher-influence", {"damping": "0.01", "projection_dim": "0"})
    assert s["method"].damping == 0.01 and s["gradients"].projection_dim == 0
    assert resolve_settings("lpips-dit", {"timesteps": "0.2,0.5"})["lpips"].timesteps == (0.2, 0.5)
    assert resolve_settings("kronfluence")["gradients"].projection_dim == 0  # alias
    keys = setting_keys("unlearning")
    assert keys["alpha"] == 0.0 and keys["score.seed"] == 0 and "fisher.draws" in keys


# ---------------------------------------------------------------- the two views


def _tables(tmp_path, manifest, methods: dict[str, callable], n_queries: int = 3):
    """Write score tables of synthetic methods (one folder each); return the folders."""
    rng = np.random.default_rng(0)
    ids = list(manifest["track_id"])
    dirs = []
    for method, fn in methods.items():
        folder = tmp_path / method
        for q in range(n_queries):
            base = np.random.default_rng(q).standard_normal(len(ids))
            df = score_table(f"q{q}", method, ids, fn(base, rng), manifest)
            write_scores(df, folder / f"q{q}.parquet", {"query": f"q{q}", "method": method,
                                                        "run": "r"})
        dirs.append(folder)
    return dirs


def test_rank_distribution_and_correlations(tmp_path, tone_corpus):
    dirs = _tables(tmp_path, tone_corpus, {
        "a": lambda s, r: s,
        "same": lambda s, r: s,
        "neg": lambda s, r: -s,
        "cube": lambda s, r: s**3,
        "noise": lambda s, r: r.standard_normal(len(s)),
    })
    result = compare(dirs, tmp_path / "out")
    dist = result.distribution
    mm = dist[dist["normalisation"] == "min-max"]
    assert mm["mean"].between(0, 1).all() and np.allclose(mm[mm["rank"] == 1]["mean"], 1.0)
    soft = dist[dist["normalisation"] == "softmax"]
    assert np.allclose(soft.groupby("method")["mean"].sum(), 1.0)  # shares sum to 1 per query
    for _, g in dist.groupby(["method", "normalisation"]):
        assert g["mean"].is_monotonic_decreasing and (g["n_queries"] == 3).all()
    p, s = result.correlations["pearson"], result.correlations["spearman"]
    assert np.allclose(np.diag(p), 1.0) and np.allclose(np.diag(s), 1.0)
    assert np.isclose(p.loc["a", "same"], 1.0) and np.isclose(p.loc["a", "neg"], -1.0)
    assert p.loc["a", "cube"] < 0.999 and np.isclose(s.loc["a", "cube"], 1.0)
    assert abs(p.loc["a", "noise"]) < 0.9 and result.n_correlated == 3
    for key in ("distribution_png", "correlation_png", "pearson_csv", "spearman_csv"):
        assert os.path.getsize(result.files[key]) > 0
    back = pd.read_csv(result.files["pearson_csv"], index_col=0)
    assert np.allclose(back.to_numpy(), p.to_numpy())
    # one method alone: the distribution, but no correlation
    alone = read_score_tables(dirs[:1])
    assert len(rank_distribution(alone)) > 0 and method_correlations(alone) == ({}, 0)


def test_compare_refuses_duplicates_and_bad_paths(tmp_path, tone_corpus):
    dirs = _tables(tmp_path, tone_corpus, {"a": lambda s, r: s}, n_queries=1)
    with pytest.raises(LinernotesError, match="two 'a' score tables"):
        compare([dirs[0], dirs[0] / "q0.parquet"], tmp_path / "out")
    with pytest.raises(LinernotesError, match="No score table or folder"):
        compare([tmp_path / "missing"], tmp_path / "out")


def test_cli_methods_and_evaluate_compare(tmp_path, tone_corpus):
    runner = CliRunner()
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and all(name in res.output for name in METHODS)
    res = runner.invoke(app, ["methods", "trak"])
    assert res.exit_code == 0 and "--set projection_dim=2048" in res.output
    dirs = _tables(tmp_path, tone_corpus, {"a": lambda s, r: s, "b": lambda s, r: -s})
    res = runner.invoke(app, ["evaluate", "compare", *map(str, dirs), "-o", str(tmp_path / "o"),
                              "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["correlations"]["pearson"]["a"]["b"] == pytest.approx(-1.0)


def test_cli_attribute_with_a_method(tiny, tmp_path):
    _, _, ids = tiny["train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "linernotes", "attribute", f"train:{ids[2]}",
            "--run", str(tiny["run"].path), "--corpus", str(tiny["root"] / "corpus"),
            "-o", str(tmp_path / "scores")]
    proc = subprocess.run([*base, "--method", "clap-audio", "--top", "3", "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)[0]
    assert len(rows) == 3 and rows[0]["rank"] == 1 and rows[0]["track_id"] == ids[2]
    assert read_scores(tmp_path / "scores" / f"{ids[2]}.parquet")["method"].eq("clap-audio").all()
    res = CliRunner().invoke(app, [*base[3:], "--method", "trak", "--alpha", "1e-6"])
    assert isinstance(res.exception, LinernotesError)
    assert "apply to --method unlearning only" in str(res.exception)


def test_cli_attribute_in_two_stages_says_so(tiny, tmp_path):
    _, _, ids = tiny["train"]
    base = ["attribute", f"train:{ids[1]}", "--run", str(tiny["run"].path), "--corpus",
            str(tiny["root"] / "corpus"), "--draws", "8", "--timesteps", "4", "--stride", "200"]
    res = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "two"), "--candidates", "3"])
    assert res.exit_code == 0, res.output
    assert "Two stages" in res.output and "top 3 " in res.output
    assert read_scores(tmp_path / "two" / f"{ids[1]}.parquet")["exact"].sum() == 3
    res = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "ex"), "--candidates", "3",
                                   "--exact"])
    assert res.exit_code == 0, res.output
    assert "Two stages" not in res.output
    assert read_scores(tmp_path / "ex" / f"{ids[1]}.parquet")["exact"].all()


def test_settings_parse_values_by_their_annotation():
    import dataclasses

    from linernotes.config import Settings

    @dataclasses.dataclass(frozen=True)
    class Example(Settings):
        count: int = 1
        rate: float = 0.5
        flag: bool = False
        limit: int | None = None
        sizes: tuple[int, ...] = (1,)
        name: str = "x"

    assert Example.parse_value("count", " 7 ") == 7
    assert Example.parse_value("rate", "1e-3") == 1e-3
    assert Example.parse_value("flag", "on") is True and Example.parse_value("flag", "no") is False
    assert Example.parse_value("limit", "none") is None and Example.parse_value("limit", "3") == 3
    assert Example.parse_value("sizes", "4, 8") == (4, 8)
    assert Example.parse_value("name", "organ") == "organ"
    for field, text, what in (("count", "many", "an integer"), ("rate", "fast", "a number"),
                              ("flag", "maybe", "true or false"),
                              ("sizes", "a,b", "comma-separated int values")):
        with pytest.raises(ValueError, match=what):
            Example.parse_value(field, text)
