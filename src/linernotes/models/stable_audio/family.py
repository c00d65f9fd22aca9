"""The stable-audio family: a user's own diffusers `StableAudioPipeline` (Stable Audio Open and
its fine-tunes), made into a run by `linernotes init` and fine-tuned by `linernotes train --base`.

Run folder: `pipeline/` (the complete pipeline folder, loadable by
`StableAudioPipeline.from_pretrained` and shippable; its `transformer/` is this run's DiT),
`base/transformer/` (the DiT weights fine-tunes start from: what a retrain without some tracks
starts from) and the usual `config.json`. The run records fingerprints of the model folder it was
made from and of each component; a changed folder is refused.

Features are VAE latents (`latents.py`); the Task is Stable Audio's v-objective with its own
conditioning (`task.py`); clips are sampled by the pipeline itself; the model being trained,
unlearned and attributed is the DiT.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from linernotes import device
from linernotes.artifacts import fingerprint_file, fingerprint_tree, link_tree
from linernotes.config import Settings, require, setting
from linernotes.errors import LinernotesError
from linernotes.models.family import register
from linernotes.models.pretrained import PretrainedFamily, PretrainedRecipe
from linernotes.models.stable_audio.folder import COMPONENTS, check_pipeline, is_pipeline
from linernotes.models.stable_audio.latents import VaeLatents
from linernotes.models.stable_audio.task import StableAudioTask
from linernotes.run.folder import CONFIG, Run, load_run, write_config

PIPELINE = "pipeline"
BASE = "base"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class StableAudioGenerateSettings(Settings):
    """How the pipeline samples clips (`StableAudioPipeline.__call__`)."""

    steps: int = setting(100, "Sampler steps.")
    guidance: float = setting(7.0, "Classifier-free guidance scale.")
    seconds: float | None = setting(None, "Clip length (default: the run's example length).")
    batch_size: int = setting(1, "Clips sampled together.")

    def validate(self) -> None:
        require(self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1.")
        require(self.guidance >= 0, "guidance must be >= 0.")
        require(self.seconds is None or self.seconds > 0, "seconds must be > 0.")


def _load_pipeline(folder: Path):
    from diffusers import StableAudioPipeline

    check_pipeline(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return StableAudioPipeline.from_pretrained(str(folder), local_files_only=True,
                                                       torch_dtype=torch.float32)
    except Exception as exc:  # a half-written or foreign folder: say which
        raise LinernotesError(f"Cannot load the StableAudioPipeline at {folder}: {exc}") from exc


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _geometry(pipe, seconds: float) -> dict:
    vae = pipe.vae
    latent = int(vae.config.encoder_hidden_size) // 2  # the encoder's (mean, scale) halves
    if not latent == int(vae.config.decoder_input_channels) == pipe.transformer.config.in_channels:
        raise LinernotesError(
            f"Inconsistent StableAudioPipeline: its VAE encodes {latent} latent channels, decodes "
            f"{vae.config.decoder_input_channels}, and its DiT takes "
            f"{pipe.transformer.config.in_channels}; give a pipeline whose parts agree.")
    sr, hop = int(vae.config.sampling_rate), int(vae.hop_length)
    max_frames = int(pipe.transformer.config.sample_size)
    frames = min(max_frames, max(1, math.ceil(seconds * sr / hop)))
    return {"sample_rate": sr, "hop": hop, "channels": int(vae.config.audio_channels),
            "latent_channels": int(pipe.transformer.config.in_channels), "n_frames": frames,
            "seconds": frames * hop / sr, "max_seconds": max_frames * hop / sr}


def _fingerprints(folder: Path) -> dict:
    """The frozen components' fingerprints (the DiT's weights are `weights_hash`)."""
    return {c: fingerprint_tree(folder / c) for c in COMPONENTS if c != "transformer"}


def _weights_hash(folder: Path) -> str:
    return fingerprint_file(folder / PIPELINE / "transformer" / WEIGHTS)


@register
class StableAudioFamily(PretrainedFamily):
    """A StableAudioPipeline of a run folder: the DiT (`model`), its Task (the frozen T5,
    tokenizer and projection model live there), the VAE and the scheduler."""

    name = "stable-audio"
    generate_settings = StableAudioGenerateSettings
    block_pattern = r"(^|\.)transformer_blocks\.\d+$"

    def __init__(self, path: Path, config: dict, pipe):
        g = config["features"]
        fixed = [n for n, p in pipe.transformer.named_parameters() if not p.requires_grad]
        task = StableAudioTask(_freeze(pipe.text_encoder), pipe.tokenizer,
                               _freeze(pipe.projection_model), g["n_frames"],
                               g["latent_channels"], g["hop"], g["sample_rate"], fixed)
        super().__init__(path, config, pipe.transformer.eval(), task)
        self.pipe, self.vae, self.geometry = pipe, _freeze(pipe.vae), g
        self.sample_rate, self.seconds = g["sample_rate"], g["seconds"]

    # ---------------------------------------------------------------- making runs

    @classmethod
    def recognises(cls, path: Path) -> bool:
        return is_pipeline(path)

    @classmethod
    def init_run(cls, model_dir: Path, manifest: pd.DataFrame, run_dir: Path,
                 recipe: PretrainedRecipe | None = None, progress: bool = True) -> Run:
        """A run of the pipeline in `model_dir` over `manifest`'s tracks: the pipeline linked
        into `run_dir`, every track encoded once by its VAE (resumable). Re-running it resumes;
        a run made from another folder or corpus is refused."""

        recipe = recipe or PretrainedRecipe()
        model_dir, run_dir = Path(model_dir), Path(run_dir)
        check_pipeline(model_dir)
        source = {"path": str(model_dir.resolve()), "fingerprint": fingerprint_tree(model_dir)}
        run = cls.existing_run(run_dir, source, manifest, progress)
        if run is not None:
            return run
        link_tree(model_dir, run_dir / PIPELINE)
        link_tree(model_dir / "transformer", run_dir / BASE / "transformer")
        pipe = _load_pipeline(run_dir / PIPELINE)
        longest = float(pd.to_numeric(manifest["duration"], errors="coerce").max() or 0.0)
        geometry = _geometry(pipe, recipe.seconds or longest or 1.0)
        config = {"features": geometry, "source": source,
                  "components": _fingerprints(run_dir / PIPELINE)}
        family = cls(run_dir, config, pipe).to(device.current())
        family.feature_store(manifest, progress)  # encode every track (resumable, by chunks)
        write_config(run_dir, cls.name, family.entries(run_dir), cls.init_meta(manifest, recipe))
        return load_run(run_dir, manifest=manifest)

    def entries(self, path: Path) -> dict:
        """The config entries describing the model files in run folder `path`."""
        return {"features": self.geometry, "source": self.config["source"],
                "components": self.config["components"], "weights_hash": _weights_hash(path),
                "base_hash": fingerprint_file(path / BASE / "transformer" / WEIGHTS)}

    @classmethod
    def load(cls, path: Path, config: dict) -> StableAudioFamily:
        pipeline = path / PIPELINE
        weights = pipeline / "transformer" / WEIGHTS
        if not weights.exists() or fingerprint_file(weights) != config["weights_hash"]:
            raise LinernotesError(f"{weights} is missing or does not match {path / CONFIG} "
                                  "(corrupt or replaced); restore the run folder or make it again.")
        return cls(path, config, _load_pipeline(pipeline))

    def to(self, where: torch.device) -> StableAudioFamily:
        for module in (self.model, self.vae, self.task.text_encoder, self.task.projection):
            module.to(where)
        return self

    def save(self, path: Path, model: nn.Module) -> dict:
        """A complete pipeline folder with `model` as its DiT, the rest linked from this run."""
        path = Path(path)
        if path.resolve() != self.path.resolve():
            link_tree(self.path / PIPELINE, path / PIPELINE, skip=("transformer",))
            link_tree(self.path / BASE, path / BASE)
        target = path / PIPELINE / "transformer"
        if target.exists():
            shutil.rmtree(target)
        with torch.no_grad():
            saved = copy.deepcopy(model).to("cpu")
        saved.save_pretrained(str(target), safe_serialization=True)
        return self.entries(path)

    def recipe_key(self) -> dict:
        return {"base": self.config["base_hash"], "components": self.config["components"],
                "features": self.geometry}

    def base_model(self) -> nn.Module:
        """The DiT this run's fine-tunes start from (`base/transformer`)."""
        from diffusers import StableAudioDiTModel

        return StableAudioDiTModel.from_pretrained(str(self.path / BASE / "transformer"),
                                                   local_files_only=True,
                                                   torch_dtype=torch.float32)

    def untrained(self, seed: int) -> nn.Module:
        from diffusers import StableAudioDiTModel

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = StableAudioDiTModel.from_config(self.model.config)
        return model.eval()

    # ---------------------------------------------------------------- audio and features

    def encoder(self) -> VaeLatents:
        return VaeLatents(self.vae, self.geometry["n_frames"],
                          self.config["components"]["vae"])

    @torch.no_grad()
    def decode(self, features: np.ndarray, mask: np.ndarray,
               settings: Settings | None = None) -> np.ndarray:
        """The VAE's audio (n, channels) of latents (frames, channels), cut to the real frames."""
        n = max(1, int(np.asarray(mask).sum()))
        z = torch.as_tensor(np.asarray(features), dtype=torch.float32).T[None]
        audio = self.vae.decode(z.to(device.of(self.vae))).sample[0]  # (channels, samples)
        return audio[:, : n * self.geometry["hop"]].T.float().cpu().numpy()

    # ---------------------------------------------------------------- generation, embeddings

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], n_real: int,
               settings: StableAudioGenerateSettings) -> torch.Tensor:
        """Latents (B, frames, channels) from the pipeline: noise seeded per clip (drawn on the
        CPU), the scheduler's noise from per-clip generators, timing = the real length."""
        from diffusers import StableAudioPipeline

        g = self.geometry
        dev = device.of(self.model)
        noise = torch.stack([torch.randn(g["latent_channels"], g["n_frames"],
                                         generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(dev)
        pipe = StableAudioPipeline(vae=self.vae, text_encoder=self.task.text_encoder,
                                   projection_model=self.task.projection,
                                   tokenizer=self.task.tokenizer, transformer=self.model,
                                   scheduler=self.pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        with warnings.catch_warnings():  # torchsde's Brownian-tree boundary notices
            warnings.simplefilter("ignore")
            out = pipe(prompt=list(prompts), audio_end_in_s=n_real * g["hop"] / g["sample_rate"],
                       num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                       latents=noise, output_type="latent",
                       generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
        return out.audios.transpose(1, 2).float().cpu()

