"""benchmarks/planted.py can be re-run honestly on other data: it picks the planted tracks as
told, trains (or checks) a CLAP for the corpus it is given, and writes docs only when asked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from linernotes.data.manifest import manifest_hash, read_manifest
from linernotes.errors import LinernotesError

from conftest import make_tone_corpus

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "planted.py"


def _module():
    spec = importlib.util.spec_from_file_location("planted", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPT.parent))
    spec.loader.exec_module(mod)
    return mod


def _script(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_planted_tracks_follow_the_pick_the_seed_and_the_named_artists(tmp_path):
    planted = _module()
    df = make_tone_corpus(tmp_path / "c", n_per_artist=6)
    assert planted.pick_tracks(df, 2) == ["alpha-00", "beta-00"]
    draws = {tuple(planted.pick_tracks(df, 2, pick="random", seed=s)) for s in range(8)}
    assert len(draws) > 1  # the seed changes the pick
    assert planted.pick_tracks(df, 2, pick="random", seed=5) == planted.pick_tracks(
        df, 2, pick="random", seed=5)
    for ids in draws:
        assert len({t.split("-")[0] for t in ids}) == 2  # one track per artist
    assert planted.pick_tracks(df, 0, artists=["Gamma"]) == ["gamma-00"]
    with pytest.raises(LinernotesError, match="Delta"):
        planted.pick_tracks(df, 0, artists=["Delta"])
    with pytest.raises(LinernotesError, match="only 3 artists"):
        planted.pick_tracks(df, 4)


def test_planted_trains_its_own_clap_refuses_a_foreign_one_and_leaves_the_docs(tmp_path):
    make_tone_corpus(tmp_path / "corpus")
    make_tone_corpus(tmp_path / "other", n_per_artist=5)
    docs = (ROOT / "docs" / "benchmarks.md").read_bytes()
    res = _script("--corpus", tmp_path / "corpus", "--out", tmp_path / "out", "--planted", 1,
                  "--pick", "random", "--seed", 3, "--copies", 2, "--clips", 1, "--steps", 2,
                  "--seconds", 1, "--clap-steps", 2)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ranked first for" in res.stdout
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == docs  # no --write, no change
    clap = tmp_path / "out" / "run" / "clap"
    trained_on = json.loads((clap / "clap.json").read_text())["provenance"]["manifest_hash"]
    assert trained_on == manifest_hash(read_manifest(tmp_path / "corpus"))
    refused = _script("--corpus", tmp_path / "other", "--out", tmp_path / "o2", "--clap", clap)
    assert refused.returncode == 2
    assert "trained on another corpus" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    unknown = _script("--corpus", tmp_path / "other", "--artist", "Nobody")
    assert unknown.returncode == 2 and "Nobody" in unknown.stderr
    assert _script("--corpus", tmp_path / "other", "--copies", 0).returncode == 2
