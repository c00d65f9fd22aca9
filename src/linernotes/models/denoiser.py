"""The denoiser: diffusers' StableAudioDiTModel over normalised log-mel frames.

Frames (B, T, M) are the latent sequence (the DiT sees (B, C=M, T)); rotary positions over time.
Conditioning reaches cross-attention as several tokens, never one: the CLAP embedding projected to
`clap_tokens` tokens, a timing token, and (text mode) the caption's MiniLM token features; the
global token carries CLAP + timing. Dropping the condition (classifier-free guidance) swaps the CLAP
embedding for a learned null embedding and masks the word tokens; timing is kept.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from linernotes.config import Settings, require
from linernotes.models.text import TEXT_DIM

CONDITIONS = ("text", "audio")
N_FOURIER = 8


@dataclasses.dataclass(frozen=True)
class DenoiserConfig(Settings):
    """Architecture of the DiT denoiser and its conditioning."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    kv_heads: int = 2
    cross_dim: int = 128  # cross-attention width (and conditioning token width)
    time_proj_dim: int = 256
    clap_tokens: int = 4  # CLAP embedding -> this many cross-attention tokens
    word_tokens: bool = True  # also attend to the caption's MiniLM token features
    max_words: int = 32  # MiniLM tokens kept per caption (fixed, masked)
    condition: str = "text"  # "text": CLAP text embedding; "audio": CLAP audio embedding

    def validate(self) -> None:
        require(self.layers > 0 and self.heads > 0 and self.head_dim > 0, "DiT sizes must be > 0.")
        require(self.heads % self.kv_heads == 0, "heads must be a multiple of kv_heads.")
        require(self.head_dim % 4 == 0, "head_dim must be a multiple of 4 (rotary embedding).")
        require(self.clap_tokens >= 2, "clap_tokens must be >= 2 (one key makes softmax constant).")
        require(self.condition in CONDITIONS, f"condition must be one of {CONDITIONS}.")
        require(self.max_words > 0, "max_words must be > 0.")


def timing_features(frac: torch.Tensor) -> torch.Tensor:
    """Fourier features (B, 2*N_FOURIER+1) of the real-length fraction in (0, 1]."""
    k = torch.arange(1, N_FOURIER + 1, dtype=frac.dtype, device=frac.device)
    ang = math.pi * frac.unsqueeze(-1) * k
    return torch.cat([frac.unsqueeze(-1), torch.sin(ang), torch.cos(ang)], dim=-1)


class Denoiser(nn.Module):
    """v-prediction DiT: `forward(x (B,T,M), t (B,), cond, drop (B,) bool | None) -> (B,T,M)`.

    `cond` is {"clap": (B, D), "words": (B, L, 384), "words_mask": (B, L) bool, "frac": (B,)}.
    """

    #: parameters that are never trained (the DiT's random Fourier time features)
    fixed_parameters = ("dit.time_proj.weight",)

    def __init__(self, config: DenoiserConfig, n_mels: int, clap_dim: int):
        super().__init__()
        from diffusers import StableAudioDiTModel

        self.config, self.n_mels, self.clap_dim = config, n_mels, clap_dim
        c = config.cross_dim
        self.dit = StableAudioDiTModel(
            sample_size=1024,
            in_channels=n_mels,
            num_layers=config.layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.heads,
            num_key_value_attention_heads=config.kv_heads,
            out_channels=n_mels,
            cross_attention_dim=c,
            time_proj_dim=config.time_proj_dim,
            global_states_input_dim=c,
            cross_attention_input_dim=c,
        )
        self.clap_to_tokens = nn.Linear(clap_dim, config.clap_tokens * c)
        self.clap_to_global = nn.Linear(clap_dim, c)
        self.timing = nn.Linear(2 * N_FOURIER + 1, c)
        self.token_pos = nn.Parameter(torch.randn(config.clap_tokens + 1, c) * 0.02)
        self.words = nn.Linear(TEXT_DIM, c) if self.uses_words else None
        self.null_clap = nn.Parameter(torch.zeros(clap_dim))
        self._rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def uses_words(self) -> bool:
        return self.config.word_tokens and self.config.condition == "text"

    def describe(self) -> dict:
        """What is needed to rebuild this module (saved in a run's config)."""
        return {"config": self.config.to_dict(), "n_mels": self.n_mels, "clap_dim": self.clap_dim}

    @torch.inference_mode(False)
    def rotary(self, length: int, device: torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary position tables, cached per length and device (made outside inference mode,
        so a table first built while scoring can serve gradient computations later)."""
        key = (length, str(device or "cpu"))
        if key not in self._rotary:
            from diffusers.models.embeddings import get_1d_rotary_pos_embed

            cos, sin = get_1d_rotary_pos_embed(
                self.config.head_dim // 2, length, use_real=True, repeat_interleave_real=False
            )
            self._rotary[key] = (cos.to(device or "cpu"), sin.to(device or "cpu"))
        return self._rotary[key]

    def encode_condition(self, cond: dict, drop: torch.Tensor | None) -> tuple:
        """Cross-attention tokens (B, S, C), their mask (B, S) or None, global token (B, 1, C)."""
        clap = cond["clap"]
        b = clap.shape[0]
        if drop is not None:
            clap = torch.where(drop.view(-1, 1), self.null_clap.expand_as(clap), clap)
        timing = self.timing(timing_features(cond["frac"].to(clap.dtype)))
        tokens = self.clap_to_tokens(clap).view(b, self.config.clap_tokens, -1)
        tokens = torch.cat([tokens, timing.unsqueeze(1)], dim=1) + self.token_pos
        glob = (self.clap_to_global(clap) + timing).unsqueeze(1)
        if not self.uses_words:
            return tokens, None, glob
        words = self.words(cond["words"].to(clap.dtype))
        wmask = cond["words_mask"].bool()
        if drop is not None:
            wmask = wmask & ~drop.view(-1, 1)
        fixed = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=clap.device)
        return torch.cat([tokens, words], 1), torch.cat([fixed, wmask], 1), glob

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens, tmask, glob = self.encode_condition(cond, drop)
        out = self.dit(
            x.transpose(1, 2),
            timestep=t.to(x.dtype),
            encoder_hidden_states=tokens,
            global_hidden_states=glob,
            rotary_embedding=self.rotary(x.shape[1] + 1, x.device),
            encoder_attention_mask=tmask,
            return_dict=False,
        )[0]
        return out.transpose(1, 2)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
