"""A user's own diffusers model as a linernotes Task: a tiny random StableAudioDiTModel.

This is the few lines a user writes (see docs/your-model.md); the tests use it to check the
attribution engine independently of the reference model.
"""

from __future__ import annotations

import hashlib
import math

import torch
from diffusers import StableAudioDiTModel

from linernotes.task import Task


class TinyDiTTask(Task):
    """v-objective, cosine schedule; captions embedded by a fixed hashed lookup (4 tokens)."""

    def __init__(self, n_frames: int, n_mels: int, dim: int = 16):
        self.latent_shape = (n_frames, n_mels)
        self.dim = dim

    def make_model(self, seed: int = 0) -> StableAudioDiTModel:
        torch.manual_seed(seed)
        return StableAudioDiTModel(
            sample_size=self.latent_shape[0], in_channels=self.latent_shape[1], num_layers=2,
            attention_head_dim=8, num_attention_heads=2, num_key_value_attention_heads=1,
            out_channels=self.latent_shape[1], cross_attention_dim=self.dim,
            time_proj_dim=self.dim, global_states_input_dim=self.dim,
            cross_attention_input_dim=self.dim,
        )

    def embed(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for c in captions:
            seed = int.from_bytes(hashlib.sha256(c.encode()).digest()[:4], "little")
            rows.append(torch.randn(4, self.dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)

    def per_sample_loss(self, model, batch, t, noise, mask_padding=False):
        x0 = batch["features"].transpose(1, 2)  # (B, M, T): the DiT's channels-first latent
        eps = noise.transpose(1, 2)
        a = torch.cos(t * math.pi / 2).view(-1, 1, 1)
        s = torch.sin(t * math.pi / 2).view(-1, 1, 1)
        cond = self.embed(batch["caption"])
        pred = model(a * x0 + s * eps, timestep=t * 1000, encoder_hidden_states=cond,
                     global_hidden_states=cond.mean(1, keepdim=True), return_dict=False)[0]
        err = ((pred.to(x0.dtype) - (a * eps - s * x0)) ** 2).mean(dim=1)  # (B, T), not bf16
        if mask_padding:
            m = batch["mask"].to(err.dtype)
            return (err * m).sum(1) / m.sum(1).clamp(min=1)
        return err.mean(1)

    def parameter_names(self, model, group):
        names = [n for n, _ in model.named_parameters()]
        pick = {
            "cross_attn_kv": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
            "cross_attn": lambda n: ".attn2." in n,
            "self_attn": lambda n: ".attn1." in n,
            "transformer": lambda n: n.startswith("transformer_blocks."),
            "all": lambda n: True,
        }[group]
        return [n for n in names if pick(n)]
