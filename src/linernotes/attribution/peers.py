"""Adapters that run peer attribution libraries (dattri, kronfluence) on the same Task and draws.

Each training track's (t, ε) draws come from `draw_noise` exactly as for linernotes' own methods
and are passed in the batch (sampling inside the loss destroys agreement; PEERS.md). Results are
the same score tables, with method names like "peer:kronfluence-ekfac". The libraries are
imported lazily; if one is missing, a LinernotesError names the install command.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from linernotes.artifacts import hash_json
from linernotes.attribution.attributor import Attributor, Scored
from linernotes.attribution.gradients import GradientSettings, TaskObjective
from linernotes.attribution.query import Query
from linernotes.errors import LinernotesError
from linernotes.task import Task, draw_noise, fixed_timesteps

INSTALL = {
    "dattri": "pip install 'dattri==0.3.0'",
    "kronfluence": "pip install --no-deps 'kronfluence==1.0.1' && "
    "pip install accelerate einops einconv opt-einsum",
}
PEER_METHODS = ("dattri-trak", "dattri-tracin", "kronfluence-identity", "kronfluence-diagonal",
                "kronfluence-kfac", "kronfluence-ekfac")


def available(lib: str) -> bool:
    """Whether the peer library `lib` can be imported."""
    return importlib.util.find_spec(lib) is not None


def require(lib: str) -> None:
    """Raise LinernotesError naming the install command if `lib` is missing."""
    if not available(lib):
        raise LinernotesError(f"The peer library {lib} is not installed. Install it with: "
                              f"{INSTALL[lib]}  (never a plain `pip install kronfluence`: it "
                              "replaces torch).")


# ------------------------------------------------------------------------------------ shared data


def track_draws(task: Task, ids: Sequence[str], s: GradientSettings) -> tuple:
    """The training tracks' fixed draws, exactly as linernotes' gradient methods use them."""
    ts = fixed_timesteps(s.timesteps, s.stride)
    return draw_noise(list(ids), range(s.timesteps), task.latent_shape, seed=s.seed,
                      timesteps=ts)


def query_draws(task: Task, query: Query, s: GradientSettings) -> tuple:
    """A query's random draws, exactly as linernotes' gradient methods use them."""
    t, noise = draw_noise([query.key], range(s.query_draws), task.latent_shape,
                          seed=s.query_seed)
    return t[0], noise[0]


class _Samples(Dataset):
    """Items (features, mask, t (D,), noise (D, ...)) with their captions kept aside."""

    def __init__(self, features, masks, captions, t, noise):
        self.features, self.masks, self.captions, self.t, self.noise = (
            features, masks, list(captions), t, noise)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return self.features[i], self.masks[i], self.t[i], self.noise[i]


def _train_samples(task: Task, train: Dataset, ids: list[str], s: GradientSettings) -> _Samples:
    items = [train[k] for k in range(len(train))]
    t, noise = track_draws(task, ids, s)
    return _Samples(torch.stack([it["features"] for it in items]),
                    torch.stack([it["mask"] for it in items]),
                    [it["caption"] for it in items], t, noise)


def _query_samples(task: Task, queries: Sequence[Query], s: GradientSettings) -> _Samples:
    draws = [query_draws(task, q, s) for q in queries]
    return _Samples(torch.stack([q.features for q in queries]),
                    torch.stack([q.mask for q in queries]), [q.caption for q in queries],
                    torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws]))


# -------------------------------------------------------------------------------------- dattri


class _CaptionedLoader(DataLoader):
    """Batches of one tensor sample; the sample's caption is published in `holder` on yield.

    dattri vmaps its loss over tensors only, so the caption travels beside the batch.
    """

    def __init__(self, samples: _Samples, holder: dict):
        super().__init__(samples, batch_size=1, shuffle=False)
        self.samples, self.holder = samples, holder

    def __iter__(self) -> Iterator:
        for i, batch in enumerate(super().__iter__()):
            self.holder["caption"] = self.samples.captions[i]
            yield batch


class _Dattri:
    """dattri's TRAK or TracIn on a private copy of the model (its hooks and flags stay there)."""

    def __init__(self, name: str, task: Task, model: nn.Module, params: list[str],
                 train: _Samples, s: GradientSettings, damping: float | None):
        from dattri.task import AttributionTask

        if name == "dattri-trak" and s.projection_dim == 0:
            raise LinernotesError("dattri's TRAK needs projection_dim > 0.")
        self.name, self.task, self.s, self.damping = name, task, s, damping
        self.holder: dict = {}
        self.work = copy.deepcopy(model).eval()
        for n, p in self.work.named_parameters():
            p.requires_grad_(n in params)
        self.atask = AttributionTask(loss_func=self._loss(s.mask_train), model=self.work,
                                     checkpoints=self.work.state_dict(),
                                     target_func=self._loss(s.mask_query))
        self.train_loader = _CaptionedLoader(train, self.holder)
        self.proj = {"proj_dim": s.projection_dim, "proj_max_batch_size": 32,
                     "proj_seed": s.projection_seed, "device": "cpu"}
        self._trak = None

    def _loss(self, mask: bool):
        from torch.func import functional_call

        call = TaskObjective(self.task, self.work, self.s.output, mask)
        rank = len(self.task.latent_shape)

        def loss(p, data):
            f, m, t, noise = data[:4]
            if f.dim() == rank:  # one sample without its batch dimension
                f, m, t, noise = f[None], m[None], t[None], noise[None]
            batch = {"features": f, "mask": m, "caption": [self.holder["caption"]] * f.shape[0]}
            named = {f"model.{k}": v for k, v in p.items()}
            return functional_call(call, named, (batch, t, noise)).sum()

        return loss

    def scores(self, queries: _Samples) -> np.ndarray:
        """(n_train, n_query) scores."""
        from dattri.algorithm import tracin as tracin_mod
        from dattri.algorithm import trak as trak_mod

        query_loader = _CaptionedLoader(queries, self.holder)
        # both attributors update a module-level default dict in place: restore it afterwards
        defaults = {m: dict(m.DEFAULT_PROJECTOR_KWARGS) for m in (trak_mod, tracin_mod)}
        try:
            if self.name == "dattri-trak":
                if self._trak is None:  # the training side is cached once
                    self._trak = trak_mod.TRAKAttributor(
                        self.atask, correct_probability_func=lambda p, data: torch.zeros(()),
                        projector_kwargs=dict(self.proj),
                        regularization=1e-3 if self.damping is None else self.damping)
                    self._trak.cache(self.train_loader)
                out = self._trak.attribute(query_loader)
            else:
                att = tracin_mod.TracInAttributor(self.atask, weight_list=torch.ones(1),
                                                  normalized_grad=False,
                                                  projector_kwargs=dict(self.proj))
                if self.s.projection_dim == 0:
                    att.projector_kwargs = None  # exact gradients (dattri projects by default)
                out = att.attribute(self.train_loader, query_loader)
        finally:
            for m, saved in defaults.items():
                m.DEFAULT_PROJECTOR_KWARGS.clear()
                m.DEFAULT_PROJECTOR_KWARGS.update(saved)
        return out.detach().double().numpy()


# --------------------------------------------------------------------------------- kronfluence


class _Rows(Dataset):
    """One row per (sample, draw): kronfluence's "example" is dim 0 of each module's input."""

    def __init__(self, samples: _Samples):
        self.samples = samples
        self.d = samples.t.shape[1]

    def __len__(self) -> int:
        return len(self.samples) * self.d

    def __getitem__(self, r: int) -> dict:
        i, j = divmod(r, self.d)
        s = self.samples
        return {"features": s.features[i], "mask": s.masks[i], "caption": s.captions[i],
                "t": s.t[i, j], "noise": s.noise[i, j]}


def _collate_rows(items: list[dict]) -> dict:
    return {k: ([it[k] for it in items] if k == "caption" else torch.stack([it[k] for it in items]))
            for k in items[0]}


def tracked_modules(model: nn.Module, params: Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules whose weights are in `params` (what kronfluence tracks)."""
    names = set(params)
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and f"{n}.weight" in names]


def tracked_parameters(model: nn.Module, params: Sequence[str]) -> list[str]:
    """Parameter names (weights and biases) of `tracked_modules`, in model order."""
    mods = set(tracked_modules(model, params))
    return [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in mods]


class _Kronfluence:
    """kronfluence with one strategy; factors are fitted once, on a prepared copy of the model."""

    def __init__(self, strategy: str, task: Task, model: nn.Module, params: list[str],
                 train: _Samples, s: GradientSettings, damping: float | None, work_dir: Path,
                 progress: bool):
        import kronfluence
        from kronfluence.arguments import FactorArguments
        from kronfluence.utils.dataset import DataLoaderKwargs

        if s.output != "loss":
            raise LinernotesError("The kronfluence adapter supports output='loss' only.")
        modules = tracked_modules(model, params)
        if not modules:
            raise LinernotesError(f"No nn.Linear module in group {s.group!r} for kronfluence.")

        class KTask(kronfluence.Task):
            def compute_train_loss(self, batch, model, sample=False):
                return task.per_sample_loss(model, batch, batch["t"], batch["noise"],
                                            s.mask_train).sum()

            def compute_measurement(self, batch, model):
                return task.per_sample_loss(model, batch, batch["t"], batch["noise"],
                                            s.mask_query).sum()

            def get_influence_tracked_modules(self):
                return modules

        self.s, self.damping, self.train = s, damping, _Rows(train)
        self.n_train = len(train)
        ktask = KTask()
        work = kronfluence.prepare_model(copy.deepcopy(model), ktask)
        logging.getLogger("kronfluence").setLevel(logging.WARNING)
        self.analyzer = kronfluence.Analyzer(
            analysis_name="linernotes", model=work, task=ktask, cpu=True,
            disable_tqdm=not progress, output_dir=str(work_dir), log_level=logging.WARNING)
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=_collate_rows))
        self.rows_per_batch = max(1, s.batch_size * s.timesteps)
        self.calls = 0
        self.factors = f"f-{hash_json([strategy, s.feature_key(), self.n_train])}"
        self.analyzer.fit_all_factors(
            factors_name=self.factors, dataset=self.train,
            per_device_batch_size=self.rows_per_batch,
            factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True),
            overwrite_output_dir=True)

    def scores(self, queries: _Samples) -> np.ndarray:
        """(n_train, n_query) scores, averaged over each side's draws."""
        from kronfluence.arguments import ScoreArguments

        rows = _Rows(queries)
        args = ScoreArguments() if self.damping is None else ScoreArguments(
            damping_factor=self.damping)
        self.calls += 1
        name = f"s-{self.factors}-{self.calls}"
        self.analyzer.compute_pairwise_scores(
            scores_name=name, factors_name=self.factors, query_dataset=rows,
            train_dataset=self.train, per_device_query_batch_size=max(1, self.s.batch_size),
            per_device_train_batch_size=self.rows_per_batch, score_args=args,
            overwrite_output_dir=True,
        )
        out = self.analyzer.load_pairwise_scores(name)["all_modules"].double()
        per_sample = out.view(len(queries), rows.d, self.n_train, self.train.d).mean(dim=(1, 3))
        return per_sample.T.numpy()


# --------------------------------------------------------------------------------- front door


class PeerAttributor(Attributor):
    """One peer method (see PEER_METHODS) on linernotes' Task, model, draws and queries."""

    def __init__(
        self, name: str, task: Task, model: nn.Module, run_hash: str, manifest: pd.DataFrame,
        train: Dataset, train_ids: list[str], work_dir: str | Path,
        settings: GradientSettings | None = None, damping: float | None = None,
        progress: bool = False,
    ):
        if name not in PEER_METHODS:
            raise LinernotesError(f"Unknown peer method {name!r}; choose one of "
                                  f"{', '.join(PEER_METHODS)}.")
        super().__init__(run_hash, manifest, train_ids)
        self.peer, self.lib = name, name.split("-")[0]
        require(self.lib)
        self.task, self.model, self.train = task, model, train
        self.settings = settings or GradientSettings(projection_dim=0)
        self.work_dir, self.damping, self.progress = Path(work_dir), damping, progress
        self.params = task.parameter_names(model, self.settings.group)
        if not self.params:
            raise LinernotesError(f"Parameter group {self.settings.group!r} is empty.")
        self._runner: _Dattri | _Kronfluence | None = None

    @property
    def method(self) -> str:
        return f"peer:{self.peer}"

    def score_matrix(self, queries: Sequence[Query]) -> np.ndarray:
        """(n_train, n_query) scores of the peer method."""
        if self._runner is None:
            train = _train_samples(self.task, self.train, self.train_ids, self.settings)
            if self.lib == "dattri":
                self._runner = _Dattri(self.peer, self.task, self.model, self.params, train,
                                       self.settings, self.damping)
            else:
                self._runner = _Kronfluence(self.peer.split("-", 1)[1], self.task, self.model,
                                            self.params, train, self.settings, self.damping,
                                            self.work_dir / self.peer, self.progress)
        return self._runner.scores(_query_samples(self.task, queries, self.settings))

    def scores_many(self, queries: Sequence[Query], work: Path) -> list[Scored]:
        """Every training track's score for each query, in one peer run."""
        t0 = time.perf_counter()
        scores = self.score_matrix(queries)
        seconds = time.perf_counter() - t0
        record = {"gradients": self.settings.to_dict(), "damping": self.damping,
                  "seconds_all_queries": seconds, "n_queries": len(queries)}
        return [Scored(scores[:, j], dict(record)) for j in range(len(queries))]

    def scores(self, query: Query, work: Path) -> Scored:
        return self.scores_many([query], work)[0]
