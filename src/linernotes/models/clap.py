"""CLAP-style text/audio encoder: frozen MiniLM + trainable projection, and a small audio tower.

Trained with a symmetric InfoNCE loss (learnable temperature) on (audio, caption) pairs; tracks that
share a caption count as positives of each other. Both towers return L2-normalised (B, D) vectors.
`LaionClapEncoder` offers the same interface over a local LAION-CLAP checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linernotes import device
from linernotes.artifacts import atomic_path, hash_file, read_json, write_json
from linernotes.config import Settings, require
from linernotes.errors import LinernotesError
from linernotes.models.text import TEXT_DIM, get_text_encoder

CLAP_WEIGHTS = "clap.safetensors"
CLAP_CONFIG = "clap.json"


@dataclasses.dataclass(frozen=True)
class ClapSettings(Settings):
    """Architecture and training of the CLAP-style encoder."""

    dim: int = 128  # joint embedding size
    hidden: int = 128  # audio tower width
    layers: int = 3  # dilated conv blocks in the audio tower
    temperature: float = 0.07  # initial softmax temperature (learned)
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    min_crop: float = 0.5  # random crop of real frames during training (fraction kept, min)
    seed: int = 0
    checkpoint_every: int = 100

    def validate(self) -> None:
        require(self.dim > 0 and self.hidden > 0 and self.layers > 0, "CLAP sizes must be > 0.")
        require(0 < self.temperature < 1, "CLAP temperature must be in (0, 1).")
        require(self.steps >= 0 and self.batch_size > 1, "CLAP steps >= 0 and batch_size > 1.")
        require(0 < self.min_crop <= 1, "CLAP min_crop must be in (0, 1].")

    def architecture(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "layers": self.layers}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x (B, T, C) counting only frames where mask (B, T) is True."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class _ConvBlock(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 5, padding=2 * dilation, dilation=dilation)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = self.conv((h * m).transpose(1, 2)).transpose(1, 2)
        return self.norm(h + F.gelu(y)) * m


class AudioTower(nn.Module):
    """Normalised log-mel frames (B, T, M) + mask (B, T) -> (B, D); padding never leaks in."""

    def __init__(self, n_mels: int, hidden: int, dim: int, layers: int):
        super().__init__()
        self.proj_in = nn.Linear(n_mels, hidden)
        self.blocks = nn.ModuleList([_ConvBlock(hidden, 2**i) for i in range(layers)])
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(features.dtype).unsqueeze(-1)
        h = self.proj_in(features) * m
        for block in self.blocks:
            h = block(h, m)
        mean = masked_mean(h, mask)
        peak = h.masked_fill(~mask.unsqueeze(-1), -1e4).amax(1)
        return self.head(torch.cat([mean, peak], dim=-1))


class ClapEncoder(nn.Module):
    """Text tower = frozen MiniLM + trainable MLP; audio tower over frames; learned temperature."""

    def __init__(
        self,
        n_mels: int,
        dim: int = 128,
        hidden: int = 128,
        layers: int = 3,
        temperature: float = 0.07,
        text_model: str | None = None,
    ):
        super().__init__()
        self.n_mels, self.dim = n_mels, dim
        self.arch = {"dim": dim, "hidden": hidden, "layers": layers}
        self.text = get_text_encoder(text_model)  # frozen, shared, not a submodule
        self.text_proj = nn.Sequential(
            nn.Linear(TEXT_DIM, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.audio = AudioTower(n_mels, hidden, dim, layers)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def embed_text(self, captions: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D)."""
        sentences = self.text.sentence(list(captions)).to(device.of(self))
        return F.normalize(self.text_proj(sentences), dim=-1)

    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised audio embeddings (B, D) of normalised frames (B, T, M) with mask (B, T)."""
        return F.normalize(self.audio(features, mask.bool()), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def clap_from_settings(n_mels: int, s: ClapSettings) -> ClapEncoder:
    return ClapEncoder(n_mels, s.dim, s.hidden, s.layers, s.temperature)


def _pair_targets(captions: Sequence[str]) -> torch.Tensor:
    """Row-normalised (B, B) targets: items that share a caption are positives of each other."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    return same / same.sum(1, keepdim=True)


def contrastive_loss(
    audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, captions: Sequence[str]
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of normalised audio/text embeddings."""
    logits = scale * audio @ text.T
    target = _pair_targets(captions)
    a2t = -(target * logits.log_softmax(1)).sum(1).mean()
    t2a = -(target * logits.T.log_softmax(1)).sum(1).mean()
    return (a2t + t2a) / 2


def random_crop(mask: torch.Tensor, min_keep: float, gen: torch.Generator) -> torch.Tensor:
    """Keep a random window (at least `min_keep` of the real frames) of each row of `mask`."""
    out = torch.zeros_like(mask)
    n_real = mask.sum(1)
    for i in range(len(mask)):
        n = int(n_real[i])
        if n == 0:
            continue
        keep = max(
            1,
            int(math.ceil(n * (min_keep + (1 - min_keep) * float(torch.rand((), generator=gen))))),
        )
        start = int(torch.randint(0, n - keep + 1, (), generator=gen))
        out[i, start : start + keep] = True
    return out & mask


class ClapLoss:
    """Per-step CLAP loss for the shared training loop: crop augmentation + InfoNCE."""

    def __init__(self, min_crop: float = 0.5, seed: int = 0):
        self.min_crop, self.seed = min_crop, seed

    def __call__(self, model: ClapEncoder, task, batch: dict, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        mask = (
            random_crop(batch["mask"], self.min_crop, gen) if self.min_crop < 1 else batch["mask"]
        )
        audio = model.embed_audio(batch["features"], mask)
        text = model.embed_text(batch["caption"])
        return contrastive_loss(audio, text, model.scale(), batch["caption"])


# ---------------------------------------------------------------- save / load


def save_clap(clap: ClapEncoder, path: str | Path, extra: dict | None = None) -> str:
    """Write clap.safetensors + clap.json (+ `extra` provenance) into `path`; return its hash."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in clap.state_dict().items()}
    with atomic_path(path / CLAP_WEIGHTS) as tmp:
        save_file(state, str(tmp))
    digest = hash_file(path / CLAP_WEIGHTS)
    write_json(
        path / CLAP_CONFIG,
        {
            "kind": "linernotes-clap",
            "n_mels": clap.n_mels,
            **clap.arch,
            **(extra or {}),
            "weights_hash": digest,
        },
    )
    return digest


def load_clap(path: str | Path) -> ClapEncoder:
    """Load a CLAP saved by `save_clap` (frozen, eval mode); clear errors for missing/corrupt."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CLAP_CONFIG, path / CLAP_WEIGHTS
    if not cfg_path.exists() or not w_path.exists():
        raise LinernotesError(
            f"No CLAP encoder at {path} (need {CLAP_CONFIG} and {CLAP_WEIGHTS}); "
            "train one with `linernotes train-clap`."
        )
    cfg = read_json(cfg_path)
    if hash_file(w_path) != cfg.get("weights_hash"):
        raise LinernotesError(f"{w_path} does not match {cfg_path} (corrupt or replaced); retrain.")
    clap = ClapEncoder(cfg["n_mels"], cfg["dim"], cfg["hidden"], cfg["layers"])
    try:
        clap.load_state_dict(load_file(str(w_path)))
    except Exception as exc:
        raise LinernotesError(f"Cannot load CLAP weights {w_path}: {exc}") from exc
    clap.weights_hash = cfg["weights_hash"]
    return freeze(clap)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------- evaluation


def _recall_at(sim: np.ndarray, same: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@k (a hit = any top-k item shares the query's caption) and its chance level."""
    n = sim.shape[1]
    k = min(k, n)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(same, top, axis=1).any(1)
    g = same.sum(1)
    chance = 1.0 - np.array([math.comb(n - gi, k) / math.comb(n, k) for gi in g])
    return float(hits.mean()), float(chance.mean())


@torch.no_grad()
def evaluate_clap(clap, store, manifest, split: str = "holdout", batch_size: int = 64) -> dict:
    """Holdout retrieval recall@1/@10 both ways and zero-shot artist accuracy, each with chance."""
    from linernotes.data.dataset import split_rows

    rows = split_rows(manifest, split)
    if len(rows) < 2:
        raise LinernotesError(f"The '{split}' split has {len(rows)} track(s); need at least 2.")
    audio = []
    for start in range(0, len(rows), batch_size):
        r = rows[start : start + batch_size]
        feats = torch.from_numpy(np.stack([store.features(int(i)) for i in r]))
        mask = torch.from_numpy(np.asarray(store.mask[r], dtype=bool))
        audio.append(clap.embed_audio(feats, mask))
    audio = torch.cat(audio).float().numpy()
    captions = manifest["caption"].iloc[rows].tolist()
    text = clap.embed_text(captions).float().numpy()
    same = np.array([[a == b for b in captions] for a in captions])
    out: dict = {"split": split, "n": int(len(rows))}
    for k in (1, 10):
        out[f"t2a_r{k}"], out[f"t2a_r{k}_chance"] = _recall_at(text @ audio.T, same, k)
        out[f"a2t_r{k}"], out[f"a2t_r{k}_chance"] = _recall_at(audio @ text.T, same, k)
    artists = manifest["artist"].iloc[rows].fillna("").tolist()
    names = sorted({a for a in manifest["artist"].fillna("") if a})
    if len(names) >= 2:
        proto = clap.embed_text([f"music by {a}" for a in names]).float().numpy()
        keep = [i for i, a in enumerate(artists) if a]
        pred = (audio[keep] @ proto.T).argmax(1)
        truth = np.array([names.index(artists[i]) for i in keep])
        out["artist_acc"] = float((pred == truth).mean())
        out["artist_chance"] = 1.0 / len(names)
        out["n_artists"] = len(names)
    return out


# ---------------------------------------------------------------- LAION-CLAP


class LaionClapEncoder:
    """A local LAION-CLAP checkpoint (transformers `ClapModel`) behind the ClapEncoder interface.

    `embed_audio(features, mask)` inverts frames to audio with Griffin-Lim (needs `features` and
    `stats`); `embed_waveforms` embeds audio directly.
    """

    def __init__(self, path: str | Path, features=None, stats=None, n_iter: int = 16):
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise LinernotesError(
                f"No LAION-CLAP checkpoint at {path} (config.json missing); pass the folder of a "
                "downloaded `laion/clap-htsat-*` model."
            )
        try:
            self.model = ClapModel.from_pretrained(str(path), local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.extractor = ClapFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        except OSError as exc:
            raise LinernotesError(f"Cannot load LAION-CLAP from {path}: {exc}") from exc
        self.dim = int(self.model.config.projection_dim)
        self.features, self.stats, self.n_iter = features, stats, n_iter

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        emb = out.pooler_output if hasattr(out, "pooler_output") else out
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def embed_text(self, captions: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(captions), padding=True, truncation=True, return_tensors="pt")
        tok = {k: v for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return self._pooled(self.model.get_text_features(**tok))

    @torch.no_grad()
    def embed_waveforms(self, audios: Sequence[np.ndarray], sample_rate: int) -> torch.Tensor:
        import librosa

        sr = int(self.extractor.sampling_rate)
        wavs = [np.asarray(a, np.float32) for a in audios]
        if sample_rate != sr:
            wavs = [librosa.resample(a, orig_sr=sample_rate, target_sr=sr) for a in wavs]
        inputs = self.extractor(wavs, sampling_rate=sr, return_tensors="pt")
        kwargs = {"input_features": inputs["input_features"]}
        if "is_longer" in inputs:
            kwargs["is_longer"] = inputs["is_longer"]
        return self._pooled(self.model.get_audio_features(**kwargs))

    def embed_audio(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.features is None or self.stats is None:
            raise LinernotesError("LaionClapEncoder.embed_audio needs `features` and `stats`.")
        from linernotes.models.mel import db_to_audio

        wavs = []
        for x, m in zip(features.detach().cpu().numpy(), mask.cpu().numpy()):
            n = max(1, int(m.sum()))
            audio = db_to_audio(self.stats.denormalise(x), self.features, n_iter=self.n_iter)
            wavs.append(audio[: n * self.features.hop_length])
        return self.embed_waveforms(wavs, self.features.sample_rate)
