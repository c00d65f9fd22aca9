"""The front door for attribution on a trained run: queries in, one score table per query out.

`attribute_run` is what `linernotes attribute` and the demo call: it builds the method once
(the Fisher, baseline losses and training features are cached in the run folder and shared by
every query) and writes one score table per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.clips import load_clip
from linernotes.curvature import FisherSettings
from linernotes.data.audio import AUDIO_SUFFIXES
from linernotes.data.features import FeatureStore
from linernotes.errors import LinernotesError
from linernotes.unlearning.newton import UnlearnSettings


def query_from_spec(
    spec: str, run, store: FeatureStore, manifest: pd.DataFrame, caption: str | None = None
) -> Query:
    """A query from `train:<track id>`, a generated clip (with sidecar) or audio + `caption`."""
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
    features, mask = run.family.encode_audio(path)
    return Query(key=path.stem, features=features, mask=mask, caption=caption, source=str(path))


def queries_from_specs(specs: Sequence[str], run, manifest: pd.DataFrame,
                       caption: str | None = None, progress: bool = True) -> list[Query]:
    """The queries of several specs (see `query_from_spec`) against `run`'s features."""
    store = run.feature_store(manifest, progress)
    return [query_from_spec(s, run, store, manifest, caption) for s in specs]


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

    store, train, ids = run.train_set(manifest, progress)
    queries = [query_from_spec(s, run, store, manifest, caption) for s in specs]
    attributor = make_attributor(method, run, manifest, (store, train, ids), overrides,
                                 {"unlearn": unlearn, "score": score, "fisher": fisher}, progress)
    return attributor.attribute_many(queries, out_dir)
