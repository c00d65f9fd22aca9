"""The ar-reference family: a MusicGen-architecture decoder trained here over tokens of a residual
vector quantiser learned on log-mel frames. Tokenizer round trip, training and its resume after a
kill, and the commands (generate, attribute, optout, audit) on a tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from linernotes.cli import app
from linernotes.data.manifest import read_manifest
from linernotes.errors import LinernotesError
from linernotes.models.ar.family import ArFamily, ArRecipe
from linernotes.models.ar.tokens import Rvq
from linernotes.training import TrainSettings
from linernotes.unlearning.trainer import DEFAULT_METHODS

from conftest import assert_a_reload_reads_the_captions_kept, make_tone_corpus

RECIPE = dict(seconds=2.0, clap_steps=4, codebooks=2, codebook_size=16, hidden=32, layers=2,
              heads=2)
SETTINGS = TrainSettings(steps=300, batch_size=4, lr=3e-3, warmup=5, checkpoint_every=100)


@pytest.fixture(scope="module")
def ar(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    make_tone_corpus(root / "corpus")
    manifest = read_manifest(root / "corpus")
    run = ArFamily.create(manifest, root / "run", SETTINGS, ArRecipe(**RECIPE), progress=False)
    return {"root": root, "manifest": manifest, "run": run}


def test_the_tokenizer_round_trip_is_exact_on_its_codes_and_close_on_frames():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 6)).astype(np.float32) * 4
    frames = centres[rng.integers(0, 8, 4000)] + 0.05 * rng.normal(size=(4000, 6))
    rvq = Rvq.fit(frames, codebooks=3, size=8, iters=25, seed=0)
    codes = rvq.encode(frames)
    assert codes.shape == (4000, 3) and codes.min() >= 0 and codes.max() < 8
    # decoding codes and encoding the frames again gives (nearly all) the same codes back
    back = rvq.encode(rvq.decode(codes))
    assert (back == codes).all(1).mean() > 0.95
    assert rvq.reconstruction(frames) < 0.01  # clustered frames: almost nothing lost
    more = Rvq.fit(frames, codebooks=1, size=8, iters=25, seed=0)
    assert rvq.reconstruction(frames) <= more.reconstruction(frames)  # residual levels help
    again = Rvq.fit(frames, codebooks=3, size=8, iters=25, seed=0)
    assert torch.equal(again.books, rvq.books)  # seeded: the same tokenizer
    with pytest.raises(LinernotesError, match="at least 64 training frames"):
        Rvq.fit(frames[:10], codebooks=1, size=64, iters=2, seed=0)


def test_a_reloaded_run_reads_its_kept_caption_encodings(ar):
    captions = list(dict.fromkeys(ar["manifest"]["caption"]))[:3]
    assert_a_reload_reads_the_captions_kept(ar["run"].path, captions,
                                            lambda task, c: task.text(c))


def test_training_learns_the_tokens_and_attribution_finds_a_training_track(ar):
    from linernotes.attribution.front import attribute_run

    run, manifest, root = ar["run"], ar["manifest"], ar["root"]
    assert run.family.name == "ar-reference" and run.task.deterministic
    assert run.config["final_loss"] < np.log(16) / 2  # far below chance (log 16 per code)
    assert 0 < run.config["tokenizer_error"] < 0.5
    ids = ["alpha-01", "beta-02", "gamma-00"]
    tables = attribute_run(run, manifest, [f"train:{i}" for i in ids], root / "scores",
                           progress=False)
    for tid, table in zip(ids, tables):
        assert table.loc[table["rank"] == 1, "track_id"].tolist() == [tid]


KILLER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from linernotes import training
    from linernotes.data.manifest import read_manifest
    from linernotes.models.ar.family import ArFamily, ArRecipe
    real = training._save_checkpoint
    def dying(path, fingerprint, done, *args, **kwargs):
        real(path, fingerprint, done, *args, **kwargs)
        if Path(path).parent == Path(sys.argv[2]) and done == 100:
            os._exit(9)  # as kill -9, just after the decoder's first checkpoint
    training._save_checkpoint = dying
    settings = training.TrainSettings(steps=300, batch_size=4, lr=3e-3, warmup=5,
                                      checkpoint_every=100)
    recipe = ArRecipe(seconds=2.0, clap_steps=4, codebooks=2, codebook_size=16, hidden=32,
                      layers=2, heads=2)
    ArFamily.create(read_manifest(sys.argv[1]), sys.argv[2], settings, recipe, progress=False)
""")


def test_a_killed_training_resumes_to_the_same_bytes(ar, tmp_path):
    root = ar["root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, str(root / "corpus"),
                             str(tmp_path / "run")], capture_output=True, text=True, env=env,
                            timeout=600)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert not (tmp_path / "run" / "config.json").exists()
    resumed = ArFamily.create(ar["manifest"], tmp_path / "run", SETTINGS, ArRecipe(**RECIPE),
                              progress=False)
    for name in ("model.safetensors", "tokenizer.safetensors"):
        assert (resumed.path / name).read_bytes() == (ar["run"].path / name).read_bytes(), name


def test_the_commands_work_on_an_ar_reference_run(ar, tmp_path):
    root = ar["root"]

    def cli(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, (res.output, res.exception)
        return res.output

    sets = [f"--set={k}={v}" for k, v in RECIPE.items() if k not in ("seconds", "clap_steps")]
    out = cli("train", "--family", "ar-reference", "--corpus", root / "corpus", "-o",
              tmp_path / "ar", "--steps", 20, "--batch-size", 4, "--warmup", 2, "--seconds", 2,
              "--clap-steps", 4, *sets)
    assert "final loss" in out
    clip = tmp_path / "clip.wav"
    cli("generate", "--run", tmp_path / "ar", "Morning, a tune by Alpha played on sine", "-o",
        clip, "--seconds", 1)
    import soundfile as sf

    audio, sr = sf.read(clip)
    assert sr == 16000 and len(audio) == 16000 and np.isfinite(audio).all()
    cli("attribute", "--run", tmp_path / "ar", "--corpus", root / "corpus", clip, "-o",
        tmp_path / "scores")
    cli("optout", "--run", tmp_path / "ar", "--corpus", root / "corpus", "--forget",
        "artist=Alpha", "--method", "random_label", "-o", tmp_path / "rl")
    out = cli("optout", "--run", tmp_path / "ar", "--corpus", root / "corpus", "--forget",
              "artist=Beta", "-o", tmp_path / "default", "--set", "steps=5")
    assert f"Method {DEFAULT_METHODS['autoregressive']}" in out  # not a diffusion-only method
    out = cli("audit", tmp_path / "rl", "--corpus", root / "corpus", "-o", tmp_path / "audit")
    assert "random_label" in out and (tmp_path / "audit" / "audit.csv").exists()
    # the retrained reference of the audit kept the run's CLAP and tokenizer
    retrains = list((tmp_path / "ar" / "retrains").iterdir())
    assert retrains and all((r / "tokenizer.safetensors").read_bytes()
                            == (tmp_path / "ar" / "tokenizer.safetensors").read_bytes()
                            for r in retrains)
