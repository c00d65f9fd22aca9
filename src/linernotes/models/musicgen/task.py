"""The musicgen family's Task: MusicGen's training loss, one value per sample (and the same loss
for any decoder over delayed codebooks, `DelayedCodesTask`).

As audiocraft's `MusicGenSolver` trains it and transformers' `MusicgenForCausalLM` computes it
for `labels`: the track's codes in the delay pattern (`codes.delayed`) are the labels, the decoder
reads them shifted right behind its start token, with cross-attention to the caption's T5
states (padded tokens zeroed), and the loss is the next-token cross-entropy averaged over each
codebook's predicted positions, then over the codebooks. Positions outside the track's real frames
are not predicted (the pad id), so padding never counts. For a batch of one this is the model's
own `loss`; for a batch, each sample's own value (a batch's mean over all its tokens would weight
long tracks more).

The loss has no random draws (`deterministic`): the caller's timesteps and noise are ignored.
Dropping the condition (classifier-free guidance training, "drop_cond") zeroes the text states and
their attention mask, as MusicGen's generation does for its unconditional half. The T5 encoder is
frozen; each caption's states are computed once, alone (never dependent on the batch it came in),
and cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from linernotes import device
from linernotes.errors import LinernotesError
from linernotes.models.caption_cache import CaptionCache
from linernotes.models.musicgen.codes import delayed
from linernotes.task import PARAM_GROUPS, Task

_LAYER = "decoder.model.decoder.layers."
_GROUPS = {
    "cross_attn_kv": lambda n: ".encoder_attn.k_proj." in n or ".encoder_attn.v_proj." in n,
    "cross_attn": lambda n: ".encoder_attn." in n,
    "self_attn": lambda n: ".self_attn." in n,
    "ffn": lambda n: n.startswith(_LAYER) and (".fc1." in n or ".fc2." in n),
    "transformer": lambda n: n.startswith(_LAYER),
    "all": lambda n: n.startswith("decoder.") or n.startswith("enc_to_dec_proj."),
}
DIFFUSION_ONLY = ("concept_ablation steers a diffusion model's noise predictions and siss noises "
                  "the data itself; a MusicGen run is autoregressive: use gradient_ascent, "
                  "random_label, grad_diff, ewc, selective_amnesia, salun or mirrored.")


class DelayedCodesTask(Task):
    """The next-token cross-entropy of a decoder over parallel codebooks in the delay pattern,
    one value per sample. Batches hold "features" (B, frames, codebooks) codes as floats, "mask"
    (B, frames) and "caption". Subclasses give the caption's states (`text`) and the decoder's
    logits for teacher-forced inputs (`decoder_logits`); parameters are named like
    `MusicgenForConditionalGeneration`'s (`decoder.model.decoder.layers.<i>...`,
    `enc_to_dec_proj`)."""

    deterministic = True
    # the reference AR decoder gives non-finite losses under CPU bfloat16 autocast
    # (tests/test_ar_reference.py caught it): float32 unless asked
    bfloat16_scoring = False

    def __init__(self, n_frames: int, n_codebooks: int, pad: int, start: int):
        self.latent_shape = (n_frames, n_codebooks)
        self.pad, self.start = pad, start

    def text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states (B, L, D) of captions, zero-padded to the longest, and their mask (a
        subclass keeps `captions`, a `CaptionCache` of one caption's (L, D) states)."""
        return self.pad_states([it[0] for it in self.captions.get(captions)])

    def decoder_logits(self, model: nn.Module, inputs: torch.Tensor, hidden: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """The model's logits (B * K, L, V) for decoder inputs (B * K, L) and text states."""
        raise NotImplementedError

    @staticmethod
    def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) states zero-padded to the longest, and their (B, L) mask."""
        longest = max(len(s) for s in states)
        out = torch.zeros(len(states), longest, states[0].shape[-1])
        mask = torch.zeros(len(states), longest, dtype=torch.long)
        for i, s in enumerate(states):
            out[i, : len(s)], mask[i, : len(s)] = s, 1
        return out, mask

    def labels(self, batch: dict, dev: torch.device) -> torch.Tensor:
        """The batch's codes in the delay pattern (B, T + K - 1, K), padding as the pad id."""
        codes = torch.round(batch["features"].to(dev, torch.float32)).long()
        return delayed(codes, batch["mask"].to(dev), self.pad)

    def logits(self, model: nn.Module, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's logits (B, K, L, V) for teacher-forced `labels` (B, L, K)."""
        dev = device.of(model)
        hidden, amask = self.text(batch["caption"])
        hidden, amask = hidden.to(dev), amask.to(dev)
        drop = batch.get("drop_cond")
        if drop is not None:
            keep = (~drop.to(dev).bool()).long()
            hidden, amask = hidden * keep.view(-1, 1, 1), amask * keep.view(-1, 1)
        b, length, k = labels.shape
        inputs = torch.full_like(labels, self.start)
        inputs[:, 1:] = labels[:, :-1]
        out = self.decoder_logits(model, inputs.transpose(1, 2).reshape(b * k, length),
                                  hidden, amask)
        return out.view(b, k, length, -1)

    # ---------------------------------------------------------------- the Task contract

    def per_sample_loss(self, model: nn.Module, batch: dict, t: torch.Tensor,
                        noise: torch.Tensor, mask_padding: bool = False) -> torch.Tensor:
        """Each sample's next-token cross-entropy, averaged over each codebook's predicted
        positions, then over codebooks (padding never counts; `t` and `noise` are ignored)."""
        dev = device.of(model)
        labels = self.labels(batch, dev)
        logits = self.logits(model, batch, labels)
        target = labels.transpose(1, 2)  # (B, K, L)
        valid = target != self.pad
        ce = F.cross_entropy(logits.float().flatten(0, 2), target.masked_fill(~valid, 0).flatten(),
                             reduction="none").view_as(target)
        per_codebook = (ce * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        return per_codebook.mean(-1)

    def per_sample_output(self, model: nn.Module, batch: dict, t: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
        """D-TRAK's output function: each sample's mean squared logit over its predicted
        positions and codebooks (B,)."""
        labels = self.labels(batch, device.of(model))
        logits = self.logits(model, batch, labels).float()  # (B, K, L, V)
        valid = (labels.transpose(1, 2) != self.pad).unsqueeze(-1)
        squared = (logits.pow(2) * valid).sum((1, 2, 3))
        return squared / (valid.sum((1, 2, 3)) * logits.shape[-1]).clamp_min(1)

    def prediction(self, model, batch, t, noise):
        raise LinernotesError(DIFFUSION_ONLY)

    def alpha_sigma(self, t):
        raise LinernotesError(DIFFUSION_ONLY)

    def parameter_names(self, model: nn.Module, group: str) -> list[str]:
        """Parameter names of a group of the decoder (`decoder.model.decoder.layers.<i>.
        self_attn/encoder_attn/fc1/fc2`...); text and audio encoders are never trained."""
        if group not in PARAM_GROUPS:
            raise LinernotesError(f"Unknown parameter group '{group}'; use one of {PARAM_GROUPS}.")
        pick, trained = _GROUPS[group], _GROUPS["all"]
        return [n for n, _ in model.named_parameters() if trained(n) and pick(n)]


class MusicgenTask(DelayedCodesTask):
    """Task of a `MusicgenForConditionalGeneration`: T5 states of the caption."""

    def __init__(self, text_encoder, tokenizer, n_frames: int, n_codebooks: int, pad: int,
                 start: int, max_words: int = 256):
        super().__init__(n_frames, n_codebooks, pad, start)
        self.text_encoder, self.tokenizer, self.max_words = text_encoder, tokenizer, max_words
        self.captions = CaptionCache(self._encode)

    def __deepcopy__(self, memo: dict) -> MusicgenTask:
        return self  # holds only the frozen text encoder and its cache

    def _encode(self, caption: str) -> tuple[torch.Tensor]:
        """One caption's T5 states (L, D)."""
        tok = self.tokenizer([caption], return_tensors="pt", truncation=True,
                             max_length=self.max_words)
        dev = device.of(self.text_encoder)
        hidden = self.text_encoder(input_ids=tok.input_ids.to(dev),
                                   attention_mask=tok.attention_mask.to(dev))[0]
        return (hidden[0].float(),)

    def decoder_logits(self, model: nn.Module, inputs: torch.Tensor, hidden: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        return model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=inputs,
                     return_dict=True).logits
