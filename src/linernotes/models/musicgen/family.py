"""The musicgen family: a user's own transformers MusicGen (`MusicgenForConditionalGeneration`:
T5 text encoder, EnCodec audio codec, a decoder over the codec's parallel codebooks with a delay
pattern), made into a run by `linernotes init` and fine-tuned by `linernotes train --base`.

Run folder: `model/` (a complete model folder, loadable by
`MusicgenForConditionalGeneration.from_pretrained` and shippable, with the text tokenizer),
`base/` (the model fine-tunes start from: what a retrain without some tracks starts from) and the
usual `config.json`. The run records fingerprints of the folder it was made from; a changed folder
is refused.

Features are EnCodec codes (`codes.py`); the Task is MusicGen's next-token cross-entropy
(`task.py`); clips are sampled by the model's own `generate`. The model trained, unlearned and
attributed is the decoder (and the text-to-decoder projection, if any); T5 and EnCodec stay
frozen, as in MusicGen's training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch import nn

from linernotes import device
from linernotes.artifacts import fingerprint_file, fingerprint_tree, hash_json, link_tree
from linernotes.config import Settings, require, setting
from linernotes.errors import LinernotesError
from linernotes.models.family import register
from linernotes.models.musicgen.codes import EncodecCodes
from linernotes.models.musicgen.folder import (
    check_folder,
    is_musicgen,
    load_model,
    load_tokenizer,
    quiet,
)
from linernotes.models.musicgen.task import MusicgenTask
from linernotes.models.pretrained import PretrainedFamily, PretrainedRecipe
from linernotes.run.folder import CONFIG, Run, load_run, write_config

MODEL = "model"
BASE = "base"
#: files of the model folder a save rewrites (the rest, e.g. the tokenizer, is linked)
WRITTEN = ("config.json", "generation_config.json")


@dataclasses.dataclass(frozen=True)
class MusicgenGenerateSettings(Settings):
    """How MusicGen samples clips (`MusicgenForConditionalGeneration.generate`)."""

    guidance: float = setting(3.0, "Classifier-free guidance scale (1: none).")
    temperature: float = setting(1.0, "Sampling temperature.")
    top_k: int = setting(250, "Sample among the k most likely codes (0: all).")
    seconds: float | None = setting(None, "Clip length (default: the run's example length).")
    batch_size: int = setting(1, "Clips sampled together.")

    def validate(self) -> None:
        require(self.guidance >= 0 and self.temperature > 0, "guidance must be >= 0 and "
                "temperature > 0.")
        require(self.top_k >= 0 and self.batch_size >= 1, "top_k >= 0 and batch_size >= 1.")
        require(self.seconds is None or self.seconds > 0, "seconds must be > 0.")


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def _weights_hash(folder: Path) -> str:
    return hash_json([[p.name, fingerprint_file(p)] for p in _weights(folder)])


def _geometry(model, seconds: float) -> dict:
    dec, codec = model.decoder.config, model.audio_encoder.config
    k, channels = int(dec.num_codebooks), int(dec.audio_channels)
    if k % channels:
        raise LinernotesError(f"A MusicGen decoder with {k} codebooks cannot hold {channels} "
                              "audio channels; the folder's config is inconsistent.")
    sr, hop = int(codec.sampling_rate), int(np.prod(codec.upsampling_ratios))
    max_frames = int(dec.max_position_embeddings) - k
    frames = min(max_frames, max(1, math.ceil(seconds * sr / hop)))
    return {"sample_rate": sr, "hop": hop, "channels": channels, "n_codebooks": k,
            "n_frames": frames, "seconds": frames * hop / sr, "max_seconds": max_frames * hop / sr,
            "pad": int(dec.pad_token_id), "start": int(model.config.decoder.decoder_start_token_id
                                                        or dec.pad_token_id),
            "vocab": int(dec.vocab_size)}


@register
class MusicgenFamily(PretrainedFamily):
    """A MusicGen model of a run folder: the whole model (`model`; only its decoder is trained),
    its Task (the frozen T5 and its tokenizer live there) and the EnCodec codec."""

    name = "musicgen"
    generate_settings = MusicgenGenerateSettings
    block_pattern = r"(^|\.)decoder\.layers\.\d+$"

    def __init__(self, path: Path, config: dict, model, tokenizer):
        g = config["features"]
        for part in (model.text_encoder, model.audio_encoder):
            part.eval().requires_grad_(False)
        task = MusicgenTask(model.text_encoder, tokenizer, g["n_frames"], g["n_codebooks"],
                            g["pad"], g["start"])
        super().__init__(path, config, model.eval(), task)
        self.tokenizer, self.geometry = tokenizer, g
        self.sample_rate, self.seconds = g["sample_rate"], g["seconds"]

    # ---------------------------------------------------------------- making runs

    @classmethod
    def recognises(cls, path: Path) -> bool:
        return is_musicgen(path)

    @classmethod
    def init_run(cls, model_dir: Path, manifest: pd.DataFrame, run_dir: Path,
                 recipe: PretrainedRecipe | None = None, progress: bool = True) -> Run:
        """A run of the MusicGen in `model_dir` over `manifest`'s tracks: the folder linked into
        `run_dir`, every track encoded once to codes by its EnCodec (resumable). Re-running it
        resumes; a run made from another folder or corpus is refused."""

        recipe = recipe or PretrainedRecipe()
        model_dir, run_dir = Path(model_dir), Path(run_dir)
        check_folder(model_dir)
        source = {"path": str(model_dir.resolve()), "fingerprint": fingerprint_tree(model_dir)}
        run = cls.existing_run(run_dir, source, manifest, progress)
        if run is not None:
            return run
        link_tree(model_dir, run_dir / MODEL)
        link_tree(model_dir, run_dir / BASE)
        model = load_model(run_dir / MODEL)
        longest = float(pd.to_numeric(manifest["duration"], errors="coerce").max() or 0.0)
        config = {"features": _geometry(model, recipe.seconds or longest or 1.0),
                  "source": source, "codec": module_fingerprint(model.audio_encoder)}
        family = cls(run_dir, config, model, load_tokenizer(run_dir / MODEL))
        family.to(device.current())
        family.feature_store(manifest, progress)  # encode every track (resumable, by chunks)
        write_config(run_dir, cls.name, family.entries(run_dir), cls.init_meta(manifest, recipe))
        return load_run(run_dir, manifest=manifest)

    def entries(self, path: Path) -> dict:
        """The config entries describing the model files in run folder `path`."""
        return {"features": self.geometry, "source": self.config["source"],
                "codec": self.config["codec"], "weights_hash": _weights_hash(path / MODEL),
                "base_hash": _weights_hash(path / BASE)}

    @classmethod
    def load(cls, path: Path, config: dict) -> MusicgenFamily:
        folder = path / MODEL
        if not _weights(folder) or _weights_hash(folder) != config["weights_hash"]:
            raise LinernotesError(f"The weights in {folder} are missing or do not match "
                                  f"{path / CONFIG} (corrupt or replaced); restore the run folder "
                                  "or make it again.")
        return cls(path, config, load_model(folder), load_tokenizer(folder))

    def save(self, path: Path, model: nn.Module) -> dict:
        """A complete model folder with `model`'s weights, the tokenizer linked from this run."""
        path = Path(path)
        target = path / MODEL
        if path.resolve() != self.path.resolve():
            link_tree(self.path / BASE, path / BASE)
        if target.exists():
            shutil.rmtree(target)
        with torch.no_grad():
            saved = copy.deepcopy(model).to("cpu")
        with quiet():
            warnings.simplefilter("ignore")
            saved.save_pretrained(str(target), safe_serialization=True)
        skip = tuple(p.name for p in _weights(self.path / MODEL)) + WRITTEN
        link_tree(self.path / MODEL, target, skip=skip)
        return self.entries(path)

    def recipe_key(self) -> dict:
        return {"base": self.config["base_hash"], "codec": self.config["codec"],
                "features": self.geometry}

    def base_model(self) -> nn.Module:
        """The model this run's fine-tunes start from (`base/`)."""
        return load_model(self.path / BASE).to(device.of(self.model))

    def untrained(self, seed: int) -> nn.Module:
        """The model with a freshly initialised decoder (T5 and EnCodec kept: never trained)."""
        from transformers import MusicgenForConditionalGeneration

        with torch.random.fork_rng(), quiet():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            fresh = MusicgenForConditionalGeneration(self.model.config)
        model = copy.deepcopy(self.model)
        trained = set(self.task.parameter_names(model, "all"))
        state = {k: v for k, v in fresh.state_dict().items() if k in trained}
        model.load_state_dict(state, strict=False)
        return model.eval()

    # ---------------------------------------------------------------- audio and features

    def encoder(self) -> EncodecCodes:
        g = self.geometry
        return EncodecCodes(self.model.audio_encoder, g["n_codebooks"], g["channels"],
                            g["n_frames"], self.config["codec"])

    def decode(self, features: np.ndarray, mask: np.ndarray,
               settings: Settings | None = None) -> np.ndarray:
        """EnCodec's audio ((n,) mono or (n, channels)) of codes, cut to the real frames."""
        n = max(1, int(np.asarray(mask).sum()))
        audio = self.encoder().decode(np.asarray(features)[:n])[:, : n * self.geometry["hop"]]
        return audio[0] if len(audio) == 1 else audio.T

    # ---------------------------------------------------------------- generation, embeddings

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], n_real: int,
               settings: MusicgenGenerateSettings) -> torch.Tensor:
        """Codes (B, frames, codebooks) from the model's `generate`, each clip sampled alone
        from the global generator seeded by its seed (restored after)."""
        g = self.geometry
        out = torch.zeros(len(prompts), g["n_frames"], g["n_codebooks"])
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            codes = self._generate(prompt, int(seed), n_real, settings)  # (K, n)
            out[i, : codes.shape[1]] = codes.T.float().cpu()
        return out

    def _generate(self, prompt: str, seed: int, n_real: int,
                  s: MusicgenGenerateSettings) -> torch.Tensor:
        model, dev = self.model, device.of(self.model)
        tok = self.tokenizer([prompt], return_tensors="pt")
        caught: list[torch.Tensor] = []

        def keep(codes, *args, **kwargs):  # generate's last step: the codes, before EnCodec
            caught.append(codes[0, 0])  # (K per channel, frames)
            return SimpleNamespace(audio_values=torch.zeros(1, 1, 1, device=codes.device))

        model.audio_encoder.decode = keep
        try:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), quiet():
                warnings.simplefilter("ignore")
                torch.manual_seed(seed)
                model.generate(input_ids=tok.input_ids.to(dev),
                               attention_mask=tok.attention_mask.to(dev), do_sample=True,
                               guidance_scale=s.guidance if s.guidance > 1 else None,
                               temperature=s.temperature, top_k=s.top_k or None,
                               max_new_tokens=n_real + self.geometry["n_codebooks"] - 1)
        finally:
            del model.audio_encoder.decode
        if len(caught) == 1:
            return caught[0]
        return torch.stack(caught, dim=1).flatten(0, 1)  # stereo: left/right interleaved



def module_fingerprint(module: nn.Module) -> str:
    """Hash of a frozen module's weights (the codec the codes were made with)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
