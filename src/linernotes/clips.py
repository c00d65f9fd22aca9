"""Generated clips on disk: a WAV, its features as the model made them (.npy) and a JSON sidecar
(prompt, seed, sampler settings, run), so a clip can be attributed exactly and regenerated.

`generate` samples clips with the run's family (`Family.sample`, then `Family.decode`); any
family's clips share this format.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from linernotes.artifacts import atomic_path, read_json, write_json
from linernotes.data.audio import write_audio
from linernotes.errors import LinernotesError

KIND = "linernotes-clip"


@dataclasses.dataclass
class Clip:
    """A generated clip as the model saw it: latent (T, ...) normalised, mask (T,), prompt."""

    latent: torch.Tensor
    mask: torch.Tensor
    prompt: str
    meta: dict
    path: Path

    @property
    def clip_id(self) -> str:
        return self.meta["id"]


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "clip"


def generate(
    run,
    prompts: Sequence[str],
    out_dir: str | Path,
    seeds: Sequence[int] | int = 0,
    settings=None,
    progress: bool = True,
) -> list[Path]:
    """Generate one clip per prompt into out_dir (WAV + .json sidecar + .npy latent).

    `run` is a Run or a run folder; `seeds` is one per prompt or a first seed (then seed + i);
    `settings` the family's `generate_settings` (default: its defaults). Returns the WAV paths.
    """
    from linernotes.run import load_run

    if isinstance(run, (str, Path)):
        run = load_run(run)
    family = run.family
    s = settings or family.generate_settings()
    prompts = list(prompts)
    if not prompts:
        raise LinernotesError("generate: give at least one prompt.")
    seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise LinernotesError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds.")
    seconds = family.seconds if s.seconds is None else float(s.seconds)
    if not 0 < seconds <= family.seconds + 1e-9:
        raise LinernotesError(f"--seconds must be in (0, {family.seconds}] for this model.")
    n_real = family.real_frames(seconds)
    silence = family.silence()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start in range(0, len(prompts), s.batch_size):
        stop = start + s.batch_size
        chunk_p, chunk_s = prompts[start:stop], seeds[start:stop]
        lat = family.sample(chunk_p, chunk_s, n_real, s)
        lat[:, n_real:] = silence
        for i, (prompt, seed) in enumerate(zip(chunk_p, chunk_s)):
            paths.append(_write_clip(out, run, lat[i], n_real, prompt, int(seed), seconds, s))
            bar.update(1)
    bar.close()
    return paths


def _write_clip(out: Path, run, latent: torch.Tensor, n_real: int, prompt: str, seed: int,
                seconds: float, s) -> Path:
    family = run.family
    name = f"{_slug(prompt)}-s{seed}"
    wav, side, npy = out / f"{name}.wav", out / f"{name}.json", out / f"{name}.npy"
    lat = latent.numpy().astype(np.float32)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, lat)
    mask = np.arange(lat.shape[0]) < n_real
    audio = family.decode(lat, mask, s)
    n_samples = int(round(seconds * family.sample_rate))
    audio = np.pad(audio[:n_samples], (0, max(0, n_samples - len(audio))))
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    write_audio(wav, audio, family.sample_rate)
    sampler = {k: v for k, v in s.to_dict().items() if k != "seconds"}
    write_json(side, {
        "kind": KIND, "id": name, "prompt": prompt, "seed": seed, **sampler,
        "seconds": seconds, "n_real_frames": n_real, "n_frames": lat.shape[0],
        "run_hash": run.hash, "run_path": str(run.path), "latent": npy.name, "audio": wav.name,
        "sample_rate": family.sample_rate,
    })
    return wav


def sampler_settings(run, meta: dict):
    """The family's generate settings a clip was sampled with (from its sidecar)."""
    cls = run.family.generate_settings
    names = {f.name for f in dataclasses.fields(cls)} - {"seconds"}
    return cls.from_dict({k: meta[k] for k in names if k in meta})


def load_clip(path: str | Path, run=None) -> Clip:
    """Read a generated clip (its .wav, .json or .npy path); with `run`, refuse another model's."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not side.exists():
        raise LinernotesError(f"No sidecar {side}: was {path.name} made by `linernotes generate`?")
    meta = read_json(side)
    if meta.get("kind") != KIND:
        raise LinernotesError(f"{side} is not a linernotes clip sidecar.")
    npy = side.parent / meta["latent"]
    try:
        latent = torch.from_numpy(np.load(npy))
    except (OSError, ValueError) as exc:
        raise LinernotesError(
            f"Cannot read the clip's latent {npy}: {exc}; regenerate it."
        ) from exc
    if latent.shape[0] != meta["n_frames"]:
        raise LinernotesError(
            f"{npy} has {latent.shape[0]} frames, sidecar says {meta['n_frames']}."
        )
    if run is not None and meta["run_hash"] != run.hash:
        raise LinernotesError(
            f"{path.name} was generated by run {meta['run_hash']}, not by {run.path} ({run.hash}); "
            "attribute it against the model that made it."
        )
    mask = torch.arange(meta["n_frames"]) < meta["n_real_frames"]
    return Clip(latent, mask, meta["prompt"], meta, side)


def clip_batch(clips: Sequence[Clip]) -> dict:
    """A Task batch (features, mask, caption, track_id) of generated clips."""
    return {
        "features": torch.stack([c.latent for c in clips]),
        "mask": torch.stack([c.mask for c in clips]),
        "caption": [c.prompt for c in clips],
        "track_id": [c.clip_id for c in clips],
    }


def move_clip(src: str | Path, dst: str | Path) -> Path:
    """Move a generated clip (WAV, sidecar and latent) to `dst` (.wav), keeping them linked."""
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".wav":
        raise LinernotesError(f"{dst} must end in .wav.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".wav", ".npy", ".json"):
        src.with_suffix(suffix).replace(dst.with_suffix(suffix))
    side = dst.with_suffix(".json")
    meta = read_json(side)
    meta["latent"] = dst.with_suffix(".npy").name
    meta["audio"] = dst.name
    write_json(side, meta)
    return dst
