"""A MusicGen of the real transformers classes with random weights, built offline and saved as a
user's folder would be (`save_pretrained`, with a word-level text tokenizer built here).

For tests, benchmarks and trying the musicgen family without downloading anything: `MUSICGEN_SMALL`
is the published MusicGen-small shape (T5-base text encoder, EnCodec 32 kHz with 4 codebooks of
2048 codes at 50 frames/s, a 24-layer decoder of width 1024); smaller shapes keep the layout and
shrink the widths. EnCodec's codebooks start at zero in transformers (they are learned buffers);
they are filled from the encoder's frames of tones, residual by residual, so that different audio
gets different codes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

#: MusicGen-small's published configuration (facebook/musicgen-small's config.json).
MUSICGEN_SMALL = {
    "text": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64),
    "codec": dict(sampling_rate=32000, num_filters=64, hidden_size=128, codebook_size=2048,
                  codebook_dim=128, upsampling_ratios=[8, 5, 4, 4], num_lstm_layers=2,
                  target_bandwidths=[2.2]),
    "decoder": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                    ffn_dim=4096, num_codebooks=4, vocab_size=2048,
                    max_position_embeddings=2048),
}


def word_tokenizer(words: Iterable[str], max_length: int = 256):
    """A word-level tokenizer (T5's special tokens first) over `words`, lower-cased."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(
        ["<pad>", "</s>", "<unk>", *sorted({w.lower() for w in words})]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


def random_musicgen(text: dict, codec: dict, decoder: dict, channels: int = 1,
                    vocab_size: int = 32128, seed: int = 0):
    """A `MusicgenForConditionalGeneration` of these sizes with random weights (eval mode)."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    codes = int(decoder["vocab_size"])
    t5 = T5Config(vocab_size=vocab_size, relative_attention_num_buckets=32, **text)
    enc = EncodecConfig(audio_channels=1, chunk_length_s=None, normalize=False, **codec)
    dec = MusicgenDecoderConfig(audio_channels=channels, pad_token_id=codes, bos_token_id=codes,
                                decoder_start_token_id=codes, **decoder)
    config = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(),
                            decoder=dec.to_dict())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration(config).eval()
        _fill_codebooks(model)
    return model


@torch.no_grad()
def _fill_codebooks(model) -> None:
    codec = model.audio_encoder
    sr = int(codec.config.sampling_rate)
    t = torch.arange(sr) / sr
    tones = torch.stack([0.3 * torch.sin(2 * math.pi * float(f) * t) + 0.05 * torch.randn(len(t))
                         for f in np.geomspace(80, 4000, 48)])[:, None]
    residual = codec.encoder(tones).transpose(1, 2).reshape(-1, codec.config.codebook_dim)
    size = int(codec.config.codebook_size)
    for layer in codec.quantizer.layers:
        pick = residual[torch.randint(len(residual), (size,))].clone()
        pick += 1e-3 * residual.std() * torch.randn_like(pick)  # no two codes alike
        layer.codebook.embed.copy_(pick)
        layer.codebook.embed_avg.copy_(pick)
        residual = residual - pick[layer.codebook.quantize(residual)]


def save_random_musicgen(folder: str | Path, words: Iterable[str], text: dict, codec: dict,
                         decoder: dict, channels: int = 1, seed: int = 0) -> Path:
    """`random_musicgen` and a `word_tokenizer` over `words`, saved into `folder` as a
    `MusicgenForConditionalGeneration` + `MusicgenProcessor` folder."""
    from transformers import EncodecFeatureExtractor, MusicgenProcessor

    tokenizer = word_tokenizer(words)
    model = random_musicgen(text, codec, decoder, channels, len(tokenizer), seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    extractor = EncodecFeatureExtractor(sampling_rate=int(codec["sampling_rate"]))
    MusicgenProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
