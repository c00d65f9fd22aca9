"""Similarity baselines (CLAP, basic-pitch, chroma-MFCC, LPIPS-DiT) and quality measures."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from linernotes.attribution.front import query_from_spec
from linernotes.attribution.scores import SCORE_COLUMNS, read_scores
from linernotes.attribution.similarity import (
    BASIC_PITCH_DIM,
    SIMILARITY_METHODS,
    LpipsSettings,
    basic_pitch_embedding,
    similarity_method,
)
from linernotes.errors import LinernotesError
from linernotes.evaluation.quality import (
    artist_centroids,
    assign_artists,
    assignment_accuracy,
    frechet_distance,
    leave_one_out_accuracy,
)

from conftest import make_tiny_run

HAS_BASIC_PITCH = (importlib.util.find_spec("basic_pitch") is not None
                   and importlib.util.find_spec("onnxruntime") is not None)
NO_BASIC_PITCH = ("basic-pitch or onnxruntime is not installed "
                  "(pip install --no-deps basic-pitch; pip install onnxruntime)")
SELF_FIRST = ("clap-audio", "chroma-mfcc", "basic-pitch", "lpips-dit")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("sim"))


def _methods():
    for name in SIMILARITY_METHODS:
        marks = [pytest.mark.skipif(not HAS_BASIC_PITCH, reason=NO_BASIC_PITCH)] \
            if name == "basic-pitch" else []
        yield pytest.param(name, marks=marks, id=name)


def _kwargs(name: str) -> dict:
    return {"settings": LpipsSettings(timesteps=(0.2, 0.6), batch_size=4)} \
        if name == "lpips-dit" else {}


@pytest.mark.parametrize("name", list(_methods()))
def test_score_table_over_all_tracks_and_self_first(tiny_run, tmp_path, name):
    run, manifest = tiny_run
    method = similarity_method(name, run, manifest, progress=False, **_kwargs(name))
    train_ids = set(manifest.loc[manifest["split"] == "train", "track_id"])
    for tid in sorted(train_ids)[:3]:
        query = query_from_spec(f"train:{tid}", run, method.store, manifest)
        df = method.attribute(query, tmp_path / name)
        assert set(df["track_id"]) == train_ids and len(df) == len(train_ids)
        assert np.isfinite(df["score"]).all() and (df["method"] == name).all()
        assert df["rank"].min() == 1 and df["rank"].is_monotonic_increasing
        stored = read_scores(tmp_path / name / f"{tid}.parquet")
        assert list(stored.columns[: len(SCORE_COLUMNS)]) == SCORE_COLUMNS
        assert (tmp_path / name / f"{tid}.json").exists()
        if name in SELF_FIRST:
            assert df.loc[df["track_id"] == tid, "rank"].item() == 1, (name, tid)
    # cached: a second instance reads the training features back and agrees
    again = similarity_method(name, run, manifest, progress=False, **_kwargs(name))
    query = query_from_spec(f"train:{sorted(train_ids)[0]}", run, again.store, manifest)
    assert np.allclose(again.similarity(query)[0], method.similarity(query)[0], atol=1e-5)


@pytest.mark.skipif(not HAS_BASIC_PITCH, reason=NO_BASIC_PITCH)
def test_basic_pitch_embedding_is_deterministic_and_sized():
    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    other = (0.3 * np.sin(2 * np.pi * 523.25 * t)).astype(np.float32)
    a, b = basic_pitch_embedding(tone, sr), basic_pitch_embedding(tone, sr)
    assert a.shape == (BASIC_PITCH_DIM,) and a.dtype == np.float32
    assert np.array_equal(a, b) and abs(float(np.linalg.norm(a)) - 1) < 1e-5
    assert float(a @ basic_pitch_embedding(other, sr)) < 0.999
    assert basic_pitch_embedding(np.zeros(0, np.float32), sr).shape == (BASIC_PITCH_DIM,)


def test_generated_style_query_without_audio_uses_griffin_lim(tiny_run, tmp_path):
    run, manifest = tiny_run
    method = similarity_method("chroma-mfcc", run, manifest, progress=False)
    query = query_from_spec(f"train:{method.train_ids[0]}", run, method.store, manifest)
    query.track_id, query.source, query.key = None, "", "vocoded"
    df = method.attribute(query, tmp_path)
    assert len(df) == len(method.train_ids) and np.isfinite(df["score"]).all()
    assert np.array_equal(method.similarity(query)[0], df.set_index("track_id").loc[
        method.train_ids, "score"].to_numpy())  # seeded Griffin-Lim: same audio each time


def test_unknown_method_is_a_clear_error(tiny_run):
    run, manifest = tiny_run
    with pytest.raises(LinernotesError, match="Unknown similarity method"):
        similarity_method("dino", run, manifest)
    with pytest.raises(LinernotesError, match="timesteps"):
        LpipsSettings(timesteps=(0.0,))


def test_frechet_distance_zero_for_itself_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    d1, d2 = frechet_distance(a, a + 0.5), frechet_distance(a, a + 1.0)
    assert d1 == pytest.approx(8 * 0.25, rel=1e-3) and d2 > d1
    assert frechet_distance(a, 2 * a) > 1.0  # a scale change counts too
    few = rng.standard_normal((5, 32))  # rank-deficient covariances: still finite
    assert np.isfinite(frechet_distance(few, few + 0.1))
    with pytest.raises(LinernotesError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_centroids_and_assignment():
    rng = np.random.default_rng(1)
    centres = np.eye(3, 6) * 4
    labels = np.repeat(["Ann", "Bo", "Cy"], 10)
    emb = centres[np.repeat(np.arange(3), 10)] + rng.standard_normal((30, 6)) * 0.3
    cents = artist_centroids(emb, labels)
    assert list(cents) == ["Ann", "Bo", "Cy"]
    assert np.allclose([np.linalg.norm(v) for v in cents.values()], 1)
    assert list(assign_artists(centres, cents)) == ["Ann", "Bo", "Cy"]
    acc, chance = assignment_accuracy(emb, labels, cents)
    assert acc == 1.0 and chance == pytest.approx(1 / 3)
    assert leave_one_out_accuracy(emb, labels) == 1.0
