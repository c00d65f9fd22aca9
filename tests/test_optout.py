"""Opt-out: forget sets, the shared unlearning trainer, every method, resume, and the audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from linernotes.clips import generate
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.evaluation.audit import EMBEDDERS, AuditSettings, audit, membership_auc
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.report.build import OptOut
from linernotes.run import load_run
from linernotes.training import TrainSettings
from linernotes.unlearning import trainer as trainer_mod
from linernotes.unlearning.forget import ForgetSpec, resolve_forget_set
from linernotes.unlearning.salun import MASK_FILE
from linernotes.unlearning.trainer import (
    available_methods,
    fixed_losses,
    get_method,
    optout,
    read_record,
)

from conftest import TINY_FEATURES, make_tone_corpus

TINY_DIT = DenoiserConfig(
    layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=32, time_proj_dim=32, max_words=12
)
TINY_CLAP = ClapSettings(dim=32, hidden=32, layers=2, steps=30, batch_size=16,
                         checkpoint_every=1000)
TINY_TRAIN = TrainSettings(steps=40, batch_size=8, lr=2e-3, warmup=5, checkpoint_every=100)
FAST = {"steps": 3, "batch_size": 4, "retain_batch_size": 4, "checkpoint_every": 2}
METHODS = sorted(available_methods())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three artists x 8 tone tracks (7 train + 1 holdout each) and a tiny trained run."""
    root = tmp_path_factory.mktemp("optout")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=8)
    FeatureStore.open(manifest, TINY_FEATURES, progress=False, workers=1)
    run = train(manifest, root / "run", TINY_TRAIN, TINY_DIT, TINY_FEATURES,
                clap_settings=TINY_CLAP, progress=False)
    return {"root": root, "manifest": manifest, "run": run}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- forget sets


def test_forget_spec_forms_resolve_exactly(setup):
    df = setup["manifest"]
    by_artist = resolve_forget_set(df, "artist=Beta")
    assert by_artist.forget_ids == tuple(f"beta-{k:02d}" for k in range(7))
    assert by_artist.artists == ("Beta",) and by_artist.holdout_ids == ("beta-07",)
    train_ids = set(df.loc[df["split"] == "train", "track_id"])
    assert set(by_artist.retain_ids) == train_ids - set(by_artist.forget_ids)
    tracks = resolve_forget_set(df, ForgetSpec(track_ids=("alpha-01", "gamma-02")))
    assert tracks.forget_ids == ("alpha-01", "gamma-02") and tracks.artists == ("Alpha", "Gamma")
    title = resolve_forget_set(df, "title=River")  # column filter, case-insensitive
    assert set(title.forget_ids) == {"alpha-01", "beta-01", "gamma-01"}
    both = resolve_forget_set(df, "beta; track=alpha-00")
    assert set(both.forget_ids) == set(by_artist.forget_ids) | {"alpha-00"}
    later = resolve_forget_set(df, "artist=Gamma", removed_before=by_artist.forget_ids)
    assert not set(later.retain_ids) & set(by_artist.forget_ids)
    assert ForgetSpec.from_dict(json.loads(json.dumps(both.spec.to_dict()))) == both.spec


@pytest.mark.parametrize(
    "spec, message",
    [
        (ForgetSpec, "Empty forget set"),
        ("artist=Alpah", "Did you mean 'Alpha'"),
        ("artist=Alpha; artist=Beta; artist=Gamma", "whole training set"),
        ("track=nope-00", "not in the manifest"),
        ("track=alpha-07", "holdout track"),
        ("colour=red", "names no manifest column"),
        ("title=Nowhere", "matches no training track"),
        ("title", "Unknown artist"),
    ],
)
def test_bad_forget_specs_fail_clearly(setup, spec, message):
    with pytest.raises(LinernotesError, match=message):
        resolve_forget_set(setup["manifest"], spec() if callable(spec) else spec)


def test_forget_set_already_removed_is_explained(setup):
    first = resolve_forget_set(setup["manifest"], "artist=Alpha")
    with pytest.raises(LinernotesError, match="already removed"):
        resolve_forget_set(setup["manifest"], "artist=Alpha", removed_before=first.forget_ids)


def test_unknown_method_and_settings_fail_clearly(setup, tmp_path):
    with pytest.raises(LinernotesError, match="Did you mean salun"):
        get_method("saluun")
    with pytest.raises(LinernotesError, match="Unknown .*setting"):
        optout(setup["run"], setup["manifest"], "Alpha", "salun", {"mask_ration": 0.3},
               tmp_path / "x", progress=False)


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_method_changes_only_its_group_and_sees_its_sets(setup, tmp_path, method, monkeypatch):
    run, df = setup["run"], setup["manifest"]
    forget = resolve_forget_set(df, "artist=Alpha")
    cls = get_method(method)
    seen = {"forget": set(), "retain": set()}
    original_loss = cls.loss

    def spy(self, model, task, batch, step):
        seen["forget"].update(batch["forget"]["track_id"])
        if batch["retain"] is not None:
            seen["retain"].update(batch["retain"]["track_id"])
        return original_loss(self, model, task, batch, step)

    monkeypatch.setattr(cls, "loss", spy)
    before = _params(run.model)
    new = optout(run, df, "artist=Alpha", method, {**FAST, "group": "self_attn"},
                 tmp_path / method, progress=False)
    group = set(run.task.parameter_names(run.model, "self_attn"))
    after = _params(new.model)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in group)
    assert any(not torch.equal(before[n], after[n]) for n in group)
    assert seen["forget"] and seen["forget"] <= set(forget.forget_ids)
    assert seen["retain"] <= set(forget.retain_ids)
    if cls(cls.settings_class(), None).uses_retain:
        assert seen["retain"]
    rec = read_record(new)
    assert rec["method"] == method and rec["removed"]["track_ids"] == list(forget.forget_ids)
    assert rec["removed"]["artists"] == ["Alpha"] and rec["cost"]["seconds"] > 0
    assert rec["cost"]["steps"] == 3 or rec["cost"]["stopped_early"]
    assert new.config["parent"] == run.hash
    assert new.config["note"]["method"] == method
    assert not (new.path / "_unlearn").exists()
    again = optout(run, df, "artist=Alpha", method, {**FAST, "group": "self_attn"},
                   tmp_path / method, progress=False)
    assert again.hash == new.hash  # finished runs are reused


def test_salun_changes_only_masked_weights(setup, tmp_path):
    run = setup["run"]
    new = optout(run, setup["manifest"], "artist=Beta", "salun", {**FAST, "steps": 4},
                 tmp_path / "salun", progress=False)
    mask = {n: m.bool() for n, m in load_file(str(new.path / MASK_FILE)).items()}
    group = set(run.task.parameter_names(run.model, "transformer"))
    assert set(mask) == group
    frac = sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    assert 0.45 < frac < 0.55
    before, after = _params(run.model), _params(new.model)
    for n, m in mask.items():
        assert torch.equal(before[n][~m], after[n][~m]), n
    assert any(not torch.equal(before[n][m], after[n][m]) for n, m in mask.items())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in group)


def test_gradient_ascent_raises_forget_loss(setup, tmp_path):
    run, df = setup["run"], setup["manifest"]
    new = optout(run, df, "artist=Gamma", "gradient_ascent",
                 {"steps": 8, "lr": 1e-3, "stop_at_gap": False}, tmp_path / "ga", progress=False)
    rec = read_record(new)
    assert rec["forget_loss"]["after"] > 1.05 * rec["forget_loss"]["before"]
    forget = resolve_forget_set(df, "artist=Gamma")
    store = run.feature_store(df, progress=False)
    from linernotes.data.dataset import TrackDataset

    pos = {t: i for i, t in enumerate(df["track_id"])}
    ds = TrackDataset(store, df, [pos[t] for t in forget.forget_ids])
    assert fixed_losses(new.task, new.model, ds, 5).mean() > fixed_losses(
        run.task, run.model, ds, 5).mean()


def test_concept_ablation_moves_forget_captions_to_the_anchor(setup, tmp_path):
    from linernotes.data.dataset import TrackDataset, collate
    from linernotes.unlearning.trainer import random_draws

    run, df = setup["run"], setup["manifest"]
    new = optout(run, df, "artist=Gamma", "concept_ablation",
                 {"steps": 10, "lr": 1e-3, "anchor": "null", "retain_weight": 0.0}, tmp_path / "ca",
                 progress=False)
    forget = resolve_forget_set(df, "artist=Gamma")
    pos = {t: i for i, t in enumerate(df["track_id"])}
    ds = TrackDataset(run.feature_store(df, progress=False), df,
                      [pos[t] for t in forget.forget_ids])
    batch = collate([ds[i] for i in range(len(ds))])
    t, noise = random_draws(run.task, len(ds), 7, 0, 1)
    null = dict(batch, drop_cond=torch.ones(len(ds), dtype=torch.bool))

    def gap(model) -> float:  # forget captions' predictions vs the original's null predictions
        with torch.no_grad():
            return float((run.task.prediction(model, batch, t, noise)
                          - run.task.prediction(run.model, null, t, noise)).pow(2).mean())

    assert gap(new.model) < 0.3 * gap(run.model)  # measured: 0.030 -> 0.003


def test_task_without_prediction_is_a_clear_error():
    from linernotes.task import Task

    class LossOnly(Task):
        latent_shape = (4, 4)

        def per_sample_loss(self, model, batch, t, noise, mask_padding=False):
            return torch.zeros(len(t))

        def parameter_names(self, model, group):
            return []

    with pytest.raises(LinernotesError, match="Task.prediction"):
        LossOnly().prediction(None, {}, torch.zeros(1), torch.zeros(1, 4, 4))


def test_gap_stopping_rule_ends_ascent_early(setup, tmp_path):
    new = optout(setup["run"], setup["manifest"], "artist=Gamma", "gradient_ascent",
                 {"steps": 60, "lr": 3e-3, "check_every": 2}, tmp_path / "stop", progress=False)
    cost = read_record(new)["cost"]
    assert cost["stopped_early"] and cost["steps"] < 60 and "target" in cost["stop_reason"]


def test_killed_run_resumes_to_identical_weights(setup, tmp_path, monkeypatch):
    run, df = setup["run"], setup["manifest"]
    settings = {"steps": 6, "batch_size": 4, "retain_batch_size": 4, "checkpoint_every": 3}
    ref = optout(run, df, "artist=Alpha", "siss", settings, tmp_path / "a", progress=False)
    cls = get_method("siss")
    original_loss = cls.loss

    def killed(self, model, task, batch, step):
        if step == 4:
            raise KeyboardInterrupt  # a kill after the step-3 checkpoint
        return original_loss(self, model, task, batch, step)

    monkeypatch.setattr(cls, "loss", killed)
    with pytest.raises(KeyboardInterrupt):
        optout(run, df, "artist=Alpha", "siss", settings, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "_unlearn" / "checkpoint.pt").exists()
    monkeypatch.setattr(cls, "loss", original_loss)
    resumed = optout(run, df, "artist=Alpha", "siss", settings, tmp_path / "b", progress=False)
    assert read_record(resumed)["cost"]["resumed"]
    for (n, p), q in zip(ref.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n


def test_unlearned_run_loads_generates_and_chains(setup, tmp_path):
    run, df = setup["run"], setup["manifest"]
    first = optout(run.path, df, "artist=Alpha", "grad_diff", {**FAST, "stop_at_gap": False},
                   tmp_path / "first", progress=False)
    loaded = load_run(first.path, manifest=df)
    paths = generate(loaded, ["Morning, a tune by Alpha played on sine"], tmp_path / "clips",
                     settings=GenerateSettings(steps=2, griffin_lim_iters=2), progress=False)
    assert paths[0].exists()
    second = optout(first.path, df, "artist=Beta", "random_label", FAST, tmp_path / "second",
                    progress=False)
    rec = read_record(second)
    alpha = {f"alpha-{k:02d}" for k in range(7)}
    beta = {f"beta-{k:02d}" for k in range(7)}
    assert set(rec["removed"]["track_ids"]) == beta
    assert set(rec["removed_total"]) == alpha | beta
    assert set(rec["removed"]["removed_before"]) == alpha
    with pytest.raises(LinernotesError, match="already removed"):
        optout(second.path, df, "artist=Alpha", "grad_diff", FAST, tmp_path / "third",
               progress=False)
    with pytest.raises(LinernotesError, match="already holds another opt-out"):
        optout(run, df, "artist=Gamma", "grad_diff", FAST, tmp_path / "first", progress=False)


# ---------------------------------------------------------------- the audit


def test_membership_auc():
    assert membership_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert membership_auc(np.array([0.5]), np.array([0.5])) == 0.5
    assert np.isnan(membership_auc(np.array([]), np.array([0.1])))


def test_audit_table_rows_columns_and_retrained_reference(setup, tmp_path, monkeypatch):
    run, df = setup["run"], setup["manifest"]
    monkeypatch.setitem(EMBEDDERS, "mean_frame", lambda r, f, m: f.mean(1).numpy())
    runs = [
        optout(run, df, "artist=Alpha", m, FAST, tmp_path / m, progress=False)
        for m in ("gradient_ascent", "salun")
    ]
    s = AuditSettings(score_timesteps=3, score_stride=300, prompts=2, other_prompts=4,
                      generate_steps=2, pairs=1, griffin_lim_iters=2)
    result = audit(run, runs, df, "artist=Alpha", tmp_path / "audit", settings=s,
                   retrain_dir=tmp_path / "retrained", progress=False)
    table = result.table
    assert table["model"].tolist() == ["original", "retrained", "gradient_ascent", "salun"]
    for col in ("forget_loss", "forget_gap", "mia_auc", "artist_similarity", "artist_rate",
                "retain_loss", "holdout_loss", "fd_other", "text_audio", "seconds",
                "cost_fraction", "fd_mean_frame"):
        assert col in table.columns
    assert np.isfinite(table[["forget_loss", "retain_loss", "mia_auc"]].to_numpy()).all()
    assert table.loc[1, "forget_gap"] == 0.0 and table.loc[1, "cost_fraction"] == 1.0
    retrained = load_run(result.retrained)
    forget = resolve_forget_set(df, "artist=Alpha")
    assert sorted(retrained.config["train"]["exclude"]) == sorted(forget.forget_ids)
    assert set(result.verdicts) == {"original", "retrained", "gradient_ascent", "salun"}
    assert all(v.startswith(("passes", "fails")) for k, v in result.verdicts.items()
               if k in result.passed)
    assert any("holdout tracks of all artists" in n for n in result.notes)
    assert result.plot.exists() and (tmp_path / "audit" / "audit.csv").exists()
    doc = json.loads(result.optout_files["salun"].read_text())
    optout_doc = OptOut.from_dict(doc)
    audit_table = optout_doc.audit_table()
    assert list(audit_table.columns) == table["model"].tolist()
    assert "MIA AUC (forget vs holdout)" in audit_table.index
    assert optout_doc.pairs and all(Path(p.after).exists() for p in optout_doc.pairs)
    again = audit(run, runs, df, "artist=Alpha", tmp_path / "audit", settings=s,
                  retrain_dir=tmp_path / "retrained", progress=False)
    assert again.table.drop(columns="seconds").equals(table.drop(columns="seconds"))
    with pytest.raises(LinernotesError, match="other tracks than the forget set"):
        audit(run, runs, df, "artist=Beta", tmp_path / "audit2", settings=s,
              retrain_dir=tmp_path / "retrained", progress=False)


def test_trainer_module_registry_is_complete():
    assert set(trainer_mod.METHOD_MODULES) == {
        "gradient_ascent", "random_label", "grad_diff", "ewc", "selective_amnesia", "salun",
        "siss", "mirrored", "concept_ablation"}
    assert set(available_methods()) == set(trainer_mod.METHOD_MODULES)
    for cls in available_methods().values():
        assert cls.summary and cls.settings_class().steps >= 1
