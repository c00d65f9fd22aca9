"""A transformers MusicGen folder: recognising one, checking it, loading it offline.

The folder is what `MusicgenForConditionalGeneration.save_pretrained` and
`MusicgenProcessor.save_pretrained` (or `AutoTokenizer`'s) write into one place: `config.json`
naming the architecture, the weights, `generation_config.json`, and the text tokenizer's files.
Nothing is downloaded: a folder that lacks a part is refused, naming the part.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from linernotes.errors import LinernotesError

ARCHITECTURE = "MusicgenForConditionalGeneration"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _config(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_musicgen(path: str | Path) -> bool:
    """Whether `path` is a transformers MusicGen folder (by its config.json)."""
    config = _config(Path(path))
    if not config:
        return False
    return ARCHITECTURE in (config.get("architectures") or []) or (
        config.get("model_type") == "musicgen")


def check_folder(path: str | Path) -> None:
    """Refuse a MusicGen folder without weights or a tokenizer, saying what to save."""
    path = Path(path)
    if not (list(path.glob("*.safetensors")) or (path / "pytorch_model.bin").exists()):
        raise LinernotesError(f"{path} is a MusicGen folder without weights (*.safetensors); "
                              "save the model with `model.save_pretrained(folder)`.")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise LinernotesError(f"{path} is a MusicGen folder without its text tokenizer; save "
                              "it there too: `MusicgenProcessor.from_pretrained(...)"
                              ".save_pretrained(folder)` (or the tokenizer's).")


def quiet():
    """transformers' notices about MusicGen's pad id lying outside the vocabulary (by design)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return warnings.catch_warnings()


def load_model(path: str | Path):
    """The `MusicgenForConditionalGeneration` of a folder, float32, in eval mode."""
    from transformers import MusicgenForConditionalGeneration

    check_folder(path)
    try:
        with quiet():
            warnings.simplefilter("ignore")
            model = MusicgenForConditionalGeneration.from_pretrained(
                str(path), local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # a half-written or foreign folder: say which
        raise LinernotesError(f"Cannot load the MusicGen model at {path}: {exc}") from exc
    return model.eval()


def load_tokenizer(path: str | Path):
    """The text tokenizer saved with the model (a processor's, or a tokenizer alone)."""
    from transformers import AutoTokenizer

    try:
        with quiet():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise LinernotesError(f"Cannot load the text tokenizer of {path}: {exc}; save the "
                              "model's processor or tokenizer into the folder.") from exc
