"""The opt-out and evaluation commands, run as real subprocesses on a tiny corpus and run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from linernotes.data.features import FeatureStore
from linernotes.models.reference import train
from linernotes.run import load_run
from linernotes.unlearning.forget import resolve_forget_set
from test_optout import TINY_CLAP, TINY_DIT, TINY_TRAIN

from conftest import TINY_FEATURES, make_tone_corpus

ALPHA = {f"alpha-{k:02d}" for k in range(7)}
BETA = {f"beta-{k:02d}" for k in range(7)}
FAST = ["--set", "steps=3", "--set", "batch_size=4", "--set", "retain_batch_size=4"]


def cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "linernotes", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three artists x 8 tone tracks, a tiny run (library), and one opt-out of Alpha (CLI)."""
    root = tmp_path_factory.mktemp("cli")
    manifest = make_tone_corpus(root / "corpus", n_per_artist=8)
    FeatureStore.open(manifest, TINY_FEATURES, progress=False, workers=1)
    train(manifest, root / "run", TINY_TRAIN, TINY_DIT, TINY_FEATURES, clap_settings=TINY_CLAP,
          progress=False)
    first = cli("optout", "--run", "run", "--corpus", "corpus", "--forget", "artist=Alpha",
                "--method", "grad_diff", *FAST, "--set", "stop_at_gap=false", "-o", "oo-alpha",
                cwd=root)
    return {"root": root, "manifest": manifest, "first": first}


def test_optout_writes_a_run_that_generates_and_chains(setup):
    root = setup["root"]
    out = ok(setup["first"])
    assert "Removed 7 training track(s) of Alpha (14 retained" in out
    assert "Method grad_diff with steps=3" in out and "stop_at_gap=False" in out
    assert "Cost:" in out and "3 step(s)" in out
    record = json.loads((root / "oo-alpha" / "optout.json").read_text())
    assert set(record["removed"]["track_ids"]) == ALPHA
    assert record["settings"]["steps"] == 3 and record["settings"]["stop_at_gap"] is False
    clip = ok(cli("generate", "Morning, a tune by Beta played on sine", "--run", "oo-alpha",
                  "-o", "clips", "--steps", "2", cwd=root)).strip().splitlines()
    assert len(clip) == 1 and (root / clip[0]).exists()
    (root / "beta.txt").write_text("\n".join(sorted(BETA)) + "\n")
    second = json.loads(ok(cli("optout", "--run", "oo-alpha", "--corpus", "corpus",
                               "--forget-file", "beta.txt", "--method", "random_label", "--set",
                               "steps=2", "--set", "batch_size=4", "-o", "oo-beta", "--json",
                               cwd=root)))
    assert set(second["removed"]["track_ids"]) == BETA and second["method"] == "random_label"
    assert set(second["removed_total"]) == ALPHA | BETA  # the chain keeps Alpha out
    assert second["base"]["hash"] == load_run(root / "oo-alpha").hash

@pytest.mark.parametrize("args, message", [
    (["--forget", "artist=Alpah"], "Did you mean 'Alpha'"),
    (["--forget-file", "missing.txt"], "missing.txt does not exist"),
    (["--forget", "Alpha", "--set", "stepz=3"], "no setting 'stepz'. Did you mean steps?"),
    (["--forget", "Alpha", "--set", "steps=many"], "steps takes an integer"),
])
def test_bad_optout_input_exits_2_with_a_clear_message(setup, args, message):
    proc = cli("optout", "--run", "run", "--corpus", "corpus", *args, "-o", "never",
               cwd=setup["root"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (setup["root"] / "never").exists()


def test_audit_prints_table_verdict_and_files(setup):
    root = setup["root"]
    ok(setup["first"])
    out = ok(cli("audit", "oo-alpha", "--corpus", "corpus", "-o", "audit", "--retrained",
                 "retrained", "--retrain-steps", "10", "--prompts", "1", "--other-prompts", "2",
                 "--generate-steps", "2", "--pairs", "0", "--score-timesteps", "3",
                 "--score-stride", "300", "--max-retain", "8", cwd=root))
    lines = out.splitlines()
    header = next(line for line in lines if "original" in line and "retrained" in line)
    assert header.split() == ["original", "retrained", "grad_diff"]
    assert any(line.startswith("MIA AUC (forget vs holdout)") for line in lines)
    assert any(line.startswith("  grad_diff: ") and ("passes" in line or "fails" in line)
               for line in lines)
    for name in ("audit.csv", "audit.md", "audit.json", "audit.png", "optout-grad_diff.json"):
        assert f"audit/{name}" in out and (root / "audit" / name).exists()
    doc = json.loads((root / "audit" / "audit.json").read_text())
    assert [r["model"] for r in doc["table"]] == ["original", "retrained", "grad_diff"]
    reference = load_run(doc["retrained"] if os.path.isabs(doc["retrained"])
                         else root / doc["retrained"])
    assert reference.config["train"]["steps"] == 10
    forget = resolve_forget_set(setup["manifest"], "artist=Alpha")
    assert set(reference.config["train"]["exclude"]) == set(forget.forget_ids)


def test_evaluate_consistency_prints_self_ranks(setup):
    root = setup["root"]
    out = ok(cli("evaluate", "consistency", "--run", "run", "--corpus", "corpus", "--queries",
                 "2", "--draws", "64", "--timesteps", "6", "--stride", "150", "-o", "cons",
                 cwd=root))
    assert "Mean self-rank" in out and "of 21 tracks" in out
    doc = json.loads((root / "cons" / "consistency.json").read_text())
    ranks = [q["self_rank"] for q in doc["per_query"]]
    assert len(ranks) == 2 and all(1 <= r <= 21 for r in ranks)
    assert doc["summary"]["mean_self_rank"] == sum(ranks) / 2
    assert len({q["query"] for q in doc["per_query"]}) == 2


def test_command_defaults_are_the_library_defaults():
    import typer

    from linernotes.attribution.losses import ScoreSettings
    from linernotes.cli import app
    from linernotes.evaluation.audit import AuditSettings
    from linernotes.unlearning.newton import UnlearnSettings

    group = typer.main.get_command(app)
    consistency = group.commands["evaluate"].commands["consistency"]
    checks = [(group.commands["audit"], AuditSettings()), (consistency, UnlearnSettings()),
              (consistency, ScoreSettings())]
    for command, lib in checks:
        params = {p.name: p.default for p in command.params if p.name != "seed" or
                  command is group.commands["audit"]}  # consistency's seed picks the queries
        shared = [f.name for f in dataclasses.fields(lib) if f.name in params]
        assert len(shared) >= 3, (command.name, shared)
        for field in shared:
            assert params[field] == getattr(lib, field), (command.name, field)
