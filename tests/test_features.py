import os

import numpy as np
import pytest
import torch

from linernotes.data.dataset import TrackDataset, collate, split_rows
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import read_manifest, write_manifest
from linernotes.errors import LinernotesError
from linernotes.models.mel import FeatureSettings, audio_to_db, db_to_audio

from conftest import TINY_FEATURES


def test_mask_sums_equal_real_frames(tone_corpus):
    store = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)
    s = TINY_FEATURES
    for i, dur in enumerate(tone_corpus["duration"]):
        expected = min(s.n_frames, int(np.ceil(round(dur * s.sample_rate) / s.hop_length)))
        assert int(store.mask[i].sum()) == expected
        # the mask is a prefix: real frames first, then padding
        m = np.asarray(store.mask[i])
        assert not m[expected:].any() and m[:expected].all()
    # padded frames hold silence (the floor), real frames do not
    i = int(np.argmin(tone_corpus["duration"]))
    assert np.all(store.values[i][~store.mask[i]] == s.db_floor)
    assert store.values[i][store.mask[i]].max() > s.db_floor + 30


def test_features_normalised_on_train_real_frames(tone_corpus):
    store = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)
    train = split_rows(tone_corpus, "train")
    x = np.concatenate([store.features(i)[np.asarray(store.mask[i])] for i in train])
    assert abs(x.mean()) < 1e-3 and abs(x.std() - 1) < 1e-2
    # padding (silence) stays within a few standard deviations
    assert store.features(int(np.argmin(tone_corpus["duration"]))).min() > -10
    # round trip through the normalisation
    assert np.allclose(store.stats.denormalise(store.features(0)), store.values[0], atol=1e-3)


def test_dataset_and_collate(tone_corpus):
    store = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)
    ds = TrackDataset(store, tone_corpus, split_rows(tone_corpus, "train", exclude=["alpha-00"]))
    assert "alpha-00" not in [ds[k]["track_id"] for k in range(len(ds))]
    batch = collate([ds[0], ds[1]])
    s = TINY_FEATURES
    assert batch["features"].shape == (2, s.n_frames, s.n_mels)
    assert batch["mask"].dtype == torch.bool and batch["index"].dtype == torch.long
    assert batch["caption"][0] == tone_corpus["caption"][int(batch["index"][0])]


def test_cache_reused_and_invalidated(tone_corpus, tmp_path):
    a = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)
    b = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)
    assert a.root == b.root
    # other feature settings -> another cache
    c = FeatureStore.open(tone_corpus, TINY_FEATURES.replace(n_mels=8), progress=False)
    assert c.root != a.root and c.values.shape[2] == 8
    # a changed manifest (caption edit) -> another cache
    edited = tone_corpus.copy()
    edited.loc[0, "caption"] = "something else entirely"
    write_manifest(edited, a.root.parent.parent)
    d = FeatureStore.open(read_manifest(a.root.parent.parent), TINY_FEATURES, progress=False)
    assert d.root != a.root


def test_cache_resumes_after_partial_build(tone_corpus):
    store = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False, chunk=4)
    reference = np.array(store.values)
    # simulate a build killed after the first chunk: forget completion of the rest
    done = np.load(store.root / "done.npy")
    done[4:] = False
    np.save(store.root / "done.npy", done)
    (store.root / "meta.json").unlink()
    values = np.load(store.root / "values.npy", mmap_mode="r+")
    values[4:] = 0
    values.flush()
    again = FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False, chunk=4)
    assert np.array_equal(np.array(again.values), reference)


def test_missing_audio_is_a_clear_error(tone_corpus):
    os.remove(os.path.join(tone_corpus.attrs["root"], tone_corpus["path"][0]))
    with pytest.raises(LinernotesError, match="missing"):
        FeatureStore.open(tone_corpus, TINY_FEATURES, progress=False)


def test_long_audio_is_cut():
    s = TINY_FEATURES
    db, n_real = audio_to_db(np.ones(s.n_samples * 3, dtype=np.float32) * 0.1, s)
    assert db.shape == (s.n_frames, s.n_mels) and n_real == s.n_frames


def test_vocoder_is_deterministic_and_inverts_real_and_junk_frames():
    s = FeatureSettings(seconds=2.0)
    t = np.arange(s.n_samples) / s.sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    db, n = audio_to_db(tone, s)
    audio = db_to_audio(db, s)
    assert np.array_equal(audio, db_to_audio(db, s))  # seeded phase: same frames, same audio
    back, _ = audio_to_db(audio, s)
    assert np.abs(back[2:n - 2] - db[2:n - 2]).mean() < 6.0  # mel round trip within a few dB
    # loud broadband frames (an untrained model's) and pure silence still give finite audio
    loud = np.random.default_rng(0).normal(40, 20, size=db.shape)
    for frames in (loud, np.full(db.shape, s.db_floor)):
        assert np.isfinite(db_to_audio(frames, s)).all()
