"""The reference family: the model linernotes trains here from a corpus.

A CLAP-style text/audio encoder (`clap.py`, trained first and then frozen) conditions a small
Stable-Audio-style DiT (`denoiser.py`) over normalised log-mel frames (`mel.py`), trained with the
v-objective on a cosine schedule (`task.py`, `schedule.py`) and sampled with diffusers'
schedulers, frames turned into audio by the offline vocoder (`pipeline.py`, `mel.py`).

Its files in a run folder: `model.safetensors` (the EMA weights), `clap/` (the frozen encoder)
and, in `config.json`, the denoiser's architecture, the feature settings and the normalisation.
`train_clap` and `train` are its training stages; `ReferenceFamily` is the run's model loaded.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from linernotes import device
from linernotes.artifacts import atomic_path, hash_file, hash_json, read_json
from linernotes.config import Settings, require, setting
from linernotes.data.audio import load_audio
from linernotes.data.dataset import TrackDataset, split_rows
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import manifest_hash, read_manifest
from linernotes.errors import LinernotesError
from linernotes.models.clap import (
    CLAP_CONFIG,
    CLAP_WEIGHTS,
    ClapLoss,
    ClapSettings,
    clap_from_settings,
    evaluate_clap,
    load_clap,
    save_clap,
)
from linernotes.models.denoiser import Denoiser, DenoiserConfig
from linernotes.models.family import Family, register
from linernotes.models.mel import FeatureSettings, FeatureStats, audio_to_db, vocode
from linernotes.models.pipeline import GenerateSettings, sample_latents
from linernotes.models.task import ReferenceTask
from linernotes.run.folder import CONFIG, Layout, Run, load_run, write_config
from linernotes.training import (
    CHECKPOINT,
    DiffusionLoss,
    StepBatches,
    TrainSettings,
    ema_state_dict,
    fit,
    training_rows,
)

WEIGHTS = "model.safetensors"
CLAP_DIR = "clap"


@dataclasses.dataclass(frozen=True)
class ReferenceRecipe(Settings):
    """What training a reference model needs beyond its training settings."""

    seconds: float = setting(8.0, "Feature length in seconds (the model's clip length).")
    clap_steps: int = setting(300, "CLAP training steps (when no --clap is given).")
    clap_seed: int = setting(0, "Seed of the CLAP stage.")
    clap: str = setting("", "Reuse a trained CLAP folder instead of training one.")

    def validate(self) -> None:
        require(0 < self.seconds <= 600, "seconds must be in (0, 600].")
        require(self.clap_steps >= 1, "clap_steps must be >= 1.")


# ---------------------------------------------------------------- training stages


def _open(manifest, features: FeatureSettings, cache_dir, progress):
    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    return df, FeatureStore.open(df, features, cache_dir=cache_dir, progress=progress)


def train_clap(
    manifest: str | Path | pd.DataFrame,
    out_dir: str | Path,
    settings: ClapSettings | None = None,
    features: FeatureSettings | None = None,
    exclude: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train the CLAP-style encoder on the train split; write it (and holdout metrics) to out_dir.

    Resumes an interrupted run; returns at once if out_dir already holds this exact CLAP.
    """
    settings, features = settings or ClapSettings(), features or FeatureSettings()
    df, store = _open(manifest, features, cache_dir, progress)
    out = Path(out_dir)
    prov = {
        "settings": settings.to_dict(),
        "features": features.to_dict(),
        "manifest_hash": manifest_hash(df),
        "exclude": sorted(exclude),
    }
    if (out / CLAP_CONFIG).exists():
        if read_json(out / CLAP_CONFIG).get("provenance") != prov:
            raise LinernotesError(
                f"{out} already holds a CLAP trained on other data or settings; delete it or "
                "choose another folder."
            )
        return out
    torch.manual_seed(settings.seed)
    clap = clap_from_settings(features.n_mels, settings)
    rows = split_rows(df, "train", exclude)
    data = StepBatches(TrackDataset(store, df, rows), settings.batch_size, settings.seed)
    fit_settings = TrainSettings(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        warmup=20,
        weight_decay=settings.weight_decay,
        grad_clip=settings.grad_clip,
        ema_decay=0.0,
        seed=settings.seed,
        cond_dropout=0.0,
        checkpoint_every=settings.checkpoint_every,
    )
    fit(
        clap,
        data,
        ClapLoss(settings.min_crop, settings.seed),
        fit_settings,
        out_dir=out / "_train",
        key=hash_json(prov),
        progress=progress,
        desc="clap",
    )
    clap.eval()
    metrics = None
    if (df["split"] == "holdout").sum() >= 2:
        metrics = evaluate_clap(clap, store, df, "holdout")
    save_clap(clap, out, {"provenance": prov, "eval": metrics})
    shutil.rmtree(out / "_train", ignore_errors=True)
    return out


def train(
    manifest: str | Path | pd.DataFrame,
    run_dir: str | Path,
    settings: TrainSettings | None = None,
    model: DenoiserConfig | None = None,
    features: FeatureSettings | None = None,
    clap: str | Path | None = None,
    clap_settings: ClapSettings | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Run:
    """Train the reference model into run_dir: CLAP first (unless `clap` is a trained CLAP's
    folder), then the denoiser. Resumes an interrupted run; a finished identical run is loaded."""
    settings, model = settings or TrainSettings(), model or DenoiserConfig()
    features = features or FeatureSettings()
    df, store = _open(manifest, features, cache_dir, progress)
    run_dir = Path(run_dir)
    if Layout(run_dir).is_run:
        run = load_run(run_dir, manifest=df)
        if run.config.get("features") != features.to_dict():
            raise LinernotesError(
                f"The run at {run_dir} was trained with feature settings "
                f"{run.config.get('features')}, not {features.to_dict()}; use matching settings "
                "or retrain."
            )
        if (
            TrainSettings.from_dict(run.config["train"]) != settings
            or run.config["model"]["config"] != model.to_dict()
        ):
            raise LinernotesError(
                f"{run_dir} already holds a run trained with other settings; choose another "
                "folder or delete it."
            )
        return run
    clap_dir = run_dir / CLAP_DIR
    if clap is None:
        train_clap(df, clap_dir, clap_settings, features, settings.exclude, cache_dir, progress)
    elif Path(clap).resolve() != clap_dir.resolve():
        src = Path(clap)
        load_clap(src)  # checks it
        _copy_clap(src, clap_dir)
    encoder = load_clap(clap_dir)
    if encoder.n_mels != features.n_mels:
        raise LinernotesError(
            f"The CLAP at {clap} reads {encoder.n_mels} mel bins but the features have "
            f"{features.n_mels}; train a CLAP with these feature settings."
        )
    task = ReferenceTask(encoder, features.n_frames, features.n_mels)
    torch.manual_seed(settings.seed)
    net = Denoiser(model, features.n_mels, encoder.dim)
    net.to(device.current())  # the CLAP stage above stays on the CPU (small)
    encoder.to(device.current())
    data = StepBatches(
        TrackDataset(store, df, training_rows(df, settings)), settings.batch_size, settings.seed
    )
    loss_fn = DiffusionLoss(
        settings.seed, settings.n_draws, settings.cond_dropout, settings.mask_padding
    )
    mhash = manifest_hash(df)
    key = hash_json(
        {
            "manifest": mhash,
            "features": features.to_dict(),
            "model": model.to_dict(),
            "clap": encoder.weights_hash,
        }
    )
    result = fit(
        net,
        data,
        loss_fn,
        settings,
        out_dir=run_dir,
        task=task,
        params=task.parameter_names(net, settings.param_group),
        key=key,
        progress=progress,
        desc="denoiser",
    )
    losses = result.losses[-50:]
    meta = {
        "train": settings.to_dict(),
        "settings_hash": settings.hash(),
        "manifest_hash": mhash,
        "final_loss": float(np.mean(losses)) if losses else None,
        "steps": result.steps,
    }
    entries = _write_model(run_dir, net, ema_state_dict(net, result.ema), features, store.stats)
    write_config(run_dir, ReferenceFamily.name, entries, meta)
    if not settings.keep_checkpoint:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return load_run(run_dir)


def _copy_clap(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CLAP_WEIGHTS, CLAP_CONFIG):
        shutil.copyfile(src / name, dst / name)


def _write_model(path: Path, model: Denoiser, state: dict, features: FeatureSettings,
                 stats: FeatureStats) -> dict:
    """Write the weights; the config entries describing the model (the CLAP is in place)."""
    clap_cfg = read_json(path / CLAP_DIR / CLAP_CONFIG)
    with atomic_path(path / WEIGHTS) as tmp:
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(tmp))
    return {
        "model": model.describe(),
        "features": features.to_dict(),
        "stats": stats.to_dict(),
        "clap_hash": clap_cfg["weights_hash"],
        "weights_hash": hash_file(path / WEIGHTS),
    }


# ---------------------------------------------------------------- the family


@register
class ReferenceFamily(Family):
    """The reference model of a run folder: the DiT (EMA weights), its frozen CLAP, the feature
    settings and normalisation it was trained with."""

    name = "reference"
    generate_settings = GenerateSettings
    block_pattern = r"(^|\.)transformer_blocks\.\d+$"
    recipe_settings = ReferenceRecipe

    def __init__(self, path: Path, config: dict, model: Denoiser, task: ReferenceTask,
                 features: FeatureSettings, stats: FeatureStats):
        super().__init__(path, config, model, task)
        self.clap, self.features, self.stats = task.clap, features, stats
        self.sample_rate, self.seconds = features.sample_rate, features.seconds

    @classmethod
    def create(cls, manifest: pd.DataFrame, run_dir: str | Path, settings: TrainSettings,
               recipe: ReferenceRecipe | None = None, progress: bool = True) -> Run:
        """Train a new reference run (or resume / reload one) into `run_dir`."""
        recipe = recipe or ReferenceRecipe()
        return train(manifest, run_dir, settings, features=FeatureSettings(seconds=recipe.seconds),
                     clap=recipe.clap or None,
                     clap_settings=ClapSettings(steps=recipe.clap_steps, seed=recipe.clap_seed),
                     progress=progress)

    @classmethod
    def load(cls, path: Path, config: dict) -> ReferenceFamily:
        weights = path / WEIGHTS
        if not weights.exists() or hash_file(weights) != config["weights_hash"]:
            raise LinernotesError(
                f"{weights} is missing or does not match {CONFIG} (corrupt or replaced); "
                "retrain the run or restore the file."
            )
        clap = load_clap(path / CLAP_DIR)
        if clap.weights_hash != config["clap_hash"]:
            raise LinernotesError(f"{path / CLAP_DIR} is not the CLAP this run was trained with.")
        desc = config["model"]
        model = Denoiser(DenoiserConfig.from_dict(desc["config"]), desc["n_mels"],
                         desc["clap_dim"])
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as exc:
            raise LinernotesError(f"Cannot load {weights}: {exc}") from exc
        model.eval()
        features = FeatureSettings.from_dict(config["features"])
        task = ReferenceTask(clap, features.n_frames, features.n_mels)
        return cls(path, config, model, task, features, FeatureStats.from_dict(config["stats"]))

    def to(self, device: torch.device) -> ReferenceFamily:
        self.model.to(device)
        self.clap.to(device)
        return self

    def save(self, path: Path, model: nn.Module) -> dict:
        if Path(path).resolve() != self.path.resolve():
            _copy_clap(self.path / CLAP_DIR, Path(path) / CLAP_DIR)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return _write_model(Path(path), model, state, self.features, self.stats)

    def recipe_key(self) -> dict:
        return {"features": self.features.to_dict(), "model": self.config["model"],
                "clap": self.config["clap_hash"]}

    def caption_key(self) -> dict:
        return {**self.recipe_key(), "text": self.clap.text.identity}  # the packaged MiniLM

    def retrain(self, manifest: pd.DataFrame, folder: Path, settings: TrainSettings,
                progress: bool = True) -> Path:
        train(manifest, folder, settings, DenoiserConfig.from_dict(self.config["model"]["config"]),
              self.features, clap=self.path / CLAP_DIR, progress=progress)
        return Path(folder)

    def untrained(self, seed: int) -> nn.Module:
        desc = self.config["model"]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Denoiser(DenoiserConfig.from_dict(desc["config"]), desc["n_mels"],
                             desc["clap_dim"])
        return model.eval()

    # ---------------------------------------------------------------- audio and features

    def feature_store(self, manifest: pd.DataFrame, progress: bool = True,
                      cache_dir: str | Path | None = None) -> FeatureStore:
        return FeatureStore.open(manifest, self.features, cache_dir=cache_dir, progress=progress)

    def encode_audio(self, path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features
        db, n_real = audio_to_db(load_audio(path, f.sample_rate), f)
        mask = np.arange(f.n_frames) < n_real
        return torch.from_numpy(self.stats.normalise(db)), torch.from_numpy(mask)

    def decode(self, features: np.ndarray, mask: np.ndarray,
               settings: GenerateSettings | None = None) -> np.ndarray:
        """The vocoder's (seeded Griffin-Lim) mono audio of normalised frames (T, M), cut to the
        real frames."""
        s = settings or GenerateSettings()
        return vocode(features, mask, self.features, self.stats, s.griffin_lim_iters)

    def real_frames(self, seconds: float) -> int:
        return self.features.clip_frames(seconds)

    def silence(self) -> torch.Tensor:
        f = self.features
        return torch.from_numpy(self.stats.normalise(np.full(f.n_mels, f.db_floor)))

    # ---------------------------------------------------------------- generation, embeddings

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], n_real: int,
               settings: GenerateSettings) -> torch.Tensor:
        return sample_latents(self.model, self.task, prompts, seeds, n_real, settings)

    @torch.no_grad()
    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dev = device.of(self.clap)
        return self.clap.embed_audio(features.float().to(dev), mask.to(dev)).cpu()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clap.embed_text(list(texts)).float().cpu()

