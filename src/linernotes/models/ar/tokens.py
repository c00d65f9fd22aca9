"""The ar-reference family's tokenizer: residual vector quantisation (RVQ) of log-mel frames.

EnCodec and every other neural codec need downloaded weights, so the autoregressive reference
model's tokens are learned here, from the corpus: K codebooks of C codes, fitted by k-means on the
normalised log-mel frames of the training split, each codebook on what the previous ones leave
(as EnCodec's residual quantiser stacks codebooks). A frame's codes are its nearest code in each
codebook in turn; decoding sums the codes' vectors, and the existing vocoder (Griffin-Lim,
`models.mel`) turns the frames back into audio. `reconstruction` measures what the tokenizer
loses: the relative squared error of the decoded frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from linernotes.artifacts import atomic_path, hash_file
from linernotes.data.features import Unnormalised
from linernotes.errors import LinernotesError

CHUNK = 8192


def nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of each row of x's nearest centre (squared Euclidean), in chunks."""
    c2 = centres.pow(2).sum(1)
    out = [((-2 * x[lo:lo + CHUNK] @ centres.T) + c2).argmin(1)
           for lo in range(0, len(x), CHUNK)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


class Rvq:
    """K codebooks (K, C, M) over M-dimensional frames."""

    def __init__(self, books: torch.Tensor):
        self.books = books.float().contiguous()

    @property
    def n_codebooks(self) -> int:
        return int(self.books.shape[0])

    @property
    def size(self) -> int:
        return int(self.books.shape[1])

    @classmethod
    def fit(cls, frames: np.ndarray, codebooks: int, size: int, iters: int, seed: int) -> Rvq:
        """k-means (Lloyd, `iters` rounds, seeded) of each residual in turn."""
        x = torch.from_numpy(np.asarray(frames, dtype=np.float32))
        if len(x) < size:
            raise LinernotesError(f"The tokenizer needs at least {size} training frames (one per "
                                  f"code) but the corpus has {len(x)}; use --set codebook_size= "
                                  "with fewer codes or a larger corpus.")
        gen = torch.Generator().manual_seed(seed)
        residual, books = x.clone(), []
        for _ in range(codebooks):
            centres = residual[torch.randperm(len(x), generator=gen)[:size]].clone()
            for _ in range(iters):
                idx = nearest(residual, centres)
                sums = torch.zeros_like(centres).index_add_(0, idx, residual)
                counts = torch.bincount(idx, minlength=size).unsqueeze(1).float()
                centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
            books.append(centres)
            residual = residual - centres[nearest(residual, centres)]
        return cls(torch.stack(books))

    def encode(self, frames: np.ndarray | torch.Tensor) -> np.ndarray:
        """Codes (T, K) of frames (T, M)."""
        residual = torch.as_tensor(np.asarray(frames, dtype=np.float32))
        codes = []
        for book in self.books:
            idx = nearest(residual, book)
            codes.append(idx)
            residual = residual - book[idx]
        return torch.stack(codes, 1).numpy()

    def decode(self, codes: np.ndarray | torch.Tensor) -> np.ndarray:
        """Frames (T, M) of codes (T, K) (rounded and clipped to valid codes)."""
        c = torch.as_tensor(np.rint(np.asarray(codes, dtype=np.float64))).long()
        c = c.clamp(0, self.size - 1)
        return sum(self.books[k][c[:, k]] for k in range(self.n_codebooks)).numpy()

    def reconstruction(self, frames: np.ndarray) -> float:
        """Relative squared error of decoded frames: |x - decode(encode(x))|^2 / |x - mean|^2."""
        x = np.asarray(frames, dtype=np.float32)
        err = ((x - self.decode(self.encode(x))) ** 2).sum()
        return float(err / max(((x - x.mean(0)) ** 2).sum(), 1e-12))

    def save(self, path: str | Path) -> str:
        with atomic_path(path) as tmp:
            save_file({"books": self.books}, str(tmp))
        return hash_file(path)

    @classmethod
    def load(cls, path: str | Path, expected_hash: str | None = None) -> Rvq:
        path = Path(path)
        if not path.exists() or (expected_hash and hash_file(path) != expected_hash):
            raise LinernotesError(f"{path} is missing or is not the tokenizer this run was "
                                  "trained with; restore the run folder or train it again.")
        return cls(load_file(str(path))["books"])


class RvqCodes:
    """The feature encoder of `FeatureStore`: each track's log-mel frames (the reference
    family's features, normalised with its statistics) as codes (n_frames, K), stored as floats."""

    def __init__(self, features, stats, rvq: Rvq, rvq_hash: str):
        self.features, self.stats, self.rvq, self.rvq_hash = features, stats, rvq, rvq_hash

    @property
    def shape(self) -> tuple[int, int]:
        return (self.features.n_frames, self.rvq.n_codebooks)

    def cache_key(self) -> dict:
        return {"mel": self.features.cache_key(), "stats": self.stats.to_dict(),
                "rvq": self.rvq_hash, "format": 1}

    def encode_file(self, path: str) -> tuple[np.ndarray, int]:
        db, n_real = self.features.encode_file(path)
        return self.rvq.encode(self.stats.normalise(db)).astype(np.float32), n_real

    def fit_stats(self, values, mask, rows) -> Unnormalised:
        return Unnormalised()

    def load_stats(self, data: dict) -> Unnormalised:
        return Unnormalised()
