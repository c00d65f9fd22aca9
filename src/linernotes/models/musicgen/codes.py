"""The musicgen family's features: each track's EnCodec codes, encoded once by the model's own
audio encoder.

A track is read at the codec's sample rate (resampled; mono, or left and right encoded apart and
interleaved as stereo MusicGen's codebooks are), zero-padded (or cut) to the run's length and
encoded at the bandwidth that gives the decoder's number of codebooks. Codes are stored as
float32 (exact for any codebook size below 2^24), (n_frames, n_codebooks) per track; the mask
counts the frames that hold real audio. The store (`data.features.FeatureStore`) keeps them, chunk
by chunk and resumable.

The delay pattern (`delayed`): codebook k is shifted k frames later, so the model predicts
codebook k of frame f at position f + k; positions outside a track's real frames hold the pad id
and are not predicted. As in transformers' `build_delay_pattern_mask` (and audiocraft's
`DelayedPatternProvider`), with the first position the decoder's start token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from linernotes import device
from linernotes.data.features import FixedLengthAudio
from linernotes.errors import LinernotesError


def bandwidth_for(codec_config, n_codebooks: int) -> float:
    """The smallest of the codec's bandwidths that gives `n_codebooks` codebooks."""
    bits = math.log2(codec_config.codebook_size) * codec_config.frame_rate
    for bw in sorted(codec_config.target_bandwidths):
        if max(1, math.floor(bw * 1000 / bits)) == n_codebooks:
            return float(bw)
    raise LinernotesError(f"The MusicGen decoder predicts {n_codebooks} codebooks but its EnCodec "
                          f"has no bandwidth giving that many ({codec_config.target_bandwidths} "
                          "kbps); the folder's parts do not belong together.")


def delayed(codes: torch.Tensor, mask: torch.Tensor, pad: int) -> torch.Tensor:
    """Labels (B, T + K - 1, K) of codes (B, T, K) in the delay pattern; positions outside the
    real frames of `mask` (B, T) hold `pad`."""
    b, t, k = codes.shape
    real = torch.where(mask.bool().unsqueeze(-1), codes.long(), torch.full_like(codes.long(), pad))
    out = torch.full((b, t + k - 1, k), pad, dtype=torch.long, device=codes.device)
    for j in range(k):
        out[:, j : j + t, j] = real[:, :, j]
    return out


class EncodecCodes(FixedLengthAudio):
    """The feature encoder of `FeatureStore` for MusicGen: (n_frames, n_codebooks) codes."""

    def __init__(self, codec, n_codebooks: int, channels: int, n_frames: int, fingerprint: str,
                 batch_size: int = 8):
        self.codec, self.n_codebooks, self.channels = codec, n_codebooks, channels
        self.n_frames, self.fingerprint, self.batch_size = n_frames, fingerprint, batch_size
        cfg = codec.config
        self.sample_rate = int(cfg.sampling_rate)
        self.hop = int(np.prod(cfg.upsampling_ratios))
        per_channel = n_codebooks // channels
        self.bandwidth = bandwidth_for(cfg, per_channel)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_frames, self.n_codebooks)

    def cache_key(self) -> dict:
        return {"encodec": self.fingerprint, "n_frames": self.n_frames,
                "codebooks": self.n_codebooks, "channels": self.channels,
                "bandwidth": self.bandwidth, "format": 1}

    @torch.no_grad()
    def encode(self, waveforms: np.ndarray) -> np.ndarray:
        """Codes (B, n_frames, n_codebooks) of waveforms (B, channels, n_frames * hop)."""
        dev = device.of(self.codec)
        x = torch.from_numpy(np.asarray(waveforms, dtype=np.float32)).to(dev)
        parts = [self.codec.encode(x[:, c : c + 1], bandwidth=self.bandwidth).audio_codes[0]
                 for c in range(self.channels)]  # each (B, K/channels, frames)
        codes = torch.stack(parts, dim=2).flatten(1, 2)  # left/right interleaved per codebook
        return codes[:, :, : self.n_frames].transpose(1, 2).float().cpu().numpy()

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Audio (channels, samples) of codes (frames, n_codebooks)."""
        dev = device.of(self.codec)
        c = torch.as_tensor(np.rint(np.asarray(codes)), dtype=torch.long, device=dev).T
        c = c.clamp(0, self.codec.config.codebook_size - 1)
        outs = [self.codec.decode(c[ch :: self.channels][None, None], [None]).audio_values[0, 0]
                for ch in range(self.channels)]
        return torch.stack(outs).float().cpu().numpy()
