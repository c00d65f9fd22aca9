"""Generation: prompts -> latent frames (diffusers v-prediction sampler, classifier-free guidance)
-> denormalise -> Griffin-Lim -> WAV, each clip with a JSON sidecar and its latent (.npy) so it can
be attributed exactly later (`load_clip`).
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
from linernotes.config import Settings, require
from linernotes.data.audio import write_audio
from linernotes.data.features import db_to_audio
from linernotes.errors import LinernotesError
from linernotes.models.schedule import continuous_t, make_scheduler


@dataclasses.dataclass(frozen=True)
class GenerateSettings(Settings):
    """How clips are sampled."""

    steps: int = 25
    guidance: float = 2.0
    sampler: str = "dpm"  # "dpm" (DPM-Solver++ 2M) or "ddim"
    seconds: float | None = None  # real length; None = the model's full length
    griffin_lim_iters: int = 32
    batch_size: int = 8

    def validate(self) -> None:
        require(self.steps >= 1, "steps must be >= 1.")
        require(self.guidance >= 0, "guidance must be >= 0.")
        require(self.sampler in ("dpm", "ddim"), "sampler must be 'dpm' or 'ddim'.")
        require(self.seconds is None or self.seconds > 0, "seconds must be > 0.")
        require(self.griffin_lim_iters >= 1 and self.batch_size >= 1, "iters/batch must be >= 1.")


@dataclasses.dataclass
class Clip:
    """A generated clip as the model saw it: latent (T, M) normalised, mask (T,), prompt."""

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


@torch.no_grad()
def sample_latents(
    run,
    prompts: Sequence[str],
    seeds: Sequence[int],
    n_real: int,
    s: GenerateSettings,
    progress: bool = False,
) -> torch.Tensor:
    """Sample normalised latents (B, T, M) for prompts with per-clip seeded noise."""
    model, task = run.model, run.task
    n_frames, n_mels = task.latent_shape
    b = len(prompts)
    x = torch.stack(
        [
            torch.randn(n_frames, n_mels, generator=torch.Generator().manual_seed(int(sd)))
            for sd in seeds
        ]
    )
    cond = task.text_condition(list(prompts), model.config.max_words)
    cond["frac"] = torch.full((b,), n_real / n_frames)
    guided = s.guidance != 1.0
    if guided:
        cond = {k: torch.cat([v, v]) for k, v in cond.items()}
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)])
    else:
        drop = None
    sched = make_scheduler(s.sampler)
    sched.set_timesteps(s.steps)
    x = x * sched.init_noise_sigma
    for ts in tqdm(sched.timesteps, desc="sampling", disable=not progress, leave=False):
        inp = torch.cat([x, x]) if guided else x
        t = continuous_t(ts).expand(inp.shape[0])
        v = model(sched.scale_model_input(inp, ts), t, cond, drop)
        if guided:
            v_cond, v_null = v.chunk(2)
            v = v_null + s.guidance * (v_cond - v_null)
        x = sched.step(v, ts, x).prev_sample
    return x


def generate(
    run,
    prompts: Sequence[str],
    out_dir: str | Path,
    seeds: Sequence[int] | int = 0,
    settings: GenerateSettings | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate one clip per prompt into out_dir (WAV + .json sidecar + .npy latent).

    `run` is a Run or a run folder; `seeds` is one per prompt or a first seed (then seed + i).
    Returns the WAV paths.
    """
    from linernotes.training import load_run

    s = settings or GenerateSettings()
    if isinstance(run, (str, Path)):
        run = load_run(run)
    prompts = list(prompts)
    if not prompts:
        raise LinernotesError("generate: give at least one prompt.")
    seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise LinernotesError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds.")
    feats = run.features
    seconds = feats.seconds if s.seconds is None else float(s.seconds)
    if not 0 < seconds <= feats.seconds + 1e-9:
        raise LinernotesError(f"--seconds must be in (0, {feats.seconds}] for this model.")
    n_real = max(1, feats.real_frames(int(round(seconds * feats.sample_rate))))
    silence = torch.from_numpy(run.stats.normalise(np.full(feats.n_mels, feats.db_floor)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start in range(0, len(prompts), s.batch_size):
        chunk_p, chunk_s = (
            prompts[start : start + s.batch_size],
            seeds[start : start + s.batch_size],
        )
        lat = sample_latents(run, chunk_p, chunk_s, n_real, s)
        lat[:, n_real:] = silence
        for i, (prompt, seed) in enumerate(zip(chunk_p, chunk_s)):
            paths.append(_write_clip(out, run, lat[i], n_real, prompt, int(seed), seconds, s))
            bar.update(1)
    bar.close()
    return paths


def _write_clip(
    out: Path,
    run,
    latent: torch.Tensor,
    n_real: int,
    prompt: str,
    seed: int,
    seconds: float,
    s: GenerateSettings,
) -> Path:
    feats = run.features
    name = f"{_slug(prompt)}-s{seed}"
    wav, side, npy = out / f"{name}.wav", out / f"{name}.json", out / f"{name}.npy"
    lat = latent.numpy().astype(np.float32)
    with atomic_path(npy) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, lat)
    frames = lat[: min(n_real + 1, feats.n_frames)]  # one silent frame closes the last one
    audio = db_to_audio(run.stats.denormalise(frames), feats, n_iter=s.griffin_lim_iters)
    n_samples = int(round(seconds * feats.sample_rate))
    audio = np.pad(audio[:n_samples], (0, max(0, n_samples - len(audio))))
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    write_audio(wav, audio, feats.sample_rate)
    write_json(
        side,
        {
            "kind": "linernotes-clip",
            "id": name,
            "prompt": prompt,
            "seed": seed,
            "steps": s.steps,
            "guidance": s.guidance,
            "sampler": s.sampler,
            "seconds": seconds,
            "n_real_frames": n_real,
            "n_frames": feats.n_frames,
            "run_hash": run.hash,
            "run_path": str(run.path),
            "latent": npy.name,
            "audio": wav.name,
            "sample_rate": feats.sample_rate,
        },
    )
    return wav


def load_clip(path: str | Path, run=None) -> Clip:
    """Read a generated clip (its .wav, .json or .npy path); with `run`, refuse another model's."""
    path = Path(path)
    side = path.with_suffix(".json")
    if not side.exists():
        raise LinernotesError(f"No sidecar {side}: was {path.name} made by `linernotes generate`?")
    meta = read_json(side)
    if meta.get("kind") != "linernotes-clip":
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
    write_json(side, meta)
    return dst
