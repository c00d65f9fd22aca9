"""The run's home: its layout, its family, derived runs, the one retrain cache, devices."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from linernotes import device
from linernotes.artifacts import hash_json
from linernotes.errors import LinernotesError
from linernotes.run import Layout, Retrainer, load_run

from conftest import make_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-home")
    run, manifest = make_tiny_run(root)
    return {"root": root, "run": run, "manifest": manifest}


def _rewrite_config(path, change) -> None:
    """Edit a run's config and re-hash it (as a run of another version would be written)."""
    config = json.loads((path / "config.json").read_text())
    config = change({k: v for k, v in config.items() if k != "hash"})
    config["hash"] = hash_json(config)
    (path / "config.json").write_text(json.dumps(config))


def test_a_run_records_its_family_and_owns_its_layout(tiny, tmp_path):
    run = tiny["run"]
    assert run.config["family"] == "reference" and run.family.name == "reference"
    assert run.model is run.family.model and run.task is run.family.task
    for folder in (run.fisher_dir, run.cache_dir, run.retrains_dir, run.credit_dir):
        assert folder.parent == run.path
    assert run.is_run and not Layout(tmp_path).is_run
    assert Layout(run.path).optout_record == run.optout_record


def test_unknown_family_is_a_clear_error_and_old_runs_load_as_reference(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny["run"].path, other)
    _rewrite_config(other, lambda c: {**c, "family": "stable-audo"})
    with pytest.raises(LinernotesError, match="Unknown model family 'stable-audo'.*reference"):
        load_run(other)
    _rewrite_config(other, lambda c: {k: v for k, v in c.items() if k != "family"})
    old = load_run(other)  # a run written before families existed
    assert old.family.name == "reference" and old.config["weights_hash"] == \
        tiny["run"].config["weights_hash"]


def test_a_derived_run_trains_on_what_its_parent_kept(tiny, tmp_path):
    run, manifest = tiny["run"], tiny["manifest"]
    ids = run.train_ids(manifest)
    removed = ids[:3]
    derived = run.derive(run.model, tmp_path / "derived", {"removed_total": removed})
    assert derived.parent == run.hash and derived.removed_tracks() == removed
    assert derived.train_ids(manifest) == ids[3:]
    _, train, kept = derived.train_set(manifest, progress=False)
    assert kept == ids[3:] and len(train) == len(kept)
    # the one retrain cache is keyed by what a retrain is trained from: the derived run's
    # recipe without X is the original's without X and the removed tracks
    assert Retrainer(derived, manifest).key(ids[3:4]) == \
        Retrainer(run, manifest, derived.retrains_dir).key(ids[:4])
    plain = Retrainer(run, manifest)
    assert plain.key(ids[:2]) == plain.key(list(reversed(ids[:2])))
    assert len({plain.key(ids[:2]), plain.key(ids[:2], seed=7), plain.key(ids[:2], steps=3),
                plain.key(ids[:3])}) == 4
    with pytest.raises(LinernotesError, match="not among its training tracks"):
        Retrainer(derived, manifest).key(removed[:1])  # already gone from the derived run
    with pytest.raises(LinernotesError, match="new folder"):
        run.derive(run.model, run.path)


def test_device_selection_and_moves():
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LinernotesError, match="--device takes auto, cpu, cuda"):
        device.resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LinernotesError, match="no CUDA device"):
            device.resolve("cuda")
    x = torch.ones(2)
    moved = device.move({"a": x, "b": [x, (x, "caption")], "c": 3}, torch.device("cpu"))
    assert moved["a"] is x and moved["b"][1][0] is x and moved["b"][1][1] == "caption"
    assert device.select("cpu") == device.current() == torch.device("cpu")
