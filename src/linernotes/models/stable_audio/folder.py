"""A diffusers `StableAudioPipeline` folder: recognising one, and linking one into a run.

A stable-audio run holds a complete pipeline folder (`pipeline/`: `model_index.json` and the
components `vae`, `text_encoder`, `tokenizer`, `projection_model`, `transformer`, `scheduler`), so
`StableAudioPipeline.from_pretrained(RUN/pipeline)` loads it and a user can ship it, and `base/`,
the DiT weights its fine-tunes start from (what a retrain starts from). Files that do not change
are hard links (copies across file systems), so a run costs the disk space of what it changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from linernotes.errors import LinernotesError

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "StableAudioPipeline"
COMPONENTS = ("vae", "text_encoder", "tokenizer", "projection_model", "transformer", "scheduler")


def is_pipeline(path: str | Path) -> bool:
    """Whether `path` is a diffusers StableAudioPipeline folder (by its model_index.json)."""
    index = Path(path) / MODEL_INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except json.JSONDecodeError:
        return False


def check_pipeline(path: str | Path) -> None:
    """Refuse a StableAudioPipeline folder that lacks a component."""
    missing = [c for c in COMPONENTS if not (Path(path) / c).is_dir()]
    if missing:
        raise LinernotesError(f"{path} is a StableAudioPipeline folder without "
                              f"{', '.join(missing)}; give the complete folder "
                              "(`StableAudioPipeline.save_pretrained` writes one).")
