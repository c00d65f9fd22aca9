"""Bad input gets one clear error (the flag or file named, exit 2, no traceback), and a damaged
cache is recomputed, never a crash."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import typing

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from linernotes.cli import app
from linernotes.errors import LinernotesError

from conftest import make_tiny_run

# ---------------------------------------------------------------- every numeric option

#: Options for which 0 is a meaningful value (a seed, "automatic", "all", "none").
ZERO_OK = {
    "--seed", "--clap-seed", "--random-seed", "--alpha", "--damping", "--samples",
    "--retrain-steps", "--max-retain", "--pairs", "--budget", "--workers", "--extra-seeds",
    "--paired-subsets", "--forget-tol", "--auc-tol", "--utility-tol", "--resemblance-tol",
    "--ema-decay", "--warmup", "--guidance", "init --seconds", "--candidates",
    "--reference-tracks",
}
#: What each command needs besides the option, so that nothing real starts if a value slips
#: through: paths that do not exist.
NEEDS = {
    "corpus build": ["--artist", "nobody", "-o", "/nonexistent/corpus"],
    "corpus import": ["--audio", "/nonexistent/audio", "--captions", "/nonexistent/c.csv"],
    "demo": ["-o", "/nonexistent/demo"],
    "init": ["--model", "/nonexistent/model"],
    "audit": ["/nonexistent/optout-run"],
}


def _commands() -> dict[str, object]:
    """Every command of `linernotes`, by its words ("evaluate lds")."""
    def walk(cmd, words):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*words, name])
        else:
            yield " ".join(words), cmd

    return dict(walk(typer.main.get_command(app), []))


COMMANDS = _commands()


def _numeric_options():
    """(command words, flag, type) of every int or float option of every command."""
    for name, cmd in COMMANDS.items():
        for p in cmd.params:
            if type(p).__name__ != "TyperOption":
                continue
            kind = p.type_descriptor.annotation
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = args[0] if len(args) == 1 else kind
            if kind in (int, float):
                yield name, max(p.opts, key=len), kind


OPTIONS = list(_numeric_options())
CASES = [(cmd, flag, value) for cmd, flag, kind in OPTIONS
         for value in ("-1", "nan", "inf" if kind is float else str(10**20), "0")
         if value != "0" or not ({flag, f"{cmd} {flag}"} & ZERO_OK)]


def _args(cmd: str, flag: str, value: str) -> list[str]:
    """The command line: the value, paths that do not exist, and any required argument."""
    params = COMMANDS[cmd].params
    flags = {o for p in params for o in p.opts}
    args = [*cmd.split(), flag, value, *NEEDS.get(cmd, [])]
    for name in ("--run", "--corpus"):
        if name in flags and name not in args:
            args += [name, f"/nonexistent/{name[2:]}"]
    for p in params:
        if type(p).__name__ == "TyperOption" and p.required and not set(p.opts) & set(args):
            args += [max(p.opts, key=len), "/nonexistent/file"]
    if cmd not in NEEDS and any(type(p).__name__ == "TyperArgument" and p.required
                                for p in params):
        args.append("train:x")
    return args


def test_the_table_covers_every_command_with_numbers():
    commands = {cmd for cmd, _, _ in OPTIONS}
    for cmd in ("train", "generate", "fisher", "attribute", "audit", "credit", "init",
                "corpus build", "corpus import", "demo", "evaluate consistency",
                "evaluate leave-k-out", "evaluate lds", "evaluate grid", "evaluate credit"):
        assert cmd in commands, cmd
    assert len(CASES) > 150


@pytest.mark.parametrize(("cmd", "flag", "value"), CASES)
def test_a_bad_number_is_one_clear_error_naming_its_flag(cmd, flag, value):
    args = _args(cmd, flag, value)
    result = CliRunner().invoke(app, args)
    error = result.exception
    if isinstance(error, LinernotesError):  # `linernotes` prints it as one line, exit 2
        text = str(error)
    else:  # a usage error: click's own message, exit 2
        assert isinstance(error, SystemExit) and result.exit_code == 2, (result.output, error)
        text = result.output
    assert flag in text, text
    assert "Traceback" not in result.output
    assert len(str(error or "").splitlines()) <= 1


def test_the_command_line_prints_a_refused_value_as_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "linernotes", "train", "--steps", "0"],
                          capture_output=True, text=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: --steps 0: training needs at least one step."]


# ---------------------------------------------------------------- damaged caches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    run, manifest = make_tiny_run(root, n_per_artist=4, steps=2)
    return {"root": root, "run": run, "manifest": manifest}


def _truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_a_truncated_scoring_shard_or_meta_is_recomputed(tiny, tmp_path, capsys):
    from linernotes.attribution.losses import ScoreSettings, sharded_losses

    run, manifest = tiny["run"], tiny["manifest"]
    _, train, ids = run.train_set(manifest, progress=False)
    s = ScoreSettings(timesteps=2, stride=300, shard_size=4, batch_size=4)

    def losses():
        return sharded_losses(run.task, run.model, train, ids, s, tmp_path / "l", {"run": "a"},
                              progress=False)

    first = losses()
    _truncate(tmp_path / "l" / "shard-00001.npy")
    assert np.array_equal(losses(), first)
    assert "shard-00001.npy cannot be read" in capsys.readouterr().err
    (tmp_path / "l" / "meta.json").write_text('{"provenance": ')
    assert np.array_equal(losses(), first)
    assert "meta.json cannot be read" in capsys.readouterr().err


def test_a_truncated_feature_cache_is_encoded_again(tiny, capsys):
    from linernotes.data.features import FeatureStore

    run, manifest = tiny["run"], tiny["manifest"]
    store = run.feature_store(manifest, progress=False)
    before = np.array(store.values)
    _truncate(store.root / "values.npy", keep=5000)
    again = FeatureStore.open(manifest, store.encoder, cache_dir=store.root.parent,
                              progress=False)
    assert np.array_equal(np.array(again.values), before)
    assert "values.npy cannot be read" in capsys.readouterr().err
    # a partial build whose progress file is damaged starts again from nothing
    (again.root / "meta.json").unlink()
    (again.root / "done.npy").write_bytes(b"not numpy")
    third = FeatureStore.open(manifest, store.encoder, cache_dir=store.root.parent,
                              progress=False)
    assert np.array_equal(np.array(third.values), before)


def test_truncated_gradient_and_similarity_caches_are_recomputed(tiny, tmp_path, capsys):
    from linernotes.attribution.front import attribute_run

    run, manifest = tiny["run"], tiny["manifest"]
    query = f"train:{run.train_ids(manifest)[0]}"
    for method, pattern in (("trak", "gradients-*/shard-*.npy"), ("lpips-dit", "lpips*.npy")):
        kw = {"overrides": {"projection_dim": 64}} if method == "trak" else {}
        first = attribute_run(run, manifest, [query], tmp_path / method, method=method,
                              progress=False, **kw)[0]
        cached = sorted(run.cache_dir.rglob(pattern))
        assert cached, (method, sorted(p.name for p in run.cache_dir.rglob("*")))
        _truncate(cached[0])
        again = attribute_run(run, manifest, [query], tmp_path / f"{method}2", method=method,
                              progress=False, **kw)[0]
        assert np.allclose(again["score"], first["score"], rtol=1e-5, atol=1e-7), method
        assert "cannot be read" in capsys.readouterr().err


def test_files_are_written_with_the_users_umask(tmp_path):
    from linernotes.artifacts import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_a_nan_clip_is_refused_by_every_kind_of_method(tiny, tmp_path):
    from linernotes.attribution.front import attribute_run
    from linernotes.clips import generate

    run, manifest = tiny["run"], tiny["manifest"]
    clip = generate(run, ["a tune"], tmp_path / "clips", seeds=[0],
                    settings=run.family.generate_settings(steps=2), progress=False)[0]
    latent = clip.with_suffix(".npy")
    bad = np.load(latent)
    bad[..., 0] = np.nan
    np.save(latent, bad)
    for method in ("unlearning", "lpips-dit", "trak", "clap-audio"):
        with pytest.raises(LinernotesError, match="(?i)nan|not finite|non-finite"):
            attribute_run(run, manifest, [str(clip)], tmp_path / method, method=method,
                          progress=False)


def test_a_clip_written_to_a_named_wav_has_a_sidecar_naming_it(tiny, tmp_path):
    from linernotes.clips import load_clip

    out = tmp_path / "clip-0.wav"
    res = CliRunner().invoke(app, ["generate", "a tune", "--run", str(tiny["run"].path),
                                   "-o", str(out), "--set", "steps=2"])
    assert res.exit_code == 0, res.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["audio"] == "clip-0.wav" and meta["latent"] == "clip-0.npy"
    assert (tmp_path / meta["audio"]).exists() and not list(tmp_path.glob("*-s0.*"))
    assert load_clip(out).meta["id"]
