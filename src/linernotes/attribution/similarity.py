"""Non-counterfactual similarity baselines: CLAP audio/text, basic-pitch, chroma-MFCC, LPIPS-DiT.

Each method is an `Attributor` built once per (run, training set), writing the same score table
as unlearning. Training-side features are computed once and cached in the run's cache folder,
keyed by the run, the training rows and the method's settings. Audio comes from the corpus files,
the clip's WAV, or the run's family turning features back into audio.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from linernotes.artifacts import atomic_path, hash_file, hash_json, load_cached, read_json
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.embeddings import audio_embeddings, track_embeddings
from linernotes.attribution.query import Query
from linernotes.clips import KIND as CLIP_KIND
from linernotes.config import Settings, require
from linernotes.data.audio import AUDIO_SUFFIXES, load_audio, mono
from linernotes.data.descriptors import chroma_mfcc
from linernotes.data.manifest import audio_path
from linernotes.errors import LinernotesError
from linernotes.task import draw_noise

# ---------------------------------------------------------------------------- audio of items


def track_audio(run, manifest: pd.DataFrame, row: int, sample_rate: int) -> np.ndarray:
    """A manifest row's audio at `sample_rate`, cut to the model's clip length."""
    audio = load_audio(audio_path(manifest, manifest.iloc[int(row)]), sample_rate)
    return audio[: int(round(run.family.seconds * sample_rate))]


def query_audio(query: Query, run, manifest: pd.DataFrame, sample_rate: int) -> np.ndarray:
    """The query's audio: its training track, its clip's WAV or audio file, else its features
    decoded by the run's family."""
    if query.track_id is not None:
        row = int(np.flatnonzero(manifest["track_id"].to_numpy() == query.track_id)[0])
        return track_audio(run, manifest, row, sample_rate)
    src = Path(query.source) if query.source else None
    if src is not None and src.exists():
        side = src.with_suffix(".json")
        if side.exists():
            meta = read_json(side)
            if meta.get("kind") == CLIP_KIND:
                src = side.parent / meta["audio"]
        if src.suffix.lower() in AUDIO_SUFFIXES and src.exists():
            return load_audio(src, sample_rate)
    audio = mono(run.family.decode(query.features.numpy(), query.mask.numpy()))
    if sample_rate != run.family.sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=run.family.sample_rate, target_sr=sample_rate,
                                 res_type="soxr_hq")
    return audio


def _cached(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """np.load(path) if it exists and reads, else compute, save atomically and return."""
    value = load_cached(path, np.load)
    if value is not None:
        return value
    value = np.asarray(compute())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, value)
    return value


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


# ---------------------------------------------------------------------------- basic-pitch

BASIC_PITCH_RATE = 22050
_BP_WINDOW = 43844  # samples per model window: 2 s at 22.05 kHz minus one hop
_BP_HOP = 256  # samples per output frame (~86 frames/s)
_BP_OVERLAP = 30  # frames shared by neighbouring windows; half is trimmed on each side
_BP_OUTPUTS = ("StatefulPartitionedCall:1", "StatefulPartitionedCall:2",
               "StatefulPartitionedCall:0")  # note (88), onset (88), contour (264)
_MELODIC_LAGS = (8, 21)  # frames (~0.09 s, ~0.24 s) between compared chroma frames
_RHYTHM_EDGES = (2, 3, 4, 5, 6, 8, 10, 12, 15, 19, 23, 29, 36, 45, 56, 70, 87)  # frames
_BLOCKS = {"pitch_class": 12, "register": 22, "harmony": 6, "melody": 12 * len(_MELODIC_LAGS),
           "rhythm": len(_RHYTHM_EDGES) - 1, "tonal": 12, "activity": 5}
#: Size of a basic-pitch embedding (the blocks above, concatenated).
BASIC_PITCH_DIM = sum(_BLOCKS.values())
#: Bumped whenever the pooling changes (invalidates cached embeddings).
BASIC_PITCH_VERSION = 1
_EPS = 1e-3

_SESSION: dict[str, object] = {}


def basic_pitch_model_path() -> Path:
    """The ONNX model file shipped in the installed basic-pitch package (not imported)."""
    spec = importlib.util.find_spec("basic_pitch")
    if spec is None or not spec.submodule_search_locations:
        raise LinernotesError("basic-pitch is not installed: run `pip install --no-deps "
                              "basic-pitch` and `pip install onnxruntime`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "saved_models/icassp_2022/nmp.onnx"
    if not path.exists():
        raise LinernotesError(f"basic-pitch's ONNX model is missing ({path}); reinstall it.")
    return path


def _session():
    if "session" not in _SESSION:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise LinernotesError("basic-pitch embeddings need onnxruntime: "
                                  "`pip install onnxruntime`.") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        path = basic_pitch_model_path()
        _SESSION["session"] = ort.InferenceSession(str(path), opts,
                                                   providers=["CPUExecutionProvider"])
        _SESSION["hash"] = hash_file(path)
    return _SESSION["session"]


def basic_pitch_posteriors(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """basic-pitch's note (T, 88), onset (T, 88) and contour (T, 264) activations of mono audio
    at 22.05 kHz; overlapping 2-s windows, half the overlap trimmed on each side."""
    half = _BP_OVERLAP * _BP_HOP // 2
    x = np.concatenate([np.zeros(half, np.float32), np.asarray(audio, np.float32)])
    step = _BP_WINDOW - _BP_OVERLAP * _BP_HOP
    n_win = 1 if len(x) <= _BP_WINDOW else int(np.ceil((len(x) - _BP_WINDOW) / step)) + 1
    windows = np.zeros((n_win, _BP_WINDOW, 1), np.float32)
    for i in range(n_win):
        chunk = x[i * step : i * step + _BP_WINDOW]
        windows[i, : len(chunk), 0] = chunk
    outs = _session().run(list(_BP_OUTPUTS), {"serving_default_input_2:0": windows})
    n_frames = max(1, int(np.ceil(len(audio) / _BP_HOP)))
    cut = _BP_OVERLAP // 2
    return tuple(o[:, cut:-cut].reshape(-1, o.shape[-1])[:n_frames] for o in outs)


def _centred(v: np.ndarray) -> np.ndarray:
    """log(eps + v), minus its mean, unit norm: one block of the embedding."""
    v = np.log(_EPS + np.asarray(v, np.float64))
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


def _fold(m: np.ndarray) -> np.ndarray:
    """(..., 88) piano keys -> (..., 12) pitch classes."""
    pad = np.zeros(m.shape[:-1] + (96,))
    pad[..., :88] = m
    return pad.reshape(m.shape[:-1] + (8, 12)).sum(-2)


def pool_posteriors(note: np.ndarray, onset: np.ndarray, contour: np.ndarray) -> np.ndarray:
    """Time-pooled statistics of basic-pitch activations: a (BASIC_PITCH_DIM,) unit vector.

    Blocks (each centred in log space and unit-normed): pitch-class profile, register (contour
    in 4-semitone bands), harmonic intervals within frames, melodic intervals between frames at
    two lags, onset-envelope autocorrelation (rhythm), tonic-aligned pitch-class profile, and
    activity (polyphony, onset rate, loudness, mean pitch, contour spread).
    """
    chroma = _fold(note)
    frame_pc = chroma / (chroma.sum(1, keepdims=True) + _EPS)
    profile = chroma.mean(0) / (chroma.mean(0).sum() + _EPS)
    band = contour.mean(0).reshape(88, 3).sum(1).reshape(22, 4).sum(1)
    harmony = [(frame_pc * np.roll(frame_pc, -k, axis=1)).sum(1).mean() for k in range(1, 7)]
    melody = []
    for lag in _MELODIC_LAGS:
        if len(frame_pc) > lag:
            a, b = frame_pc[:-lag], frame_pc[lag:]
            melody += [(a * np.roll(b, -k, axis=1)).sum(1).mean() for k in range(12)]
        else:
            melody += [0.0] * 12
    env = onset.max(1) - onset.max(1).mean()
    ac = np.correlate(env, env, "full")[len(env) - 1 :]
    ac = np.pad(ac / (ac[0] + 1e-9), (0, _RHYTHM_EDGES[-1]))
    rhythm = np.array([ac[a:b].mean() for a, b in zip(_RHYTHM_EDGES[:-1], _RHYTHM_EDGES[1:])])
    rhythm = rhythm - rhythm.mean()
    rhythm = rhythm / (np.linalg.norm(rhythm) or 1.0)
    tonal = np.roll(profile, -int(np.argmax(profile)))
    keys = np.arange(88)
    activity = [
        (note > 0.5).sum(1).mean(), (onset > 0.5).sum(1).mean(), note.mean(),
        float((note * keys).sum() / (note.sum() + _EPS)) / 88.0, contour.std(),
    ]
    parts = [_centred(profile), _centred(band / (band.sum() + _EPS)), _centred(harmony),
             _centred(melody), rhythm, _centred(tonal), _centred(activity)]
    out = np.concatenate(parts)
    return _unit(out[None])[0]


def basic_pitch_embedding(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A (BASIC_PITCH_DIM,) L2-normalised melody/identity embedding of mono audio."""
    audio = np.asarray(audio, np.float32)
    if sample_rate != BASIC_PITCH_RATE and len(audio):
        import librosa

        audio = librosa.resample(audio, orig_sr=sample_rate, target_sr=BASIC_PITCH_RATE,
                                 res_type="soxr_hq")
    if len(audio) == 0:
        return np.zeros(BASIC_PITCH_DIM, np.float32)
    return pool_posteriors(*basic_pitch_posteriors(audio))


def basic_pitch_frames(run, features: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """(B, BASIC_PITCH_DIM) embeddings of normalised features, decoded to audio by the run's
    family (the audit's `EMBEDDERS` hook form)."""
    feats = np.asarray(features.detach().cpu().numpy())
    masks = np.asarray(mask.cpu().numpy(), dtype=bool)
    rate = run.family.sample_rate
    return np.stack([basic_pitch_embedding(mono(run.family.decode(x, m)), rate)
                     for x, m in zip(feats, masks)])


# ---------------------------------------------------------------------------- the methods


class SimilarityMethod(Attributor):
    """Shared parts: the run's training set and the record; subclasses implement `similarity`."""

    def __init__(self, run, manifest: pd.DataFrame, progress: bool = True):
        self.store, train, train_ids = run.train_set(manifest, progress)
        super().__init__(run.hash, manifest, train_ids)
        self.run, self.progress = run, progress
        self.rows = np.asarray(train.rows, dtype=np.int64)
        self.cache_dir = run.cache_dir

    def similarity(self, query: Query) -> tuple[np.ndarray, dict]:
        """(N,) similarity of every training track to `query` (higher = more credited), record."""
        raise NotImplementedError

    def scores(self, query: Query, work: Path) -> Scored:
        t0 = time.perf_counter()
        scores, extra = self.similarity(query)
        return Scored(scores, {"seconds": time.perf_counter() - t0, **extra})

    def _cache(self, name: str, key: object) -> Path:
        return self.cache_dir / f"{name}-{hash_json([self.run.hash, self.rows.tolist(), key])}.npy"

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)


class ClapAudioSimilarity(SimilarityMethod):
    """Cosine of the query's CLAP audio embedding with each training track's."""

    method = "clap-audio"

    def train_embeddings(self) -> np.ndarray:
        """(N, D) CLAP audio embeddings of the training tracks (cached by `embeddings.py`)."""
        return track_embeddings(self.run, self.store, self.rows)

    def query_embedding(self, query: Query) -> np.ndarray:
        return audio_embeddings(self.run, query.features[None], query.mask[None])[0]

    def similarity(self, query: Query) -> tuple[np.ndarray, dict]:
        return self.train_embeddings() @ self.query_embedding(query), {}


class ClapTextSimilarity(ClapAudioSimilarity):
    """Cosine of the query caption's CLAP text embedding with each training track's audio."""

    method = "clap-text"

    def query_embedding(self, query: Query) -> np.ndarray:
        return self.run.family.embed_text([query.caption]).float().numpy()[0]


class _AudioEmbeddingSimilarity(SimilarityMethod):
    """Cosine of embeddings computed from audio (training FLACs, the query's audio)."""

    sample_rate = 16000
    version: object = None

    def embed(self, audio: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def train_embeddings(self) -> np.ndarray:
        """(N, D) embeddings of the training tracks' audio, computed once then cached."""
        def compute() -> np.ndarray:
            bar = self._bar(len(self.rows), self.method)
            out = []
            for row in self.rows:
                out.append(self.embed(track_audio(self.run, self.manifest, row,
                                                  self.sample_rate)))
                bar.update(1)
            bar.close()
            return np.stack(out)

        return _cached(self._cache(self.method, self.version), compute)

    def query_embedding(self, query: Query) -> np.ndarray:
        return self.embed(query_audio(query, self.run, self.manifest, self.sample_rate))


class BasicPitchSimilarity(_AudioEmbeddingSimilarity):
    """Cosine of basic-pitch embeddings (pooled note/onset/contour activations): a
    melody/identity view, our stand-in for CLEWS."""

    method = "basic-pitch"
    sample_rate = BASIC_PITCH_RATE

    def __init__(self, run, manifest: pd.DataFrame, progress: bool = True):
        super().__init__(run, manifest, progress)
        _session()
        self.version = [BASIC_PITCH_VERSION, _SESSION["hash"]]

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return basic_pitch_embedding(audio, BASIC_PITCH_RATE)

    def similarity(self, query: Query) -> tuple[np.ndarray, dict]:
        return self.train_embeddings() @ self.query_embedding(query), {"dim": BASIC_PITCH_DIM}


class ChromaMfccSimilarity(_AudioEmbeddingSimilarity):
    """Cosine of chroma + MFCC statistics, each dimension z-scored over the training tracks."""

    method = "chroma-mfcc"
    version = 1

    def __init__(self, run, manifest: pd.DataFrame, progress: bool = True):
        super().__init__(run, manifest, progress)
        self.sample_rate = run.family.sample_rate

    def embed(self, audio: np.ndarray) -> np.ndarray:
        return chroma_mfcc(audio, self.sample_rate)

    def _standardise(self, x: np.ndarray, train: np.ndarray) -> np.ndarray:
        mean, std = train.mean(0), train.std(0)
        return _unit((x - mean) / np.where(std > 1e-8, std, 1.0))

    def similarity(self, query: Query) -> tuple[np.ndarray, dict]:
        train = self.train_embeddings()
        q = self._standardise(self.query_embedding(query)[None], train)[0]
        return self._standardise(train, train) @ q, {}


# ---------------------------------------------------------------------------- LPIPS-style DiT

CONDITIONING = ("own", "null")


@dataclasses.dataclass(frozen=True)
class LpipsSettings(Settings):
    """Which activations the LPIPS-style similarity compares, and under which draws."""

    timesteps: tuple[float, ...] = (0.2, 0.5, 0.8)  # diffusion times in (0, 1): low to high noise
    noise_key: str = "lpips-dit"  # every item gets the noise drawn for this key (shared)
    seed: int = 0
    time_pool: int = 4  # frames averaged per compared position (after unit-normalising)
    condition: str = "own"  # "own": each clip with its own caption; "null": unconditional
    layers: tuple[str, ...] = ()  # module names; () = the family's transformer blocks
    batch_size: int = 16

    def validate(self) -> None:
        require(len(self.timesteps) >= 1 and all(0 < t < 1 for t in self.timesteps),
                "timesteps must be one or more values in (0, 1).")
        require(self.time_pool >= 1 and self.batch_size >= 1, "time_pool/batch_size must be >= 1.")
        require(self.condition in CONDITIONING, f"condition must be one of {CONDITIONING}.")


@torch.no_grad()
def block_activations(task, model: nn.Module, batch: dict, layers: Sequence[str],
                      s: LpipsSettings) -> torch.Tensor:
    """(B, n_t, L, P, C) channel-unit-normalised block outputs, time-pooled to P positions.

    Every item is noised with the same draws (`s.noise_key`); the Task runs the forward pass.
    """
    modules = dict(model.named_modules())
    n_frames = task.latent_shape[0]
    b = len(batch["caption"])
    t, noise = draw_noise([s.noise_key], range(len(s.timesteps)), task.latent_shape, s.seed,
                          timesteps=s.timesteps)
    seen: list[torch.Tensor] = []

    def hook(module, inputs, out):
        seen.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [modules[name].register_forward_hook(hook) for name in layers]
    batch = dict(batch)
    if s.condition == "null":
        batch["drop_cond"] = torch.ones(b, dtype=torch.bool)
    per_t = []
    try:
        for j in range(len(s.timesteps)):
            seen.clear()
            task.per_sample_loss(model, batch, t[:, j].expand(b),
                                 noise[:, j].expand(b, *task.latent_shape))
            per_t.append(torch.stack([_pool(h, n_frames, s.time_pool) for h in seen], 1))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(per_t, 1)


def _pool(h: torch.Tensor, n_frames: int, pool: int) -> torch.Tensor:
    """(B, S, C) -> (B, P, C): the frame positions, unit-normalised per position, then averaged
    over `pool` consecutive frames (leading global tokens are dropped)."""
    if h.ndim != 3:
        raise LinernotesError(f"A hooked layer returned shape {tuple(h.shape)}; LPIPS-DiT needs "
                              "(batch, positions, channels) outputs.")
    if h.shape[1] >= n_frames:
        h = h[:, h.shape[1] - n_frames :]
    h = F.normalize(h.float().cpu(), dim=-1)
    return _pool_time(h, pool)


def _pool_time(x: torch.Tensor, pool: int) -> torch.Tensor:
    """Average (B, T, ...) over windows of `pool` steps along T (a short last window allowed)."""
    b, n = x.shape[:2]
    p = -(-n // pool)
    pad = torch.zeros(b, p * pool - n, *x.shape[2:], dtype=x.dtype)
    counts = torch.full((p,), float(pool))
    counts[-1] = n - (p - 1) * pool
    total = torch.cat([x, pad], 1).view(b, p, pool, *x.shape[2:]).sum(2)
    return total / counts.view(1, p, *([1] * (x.ndim - 2)))


class LpipsDitSimilarity(SimilarityMethod):
    """LPIPS-style: minus the mean (over timesteps and blocks) squared distance between the
    channel-normalised DiT block outputs of query and track, at the query's real positions."""

    method = "lpips-dit"

    def __init__(self, run, manifest: pd.DataFrame, settings: LpipsSettings | None = None,
                 progress: bool = True):
        super().__init__(run, manifest, progress)
        self.settings = settings or LpipsSettings()
        self.task, self.model = run.task, run.model
        self.layers = list(self.settings.layers) or run.family.block_names(self.model)
        if not self.layers:
            raise LinernotesError("The model has no transformer blocks; name the layers to "
                                  "compare with --set layers=...")
        missing = [n for n in self.layers if n not in dict(self.model.named_modules())]
        if missing:
            raise LinernotesError(f"The model has no module(s) {missing}.")
        self._train: np.ndarray | None = None

    def _batch(self, rows: np.ndarray) -> dict:
        feats = torch.from_numpy(np.stack([self.store.features(int(i)) for i in rows]))
        return {"features": feats,
                "mask": torch.from_numpy(np.asarray(self.store.mask[rows], dtype=bool)),
                "caption": [self.manifest["caption"].iloc[int(i)] for i in rows],
                "track_id": [self.manifest["track_id"].iloc[int(i)] for i in rows]}

    def train_features(self) -> np.ndarray:
        """(N, n_t, L, P, C) float16 activations of the training tracks (memory-mapped cache)."""
        if self._train is None:
            s = self.settings
            key = {**s.to_dict(), "layers": self.layers}
            path = self._cache(self.method, key)
            self._train = load_cached(path, lambda p: np.load(p, mmap_mode="r"))
            if self._train is None:
                self._compute(path)
                self._train = np.load(path, mmap_mode="r")
        return self._train

    def _compute(self, path: Path) -> None:
        s, out = self.settings, None
        bar = self._bar(len(self.rows), self.method)
        with atomic_path(path) as tmp:
            for lo in range(0, len(self.rows), s.batch_size):
                rows = self.rows[lo : lo + s.batch_size]
                acts = block_activations(self.task, self.model, self._batch(rows), self.layers,
                                         s).numpy().astype(np.float16)
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                    shape=(len(self.rows), *acts.shape[1:]))
                out[lo : lo + len(rows)] = acts
                bar.update(len(rows))
            out.flush()
            del out
        bar.close()

    def query_features(self, query: Query) -> tuple[np.ndarray, np.ndarray]:
        """(n_t, L, P, C) activations of the query and (P,) weights (its real-frame share)."""
        batch = {"features": query.features[None].float(), "mask": query.mask[None].bool(),
                 "caption": [query.caption], "track_id": [query.key]}
        acts = block_activations(self.task, self.model, batch, self.layers, self.settings)[0]
        real = query.mask.float()[None, :, None]
        weight = _pool_time(real, self.settings.time_pool)[0, :, 0]
        if weight.shape[0] != acts.shape[2]:  # positions not aligned with frames
            weight = torch.ones(acts.shape[2])
        return acts.numpy(), (weight / weight.sum().clamp_min(1e-8)).numpy()

    def distances(self, query: Query, chunk: int = 64) -> np.ndarray:
        """(N,) LPIPS-style distance of every training track to the query."""
        train = self.train_features()
        q, w = self.query_features(query)
        out = []
        for lo in range(0, len(train), chunk):
            x = np.asarray(train[lo : lo + chunk], dtype=np.float32)
            d = ((x - q[None]) ** 2).sum(-1)  # (n, n_t, L, P)
            out.append((d * w).sum(-1).mean((1, 2)))
        return np.concatenate(out)

    def similarity(self, query: Query) -> tuple[np.ndarray, dict]:
        return -self.distances(query), {"lpips": {**self.settings.to_dict(),
                                                  "layers": self.layers}}


SIMILARITY_METHODS: dict[str, type[SimilarityMethod]] = {
    "clap-audio": ClapAudioSimilarity,
    "clap-text": ClapTextSimilarity,
    "basic-pitch": BasicPitchSimilarity,
    "chroma-mfcc": ChromaMfccSimilarity,
    "lpips-dit": LpipsDitSimilarity,
}


def similarity_method(name: str, run, manifest: pd.DataFrame, progress: bool = True,
                      **kwargs) -> SimilarityMethod:
    """Build the similarity method `name` (a key of SIMILARITY_METHODS) for a run."""
    if name not in SIMILARITY_METHODS:
        raise LinernotesError(f"Unknown similarity method {name!r}; choose one of "
                              f"{', '.join(SIMILARITY_METHODS)}.")
    return SIMILARITY_METHODS[name](run, manifest, progress=progress, **kwargs)
