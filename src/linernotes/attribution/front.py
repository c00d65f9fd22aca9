"""The front door for attribution on a trained run: queries, the cached Fisher, scoring.

`attribute_run` is what `linernotes attribute` and the demo call: it loads or computes the
Fisher once per (run, settings), shares the baseline losses between queries, and writes one score
table per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.curvature import Fisher, FisherSettings, compute_fisher
from linernotes.data.audio import AUDIO_SUFFIXES, load_audio
from linernotes.data.dataset import TrackDataset, split_rows
from linernotes.data.features import FeatureStore, audio_to_db
from linernotes.errors import LinernotesError
from linernotes.unlearning.newton import UnlearnSettings


def fisher_path(run, settings: FisherSettings) -> Path:
    return Path(run.path) / "fisher" / f"fisher-{settings.group}-{settings.hash()}.safetensors"


def train_set(run, manifest: pd.DataFrame, progress: bool = True):
    """The run's training tracks: (store, dataset over the train split, their track ids)."""
    store = run.feature_store(manifest, progress=progress)
    exclude = run.config.get("train", {}).get("exclude", []) or []
    rows = split_rows(manifest, "train", exclude=exclude)
    return store, TrackDataset(store, manifest, rows), [manifest["track_id"][i] for i in rows]


def fisher_for(run, train: TrackDataset, settings: FisherSettings, progress: bool = True) -> Fisher:
    """The run's Fisher for `settings`: read from the run folder, or computed and saved there."""
    path = fisher_path(run, settings)
    if path.exists():
        return Fisher.load(path, run_hash=run.hash)
    fisher = compute_fisher(run.task, run.model, train, settings, run.hash, progress=progress)
    fisher.save(path)
    return fisher


def query_from_spec(
    spec: str, run, store: FeatureStore, manifest: pd.DataFrame, caption: str | None = None
) -> Query:
    """A query from `train:<track id>`, a generated clip (with sidecar) or audio + `caption`."""
    from linernotes.models.pipeline import load_clip

    if spec.startswith("train:"):
        tid = spec.removeprefix("train:")
        i = int(store.index_of([tid])[0])
        return Query(key=tid, features=torch.from_numpy(store.features(i)),
                     mask=torch.from_numpy(np.array(store.mask[i], dtype=bool)),
                     caption=manifest["caption"][i], source=spec, track_id=tid)
    path = Path(spec)
    if not path.exists():
        raise LinernotesError(f"Query {spec} does not exist (a clip path, an audio file with "
                              "--caption, or train:<track id>).")
    if path.with_suffix(".json").exists():
        clip = load_clip(path, run=run)
        return Query(key=clip.clip_id, features=clip.latent.float(), mask=clip.mask,
                     caption=caption or clip.prompt, source=str(path))
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise LinernotesError(f"{path} is not an audio file ({', '.join(AUDIO_SUFFIXES)}).")
    if not caption:
        raise LinernotesError(f"{path} has no sidecar: give its caption with --caption.")
    feats = run.features
    db, n_real = audio_to_db(load_audio(path, feats.sample_rate), feats)
    x = run.stats.normalise(db)
    mask = np.arange(feats.n_frames) < n_real
    return Query(key=path.stem, features=torch.from_numpy(x), mask=torch.from_numpy(mask),
                 caption=caption, source=str(path))


def attribute_run(
    run,
    manifest: pd.DataFrame,
    specs: Sequence[str],
    out_dir: str | Path,
    unlearn: UnlearnSettings | None = None,
    score: ScoreSettings | None = None,
    fisher: FisherSettings | None = None,
    caption: str | None = None,
    progress: bool = True,
    method: str = "unlearning",
    overrides: dict | None = None,
) -> list[pd.DataFrame]:
    """Attribute each query spec against the run's training set; one score table per query.

    `method` is any name of `methods.METHODS` (`linernotes methods`); `unlearn`, `score` and
    `fisher` are the starting settings of the methods that have them, `overrides` a flat dict of
    changes (e.g. {"alpha": 1e-6} or {"projection_dim": 512}).
    """
    from linernotes.attribution.methods import make_attributor

    store, train, ids = train_set(run, manifest, progress)
    queries = [query_from_spec(s, run, store, manifest, caption) for s in specs]
    attributor = make_attributor(method, run, manifest, (store, train, ids), overrides,
                                 {"unlearn": unlearn, "score": score, "fisher": fisher}, progress)
    return attributor.attribute_many(queries, out_dir)


def fisher_group(group: str) -> str:
    """The Fisher group that covers `group` (one file then serves several settings)."""
    return "all" if group == "all" else "transformer"
