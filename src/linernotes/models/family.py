"""Model families: the one place a command learns what kind of model a run holds.

A run records its family's name (`config.json`: "family"); the family, registered by name like
the unlearning methods, is the run's model loaded and ready: its module (`model`), its `Task`
(the per-sample loss every method uses), how corpus audio becomes its training features, how a
clip is sampled and turned back into audio, and how its recipe is retrained without some tracks.
Commands and methods see only the run, the family and the Task; nothing outside `models/` knows
what a DiT or a mel frame is.

A new family subclasses `Family`, sets `name`, implements the abstract methods, decorates the
class with `@register` and lists its module in `FAMILY_MODULES` (see docs/architecture.md).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from linernotes.artifacts import hash_json
from linernotes.config import Settings
from linernotes.errors import LinernotesError
from linernotes.models.caption_cache import CaptionCache
from linernotes.registry import Registry
from linernotes.task import Task

#: Modules holding the built-in families (imported when a family is looked up by name).
FAMILY_MODULES = ("linernotes.models.reference", "linernotes.models.stable_audio.family",
                  "linernotes.models.musicgen.family", "linernotes.models.ar.family")
#: The family of runs whose config names none (runs made before families existed).
DEFAULT_FAMILY = "reference"


class Family(abc.ABC):
    """One run's model, loaded: the module, its Task and what the commands need of it.

    `path` and `config` are the run folder and its config (the family reads its own entries).
    """

    name: ClassVar[str] = ""
    #: the settings of `sample` (steps, guidance, ...); they have `seconds` and `batch_size`
    generate_settings: ClassVar[type[Settings]]
    #: what training a new model of the family needs beyond `TrainSettings` (None: the family
    #: is not trained from scratch here)
    recipe_settings: ClassVar[type[Settings] | None] = None

    def __init__(self, path: Path, config: dict, model: nn.Module, task: Task):
        self.path, self.config, self.model, self.task = Path(path), config, model, task

    def to(self, device: torch.device) -> Family:
        """Move the model (and whatever runs with it) to `device`."""
        self.model.to(device)
        return self

    # ---------------------------------------------------------------- loading and saving

    @classmethod
    def create(cls, manifest: pd.DataFrame, run_dir: str | Path, settings,
               recipe: Settings | None = None, progress: bool = True):
        """Train a new run of this family from `manifest` into `run_dir` (a `Run`)."""
        raise LinernotesError(f"The {cls.name} family is not trained from scratch here; make a "
                              "run of your model with `linernotes init`.")

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """Whether `path` is a model folder of this family (`linernotes init` takes it)."""
        return False

    @classmethod
    def init_run(cls, model_dir: Path, manifest: pd.DataFrame, run_dir: Path,
                 recipe: Settings | None = None, progress: bool = True):
        """A run of the model in `model_dir` over `manifest`'s tracks, in `run_dir` (a `Run`)."""
        raise LinernotesError(f"The {cls.name} family does not take a model folder.")

    def finetune(self, manifest: pd.DataFrame, out: str | Path, settings,
                 progress: bool = True):
        """This run's model fine-tuned on `manifest` with `settings` (a `TrainSettings`), as a
        new run in `out` (a `Run`)."""
        raise LinernotesError(f"The {self.name} family is not fine-tuned here.")

    @classmethod
    @abc.abstractmethod
    def load(cls, path: Path, config: dict) -> Family:
        """The family's model of the run at `path`, checked against `config`."""

    @abc.abstractmethod
    def save(self, path: Path, model: nn.Module) -> dict:
        """Write `model` (same architecture as this one) and the family's own files into the run
        folder `path`; return the config entries that describe them (with "weights_hash")."""

    @abc.abstractmethod
    def recipe_key(self) -> dict:
        """What retraining this model depends on besides its training settings."""

    def caption_key(self) -> dict:
        """What the Task's caption encodings depend on: its frozen text encoders (the recipe
        key holds their fingerprints; a family whose encoder it does not hash adds it)."""
        return self.recipe_key()

    def keep_captions(self, cache_dir: Path) -> None:
        """Keep the Task's caption encodings (a `CaptionCache` as `task.captions`) on disk under
        `cache_dir`, in a folder keyed by `caption_key` and the torch version."""
        captions = getattr(self.task, "captions", None)
        if isinstance(captions, CaptionCache):
            key = hash_json({**self.caption_key(), "torch": torch.__version__})[:16]
            captions.keep_in(Path(cache_dir) / f"captions-{key}")

    @abc.abstractmethod
    def retrain(self, manifest: pd.DataFrame, folder: Path, settings, progress: bool = True
                ) -> Path:
        """Train this model's recipe with `settings` (a `training.TrainSettings`) into `folder`
        (resuming a killed run); returns the folder, a finished run."""

    @abc.abstractmethod
    def untrained(self, seed: int) -> nn.Module:
        """A freshly initialised model of this architecture (seeded; global RNG untouched)."""

    # ---------------------------------------------------------------- audio and features

    sample_rate: int  # of the audio it reads and writes
    seconds: float  # the length of one training example

    @abc.abstractmethod
    def feature_store(self, manifest: pd.DataFrame, progress: bool = True,
                      cache_dir: str | Path | None = None):
        """The training features of every track of `manifest` (`data.features.FeatureStore`)."""

    @abc.abstractmethod
    def encode_audio(self, path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        """An audio file as the model sees it: normalised features and the real-frame mask."""

    @abc.abstractmethod
    def decode(self, features: np.ndarray, mask: np.ndarray, settings: Settings | None = None
               ) -> np.ndarray:
        """Audio (at `sample_rate`, (n,) mono or (n, channels)) of features, cut to the real
        frames of `mask`; `settings` are the family's generate settings (default: theirs)."""

    @abc.abstractmethod
    def real_frames(self, seconds: float) -> int:
        """Frames holding `seconds` of audio (at most the model's length)."""

    @abc.abstractmethod
    def silence(self) -> torch.Tensor:
        """One frame of silence as the model sees it (padding after a clip's end)."""

    # ---------------------------------------------------------------- generation

    @abc.abstractmethod
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], n_real: int,
               settings: Settings) -> torch.Tensor:
        """Features (B, ...) sampled for `prompts`, each from noise seeded by its seed, with
        `n_real` real frames (the frames after them are not made silent)."""

    # ---------------------------------------------------------------- embeddings (optional)

    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, D) unit-norm audio embeddings of normalised features (similarity methods, audit
        and credit measures)."""
        raise LinernotesError(f"The {self.name} family has no audio embedder; this measure "
                              "needs one.")

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, D) unit-norm text embeddings in the same space as `embed_audio`."""
        raise LinernotesError(f"The {self.name} family has no text-audio embedder (text and "
                              "audio in one space), which this measure needs; audio-to-audio "
                              "measures (clap-audio, chroma-mfcc, basic-pitch) work.")

    #: the names of the model's transformer blocks (a regular expression; `block_names`)
    block_pattern: ClassVar[str] = ""

    def block_names(self, model: nn.Module | None = None) -> list[str]:
        """The model's transformer blocks, in order (the LPIPS-style similarity's layers)."""
        if not self.block_pattern:
            raise LinernotesError(f"The {self.name} family names no blocks; give the layers "
                                  "with --set layers=...")
        pattern = re.compile(self.block_pattern)
        return [name for name, _ in (model or self.model).named_modules()
                if pattern.search(name)]


FAMILIES = Registry("model family", "Families", FAMILY_MODULES)
#: Class decorator: make a family available by its `name`.
register = FAMILIES.register


def families() -> dict[str, type[Family]]:
    """Every registered family by name (importing the built-in ones)."""
    return FAMILIES.all()


def family_class(name: str) -> type[Family]:
    """The family registered as `name`, or a clear error naming the known ones."""
    return FAMILIES.get(name)


def recognise(path: str | Path) -> type[Family]:
    """The family whose model folder `path` is, or a clear error saying what it found."""
    path = Path(path)
    for cls in families().values():
        if cls.recognises(path):
            return cls
    raise LinernotesError(f"{path} is {describe_folder(path)}. `linernotes init` takes a model "
                          "folder of a family it knows: a diffusers StableAudioPipeline folder "
                          "(with model_index.json) or a transformers MusicGen folder "
                          "(MusicgenForConditionalGeneration, with its tokenizer).")


def describe_folder(path: Path) -> str:
    """What a folder looks like, for messages."""
    import json

    if not path.exists():
        return "not there"
    if not path.is_dir():
        return "a file, not a folder"
    config, index = path / "config.json", path / "model_index.json"
    try:
        if config.is_file():
            data = json.loads(config.read_text())
            if data.get("kind") == "linernotes-run":
                return (f"a linernotes run of family {data.get('family', DEFAULT_FAMILY)!r}: "
                        "use it as it is (--run), no init needed")
            if data.get("architectures"):
                return (f"a transformers model folder ({', '.join(data['architectures'])}), "
                        "which linernotes does not support yet")
        if index.is_file():
            return (f"a diffusers {json.loads(index.read_text()).get('_class_name')} folder, "
                    "which linernotes does not support")
    except json.JSONDecodeError:
        return "a folder with a broken config.json or model_index.json"
    return "a folder without model_index.json or config.json (not a model folder)"
