"""Caption encodings kept in the run's cache folder: made once, read by every later process."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from linernotes.models import caption_cache
from linernotes.models.caption_cache import CaptionCache
from linernotes.models.task import ReferenceTask
from linernotes.run import load_run

from conftest import make_tiny_run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    run, manifest = make_tiny_run(root, n_per_artist=4, steps=2)
    return {"run": run, "manifest": manifest}


def _never(caption: str):
    raise AssertionError(f"encoded {caption!r} again")


def test_a_new_process_reads_the_encodings_an_earlier_one_kept(tiny):
    run, captions = tiny["run"], list(dict.fromkeys(tiny["manifest"]["caption"]))
    assert not list((run.path / "cache").glob("captions-*/part-*.pt"))
    writer = textwrap.dedent(f"""
        from linernotes.data.manifest import read_manifest
        from linernotes.run import load_run
        run = load_run({str(run.path)!r})
        manifest = read_manifest({str(run.path.parent / "corpus")!r})
        captions = list(dict.fromkeys(manifest["caption"]))
        run.task.text_condition(captions, 12)
    """)  # no explicit save: the process keeps them as it exits
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((run.path / "cache").glob("captions-*/part-*.pt"))) == 1

    reader = load_run(run.path)
    reader.task.captions.encode = _never
    kept = reader.task.text_condition(captions, 12)
    fresh = ReferenceTask(run.task.clap, *run.task.latent_shape).text_condition(captions, 12)
    for key in ("clap", "words", "words_mask"):
        assert torch.equal(kept[key], fresh[key]), key


def test_a_damaged_part_is_encoded_again_and_removed(tiny, capfd):
    run, captions = tiny["run"], list(dict.fromkeys(tiny["manifest"]["caption"]))[:3]
    first = load_run(run.path)
    folder = first.task.captions.folder
    for part in folder.glob("part-*.pt"):
        part.unlink()
    want = first.task.text_condition(captions, 12)
    first.task.captions.save()
    (folder / "part-0-damaged.pt").write_bytes(b"not a torch file")

    again = load_run(run.path)
    got = again.task.text_condition(captions, 12)
    assert "part-0-damaged.pt cannot be read" in capfd.readouterr().err
    assert not (folder / "part-0-damaged.pt").exists()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_parts_written_while_encoding_are_merged_when_many(tmp_path, monkeypatch):
    monkeypatch.setattr(caption_cache, "SAVE_SECONDS", 0.0)  # a part after every caption
    monkeypatch.setattr(caption_cache, "MERGE_FROM", 4)

    def encode(caption: str):
        return (torch.full((2,), float(len(caption))), torch.arange(len(caption)))

    writer = CaptionCache(encode)
    writer.keep_in(tmp_path)
    captions = [f"caption {'x' * k}" for k in range(6)]
    want = writer.get(captions)
    assert len(list(tmp_path.glob("part-*.pt"))) == 6

    reader = CaptionCache(_never)
    reader.keep_in(tmp_path)
    got = reader.get(captions[::-1])[::-1]
    assert len(list(tmp_path.glob("part-*.pt"))) == 1  # six read, merged into one
    for w, g in zip(want, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(w, g, strict=True))
    third = CaptionCache(_never)
    third.keep_in(tmp_path)
    assert len(third.get(captions)) == 6


def test_a_dropped_cache_keeps_what_it_encoded(tmp_path):
    cache = CaptionCache(lambda c: (torch.ones(3),))
    cache.keep_in(tmp_path)
    cache.get(["a tune"])
    del cache  # e.g. a retrained run scored and let go before the process ends
    gc.collect()
    reader = CaptionCache(_never)
    reader.keep_in(tmp_path)
    assert torch.equal(reader.get(["a tune"])[0][0], torch.ones(3))


def test_a_retrain_shares_its_runs_caption_folder(tiny):
    from linernotes.run.retrain import Retrainer

    run, manifest = tiny["run"], tiny["manifest"]
    retrain = Retrainer(run, manifest)([manifest["track_id"][0]])
    assert retrain.path.parent == run.retrains_dir
    assert retrain.task.captions.folder == load_run(run.path).task.captions.folder
    assert retrain.task.captions.folder.parent == (run.path / "cache").resolve()
    # a folder above a run that merely has a config.json (a model folder, say) is never used
    (run.path.parent / "config.json").write_text("{}")
    try:
        assert load_run(run.path).task.captions.folder.parent == (run.path / "cache").resolve()
    finally:
        (run.path.parent / "config.json").unlink()


def test_a_folder_that_cannot_be_written_keeps_the_encodings_in_memory(tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = CaptionCache(lambda c: (torch.zeros(1),))
    cache.keep_in(blocker / "captions")  # under a file: cannot be made
    cache.get(["a", "b"])
    cache.save()
    assert "cannot keep caption encodings" in capfd.readouterr().err
    assert cache.folder is None and set(cache.memory) == {"a", "b"}
