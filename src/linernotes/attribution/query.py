"""A query: what is attributed (a generated clip, a training track, or audio + a caption)."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Query:
    """One clip in the model's space: normalised frames, real-frame mask and its caption.

    `key` seeds its noise draws (common random numbers) and names its outputs.
    """

    key: str
    features: torch.Tensor  # (n_frames, ...): the model's features, normalised
    mask: torch.Tensor  # (n_frames,) bool
    caption: str
    source: str = ""  # where it came from: a clip path, "train:<track id>", an audio file
    track_id: str | None = None  # set when the query is a training track (self-influence)

    def batch(self, n: int = 1) -> dict:
        """The query as a Task batch of `n` identical rows."""
        return {
            "features": self.features.unsqueeze(0).expand(n, *self.features.shape).contiguous(),
            "mask": self.mask.unsqueeze(0).expand(n, -1).contiguous(),
            "caption": [self.caption] * n,
            "track_id": [self.key] * n,
        }
