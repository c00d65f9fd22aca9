"""Run under torchrun by tests/test_distributed.py: Fisher + sharded losses on a tiny model."""

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from linernotes import distributed  # noqa: E402
from linernotes.attribution import losses  # noqa: E402
from linernotes.curvature import FisherSettings, compute_fisher  # noqa: E402
from linernotes.data.dataset import TrackDataset, split_rows  # noqa: E402
from linernotes.data.features import FeatureStore  # noqa: E402
from linernotes.data.manifest import read_manifest  # noqa: E402

from conftest import TINY_FEATURES  # noqa: E402
from tiny_task import TinyDiTTask  # noqa: E402


def main(corpus: str, model_path: str, out: str) -> None:
    distributed.init_from_env()
    manifest = read_manifest(corpus)
    store = FeatureStore.open(manifest, TINY_FEATURES, progress=False)
    rows = split_rows(manifest, "train")
    train = TrackDataset(store, manifest, rows)
    ids = [manifest["track_id"][i] for i in rows]
    task = TinyDiTTask(TINY_FEATURES.n_frames, TINY_FEATURES.n_mels)
    model = task.make_model()
    model.load_state_dict(torch.load(model_path))
    die_after = int(os.environ.get("DIE_AFTER_SHARDS", "0"))
    if die_after and distributed.rank() == 1:
        real, calls = losses.track_losses, [0]

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] > die_after:
                os._exit(3)  # a killed rank: no clean-up
            return real(*args, **kwargs)

        losses.track_losses = dying
    settings = losses.ScoreSettings(timesteps=4, stride=200, batch_size=2, shard_size=2)
    result = losses.sharded_losses(task, model, train, ids, settings, Path(out) / "losses",
                                   {"run": "dist"}, progress=False)
    fisher = compute_fisher(task, model, train, FisherSettings(draws=1), "dist", progress=False)
    if distributed.rank() == 0:
        np.save(Path(out) / "losses.npy", result)
        fisher.save(Path(out) / "fisher.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:4])
