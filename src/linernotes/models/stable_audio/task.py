"""The stable-audio family's Task: Stable Audio's training loss, one value per sample.

As stable-audio-tools trains it (`DiffusionCondTrainingWrapper`, objective "v"): t in (0, 1),
alpha = cos(pi t / 2), sigma = sin(pi t / 2), z_t = alpha z0 + sigma eps, the DiT predicts
v = alpha eps - sigma z0 at timestep t, and the loss is the squared error averaged over latent
channels and frames (padded frames too, unless masked). The diffusers pipeline samples the same
model: its scheduler feeds the DiT x_edm / sqrt(sigma_edm^2 + 1) = z_t at timestep
atan(sigma_edm) 2 / pi = t.

Conditioning, as `StableAudioPipeline` builds it: the caption's T5 tokens (padded to the
tokenizer's length, padded tokens zeroed) through the projection model, then the start- and
end-seconds embeddings (start 0, end = the track's real length, from its mask), all three as
cross-attention tokens; the two seconds embeddings side by side as the global token. Dropping the
condition (classifier-free guidance training, "drop_cond") zeroes the cross-attention tokens, as
the pipeline's unconditional branch does. The text encoder and projection model are frozen:
each caption's embedding is computed once (alone, so it never depends on the batch it came in)
and cached; only the DiT (`model`) is trained, unlearned and attributed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from linernotes import device
from linernotes.errors import LinernotesError
from linernotes.models.caption_cache import CaptionCache
from linernotes.task import PARAM_GROUPS, Task

_GROUPS = {
    "cross_attn_kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
    "cross_attn": lambda n: ".attn2." in n,
    "self_attn": lambda n: ".attn1." in n,
    "ffn": lambda n: ".ff." in n,
    "transformer": lambda n: n.startswith("transformer_blocks."),
    "all": lambda n: True,
}


def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and noise scales of the v-objective's cosine schedule."""
    angle = t * (math.pi / 2)
    return torch.cos(angle), torch.sin(angle)


class StableAudioTask(Task):
    """Task of a `StableAudioDiTModel` conditioned like `StableAudioPipeline`.

    Batches hold "features" (B, frames, channels) latents, "mask" (B, frames) and "caption".
    """

    def __init__(self, text_encoder, tokenizer, projection, n_frames: int, channels: int,
                 hop: int, sample_rate: int, fixed: Sequence[str] = ()):
        self.text_encoder, self.tokenizer, self.projection = text_encoder, tokenizer, projection
        self.latent_shape = (n_frames, channels)
        self.hop, self.sample_rate = hop, sample_rate
        self.fixed = set(fixed)  # never-trained parameters (the DiT's Fourier time features)
        self.captions = CaptionCache(self._encode)
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> StableAudioTask:
        return self  # holds only frozen encoders and caches

    # ---------------------------------------------------------------- conditioning

    def text(self, captions: Sequence[str]) -> torch.Tensor:
        """Projected T5 tokens (B, L, D) of captions, padded tokens zeroed (encoded once:
        `CaptionCache`)."""
        items = [it[0] for it in self.captions.get(captions)]
        out = torch.zeros(len(items), self.tokenizer.model_max_length, items[0].shape[-1],
                          dtype=items[0].dtype)
        for i, tokens in enumerate(items):
            out[i, : len(tokens)] = tokens
        return out

    def _encode(self, caption: str) -> tuple[torch.Tensor]:
        """One caption's projected T5 tokens, only the real ones (the padding is zeros)."""
        dev = device.of(self.text_encoder)
        tok = self.tokenizer([caption], padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
        hidden = self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.projection(text_hidden_states=hidden).text_hidden_states
        n = int(mask[0].sum())
        if not bool(mask[0, :n].all()):
            raise LinernotesError("The Stable Audio tokenizer pads on the left; linernotes "
                                  "expects right padding (the pipeline's T5 tokenizer).")
        return (hidden[0, :n],)

    def seconds(self, mask: torch.Tensor) -> torch.Tensor:
        """Each sample's real length in seconds (its real frames x hop / sample rate)."""
        return mask.bool().sum(1).float() * self.hop / self.sample_rate

    def condition(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention tokens (B, L + 2, D), global token (B, 1, 2D)) on the model's device."""
        dev = device.of(model)
        text = self.text(batch["caption"]).to(dev)
        end = self.seconds(batch["mask"]).to(dev)
        with torch.no_grad():
            out = self.projection(start_seconds=torch.zeros_like(end), end_seconds=end)
        start, stop = out.seconds_start_hidden_states, out.seconds_end_hidden_states
        tokens = torch.cat([text, start.to(text.dtype), stop.to(text.dtype)], dim=1)
        drop = batch.get("drop_cond")
        if drop is not None:
            tokens = torch.where(drop.to(dev).view(-1, 1, 1), torch.zeros_like(tokens), tokens)
        return tokens, torch.cat([start, stop], dim=2)

    @torch.inference_mode(False)
    def rotary(self, model: nn.Module, length: int, dev: torch.device):
        """The pipeline's rotary tables for `length` positions (cached per length and device)."""
        key = (length, str(dev))
        if key not in self._rotary:
            from diffusers.models.embeddings import get_1d_rotary_pos_embed

            cos, sin = get_1d_rotary_pos_embed(model.config.attention_head_dim // 2, length,
                                               use_real=True, repeat_interleave_real=False)
            self._rotary[key] = (cos.to(dev), sin.to(dev))
        return self._rotary[key]

    # ---------------------------------------------------------------- the Task contract

    def prediction(self, model: nn.Module, batch: dict, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
        """The DiT's v-prediction (B, frames, channels) at z_t."""
        dev = device.of(model)
        x0 = batch["features"].to(dev, torch.float32)
        noise = noise.to(dev, x0.dtype).view_as(x0)
        t = t.to(dev, x0.dtype)
        a, s = alpha_sigma(t)
        x_t = (a.view(-1, 1, 1) * x0 + s.view(-1, 1, 1) * noise).transpose(1, 2)
        tokens, glob = self.condition(model, batch)
        out = model(x_t, t, encoder_hidden_states=tokens, global_hidden_states=glob,
                    rotary_embedding=self.rotary(model, x_t.shape[2] + glob.shape[1], dev),
                    return_dict=False)[0]
        return out.transpose(1, 2)

    def per_sample_loss(self, model: nn.Module, batch: dict, t: torch.Tensor,
                        noise: torch.Tensor, mask_padding: bool = False) -> torch.Tensor:
        """Mean squared v-error per sample over channels and frames (real frames only if
        asked)."""
        dev = device.of(model)
        x0 = batch["features"].to(dev, torch.float32)
        noise = noise.to(dev, x0.dtype).view_as(x0)
        a, s = alpha_sigma(t.to(dev, x0.dtype))
        target = a.view(-1, 1, 1) * noise - s.view(-1, 1, 1) * x0
        pred = self.prediction(model, batch, t, noise)
        err = (pred.float() - target).pow(2).mean(-1)  # (B, frames)
        if not mask_padding:
            return err.mean(1)
        m = batch["mask"].to(dev, err.dtype)
        return (err * m).sum(1) / m.sum(1).clamp_min(1.0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return alpha_sigma(t)

    def parameter_names(self, model: nn.Module, group: str) -> list[str]:
        """Parameter names of a group of the DiT (`transformer_blocks.<i>.attn1/attn2/ff`...)."""
        if group not in PARAM_GROUPS:
            raise LinernotesError(f"Unknown parameter group '{group}'; use one of {PARAM_GROUPS}.")
        pick = _GROUPS[group]
        return [n for n, _ in model.named_parameters() if n not in self.fixed and pick(n)]
