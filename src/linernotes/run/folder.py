"""The run folder and its one owner, `Run`: layout, loading and saving, derived runs, the
training set and the Fisher lookup.

A run folder holds a trained model (its family's files), `config.json` (what it was made from,
hashed), and everything later stages derive from it, each in a sub-folder named only here:

    config.json        what the run is: family, training settings, manifest hash, weights hash
    <family files>     the model (reference family: model.safetensors, clap/)
    fisher/            diagonal Fishers, one file per settings
    cache/             training-side features and baseline losses, keyed inside
    retrains/          the recipe retrained without some tracks (leave-K-out, LDS, LOGO, audits)
    credit/            artist-level credit: groups unlearned, query losses
    optout.json        in an opt-out run: what was removed, how, at what cost
    _unlearn/          while an opt-out trains (checkpoint); unlearn_losses.jsonl after
    checkpoint.pt      while the model trains; losses.jsonl its step log
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from linernotes import device, distributed
from linernotes.artifacts import hash_json, load_cached, read_json, write_json
from linernotes.curvature import Fisher, FisherSettings, compute_fisher
from linernotes.data.dataset import TrackDataset, split_rows
from linernotes.data.manifest import manifest_hash, positions, read_manifest
from linernotes.errors import LinernotesError
from linernotes.models.family import DEFAULT_FAMILY, Family, family_class
from linernotes.training import CHECKPOINT

CONFIG = "config.json"
KIND = "linernotes-run"


@dataclasses.dataclass
class Layout:
    """Where everything lives in a run folder: the one place its sub-folders are named (also for
    a folder that is not a finished run yet, e.g. an opt-out in progress)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a finished run (its config)."""
        return self.config_path.exists()

    @property
    def fisher_dir(self) -> Path:
        return self.path / "fisher"

    def fisher_path(self, settings: FisherSettings) -> Path:
        return self.fisher_dir / f"fisher-{settings.group}-{settings.hash()}.safetensors"

    @property
    def cache_dir(self) -> Path:
        """Reusable training-side features and losses (one folder, keyed inside)."""
        return self.path / "cache"

    @property
    def retrains_dir(self) -> Path:
        """The one retrain cache (`run.retrain.Retrainer`)."""
        return self.path / "retrains"

    @property
    def credit_dir(self) -> Path:
        return self.path / "credit"

    @property
    def optout_record(self) -> Path:
        """In an opt-out run: what was removed, how and at what cost."""
        return self.path / "optout.json"

    @property
    def optout_work(self) -> Path:
        """The opt-out's checkpoint folder while it trains."""
        return self.path / "_unlearn"

    @property
    def optout_log(self) -> Path:
        """The opt-out's step log, kept after it finished."""
        return self.path / "unlearn_losses.jsonl"


@dataclasses.dataclass
class Run(Layout):
    """A trained model in its folder: config, family (model and Task) and the folder's layout."""

    config: dict
    family: Family

    # ---------------------------------------------------------------- what it is

    @property
    def hash(self) -> str:
        return self.config["hash"]

    @property
    def manifest_hash(self) -> str:
        return self.config["manifest_hash"]

    @property
    def model(self) -> nn.Module:
        return self.family.model

    @property
    def task(self):
        return self.family.task

    @property
    def parent(self) -> str | None:
        """The hash of the run this one was derived from (an opt-out), or None."""
        return self.config.get("parent")

    def to(self, where: torch.device | str) -> Run:
        """Move the run's model (and what runs with it) to a device; returns the run."""
        self.family.to(device.resolve(where))
        return self

    def removed_tracks(self) -> list[str]:
        """Track ids removed by opt-outs along the chain that led to this run."""
        note = self.config.get("note") or {}
        return list(note.get("removed_total", []))

    # ---------------------------------------------------------------- its data

    def check_manifest(self, manifest: pd.DataFrame) -> None:
        """Refuse a manifest other than the one the run was trained on."""
        got = manifest_hash(manifest)
        if got != self.manifest_hash:
            where = manifest.attrs.get("path", "the given manifest")
            raise LinernotesError(
                f"The run at {self.path} was trained on a different manifest (hash "
                f"{self.manifest_hash}) than {where} (hash {got}); use the run trained on this "
                "corpus or retrain with `linernotes train`."
            )

    def feature_store(self, manifest: pd.DataFrame | str | Path, progress: bool = True,
                      cache_dir: str | Path | None = None):
        """The features of `manifest` as this run's family makes them (refuses another
        manifest)."""
        df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
        self.check_manifest(df)
        return self.family.feature_store(df, progress, cache_dir)

    def train_ids(self, manifest: pd.DataFrame) -> list[str]:
        """The track ids the run's model learned from, in manifest order: its split, minus the
        tracks it excluded and those opt-outs removed."""
        train = self.config.get("train", {}) or {}
        gone = set(map(str, train.get("exclude", []) or [])) | set(self.removed_tracks())
        rows = split_rows(manifest, str(train.get("split", "train")), sorted(gone))
        return [str(t) for t in manifest["track_id"].to_numpy()[rows]]

    def holdout_ids(self, manifest: pd.DataFrame) -> list[str]:
        """The held-out track ids (never trained on), in manifest order."""
        return manifest["track_id"][manifest["split"] == "holdout"].astype(str).tolist()

    def train_set(self, manifest: pd.DataFrame, progress: bool = True):
        """(feature store, dataset of the training tracks, their track ids)."""
        store = self.feature_store(manifest, progress)
        ids = self.train_ids(manifest)
        return store, TrackDataset(store, manifest, positions(manifest, ids)), ids

    def fisher(self, manifest: pd.DataFrame, settings: FisherSettings,
               progress: bool = True, force: bool = False) -> Fisher:
        """The run's diagonal Fisher for `settings`: read from `fisher/`, or computed over the
        training set and saved there (`force`: computed again). A file there that cannot be
        read, or that was made for another run, is computed again in its place; a killed
        computation resumes from its checkpoint."""
        path = self.fisher_path(settings)
        if not force:
            fisher = load_cached(path, lambda p: Fisher.load(p, run_hash=self.hash))
            if fisher is not None:
                return fisher
        _, train, _ = self.train_set(manifest, progress)
        partial = path.with_name(f".{path.stem}.partial-{distributed.rank()}-of-"
                                 f"{distributed.world_size()}.safetensors")
        fisher = compute_fisher(self.task, self.model, train, settings, self.hash,
                                progress=progress, checkpoint=partial)
        if distributed.rank() == 0:
            fisher.save(path)
        distributed.barrier()
        partial.unlink(missing_ok=True)
        return fisher

    # ---------------------------------------------------------------- derived runs

    def derive(self, model: nn.Module, path: str | Path, note: dict | None = None) -> Run:
        """Save `model` (e.g. an unlearned copy of this run's) as a new run recording its
        parent; `note` (what was done) goes into its config."""
        path = Path(path)
        if path.resolve() == self.path.resolve():
            raise LinernotesError("A derived run goes to a new folder, not over its base run.")
        keep = ("train", "settings_hash", "manifest_hash", "final_loss", "steps")
        meta = {k: self.config.get(k) for k in keep}
        meta.update(parent=self.hash, note=note or {})
        write_config(path, self.family.name, self.family.save(path, model), meta)
        return load_run(path)


def write_config(path: str | Path, family: str, entries: dict, meta: dict) -> dict:
    """Write a run's config.json: its family, the family's entries and `meta`, hashed."""
    config = {"kind": KIND, "version": 1, "family": family, **entries, **meta}
    config = json.loads(json.dumps(config, default=str))
    config["hash"] = hash_json(config)
    write_json(Layout(path).config_path, config)
    return config


def _outermost_run(path: Path) -> Layout:
    """The run whose cache keeps `path`'s caption encodings: itself, or for a retrain in a run's
    `retrains/`, that run's (and so on up): a run and its retrains share them. Only that
    layout is followed, so nothing is written into unrelated folders above a run."""
    here = Layout(Path(path).resolve())
    while True:
        up = Layout(here.path.parent.parent)
        if (up.retrains_dir != here.path.parent or not up.is_run
                or read_json(up.config_path).get("kind") != KIND):
            return here
        here = up


def load_run(path: str | Path, manifest: str | Path | pd.DataFrame | None = None) -> Run:
    """Load a finished run (its family's model and Task), checking its config and files.

    With `manifest`, refuses a run trained on another manifest.
    """
    path = Path(path)
    if not Layout(path).is_run:
        hint = (
            " Training was interrupted: re-run `linernotes train` with the same settings to resume."
            if (path / CHECKPOINT).exists()
            else " Train one with `linernotes train`."
        )
        raise LinernotesError(f"No trained run at {path} ({CONFIG} missing).{hint}")
    config = read_json(path / CONFIG)
    if config.get("kind") != KIND:
        raise LinernotesError(f"{path / CONFIG} is not a linernotes run config.")
    body = {k: v for k, v in config.items() if k != "hash"}
    if hash_json(body) != config.get("hash"):
        raise LinernotesError(f"{path / CONFIG} was edited or is corrupt; retrain the run.")
    family = family_class(config.get("family", DEFAULT_FAMILY)).load(path, config)
    family.keep_captions(_outermost_run(path).cache_dir)
    run = Run(path, config, family).to(device.current())
    if manifest is not None:
        run.check_manifest(manifest if isinstance(manifest, pd.DataFrame)
                           else read_manifest(manifest))
    return run

