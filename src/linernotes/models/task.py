"""The reference model's Task: per-sample v-loss of the DiT denoiser and its parameter groups.

The conditioning (frozen CLAP + MiniLM) is computed here from the batch's captions (or audio) and
cached per caption, so the denoiser module holds only trainable weights. Condition dropout happens
only when the batch carries a "drop_cond" (B,) bool tensor (the training loop adds it); every other
caller gets the deterministic, fully conditioned loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from linernotes import device
from linernotes.errors import LinernotesError
from linernotes.models.caption_cache import CaptionCache
from linernotes.models.schedule import add_noise, alpha_sigma, v_target
from linernotes.models.text import TEXT_DIM
from linernotes.task import PARAM_GROUPS, Task

_GROUP_PATTERNS = {
    "cross_attn_kv": (".attn2.to_k.weight", ".attn2.to_v.weight"),
    "cross_attn": (".attn2.",),
    "self_attn": (".attn1.",),
    "ffn": (".ff.",),
}


class ReferenceTask(Task):
    """Task for `Denoiser` models conditioned by a frozen `clap` encoder.

    Batches need "features" (B, T, M) normalised, "mask" (B, T) bool, "caption" (B strings).
    """

    def __init__(self, clap, n_frames: int, n_mels: int):
        self.clap = clap
        self.latent_shape = (n_frames, n_mels)
        self.captions = CaptionCache(self._encode)

    def __deepcopy__(self, memo: dict) -> ReferenceTask:
        return self  # holds only frozen encoders and caches

    # ---------------------------------------------------------------- conditioning

    def text_condition(self, captions: Sequence[str], max_words: int) -> dict:
        """CLAP text embeddings and MiniLM word features (the first `max_words`) of captions
        (encoded once: `CaptionCache`)."""
        items = self.captions.get(captions)
        words = torch.zeros(len(items), max_words, TEXT_DIM)
        mask = torch.zeros(len(items), max_words, dtype=torch.bool)
        for i, (_, tokens) in enumerate(items):
            n = min(len(tokens), max_words)
            words[i, :n], mask[i, :n] = tokens[:n], True
        return {"clap": torch.stack([it[0] for it in items]), "words": words,
                "words_mask": mask}

    def _encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLAP text embedding, every MiniLM token's features) of one caption."""
        return self.clap.embed_text([caption])[0].float(), self.clap.text.tokens_of(caption)

    def condition(self, model: nn.Module, batch: dict) -> dict:
        """The conditioning dict the denoiser expects, for a Task batch (on the model's device)."""
        cfg, dev = model.config, device.of(model)
        mask = batch["mask"].bool().to(dev)
        frac = mask.sum(1).to(torch.float32) / mask.shape[1]
        if cfg.condition == "audio":
            with torch.no_grad():
                clap = self.clap.embed_audio(batch["features"].float().to(dev), mask).float()
            b = clap.shape[0]
            return {
                "clap": clap,
                "frac": frac,
                "words": torch.zeros(b, 1, 384, device=dev),
                "words_mask": torch.zeros(b, 1, dtype=torch.bool, device=dev),
            }
        text = device.move(self.text_condition(batch["caption"], cfg.max_words), dev)
        return {**text, "frac": frac}

    # ---------------------------------------------------------------- the Task contract

    def per_sample_loss(
        self,
        model: nn.Module,
        batch: dict,
        t: torch.Tensor,
        noise: torch.Tensor,
        mask_padding: bool = False,
    ) -> torch.Tensor:
        """Mean squared v-error per sample over mels and frames (only real frames if asked)."""
        dev = device.of(model)
        x0 = batch["features"].to(dev, torch.float32)
        noise = noise.to(dev, x0.dtype).view_as(x0)
        pred = self.prediction(model, batch, t, noise)
        err = (pred.float() - v_target(x0, noise, t.to(dev, x0.dtype))).pow(2).mean(-1)  # (B, T)
        if not mask_padding:
            return err.mean(1)
        m = batch["mask"].to(dev, err.dtype)
        return (err * m).sum(1) / m.sum(1).clamp_min(1.0)

    def prediction(
        self, model: nn.Module, batch: dict, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The denoiser's v-prediction (B, T, M) at x_t = add_noise(features, noise, t)."""
        dev = device.of(model)
        x0 = batch["features"].to(dev, torch.float32)
        noise = noise.to(dev, x0.dtype).view_as(x0)
        t = t.to(dev, x0.dtype)
        return model(add_noise(x0, noise, t), t, self.condition(model, batch),
                     device.move(batch.get("drop_cond"), dev))

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosine schedule's signal and noise scales at t."""
        return alpha_sigma(t)

    def parameter_names(self, model: nn.Module, group: str) -> list[str]:
        """Parameter names of a group: cross_attn_kv, cross_attn, self_attn, ffn, transformer, all.

        Independent of `requires_grad` flags (callers may freeze parameters temporarily); "all" is
        every parameter but the model's `fixed_parameters` (never trained).
        """
        if group not in PARAM_GROUPS:
            raise LinernotesError(f"Unknown parameter group '{group}'; use one of {PARAM_GROUPS}.")
        fixed = set(getattr(model, "fixed_parameters", ()))
        names = [n for n, _ in model.named_parameters() if n not in fixed]
        if group == "all":
            return names
        names = [n for n in names if ".transformer_blocks." in f".{n}"]
        if group == "transformer":
            return names
        return [n for n in names if any(pat in n for pat in _GROUP_PATTERNS[group])]
