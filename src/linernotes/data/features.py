"""Every track's training features, computed once into a resumable memory-mapped cache.

A model family turns a track's audio into its features (the reference family: log-mel frames;
`models.mel.FeatureSettings`). The store does the rest for any family: it calls the family's
feature encoder on every audio file of a manifest (in worker processes), writes the values and a
real-frame mask into memory maps chunk by chunk (a killed build resumes at the next chunk), fits
the encoder's normalisation on the train split, and reads tracks back normalised.

A feature encoder is an object with `shape` (one track's stored values, frames first),
`cache_key()`, `encode_file(path) -> (values, n_real_frames)`, `fit_stats(values, mask, rows)`
(an object with `normalise`, `denormalise` and `to_dict`) and `load_stats(dict)`. It is pickled
to worker processes, unless it encodes whole chunks itself (`encode_files(paths)`: a model that
batches on its own device, such as a VAE).
"""

from __future__ import annotations

import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from linernotes.artifacts import atomic_path, hash_json, load_cached, read_json, write_json
from linernotes.data.manifest import audio_path, manifest_hash
from linernotes.errors import LinernotesError


class Unnormalised:
    """Features used as they are (a latent or codes): an encoder's "stats" without
    normalisation."""

    def normalise(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float32)  # a writable copy (the store's are memory-mapped)

    denormalise = normalise

    def to_dict(self) -> dict:
        return {}


class FixedLengthAudio:
    """What a feature encoder of fixed-length audio shares (a VAE's latents, a codec's codes):
    each file read at `sample_rate` and `channels`, zero-padded or cut to `n_frames * hop`
    samples, encoded `batch_size` files at a time by the subclass's `encode` (a batch of
    waveforms (B, channels, n_frames * hop) to (B, n_frames, ...)); values used as they are."""

    sample_rate: int
    channels: int
    hop: int
    n_frames: int
    batch_size: int

    def encode(self, waveforms: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def real_frames(self, n_samples: int) -> int:
        return min(self.n_frames, -(-n_samples // self.hop))

    def waveform(self, path) -> tuple[np.ndarray, int]:
        """(channels, n_frames * hop) audio of a file, zero-padded or cut, and its real frames."""
        from linernotes.data.audio import load_audio

        audio = load_audio(path, self.sample_rate, self.channels)
        out = np.zeros((self.channels, self.n_frames * self.hop), dtype=np.float32)
        n = min(audio.shape[1], out.shape[1])
        out[:, :n] = audio[:, :n]
        return out, self.real_frames(audio.shape[1])

    def encode_files(self, paths) -> list[tuple[np.ndarray, int]]:
        """Each file's values and real frames, encoded in batches on the encoder's device."""
        out = []
        for lo in range(0, len(paths), self.batch_size):
            waves = [self.waveform(p) for p in paths[lo : lo + self.batch_size]]
            values = self.encode(np.stack([w for w, _ in waves]))
            out += [(z, n) for z, (_, n) in zip(values, waves)]
        return out

    def encode_file(self, path: str) -> tuple[np.ndarray, int]:
        return self.encode_files([path])[0]

    def fit_stats(self, values, mask, rows) -> Unnormalised:
        return Unnormalised()

    def load_stats(self, data: dict) -> Unnormalised:
        return Unnormalised()


class FeatureStore:
    """The cached features of every track of a manifest, in manifest order (memory-mapped).

    `values[i]` is the encoder's raw output for track i, `mask[i]` (n_frames,) bool its real
    frames, `stats` the normalisation; `features(i)` is track i as the model sees it.
    """

    def __init__(self, root: Path, manifest: pd.DataFrame, encoder):
        self.root = root
        self.encoder = encoder
        self.track_ids: list[str] = manifest["track_id"].tolist()
        self._index = {t: i for i, t in enumerate(self.track_ids)}
        self.values = np.load(root / "values.npy", mmap_mode="r")
        self.mask = np.load(root / "mask.npy", mmap_mode="r")
        self.stats = encoder.load_stats(read_json(root / "stats.json"))
        shape = (len(self.track_ids), *encoder.shape)
        if self.values.shape != shape or self.mask.shape != shape[:2]:
            raise ValueError(f"holds {self.values.shape} values and {self.mask.shape} masks, "
                             f"not {shape}")

    def index_of(self, track_ids: list[str]) -> np.ndarray:
        missing = [t for t in track_ids if t not in self._index]
        if missing:
            raise LinernotesError(f"Unknown track id(s) {missing[:5]} (not in the manifest).")
        return np.array([self._index[t] for t in track_ids], dtype=np.int64)

    def features(self, i: int) -> np.ndarray:
        """Normalised features of track i, float32."""
        return self.stats.normalise(np.asarray(self.values[i]))

    @classmethod
    def open(
        cls,
        manifest: pd.DataFrame,
        encoder,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        progress: bool = True,
        chunk: int = 64,
    ) -> FeatureStore:
        """Load the cache for (manifest, encoder), computing or finishing it first if needed."""
        key = hash_json({"manifest": manifest_hash(manifest), "encoder": encoder.cache_key()})
        base = Path(cache_dir) if cache_dir else Path(manifest.attrs.get("root", ".")) / "cache"
        root = base / f"features-{key}"
        meta = root / "meta.json"
        if meta.exists():  # finished before
            if load_cached(meta, lambda p: _check_key(p, key)) is not None:
                store = load_cached(root / "values.npy", lambda _: cls(root, manifest, encoder))
                if store is not None:
                    return store
            _clear(root)  # a damaged finished cache: encode again
        _build(root, manifest, encoder, workers, progress, chunk)
        return cls(root, manifest, encoder)


def _check_key(path: Path, key: str) -> bool:
    if read_json(path).get("key") != key:
        raise ValueError(f"is not the meta of feature cache {key}")
    return True


def _clear(root: Path) -> None:
    for name in ("meta.json", "stats.json", "done.npy", "values.npy", "mask.npy"):
        (root / name).unlink(missing_ok=True)


def _encode(args: tuple) -> tuple[np.ndarray, int]:
    path, encoder = args
    return encoder.encode_file(path)


def _open_partial(root: Path, shape: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(done, values, mask) of a build in progress, the memory maps writable."""
    done = np.load(root / "done.npy")
    values = np.load(root / "values.npy", mmap_mode="r+")
    mask = np.load(root / "mask.npy", mmap_mode="r+")
    if done.shape != shape[:1] or values.shape != shape or mask.shape != shape[:2]:
        raise ValueError(f"holds {values.shape} values, not {shape}")
    return done, values, mask


def _build(root: Path, manifest: pd.DataFrame, encoder, workers, progress, chunk):
    """Compute features chunk by chunk into memmaps; a killed build resumes at the next chunk."""
    root.mkdir(parents=True, exist_ok=True)
    n, shape = len(manifest), (len(manifest), *encoder.shape)
    if n == 0:
        raise LinernotesError("The manifest has no tracks; nothing to featurise.")
    paths = [str(audio_path(manifest, row)) for _, row in manifest.iterrows()]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise LinernotesError(
            f"{len(missing)} audio file(s) of the manifest are missing, e.g. {missing[0]}; "
            "rebuild or re-import the corpus."
        )
    values_path, mask_path, done_path = root / "values.npy", root / "mask.npy", root / "done.npy"
    opened = load_cached(done_path, lambda p: _open_partial(root, shape))
    if opened is None:  # a new build, or a damaged partial one: start from nothing
        np.lib.format.open_memmap(values_path, mode="w+", dtype=np.float32, shape=shape).flush()
        np.lib.format.open_memmap(mask_path, mode="w+", dtype=bool, shape=shape[:2]).flush()
        with atomic_path(done_path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.zeros(n, dtype=bool))
        opened = _open_partial(root, shape)
    done, values, mask = opened
    todo = np.flatnonzero(~done)
    workers = workers or os.cpu_count() or 1
    batched = getattr(encoder, "encode_files", None)
    pool = (get_context("spawn").Pool(workers)
            if batched is None and workers > 1 and len(todo) > chunk else None)
    n_frames = shape[1]
    try:
        bar = tqdm(total=n, initial=n - len(todo), desc="features", disable=not progress)
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            if batched is not None:
                results = batched([paths[i] for i in idx])
            else:
                jobs = [(paths[i], encoder) for i in idx]
                results = pool.map(_encode, jobs) if pool else [_encode(j) for j in jobs]
            for i, (frames, n_real) in zip(idx, results):
                values[i] = frames
                mask[i] = np.arange(n_frames) < n_real
            values.flush()
            mask.flush()
            done[idx] = True
            with atomic_path(done_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, done)
            bar.update(len(idx))
        bar.close()
    finally:
        if pool:
            pool.close()
    train = np.flatnonzero((manifest["split"] == "train").to_numpy())
    if len(train) == 0:
        train = np.arange(n)
    write_json(root / "stats.json", encoder.fit_stats(values, mask, train).to_dict())
    key = root.name.removeprefix("features-")
    write_json(root / "meta.json", {"key": key, "encoder": encoder.cache_key(), "n_tracks": n})
