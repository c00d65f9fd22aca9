"""What families of a user's pretrained model folder share: the init recipe, audio in and out
through a fixed-length encoder, fine-tuning and retraining.

A pretrained family (stable-audio, musicgen) is made a run by `linernotes init` and fine-tuned
by `linernotes train --base`. The fine-tune is the realistic case whose credits and opt-outs are
checked: a retrain without some tracks fine-tunes the same starting weights again (`base_model`),
never the pretrained model from scratch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from linernotes import device
from linernotes.artifacts import hash_json
from linernotes.config import Settings, require, setting
from linernotes.data.audio import mono
from linernotes.data.dataset import TrackDataset
from linernotes.data.descriptors import chroma_mfcc
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.models.family import Family
from linernotes.run.folder import Layout, Run, load_run, write_config
from linernotes.training import (
    CHECKPOINT,
    DiffusionLoss,
    StepBatches,
    TrainSettings,
    ema_state_dict,
    fit,
    training_rows,
)


@dataclasses.dataclass(frozen=True)
class PretrainedRecipe(Settings):
    """How `linernotes init` makes a run of a model folder."""

    seconds: float = setting(0.0, "Length of one training example in seconds (default, 0: the "
                             "longest corpus track, at most the model's maximum); shorter tracks "
                             "are padded, longer ones cut.")

    def validate(self) -> None:
        require(self.seconds >= 0, "seconds must be >= 0 (0: the longest track).")


class PretrainedFamily(Family):
    """A family whose runs start from a user's model folder; subclasses give `base_model` (the
    weights fine-tunes start from) and `save`."""

    recipe_settings = PretrainedRecipe

    @classmethod
    def existing_run(cls, run_dir: Path, source: dict, manifest: pd.DataFrame,
                     progress: bool = True) -> Run | None:
        """The run `init` already made in `run_dir` from the same folder (its encoding finished
        if a kill interrupted it), None if there is none; a run of another model is refused."""
        if not Layout(run_dir).is_run:
            return None
        run = load_run(run_dir)
        old = run.config.get("source", {}).get("fingerprint")
        if run.family.name != cls.name or old != source["fingerprint"]:
            raise LinernotesError(f"{run_dir} already holds a run of another model "
                                  f"({run.config.get('source', {}).get('path', 'unknown')}); "
                                  "choose another folder or delete it.")
        run.check_manifest(manifest)
        run.feature_store(manifest, progress)  # finishes an interrupted encoding
        return run

    @staticmethod
    def init_meta(manifest: pd.DataFrame, recipe: Settings) -> dict:
        """The config entries of a run `init` made (the model as given: no training steps)."""
        from linernotes.data.manifest import manifest_hash

        return {"train": TrainSettings(steps=0).to_dict(), "manifest_hash": manifest_hash(manifest),
                "settings_hash": None, "final_loss": None, "steps": 0, "recipe": recipe.to_dict()}

    # ---------------------------------------------------------------- audio and features
    # (a subclass gives `geometry`, {n_frames, sample_rate, hop, ...}, and `encoder()`, the
    # `data.features.FixedLengthAudio` that turns its audio into features)

    def feature_store(self, manifest: pd.DataFrame, progress: bool = True,
                      cache_dir: str | Path | None = None) -> FeatureStore:
        return FeatureStore.open(manifest, self.encoder(), cache_dir=cache_dir, progress=progress)

    def encode_audio(self, path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder()
        values, n_real = enc.encode_file(str(path))
        mask = np.arange(enc.n_frames) < n_real
        return torch.from_numpy(values), torch.from_numpy(mask)

    def real_frames(self, seconds: float) -> int:
        g = self.geometry
        return max(1, min(g["n_frames"], math.ceil(seconds * g["sample_rate"] / g["hop"])))

    def silence(self) -> torch.Tensor:
        """The features of the middle frame of a silent example."""
        enc = self.encoder()
        values = enc.encode(np.zeros((1, enc.channels, enc.n_frames * enc.hop), np.float32))[0]
        return torch.from_numpy(values[len(values) // 2])

    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Without an audio-text encoder: chroma + MFCC statistics of the decoded audio,
        unit-normed (a descriptor, not a learned embedding)."""
        rows = []
        for x, m in zip(features.detach().cpu().numpy(), mask.cpu().numpy()):
            v = chroma_mfcc(mono(self.decode(x, m)), self.sample_rate)
            rows.append(v / max(float(np.linalg.norm(v)), 1e-12))
        return torch.from_numpy(np.stack(rows)).float()

    # ---------------------------------------------------------------- fine-tuning

    def base_model(self) -> nn.Module:
        """The model this run's fine-tunes start from."""
        raise NotImplementedError

    def finetune(self, manifest: pd.DataFrame, out: str | Path, settings: TrainSettings,
                 progress: bool = True, start: nn.Module | None = None) -> Run:
        """The model (or `start`) fine-tuned on `manifest`'s training split with `settings`, as
        a new run in `out` (resumes an interrupted fine-tune; a finished one is loaded)."""
        from linernotes.data.manifest import manifest_hash

        out = Path(out)
        if out.resolve() == self.path.resolve():
            raise LinernotesError("A fine-tune goes to a new folder, not over its base run.")
        if Layout(out).is_run:
            run = load_run(out, manifest=manifest)
            if TrainSettings.from_dict(run.config["train"]) != settings:
                raise LinernotesError(f"{out} already holds a run fine-tuned with other "
                                      "settings; choose another folder or delete it.")
            return run
        store = self.feature_store(manifest, progress)
        model = copy.deepcopy(start if start is not None else self.model).to(device.current())
        data = StepBatches(TrackDataset(store, manifest, training_rows(manifest, settings)),
                           settings.batch_size, settings.seed)
        loss = DiffusionLoss(settings.seed, settings.n_draws, settings.cond_dropout,
                             settings.mask_padding)
        key = hash_json({"manifest": manifest_hash(manifest), "start": self.recipe_key()
                         if start is not None else self.config["weights_hash"]})
        torch.manual_seed(settings.seed)  # dropout draws: never those of whatever ran before
        result = fit(model, data, loss, settings, out_dir=out, task=self.task,
                     params=self.task.parameter_names(model, settings.param_group), key=key,
                     progress=progress, desc="fine-tune")
        model.load_state_dict(ema_state_dict(model, result.ema))
        losses = result.losses[-50:]
        meta = {"train": settings.to_dict(), "settings_hash": settings.hash(),
                "manifest_hash": manifest_hash(manifest), "steps": result.steps,
                "final_loss": float(np.mean(losses)) if losses else None,
                "finetuned_from": self.config["hash"]}
        write_config(out, self.name, self.save(out, model), meta)
        if not settings.keep_checkpoint:
            (out / CHECKPOINT).unlink(missing_ok=True)
        return load_run(out, manifest=manifest)

    def retrain(self, manifest: pd.DataFrame, folder: Path, settings: TrainSettings,
                progress: bool = True) -> Path:
        if not self.config.get("train", {}).get("steps"):
            raise LinernotesError(
                f"{self.path} is the pretrained model as it was given, not a fine-tune made here, "
                "so linernotes cannot retrain it without some tracks. Fine-tune it on your corpus "
                "(`linernotes train --base RUN`) and evaluate the fine-tune.")
        self.finetune(manifest, folder, settings, progress, start=self.base_model())
        return Path(folder)
