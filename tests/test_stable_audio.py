"""The stable-audio family on a tiny random StableAudioPipeline built offline (real classes)."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from linernotes.attribution.front import attribute_run
from linernotes.attribution.losses import ScoreSettings
from linernotes.clips import generate
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import read_manifest, write_manifest
from linernotes.errors import LinernotesError
from linernotes.models.family import recognise
from linernotes.models.stable_audio.family import StableAudioFamily
from linernotes.run import load_run
from linernotes.training import TrainSettings
from linernotes.unlearning.newton import UnlearnSettings

from conftest import assert_a_reload_reads_the_captions_kept, make_tiny_run
from tiny_stable_audio import make_gated_corpus, make_tiny_pipeline

FINETUNE = TrainSettings(steps=300, batch_size=8, lr=3e-3, warmup=10, ema_decay=0.0,
                         checkpoint_every=1000, duplicate=(("alpha-00", 20),))


@pytest.fixture(scope="module")
def sa(tmp_path_factory):
    """A tiny pipeline, a gated corpus, the run `init` makes and a fine-tune with alpha-00
    planted (20 copies)."""
    root = tmp_path_factory.mktemp("sa")
    model = make_tiny_pipeline(root / "model")
    manifest = make_gated_corpus(root / "corpus")
    run = StableAudioFamily.init_run(model, manifest, root / "init", progress=False)
    tuned = run.family.finetune(manifest, root / "ft", FINETUNE, progress=False)
    return {"root": root, "model": model, "manifest": manifest, "run": run, "ft": tuned}


def test_init_makes_a_run_of_the_pipeline(sa):
    run, manifest = sa["run"], sa["manifest"]
    assert run.family.name == "stable-audio" and run.config["features"]["n_frames"] == 125
    assert run.task.parameter_names(run.model, "transformer")
    assert "time_proj.weight" not in run.task.parameter_names(run.model, "all")
    store = run.feature_store(manifest, progress=False)
    assert store.values.shape == (len(manifest), 125, 4)
    short = int(np.argmin(manifest["duration"]))  # 1.2 s of 2 s: 75 of 125 frames are real
    assert int(store.mask[short].sum()) == 75 and bool(store.mask[1].all())
    from diffusers import StableAudioPipeline

    StableAudioPipeline.from_pretrained(str(run.path / "pipeline"), local_files_only=True)
    with pytest.raises(LinernotesError, match="no text-audio embedder.*clap-audio"):
        run.family.embed_text(["a tune"])  # clap-text, the audit's text-audio agreement


def test_the_task_conditions_the_dit_as_the_pipeline_does(sa):
    run = sa["run"]
    pipe, task = run.family.pipe, run.task
    caption = sa["manifest"]["caption"][0]
    batch = {"caption": [caption], "mask": torch.ones(1, 20, dtype=torch.bool)}
    tokens, glob = task.condition(run.model, batch)
    with torch.no_grad():
        text = pipe.encode_prompt(caption, torch.device("cpu"), False)
        start, end = pipe.encode_duration(0.0, 20 * 64 / 4000, torch.device("cpu"), False, 1)
    assert torch.allclose(tokens, torch.cat([text, start, end], dim=1), atol=1e-6)
    assert torch.allclose(glob, torch.cat([start, end], dim=2), atol=1e-6)
    dropped, _ = task.condition(run.model, {**batch, "drop_cond": torch.ones(1, dtype=bool)})
    assert not dropped.any()  # the pipeline's unconditional branch: all tokens zero


def test_a_reloaded_run_reads_its_kept_caption_encodings(sa):
    captions = list(dict.fromkeys(sa["manifest"]["caption"]))[:3]
    assert_a_reload_reads_the_captions_kept(sa["run"].path, captions,
                                            lambda task, c: task.text(c))


def test_a_planted_track_ranks_first_for_its_own_generations(sa):
    tuned, manifest = sa["ft"], sa["manifest"]
    caption = manifest.set_index("track_id").loc["alpha-00", "caption"]
    clips = generate(tuned, [caption, caption], sa["root"] / "clips", seeds=[0, 1],
                     settings=tuned.family.generate_settings(steps=10, guidance=3.0),
                     progress=False)
    tables = attribute_run(tuned, manifest, [str(c) for c in clips], sa["root"] / "scores",
                           UnlearnSettings(draws=64, probe_draws=16, batch_size=32),
                           ScoreSettings(timesteps=4, stride=200), progress=False)
    ranks = [int(t.set_index("track_id").loc["alpha-00", "rank"]) for t in tables]
    assert ranks == [1, 1], ranks


def test_init_resumes_after_a_kill_during_encoding(sa, tmp_path, monkeypatch):
    from linernotes.models.stable_audio.latents import VaeLatents

    real, calls = VaeLatents.encode_files, []

    def dies_on_the_second_chunk(self, paths):
        calls.append(len(paths))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while encoding
        return real(self, paths)

    monkeypatch.setattr(FeatureStore, "open",
                        functools.partial(FeatureStore.open.__func__, FeatureStore, chunk=4))
    monkeypatch.setattr(VaeLatents, "encode_files", dies_on_the_second_chunk)
    shutil.copytree(sa["root"] / "corpus" / "audio", tmp_path / "corpus" / "audio")
    write_manifest(sa["manifest"], tmp_path / "corpus")  # the same corpus, its own feature cache
    manifest = read_manifest(tmp_path / "corpus")
    with pytest.raises(KeyboardInterrupt):
        StableAudioFamily.init_run(sa["model"], manifest, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    monkeypatch.setattr(VaeLatents, "encode_files", real)
    run = StableAudioFamily.init_run(sa["model"], manifest, tmp_path / "run", progress=False)
    done = run.feature_store(manifest, progress=False).values
    clean = sa["run"].feature_store(sa["manifest"], progress=False).values
    assert np.array_equal(np.asarray(done), np.asarray(clean))


def test_other_folders_and_changes_are_refused(sa, tmp_path):
    with pytest.raises(LinernotesError, match="not a model folder"):
        recognise(tmp_path)
    ref, _ = make_tiny_run(tmp_path / "ref", n_per_artist=3, steps=1)
    with pytest.raises(LinernotesError, match="a linernotes run of family 'reference'"):
        recognise(ref.path)
    other = make_tiny_pipeline(tmp_path / "other", seed=1)
    with pytest.raises(LinernotesError, match="another model"):
        StableAudioFamily.init_run(other, sa["manifest"], sa["run"].path, progress=False)
    with pytest.raises(LinernotesError, match="pretrained model as it was given"):
        sa["run"].family.retrain(sa["manifest"], tmp_path / "r", FINETUNE)
    edited = sa["manifest"].copy()
    edited.loc[0, "caption"] = "another caption"
    with pytest.raises(LinernotesError, match="different manifest"):
        load_run(sa["run"].path, manifest=edited)


def test_optout_audit_and_credit_from_the_command_line(sa):
    root = sa["root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "linernotes", *map(str, args)], cwd=root,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = cli("optout", "--run", "ft", "--corpus", "corpus", "--forget", "artist=Beta",
              "--method", "grad_diff", "--set", "steps=4", "--set", "stop_at_gap=false",
              "-o", "oo-beta")
    assert "Removed 4 training track(s) of Beta" in out
    from diffusers import StableAudioPipeline

    shipped = StableAudioPipeline.from_pretrained(str(root / "oo-beta" / "pipeline"),
                                                  local_files_only=True)
    before = dict(sa["ft"].model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in shipped.transformer.named_parameters())
    audit = cli("audit", "oo-beta", "--corpus", "corpus", "-o", "audit", "--prompts", "1",
                "--other-prompts", "2", "--generate-steps", "2", "--pairs", "0",
                "--score-timesteps", "3", "--score-stride", "300", "--retrain-steps", "20")
    assert "grad_diff" in audit and "No text-audio agreement" in audit
    doc = json.loads((root / "audit" / "audit.json").read_text())
    retrained = load_run(doc["retrained"] if os.path.isabs(doc["retrained"])
                         else root / doc["retrained"])
    assert retrained.family.name == "stable-audio" and retrained.config["train"]["steps"] == 20
    credit = cli("credit", "train:alpha-01", "--run", "ft", "--corpus", "corpus", "-o", "credit",
                 "--set", "steps=2", "--json")
    groups = json.loads(credit)[0]["groups"]
    assert sorted(g["group"] for g in groups) == ["Alpha", "Beta", "Gamma"]


def test_large_model_options_fine_tune_in_bfloat16_with_checkpointing(sa, tmp_path):
    run, manifest = sa["run"], sa["manifest"]
    s = TrainSettings(steps=3, batch_size=4, warmup=1, checkpoint_every=1000,
                      precision="bfloat16", gradient_checkpointing=True)
    tuned = run.family.finetune(manifest, tmp_path / "bf16", s, progress=False)
    assert np.isfinite(tuned.config["final_loss"])
    assert not tuned.model.is_gradient_checkpointing  # switched off again after training
    before = dict(run.model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in tuned.model.named_parameters())
    ref, ref_manifest = make_tiny_run(tmp_path / "ref", n_per_artist=3, steps=1)
    with pytest.raises(LinernotesError, match="does not support gradient checkpointing"):
        from linernotes.models.reference import train

        train(ref_manifest, tmp_path / "ref-gc", s.replace(precision="float32"),
              features=ref.family.features, clap=ref.path / "clap", progress=False)
