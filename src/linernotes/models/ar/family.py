"""The ar-reference family: an autoregressive reference model of MusicGen's architecture, trained
here from scratch (No Encore's setting without downloaded weights).

transformers' MusicGen decoder (`MusicgenForCausalLM`: parallel codebooks, the delay pattern,
cross-attention) over the tokens of a residual vector quantiser learned on the reference family's
log-mel frames (`tokens.py`), conditioned on the captions' MiniLM word features through a learned
projection (`enc_to_dec_proj`, as MusicGen projects T5). Audio comes back through the vocoder the
diffusion reference uses, so the two reference models differ in the generative model only. Its
CLAP (trained first, as the diffusion reference's, or reused) gives the audio and text embeddings
the audit and credit measures use.

Run folder: `clap/`, `tokenizer.safetensors` (the RVQ codebooks), `model.safetensors` (the EMA
weights) and `config.json`. `linernotes train --family ar-reference` trains one; a retrain without
some tracks keeps the run's CLAP and tokenizer and trains the decoder again.
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
from linernotes.artifacts import atomic_path, hash_file, hash_json
from linernotes.config import Settings, require, setting
from linernotes.data.audio import load_audio
from linernotes.data.dataset import TrackDataset, split_rows
from linernotes.data.features import FeatureStore
from linernotes.data.manifest import manifest_hash
from linernotes.errors import LinernotesError
from linernotes.models.ar.tokens import Rvq, RvqCodes
from linernotes.models.caption_cache import CaptionCache
from linernotes.models.clap import ClapSettings, load_clap
from linernotes.models.family import Family, register
from linernotes.models.mel import FeatureSettings, FeatureStats, audio_to_db, vocode
from linernotes.models.musicgen.task import DelayedCodesTask
from linernotes.models.reference import CLAP_DIR, ReferenceRecipe, _copy_clap, _open, train_clap
from linernotes.models.text import TEXT_DIM  # MiniLM word features
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
TOKENIZER = "tokenizer.safetensors"
MAX_WORDS = 32


@dataclasses.dataclass(frozen=True)
class ArRecipe(ReferenceRecipe):
    """What training an ar-reference model needs beyond its training settings."""

    codebooks: int = setting(4, "Tokenizer codebooks (RVQ levels).")
    codebook_size: int = setting(256, "Codes per codebook.")
    tokenizer_iters: int = setting(20, "k-means rounds per codebook.")
    tokenizer: str = setting("", "Reuse a fitted tokenizer file instead of fitting one.")
    hidden: int = setting(256, "Decoder width.")
    layers: int = setting(4, "Decoder layers.")
    heads: int = setting(4, "Attention heads.")

    def validate(self) -> None:
        super().validate()
        require(self.codebooks >= 1 and self.codebook_size >= 2, "codebooks >= 1 and "
                "codebook_size >= 2.")
        require(self.tokenizer_iters >= 1, "tokenizer_iters must be >= 1.")
        require(self.hidden >= 1 and self.layers >= 1 and self.heads >= 1
                and self.hidden % self.heads == 0, "hidden, layers, heads >= 1, hidden divisible "
                "by heads.")

    def architecture(self, n_frames: int) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "heads": self.heads,
                "ffn": 4 * self.hidden, "codebooks": self.codebooks,
                "codebook_size": self.codebook_size, "text_dim": TEXT_DIM,
                "positions": n_frames + self.codebooks + 8}


@dataclasses.dataclass(frozen=True)
class ArGenerateSettings(Settings):
    """How the ar-reference model samples clips (token by token, with a KV cache)."""

    guidance: float = setting(3.0, "Classifier-free guidance scale (1: none).")
    temperature: float = setting(1.0, "Sampling temperature.")
    top_k: int = setting(0, "Sample among the k most likely codes (0: all).")
    seconds: float | None = setting(None, "Clip length (default: the model's length).")
    griffin_lim_iters: int = setting(32, "Vocoder (Griffin-Lim) iterations per clip.")
    batch_size: int = setting(8, "Clips sampled together.")

    def validate(self) -> None:
        require(self.guidance >= 0 and self.temperature > 0, "guidance >= 0, temperature > 0.")
        require(self.top_k >= 0 and self.batch_size >= 1 and self.griffin_lim_iters >= 1,
                "top_k >= 0, batch_size and griffin_lim_iters >= 1.")
        require(self.seconds is None or 0 < self.seconds <= 600, "seconds must be in (0, 600].")


class ArModel(nn.Module):
    """MusicGen's decoder (`MusicgenForCausalLM`) and a projection of the text features."""

    def __init__(self, arch: dict):
        from transformers import MusicgenDecoderConfig, MusicgenForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        super().__init__()
        self.arch = dict(arch)
        codes = int(arch["codebook_size"])
        config = MusicgenDecoderConfig(
            vocab_size=codes, hidden_size=arch["hidden"], num_hidden_layers=arch["layers"],
            num_attention_heads=arch["heads"], ffn_dim=arch["ffn"],
            num_codebooks=arch["codebooks"], max_position_embeddings=arch["positions"],
            pad_token_id=codes, bos_token_id=codes, decoder_start_token_id=codes)
        self.enc_to_dec_proj = nn.Linear(arch["text_dim"], arch["hidden"])
        self.decoder = MusicgenForCausalLM(config)

    def forward(self, input_ids: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                cache=None, use_cache: bool = False):
        hidden = self.enc_to_dec_proj(text) * text_mask.unsqueeze(-1).to(text.dtype)
        return self.decoder(input_ids=input_ids, encoder_hidden_states=hidden,
                            encoder_attention_mask=text_mask, cache=cache, use_cache=use_cache)


class ArTask(DelayedCodesTask):
    """The delay-pattern cross-entropy of an `ArModel`, conditioned on MiniLM word features."""

    def __init__(self, clap, n_frames: int, n_codebooks: int, codebook_size: int):
        super().__init__(n_frames, n_codebooks, codebook_size, codebook_size)
        self.clap = clap
        self.captions = CaptionCache(self._encode)

    def __deepcopy__(self, memo: dict) -> ArTask:
        return self  # holds only the frozen encoders and a cache

    def _encode(self, caption: str) -> tuple[torch.Tensor]:
        """One caption's MiniLM word features, the first MAX_WORDS (one zero row if none)."""
        tokens = self.clap.text.tokens_of(caption)[:MAX_WORDS]
        return (tokens if len(tokens) else torch.zeros(1, tokens.shape[-1]),)

    def decoder_logits(self, model: nn.Module, inputs: torch.Tensor, hidden: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        return model(inputs, hidden, mask).logits


# ---------------------------------------------------------------- training


def _train_frames(store: FeatureStore, manifest: pd.DataFrame, exclude: Sequence[str],
                  limit: int = 50_000, seed: int = 0) -> np.ndarray:
    """Normalised real frames of the training split (a seeded sample of at most `limit`)."""
    rows = split_rows(manifest, "train", exclude)
    frames = np.concatenate([store.features(i)[np.asarray(store.mask[i], bool)] for i in rows])
    if len(frames) > limit:
        frames = frames[np.random.default_rng(seed).choice(len(frames), limit, replace=False)]
    return frames


def train_ar(manifest: pd.DataFrame, run_dir: str | Path, settings: TrainSettings,
             recipe: ArRecipe, progress: bool = True) -> Run:
    """Train an ar-reference model into `run_dir`: CLAP (unless given), tokenizer (unless given),
    then the decoder. Resumes an interrupted run; a finished identical run is loaded."""
    features = FeatureSettings(seconds=recipe.seconds)
    df, mels = _open(manifest, features, None, progress)
    run_dir = Path(run_dir)
    arch = recipe.architecture(features.n_frames)
    if Layout(run_dir).is_run:
        run = load_run(run_dir, manifest=df)
        if (TrainSettings.from_dict(run.config["train"]) != settings
                or run.config.get("model") != arch):
            raise LinernotesError(f"{run_dir} already holds a run trained with other settings; "
                                  "choose another folder or delete it.")
        return run
    clap_dir = run_dir / CLAP_DIR
    if not recipe.clap:
        train_clap(df, clap_dir, ClapSettings(steps=recipe.clap_steps, seed=recipe.clap_seed),
                   features, settings.exclude, None, progress)
    elif Path(recipe.clap).resolve() != clap_dir.resolve():
        load_clap(recipe.clap)  # checks it
        _copy_clap(Path(recipe.clap), clap_dir)
    clap = load_clap(clap_dir)
    tok_path = run_dir / TOKENIZER
    if recipe.tokenizer:
        rvq = Rvq.load(recipe.tokenizer)
        if Path(recipe.tokenizer).resolve() != tok_path.resolve():
            shutil.copyfile(recipe.tokenizer, tok_path)
    elif tok_path.exists():
        rvq = Rvq.load(tok_path)  # fitted before a kill
    else:
        rvq = Rvq.fit(_train_frames(mels, df, settings.exclude), recipe.codebooks,
                      recipe.codebook_size, recipe.tokenizer_iters, recipe.clap_seed)
        rvq.save(tok_path)
    if (rvq.n_codebooks, rvq.size) != (recipe.codebooks, recipe.codebook_size):
        raise LinernotesError(f"The tokenizer {recipe.tokenizer or tok_path} has "
                              f"{rvq.n_codebooks} x {rvq.size} codes, not {recipe.codebooks} x "
                              f"{recipe.codebook_size}.")
    rvq_hash = hash_file(tok_path)
    codes = FeatureStore.open(df, RvqCodes(features, mels.stats, rvq, rvq_hash),
                              progress=progress)
    task = ArTask(clap, features.n_frames, rvq.n_codebooks, rvq.size)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        model = ArModel(arch)
    model.to(device.current())
    clap.to(device.current())
    data = StepBatches(TrackDataset(codes, df, training_rows(df, settings)), settings.batch_size,
                       settings.seed)
    loss = DiffusionLoss(settings.seed, settings.n_draws, settings.cond_dropout,
                         settings.mask_padding)
    key = hash_json({"manifest": manifest_hash(df), "features": features.to_dict(),
                     "model": arch, "clap": clap.weights_hash, "tokenizer": rvq_hash})
    torch.manual_seed(settings.seed)  # dropout draws: never those of whatever ran before
    result = fit(model, data, loss, settings, out_dir=run_dir, task=task,
                 params=task.parameter_names(model, settings.param_group), key=key,
                 progress=progress, desc="ar decoder")
    losses = result.losses[-50:]
    meta = {"train": settings.to_dict(), "settings_hash": settings.hash(),
            "manifest_hash": manifest_hash(df), "steps": result.steps,
            "final_loss": float(np.mean(losses)) if losses else None,
            "recipe": recipe.to_dict(),
            "tokenizer_error": rvq.reconstruction(_train_frames(mels, df, (), 20_000, 1))}
    state = ema_state_dict(model, result.ema)
    write_config(run_dir, ArFamily.name, _write_model(run_dir, arch, state, features,
                                                      mels.stats), meta)
    if not settings.keep_checkpoint:
        (run_dir / CHECKPOINT).unlink(missing_ok=True)
    return load_run(run_dir, manifest=df)


def _write_model(path: Path, arch: dict, state: dict, features: FeatureSettings,
                 stats: FeatureStats) -> dict:
    with atomic_path(path / WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    return {"model": arch, "features": features.to_dict(), "stats": stats.to_dict(),
            "clap_hash": load_clap(path / CLAP_DIR).weights_hash,
            "tokenizer_hash": hash_file(path / TOKENIZER),
            "weights_hash": hash_file(path / WEIGHTS)}


# ---------------------------------------------------------------- the family


@register
class ArFamily(Family):
    """An ar-reference model of a run folder: the decoder (EMA weights), its tokenizer, CLAP and
    the log-mel settings and statistics the tokenizer reads."""

    name = "ar-reference"
    generate_settings = ArGenerateSettings
    block_pattern = r"(^|\.)decoder\.layers\.\d+$"
    recipe_settings = ArRecipe

    def __init__(self, path: Path, config: dict, model: ArModel, clap, rvq: Rvq):
        self.features = FeatureSettings.from_dict(config["features"])
        self.stats = FeatureStats.from_dict(config["stats"])
        task = ArTask(clap, self.features.n_frames, rvq.n_codebooks, rvq.size)
        super().__init__(path, config, model.eval(), task)
        self.clap, self.rvq = clap, rvq
        self.sample_rate, self.seconds = self.features.sample_rate, self.features.seconds

    @classmethod
    def create(cls, manifest: pd.DataFrame, run_dir: str | Path, settings: TrainSettings,
               recipe: ArRecipe | None = None, progress: bool = True) -> Run:
        return train_ar(manifest, run_dir, settings, recipe or ArRecipe(), progress)

    @classmethod
    def load(cls, path: Path, config: dict) -> ArFamily:
        weights = path / WEIGHTS
        if not weights.exists() or hash_file(weights) != config["weights_hash"]:
            raise LinernotesError(f"{weights} is missing or does not match {path / CONFIG} "
                                  "(corrupt or replaced); retrain the run or restore the file.")
        clap = load_clap(path / CLAP_DIR)
        if clap.weights_hash != config["clap_hash"]:
            raise LinernotesError(f"{path / CLAP_DIR} is not the CLAP this run was trained with.")
        rvq = Rvq.load(path / TOKENIZER, config["tokenizer_hash"])
        model = ArModel(config["model"])
        try:
            model.load_state_dict(load_file(str(weights)))
        except Exception as exc:
            raise LinernotesError(f"Cannot load {weights}: {exc}") from exc
        return cls(path, config, model, clap, rvq)

    def to(self, where: torch.device) -> ArFamily:
        self.model.to(where)
        self.clap.to(where)
        return self

    def save(self, path: Path, model: nn.Module) -> dict:
        path = Path(path)
        if path.resolve() != self.path.resolve():
            _copy_clap(self.path / CLAP_DIR, path / CLAP_DIR)
            shutil.copyfile(self.path / TOKENIZER, path / TOKENIZER)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return _write_model(path, self.config["model"], state, self.features, self.stats)

    def recipe_key(self) -> dict:
        return {"features": self.features.to_dict(), "model": self.config["model"],
                "clap": self.config["clap_hash"], "tokenizer": self.config["tokenizer_hash"]}

    def caption_key(self) -> dict:
        return {**self.recipe_key(), "text": self.clap.text.identity}  # the packaged MiniLM

    def retrain(self, manifest: pd.DataFrame, folder: Path, settings: TrainSettings,
                progress: bool = True) -> Path:
        recipe = ArRecipe.from_dict({**self.config.get("recipe", {}),
                                     "clap": str(self.path / CLAP_DIR),
                                     "tokenizer": str(self.path / TOKENIZER)})
        train_ar(manifest, folder, settings, recipe, progress)
        return Path(folder)

    def untrained(self, seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return ArModel(self.config["model"]).eval()

    # ---------------------------------------------------------------- audio and features

    def encoder(self) -> RvqCodes:
        return RvqCodes(self.features, self.stats, self.rvq, self.config["tokenizer_hash"])

    def feature_store(self, manifest: pd.DataFrame, progress: bool = True,
                      cache_dir: str | Path | None = None) -> FeatureStore:
        return FeatureStore.open(manifest, self.encoder(), cache_dir=cache_dir, progress=progress)

    def encode_audio(self, path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features
        db, n_real = audio_to_db(load_audio(path, f.sample_rate), f)
        codes = self.rvq.encode(self.stats.normalise(db)).astype(np.float32)
        return torch.from_numpy(codes), torch.from_numpy(np.arange(f.n_frames) < n_real)

    def frames(self, codes: np.ndarray) -> np.ndarray:
        """Normalised log-mel frames (T, M) of codes (T, K)."""
        return self.rvq.decode(codes)

    def decode(self, features: np.ndarray, mask: np.ndarray,
               settings: Settings | None = None) -> np.ndarray:
        """The vocoder's mono audio of codes (T, K), cut to the real frames."""
        iters = getattr(settings, "griffin_lim_iters", ArGenerateSettings().griffin_lim_iters)
        return vocode(self.frames(np.asarray(features)), mask, self.features, self.stats, iters)

    def real_frames(self, seconds: float) -> int:
        return self.features.clip_frames(seconds)

    def silence(self) -> torch.Tensor:
        f = self.features
        floor = self.stats.normalise(np.full((1, f.n_mels), f.db_floor))
        return torch.from_numpy(self.rvq.encode(floor)[0].astype(np.float32))

    # ---------------------------------------------------------------- generation, embeddings

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], n_real: int,
               settings: ArGenerateSettings) -> torch.Tensor:
        return sample_codes(self.model, self.task, prompts, seeds, n_real, settings)

    @torch.no_grad()
    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        frames = torch.from_numpy(np.stack([self.frames(c) for c in features.cpu().numpy()]))
        dev = device.of(self.clap)
        return self.clap.embed_audio(frames.float().to(dev), mask.to(dev)).cpu()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clap.embed_text(list(texts)).float().cpu()



@torch.no_grad()
def sample_codes(model: ArModel, task: ArTask, prompts: Sequence[str], seeds: Sequence[int],
                 n_real: int, s: ArGenerateSettings) -> torch.Tensor:
    """Codes (B, n_frames, K) sampled token by token (KV cache) in the delay pattern: each clip
    draws from its own generator seeded by its seed, with classifier-free guidance (the
    unconditional half: no text, as in training's condition dropout)."""
    b, (n_frames, k), pad = len(prompts), task.latent_shape, task.pad
    dev = device.of(model)
    hidden, mask = task.text(list(prompts))
    guided = s.guidance != 1
    if guided:
        hidden = torch.cat([hidden, torch.zeros_like(hidden)])
        mask = torch.cat([mask, torch.zeros_like(mask)])
    hidden, mask = hidden.to(dev), mask.to(dev)
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    steps = n_real + k - 1
    seq = torch.full((b, k, steps + 1), pad, dtype=torch.long)
    seq[:, :, 0] = task.start
    cache = None
    for i in range(steps):
        step = seq[:, :, i : i + 1].reshape(b * k, 1)
        if guided:
            step = torch.cat([step, step])
        out = model(step.to(dev), hidden, mask, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[:, -1].float().cpu().view(-1, k, out.logits.shape[-1])
        if guided:
            logits = logits[b:] + s.guidance * (logits[:b] - logits[b:])
        logits = logits / s.temperature
        if s.top_k:
            kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        probs = logits.softmax(-1)
        tokens = torch.stack([torch.multinomial(probs[j], 1, generator=gens[j])[:, 0]
                              for j in range(b)])  # (B, K)
        valid = torch.tensor([0 <= i - c < n_real for c in range(k)])
        seq[:, :, i + 1] = torch.where(valid, tokens, torch.full_like(tokens, pad))
    codes = torch.zeros(b, n_frames, k)
    for c in range(k):
        codes[:, :n_real, c] = seq[:, c, 1 + c : 1 + c + n_real].float()
    return codes
