"""Artist-level credit: groups, cached group unlearning, credit tables, LOGO and its metrics."""

from __future__ import annotations

import math
import shutil
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from linernotes.attribution.front import query_from_spec
from linernotes.attribution.scores import score_table, write_scores
from linernotes.cli import app
from linernotes.credit import (
    CreditSettings,
    credit,
    evaluate_credit,
    group_models,
    groups,
    logo_runs,
    ranking_metrics,
    read_credit,
)
from linernotes.credit.baselines import summed_scores
from linernotes.credit.calibrate import reference_ids
from linernotes.credit.logo import FULL
from linernotes.credit.tables import positive_shares
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import write_manifest
from linernotes.errors import LinernotesError
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.reference import train
from linernotes.run import load_run
from linernotes.training import TrainSettings

from conftest import TINY_FEATURES, make_tone_corpus

TINY_DIT = DenoiserConfig(
    layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=32, time_proj_dim=32, max_words=12
)
TINY_CLAP = ClapSettings(dim=32, hidden=32, layers=2, steps=30, batch_size=16,
                         checkpoint_every=1000)
TINY_TRAIN = TrainSettings(steps=30, batch_size=8, lr=2e-3, warmup=5, checkpoint_every=100,
                           exclude=("alpha-00",))
SCORE = CreditSettings(timesteps=4, stride=200, elbo_timesteps=4, elbo_noise=1)
NEWTON = {"draws": 4}
GRAD_DIFF = {"steps": 2, "batch_size": 4, "retain_batch_size": 4, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three artists x 5 tone tracks (4 train + 1 holdout), one train track excluded."""
    root = tmp_path_factory.mktemp("credit")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=5)
    FeatureStore.open(manifest, TINY_FEATURES, progress=False, workers=1)
    run = train(manifest, root / "run", TINY_TRAIN, TINY_DIT, TINY_FEATURES,
                clap_settings=TINY_CLAP, progress=False)
    store = run.feature_store(manifest, progress=False)
    queries = [query_from_spec(f"train:{t}", run, store, manifest)
               for t in ("beta-04", "gamma-01")]
    return {"root": root, "manifest": manifest, "run": run, "queries": queries}


# ---------------------------------------------------------------- groups


def test_groups_partition_the_training_set_exactly(setup):
    df, run = setup["manifest"], setup["run"]
    parts = groups(df, run, "artist")
    assert list(parts) == ["Alpha", "Beta", "Gamma"]
    flat = [t for ids in parts.values() for t in ids]
    train_ids = set(df.loc[df["split"] == "train", "track_id"]) - {"alpha-00"}
    assert len(flat) == len(set(flat)) and set(flat) == train_ids
    assert parts["Alpha"] == ["alpha-01", "alpha-02", "alpha-03"]
    assert groups(df, run, "instrument") == {"sine": sorted(train_ids)}
    titled = groups(df, run, "title")
    assert sum(map(len, titled.values())) == len(train_ids) and "River" in titled


def test_missing_values_form_their_own_group(setup, tmp_path):
    df = setup["manifest"].copy()
    df.loc[df["track_id"] == "beta-01", "collection"] = pd.NA
    df.loc[df["track_id"] != "beta-01", "collection"] = "Tones"
    parts = groups(df, setup["run"], "collection")
    assert parts["(none)"] == ["beta-01"] and "beta-01" not in parts["Tones"]


def test_unknown_column_is_a_clear_error(setup):
    with pytest.raises(LinernotesError, match=r"no such column.*artist.*instrument"):
        groups(setup["manifest"], setup["run"], "composer")
    with pytest.raises(LinernotesError, match="Unknown credit method 'newtn'"):
        credit(setup["run"], setup["manifest"], setup["queries"], "newtn", score=SCORE,
               progress=False)


# ---------------------------------------------------------------- cached group models


def test_group_models_are_cached_reused_and_invalidated(setup):
    df, run = setup["manifest"], setup["run"]
    first = group_models(run, df, "artist", "newton", NEWTON, progress=False)
    assert [g.group for g in first] == ["Alpha", "Beta", "Gamma"]
    assert not any(g.cached for g in first)
    stamp = {g.group: (g.folder / "delta.safetensors").stat().st_mtime_ns for g in first}
    again = group_models(run, df, "artist", "newton", NEWTON, progress=False)
    assert all(g.cached for g in again)
    assert {g.group: (g.folder / "delta.safetensors").stat().st_mtime_ns for g in again} == stamp
    other = group_models(run, df, "artist", "newton", {**NEWTON, "target_ratio": 1.3},
                         progress=False)
    assert not any(g.cached for g in other) and other[0].folder != first[0].folder
    assert all(g.record["alpha"] > 0 for g in first)
    optouts = group_models(run, df, "artist", "grad_diff", GRAD_DIFF, progress=False)
    assert not any(g.cached for g in optouts)
    assert all(g.cached for g in group_models(run, df, "artist", "grad_diff", GRAD_DIFF,
                                              progress=False))
    rec = optouts[1].record
    assert rec["group"] == "Beta" and rec["n_tracks"] == 4 and rec["seconds"] > 0


def test_group_models_are_invalidated_when_the_run_changes(setup, tmp_path):
    df = setup["manifest"]
    path = tmp_path / "run"
    shutil.copytree(setup["run"].path, path, ignore=shutil.ignore_patterns("credit"))
    run = load_run(path, manifest=df)
    assert not any(g.cached for g in group_models(run, df, "artist", "newton", NEWTON,
                                                  progress=False))
    for name in ("config.json", "model.safetensors"):
        (path / name).unlink()
    shutil.rmtree(path / "fisher")  # fisher_for refuses another run's Fisher (not credit's job)
    retrained = train(df, path, TINY_TRAIN.replace(steps=12), TINY_DIT, TINY_FEATURES,
                      clap_settings=TINY_CLAP, progress=False)
    assert retrained.hash != run.hash
    models = group_models(retrained, df, "artist", "newton", NEWTON, progress=False)
    assert not any(g.cached for g in models)
    assert {p.name for p in (path / "credit" / "artist").iterdir()} == {models[0].folder.parent
                                                                        .name}


# ---------------------------------------------------------------- credit tables


def _check_table(t: pd.DataFrame, query: str, method: str) -> None:
    assert t["group"].tolist() == sorted(t["group"], key=lambda g: (t.set_index("group")
                                                                    .loc[g, "rank"], g))
    assert sorted(t["group"]) == ["Alpha", "Beta", "Gamma"] and (t["query"] == query).all()
    assert (t["method"] == method).all() and (t["by"] == "artist").all()
    assert math.isclose(t["share"].sum(), 1.0) and math.isclose(t["softmax"].sum(), 1.0)
    assert (t["share"] >= 0).all() and np.isfinite(t["score"]).all()
    assert t["rank"].iloc[0] == 1 and t["score"].iloc[0] == t["score"].max()
    assert t["n_tracks"].tolist() == [{"Alpha": 3, "Beta": 4, "Gamma": 4}[g] for g in t["group"]]


def test_credit_tables_are_valid_and_written(setup, tmp_path):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"]
    tables = credit(run, df, qs, "newton", settings=NEWTON, score=SCORE, out_dir=tmp_path,
                    progress=False)
    for q, t in zip(qs, tables):
        _check_table(t, q.key, "newton")
        assert np.allclose(t["score"], t["loss_after"] - t["loss_before"])
        assert t["elbo"].notna().all()
        back = read_credit(tmp_path / f"{q.key}.newton.parquet")
        pd.testing.assert_frame_equal(back, t)
    clap = credit(run, df, qs, "clap-centroid", score=SCORE, progress=False)
    for q, t in zip(qs, clap):
        _check_table(t, q.key, "clap-centroid")
        assert (t["score"].abs() <= 1 + 1e-9).all()


def test_summed_baselines_add_up_the_track_scores(setup, tmp_path):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"][:1]
    parts = groups(df, run, "artist")
    ids = [t for g in parts.values() for t in g]
    track = score_table(qs[0].key, "unlearning", ids, np.arange(len(ids), dtype=float), df)
    got = credit(run, df, qs, "unlearning-sum", score=SCORE, progress=False,
                 track_tables={qs[0].key: track})[0]
    _check_table(got, qs[0].key, "unlearning-sum")
    assert got.set_index("group")["score"].to_dict() == summed_scores(track, parts)
    assert got.set_index("group").loc["Gamma", "score"] == sum(range(7, 11))
    with pytest.raises(LinernotesError, match="lacks 1 training track"):
        summed_scores(track.iloc[1:], parts)
    grads = {"projection_dim": 32, "timesteps": 2, "stride": 400, "query_draws": 4}
    trak = credit(run, df, qs, "trak-sum", settings=grads, score=SCORE, progress=False)[0]
    _check_table(trak, qs[0].key, "trak-sum")


def test_calibrated_credit_takes_each_groups_reference_change_off(setup):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"]
    parts = groups(df, run, "artist")
    raw = credit(run, df, qs, "newton", settings=NEWTON, score=SCORE, progress=False)
    cal_score = SCORE.replace(reference_tracks=2)
    cal = credit(run, df, qs, "newton", settings=NEWTON, score=cal_score, progress=False)
    refs = reference_ids(parts, 2)
    assert refs == [t for g in parts for t in sorted(parts[g])[-2:]]
    store = run.feature_store(df, progress=False)
    ref_q = [query_from_spec(f"train:{t}", run, store, df) for t in refs]
    on_refs = credit(run, df, ref_q, "newton", settings=NEWTON, score=SCORE, progress=False)
    for g in parts:  # the offset is the median change over the reference tracks
        changes = [t.set_index("group").loc[g, "score"] for t in on_refs]
        offset = cal[0].set_index("group").loc[g, "offset"]
        assert math.isclose(offset, float(np.median(changes)), rel_tol=1e-4, abs_tol=1e-7)
    for a, b in zip(raw, cal):
        a, b = a.set_index("group"), b.set_index("group")
        assert np.allclose(b["score"], a["score"] - b["offset"])
        assert np.allclose(b["elbo"], a["elbo"])  # the ELBO-style change is not calibrated
        assert math.isclose(b["share"].sum(), 1.0)
    assert cal[0].attrs["record"]["seconds_calibration"] > 0
    again = credit(run, df, qs, "newton", settings=NEWTON, score=cal_score, progress=False)
    assert again[0].attrs["record"]["seconds_calibration"] == cal[0].attrs["record"][
        "seconds_calibration"]  # read back from the cache


def test_positive_shares():
    assert np.allclose(positive_shares([2.0, -1.0, 6.0]), [0.25, 0.0, 0.75])
    assert np.allclose(positive_shares([-2.0, -1.0]), [0.5, 0.5])


# ---------------------------------------------------------------- LOGO and the metrics


def test_logo_excludes_exactly_each_group(setup):
    df, run = setup["manifest"], setup["run"]
    parts = groups(df, run, "artist")
    retrained = logo_runs(run, df, "artist", progress=False)
    assert list(retrained) == list(parts)
    for name, (r, seconds) in retrained.items():
        assert sorted(r.config["train"]["exclude"]) == sorted(["alpha-00", *parts[name]])
        assert r.config["train"]["seed"] == run.config["train"]["seed"] and seconds > 0
        rest = {k: v for k, v in r.config["train"].items() if k != "exclude"}
        assert rest == {k: v for k, v in run.config["train"].items() if k != "exclude"}
    again = logo_runs(run, df, "artist", progress=False)
    assert {g: r.hash for g, (r, _) in again.items()} == {g: r.hash for g, (r, _) in
                                                           retrained.items()}
    with pytest.raises(LinernotesError, match="No group 'Delta'"):
        logo_runs(run, df, "artist", progress=False, only=["Delta"])


def test_seed_averaged_logo_is_the_mean_of_each_seeds_change(setup):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"]
    parts = groups(df, run, "artist")
    one = credit(run, df, qs, "logo", score=SCORE, progress=False)
    two = credit(run, df, qs, "logo", score=SCORE, progress=False, settings={"seeds": 2})
    seed = run.config["train"]["seed"]
    assert two[0].attrs["record"]["seeds"] == [seed, seed + 1]
    for a, b in zip(one, two):
        a, b = a.set_index("group"), b.set_index("group")
        # the recipe seed's change is the one-seed LOGO score, bit for bit
        assert (b[f"seed_{seed}"] == a["score"]).all()
        assert np.allclose(b["score"], (b[f"seed_{seed}"] + b[f"seed_{seed + 1}"]) / 2)
        assert not np.allclose(b[f"seed_{seed}"], b[f"seed_{seed + 1}"])  # seeds differ
        assert math.isclose(b["share"].sum(), 1.0)
        assert ((b["share_low"] <= b["share"] + 1e-12) & (b["share"] <= b["share_high"] + 1e-12)
                ).all()
    # seed 1: every group's model and the full model, trained with seed 1 on the right tracks
    at1 = logo_runs(run, df, "artist", progress=False, seed=seed + 1, full=True)
    assert at1[FULL][0].config["train"]["seed"] == seed + 1
    assert sorted(at1[FULL][0].config["train"]["exclude"]) == ["alpha-00"]
    for name, ids in parts.items():
        cfg = at1[name][0].config["train"]
        assert cfg["seed"] == seed + 1 and sorted(cfg["exclude"]) == sorted(["alpha-00", *ids])
    assert logo_runs(run, df, "artist", progress=False, full=True)[FULL][0] is run
    with pytest.raises(LinernotesError, match="seeds must be >= 1"):
        credit(run, df, qs, "logo", score=SCORE, progress=False, settings={"seeds": 0})


def test_ranking_metrics_on_hand_made_rankings():
    gold = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    same = ranking_metrics({"a": 40, "b": 30, "c": 20, "d": 10}, gold)
    assert same == {"top1": 1.0, "ndcg": 1.0, "ndcg_centred": 1.0, "spearman": 1.0, "mrr": 1.0}
    rev = ranking_metrics({"a": 1, "b": 2, "c": 3, "d": 4}, gold)
    dcg = 1 + 2 / math.log2(3) + 3 / 2
    ideal = 4 + 3 / math.log2(3) + 2 / 2
    assert rev["top1"] == 0.0 and rev["mrr"] == 0.25 and math.isclose(rev["spearman"], -1.0)
    assert math.isclose(rev["ndcg"], dcg / ideal)  # 0.5458
    # centred gains (gold - 2.5): a 1.5, b 0.5; the reversed top 3 (d, c, b) holds only b
    assert math.isclose(rev["ndcg_centred"], (0.5 / 2) / (1.5 + 0.5 / math.log2(3)))
    second = ranking_metrics({"a": 3, "b": 4, "c": 2, "d": 1}, gold)
    assert second["top1"] == 0.0 and second["mrr"] == 0.5
    assert math.isnan(ranking_metrics({"a": 1, "b": 2}, {"a": -1.0, "b": -2.0})["ndcg"])
    with pytest.raises(LinernotesError, match="same grouping"):
        ranking_metrics({"a": 1}, {"b": 1})


def test_evaluate_credit_end_to_end(setup, tmp_path):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"]
    summary, detail = evaluate_credit(
        run, df, qs, {"newton": ("newton", NEWTON), "clap-centroid": "clap-centroid"},
        score=SCORE, out_dir=tmp_path, progress=False, seeds=2)
    assert summary["method"].tolist() == ["newton", "newton [elbo]", "clap-centroid", "logo",
                                          "logo: seed vs seed", "logo: one seed"]
    logo = summary.set_index("method").loc["logo"]
    assert logo["top1"] == 1.0 and logo["spearman"] == 1.0 and logo["mrr"] == 1.0
    assert len(detail) == 6 * len(qs) and set(detail["query"]) == {q.key for q in qs}
    for _, row in summary.iterrows():  # every mean inside its bootstrap interval
        for m in ("top1", "ndcg@3", "spearman"):
            if math.isfinite(row[m]):
                assert row[f"{m}_low"] - 1e-12 <= row[m] <= row[f"{m}_high"] + 1e-12
    newton = summary.set_index("method").loc["newton"]
    assert newton["queries"] == len(qs) and 0 <= newton["top1"] <= 1
    assert newton["seconds"] > 0 and newton["fraction_of_logo"] > 0
    assert (tmp_path / "credit_eval.parquet").exists()
    assert len(list((tmp_path / "tables").glob("*.parquet"))) == 3 * len(qs)


# ---------------------------------------------------------------- CLI and report


def test_credit_defaults_to_the_opt_out_default_of_the_models_kind(setup):
    df, run, qs = setup["manifest"], setup["run"], setup["queries"]
    tables = credit(run, df, qs[:1], score=SCORE, progress=False,
                    settings={"steps": 2, "batch_size": 4, "retain_batch_size": 4})
    assert tables[0]["method"].iloc[0] == "concept_ablation"
    assert tables[0].attrs["record"]["settings"]["steps"] == 2


def test_cli_credit_and_evaluate(setup, tmp_path):
    corpus = Path(setup["manifest"].attrs["root"])
    args = ["--run", str(setup["run"].path), "--corpus", str(corpus)]
    res = CliRunner().invoke(app, ["credit", "train:beta-04", *args, "-o", str(tmp_path / "c"),
                                   "--method", "newton", "--set", "draws=4", "--top", "2",
                                   "--reference-tracks", "1"])
    assert res.exit_code == 0, res.output
    assert "beta-04" in res.output and "%" in res.output and "95% (draws)" in res.output
    written = read_credit(tmp_path / "c" / "beta-04.newton.parquet")
    assert "offset" in written.columns  # calibrated
    ids = [t for g in groups(setup["manifest"], setup["run"]).values() for t in g]
    write_scores(score_table("beta-04", "unlearning", ids, np.ones(len(ids)), setup["manifest"]),
                 tmp_path / "s" / "beta-04.parquet", {"run": setup["run"].hash})
    res = CliRunner().invoke(app, ["credit", "train:beta-04", *args, "-o", str(tmp_path / "c"),
                                   "--method", "unlearning-sum", "--scores", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    summed = read_credit(tmp_path / "c" / "beta-04.unlearning-sum.parquet")
    assert summed.set_index("group")["score"].to_dict() == {"Alpha": 3, "Beta": 4, "Gamma": 4}
    sets = ["--set", "projection_dim=32", "--set", "timesteps=2", "--set", "stride=400"]
    res = CliRunner().invoke(app, ["credit", "train:beta-04", *args, "-o", str(tmp_path / "c"),
                                   "--method", "trak-sum", *sets, "--json"])
    assert res.exit_code == 0, res.output
    assert '"query": "beta-04"' in res.output
    bad = CliRunner().invoke(app, ["credit", "train:beta-04", *args, "--by", "composer"])
    assert bad.exit_code != 0 and "no such column" in str(bad.exception or bad.output)
    res = CliRunner().invoke(app, ["evaluate", "credit", "train:beta-04", *args, "-o",
                                   str(tmp_path / "e"), "--methods", "clap-centroid",
                                   "--seeds", "2"])
    assert res.exit_code == 0, res.output
    assert "clap-centroid" in res.output and "logo: seed vs seed" in res.output
    assert "top1_low" in res.output


def test_report_shows_credit_by_artist(setup, tmp_path):
    from linernotes.report import build_report

    df, run, q = setup["manifest"], setup["run"], setup["queries"][0]
    ids = [t for g in groups(df, run).values() for t in g]
    scores = score_table(q.key, "unlearning", ids, np.linspace(1, 0, len(ids)), df)
    path = write_scores(scores, tmp_path / "scores" / f"{q.key}.parquet",
                        {"query": q.key, "method": "unlearning", "run": run.hash,
                         "source": q.source, "caption": q.caption})
    table = credit(run, df, [q], "newton", settings=NEWTON, score=SCORE, progress=False)[0]
    write_manifest(df, tmp_path / "m")  # the report reads audio beside the manifest
    index = build_report(tmp_path / "report", [path], df, top_k=2, credit=[table])
    (page,) = (index.parent / "queries").glob(f"{q.key}-*.html")
    html = page.read_text()
    assert "Credit by artist, by unlearning each artist (newton)" in html
    panel = html.split('id="group-credit-1"')[1].split("</table>")[0]
    assert "95% interval (draws)" in panel and panel.count('class="num interval"') == 3
    for g in ("Alpha", "Beta", "Gamma"):
        assert f'data-group="{g}"' in html
    # a baseline that never touches the model is not described as unlearning
    similar = table.assign(method="clap-centroid")
    index = build_report(tmp_path / "r1", [path], df, top_k=2, credit=[similar])
    html = unescape(next((index.parent / "queries").glob(f"{q.key}-*.html")).read_text())
    assert "by similarity to each artist's training audio (clap-centroid)" in html
    assert "unlearn" not in html.split('id="group-credit-1"')[1].split("</table>")[0]
    other = table.assign(query="nobody")
    with pytest.raises(LinernotesError, match="no score table"):
        build_report(tmp_path / "r2", [path], df, top_k=2, credit=[other])
