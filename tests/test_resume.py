"""A killed job, resumed in a new process, gives the bytes an uninterrupted one gives."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import make_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    run, manifest = make_tiny_run(root, n_per_artist=5, steps=4)
    return {"root": root, "run": run, "manifest": manifest}


def _fresh_text_caches(task) -> None:
    task.captions.memory.clear()
    task.captions.folder = None  # encoded here, not read from the run's cache folder
    task.clap.text._sentence.clear()
    task.clap.text._tokens.clear()


def test_a_captions_condition_does_not_depend_on_its_batch(tiny):
    task = tiny["run"].task
    captions = list(dict.fromkeys(tiny["manifest"]["caption"]))
    _fresh_text_caches(task)
    together = task.text_condition(captions, 12)
    _fresh_text_caches(task)
    alone = [task.text_condition([c], 12) for c in reversed(captions)][::-1]
    for key in ("clap", "words", "words_mask"):
        assert torch.equal(together[key], torch.cat([a[key] for a in alone])), key


def test_a_captions_condition_does_not_depend_on_autocast(tiny):
    task = tiny["run"].task
    captions = list(dict.fromkeys(tiny["manifest"]["caption"]))[:3]
    _fresh_text_caches(task)
    plain = task.text_condition(captions, 12)
    _fresh_text_caches(task)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # first encoded inside a scoring pass
        scoring = task.text_condition(captions, 12)
    for key in ("clap", "words", "words_mask"):
        assert scoring[key].dtype == plain[key].dtype, key
        assert torch.equal(scoring[key], plain[key]), key


KILLER = textwrap.dedent("""
    import os, sys
    from linernotes.attribution import losses
    real, calls = losses.track_losses, {"n": 0}
    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == int(os.environ["DIE_AT"]):
            os._exit(9)  # as kill -9: no clean-up
        return real(*args, **kwargs)
    losses.track_losses = dying
    sys.argv = ["linernotes", *sys.argv[1:]]
    from linernotes.cli import run
    run()
""")


def _attribute(tiny, out: Path, die_at: int = 0,
               precision: str = "float32") -> subprocess.CompletedProcess:
    train_id = tiny["manifest"]["track_id"][0]
    args = ["attribute", "--run", str(tiny["run"].path), "--corpus", str(tiny["root"] / "corpus"),
            f"train:{train_id}", "-o", str(out), "--timesteps", "4", "--draws", "16",
            "--set", "shard_size=3", "--set", "batch_size=2", "--precision", precision]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIE_AT": str(die_at)}
    cmd = [sys.executable, "-c", KILLER, *args] if die_at else [sys.executable, "-m",
                                                                  "linernotes", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _clear(cache: Path) -> None:
    for p in sorted(cache.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()


# bfloat16: the resumed process unlearns before it runs any bfloat16 forward, the uninterrupted
# one after its baseline pass; captions encoded (and cached) under autocast once made the two
# differ in every score by ~1e-4
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_attribution_killed_in_baseline_and_in_scoring_resumes_to_the_same_bytes(
        tiny, tmp_path, precision):
    cache = tiny["run"].path / "cache"
    _clear(cache)
    whole = _attribute(tiny, tmp_path / "whole", precision=precision)
    assert whole.returncode == 0, whole.stderr[-2000:]
    # the uninterrupted run filled the run's scoring cache: start the killed one from nothing
    _clear(cache)
    n_shards = math.ceil(len(tiny["run"].train_ids(tiny["manifest"])) / 3)
    assert n_shards >= 3
    for die_at in (2, n_shards + 2):  # in the baseline pass, then in the unlearned model's
        killed = _attribute(tiny, tmp_path / "killed", die_at, precision)
        assert killed.returncode == 9, killed.stderr[-2000:]
    resumed = _attribute(tiny, tmp_path / "killed", precision=precision)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (pd.read_parquet(next((tmp_path / d).glob("*.parquet"))) for d in ("whole", "killed"))
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_a_killed_fisher_resumes_from_its_checkpoint_to_the_same_bytes(tiny, tmp_path,
                                                                        monkeypatch):
    from linernotes.curvature import FisherSettings, compute_fisher

    run, manifest = tiny["run"], tiny["manifest"]
    _, train, _ = run.train_set(manifest, progress=False)
    settings = FisherSettings(draws=2, batch_size=4)
    whole = compute_fisher(run.task, run.model, train, settings, run.hash, progress=False)
    ckpt = tmp_path / "partial.safetensors"
    real, calls = run.task.per_sample_loss, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 4 * 2 + 3:  # in the third batch of 4 tracks x 2 draws
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(run.task, "per_sample_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_fisher(run.task, run.model, train, settings, run.hash, progress=False,
                       checkpoint=ckpt, checkpoint_seconds=0)
    monkeypatch.setattr(run.task, "per_sample_loss", real)
    calls["n"] = 0
    resumed = compute_fisher(run.task, run.model, train, settings, run.hash, progress=False,
                             checkpoint=ckpt, checkpoint_seconds=0)
    assert resumed.n_examples == whole.n_examples == 2 * len(train)
    for name in whole.diag:
        assert torch.equal(resumed.diag[name], whole.diag[name]), name
    # a checkpoint of another computation is not used
    other = compute_fisher(run.task, run.model, train, settings.replace(draws=1), run.hash,
                           progress=False, checkpoint=ckpt, checkpoint_seconds=1e9)
    assert other.n_examples == len(train)


def test_a_fisher_of_another_run_is_computed_again_in_its_place(tiny, tmp_path, capsys):
    from linernotes.curvature import Fisher, FisherSettings

    run, manifest = tiny["run"], tiny["manifest"]
    settings = FisherSettings(draws=1)
    path = run.fisher_path(settings)
    good = run.fisher(manifest, settings, progress=False)
    Fisher(good.diag, settings, "another-run", good.n_examples).save(path)
    with pytest.raises(Exception, match=r"fisher --run RUN --force"):
        Fisher.load(path, run_hash=run.hash)  # the advice the message gives ...
    subprocess.run([sys.executable, "-m", "linernotes", "fisher", "--run", str(run.path),
                    "--corpus", str(tiny["root"] / "corpus"), "--draws", "1", "--force"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert Fisher.load(path, run_hash=run.hash).n_examples == good.n_examples  # ... works
    Fisher(good.diag, settings, "another-run", good.n_examples).save(path)
    again = run.fisher(manifest, settings, progress=False)  # and any command mends it
    assert "computing it again" in capsys.readouterr().err
    assert Fisher.load(path, run_hash=run.hash).run_hash == run.hash
    for name in good.diag:
        assert torch.equal(again.diag[name], good.diag[name])
    assert not list(path.parent.glob(".*partial*"))  # the checkpoint is gone once saved
