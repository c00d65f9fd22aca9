"""MusicGen on this machine: a MusicGen-shaped model through every stage, and the published
MusicGen-small configuration's cost.

    OMP_NUM_THREADS=1 python benchmarks/musicgen.py --corpus demo/corpus --write

(A) A `MusicgenForConditionalGeneration` of the real classes with random weights, shaped like
MusicGen (EnCodec at 32 kHz with MusicGen's strides, 4 codebooks of 2048 codes at 50 frames/s; a
T5 encoder; the decoder narrower and shallower), saved and taken through `init` (every corpus
track encoded by EnCodec), a fine-tune, generation, one opt-out (gradient ascent) and one query's
attribution by unlearning: the cost of each stage.
(B) MusicGen-small's configuration (24-layer decoder of width 1024, T5-base) with random weights:
per-sample loss throughput (forward, and forward + backward as unlearning needs) on 10 s clips,
and peak memory. With --device cuda on a GPU. Writes the `musicgen` section of
docs/benchmarks.md with --write.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

from linernotes import device
from linernotes.attribution.front import attribute_run
from linernotes.attribution.losses import ScoreSettings, track_losses
from linernotes.clips import generate
from linernotes.data.dataset import TrackDataset
from linernotes.data.manifest import read_manifest
from linernotes.models.family import recognise
from linernotes.models.musicgen.shaped import MUSICGEN_SMALL, random_musicgen, word_tokenizer
from linernotes.models.musicgen.task import MusicgenTask
from linernotes.training import TrainSettings
from linernotes.unlearning.trainer import optout

SHAPED = {
    "text": dict(d_model=128, d_ff=256, num_layers=2, num_heads=4, d_kv=32),
    "codec": dict(sampling_rate=32000, num_filters=16, hidden_size=64, codebook_size=2048,
                  codebook_dim=64, upsampling_ratios=[8, 5, 4, 4], num_lstm_layers=1,
                  target_bandwidths=[2.2]),
    "decoder": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                    num_codebooks=4, vocab_size=2048, max_position_embeddings=2048),
}


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def shaped_stages(corpus: Path, out: Path, steps: int) -> list[dict]:
    from linernotes.models.musicgen.shaped import save_random_musicgen

    manifest = read_manifest(corpus)
    words = " ".join(manifest["caption"].astype(str)).replace(",", " ").split()
    folder = save_random_musicgen(out / "musicgen", words, **SHAPED)
    rows = []
    run, s = timed(lambda: recognise(folder).init_run(folder, manifest, out / "run",
                                                      progress=False))
    n = len(manifest)
    sizes = {k: sum(p.numel() for p in getattr(run.model, k).parameters()) / 1e6
             for k in ("text_encoder", "audio_encoder", "decoder")}
    rows.append({"stage": "init: encode every track with EnCodec", "count": f"{n} tracks",
                 "seconds": s, "rate": f"{n / s:.1f} tracks/s"})
    settings = TrainSettings(steps=steps, batch_size=8, lr=1e-3, warmup=20)
    ft, s = timed(lambda: run.family.finetune(manifest, out / "ft", settings, progress=False))
    rows.append({"stage": "fine-tune (decoder)", "count": f"{steps} steps of 8",
                 "seconds": s, "rate": f"{steps / s:.2f} steps/s"})
    store = ft.feature_store(manifest, progress=False)
    train = TrackDataset(store, manifest, list(range(n)))
    _, s = timed(lambda: track_losses(ft.task, ft.model, train, ScoreSettings(batch_size=16)))
    rows.append({"stage": "per-sample loss (scoring)", "count": f"{n} tracks", "seconds": s,
                 "rate": f"{n / s:.1f} losses/s"})
    caption = manifest["caption"].iloc[0]
    clips, s = timed(lambda: generate(ft, [caption], out / "clips", 0, progress=False))
    rows.append({"stage": "generate one clip", "count": f"{ft.family.seconds:.1f} s",
                 "seconds": s, "rate": ""})
    _, s = timed(lambda: attribute_run(ft, manifest, [str(clips[0])], out / "scores",
                                       progress=False))
    rows.append({"stage": "attribute one clip (unlearning, incl. baseline losses)",
                 "count": f"{int((manifest['split'] == 'train').sum())} tracks", "seconds": s,
                 "rate": ""})
    artist = manifest["artist"].iloc[0]
    _, s = timed(lambda: optout(ft, manifest, f"artist={artist}", "gradient_ascent", None,
                                    out / "optout", progress=False))
    rows.append({"stage": f"opt-out {artist} (gradient_ascent, defaults)", "count": "",
                 "seconds": s, "rate": ""})
    for r in rows:
        r["seconds"] = round(r["seconds"], 1)
    print(f"shaped model: {sizes} M parameters; final fine-tune loss "
          f"{ft.config['final_loss']:.3f}")
    return rows, sizes, ft.config["final_loss"]


def small_cost(dev: torch.device, batch: int, seconds: float, reps: int) -> dict:
    model = random_musicgen(**MUSICGEN_SMALL).to(dev)
    k = MUSICGEN_SMALL["decoder"]["num_codebooks"]
    frames = int(seconds * 50)
    task = MusicgenTask(model.text_encoder, word_tokenizer("a piano piece in c major".split()),
                        frames, k, 2048, 2048)
    gen = torch.Generator().manual_seed(0)
    batch_ = {"features": torch.randint(0, 2048, (batch, frames, k), generator=gen).float(),
              "mask": torch.ones(batch, frames, dtype=torch.bool),
              "caption": ["a piano piece in c major"] * batch}
    t, noise = torch.zeros(batch), torch.zeros(batch, frames, k)
    names = set(task.parameter_names(model, "all"))
    for p_name, p in model.named_parameters():
        p.requires_grad_(p_name in names)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        task.per_sample_loss(model, batch_, t, noise)  # warm-up (and the caption's T5 states)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            task.per_sample_loss(model, batch_, t, noise)
        sync()
        forward = (time.perf_counter() - t0) / (reps * batch)
        # the straightforward way: the model's own loss, one sample at a time (T5 run each time)
        tok = task.tokenizer(batch_["caption"][:1], return_tensors="pt")
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            for i in range(batch):
                one = {k: v[i : i + 1] for k, v in batch_.items() if k != "caption"}
                model(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                      labels=task.labels({**one, "caption": batch_["caption"][:1]}, dev))
        sync()
        straightforward = (time.perf_counter() - t0) / (reps * batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        task.per_sample_loss(model, batch_, t, noise).sum().backward()
    sync()
    backward = (time.perf_counter() - t0) / (reps * batch)
    return {"decoder M params": round(sum(p.numel() for p in model.decoder.parameters()) / 1e6),
            "clip seconds": seconds, "batch": batch, "device": dev.type,
            "s per loss (forward)": round(forward, 3),
            "s per loss, model's own loss one at a time": round(straightforward, 3),
            "speed-up": round(straightforward / forward, 2),
            "s per loss (forward+backward)": round(backward, 3),
            "peak GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if dev.type == "cuda" else round(peak_gib(), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--out", type=Path, default=Path("demo/musicgen-bench"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only-small", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small-batch", type=int, default=2)
    ap.add_argument("--small-seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    dev = device.select(args.device)
    command = shlex.join(["python", "benchmarks/musicgen.py", *sys.argv[1:]])
    saved = args.out / "shaped.json"  # (A)'s results, for a later --only-small --write
    shaped = json.loads(saved.read_text()) if saved.exists() else None
    if not args.only_small:
        shaped = shaped_stages(args.corpus, args.out, args.steps)
        saved.write_text(json.dumps(shaped))
        for r in shaped[0]:
            print(r)
    small = small_cost(dev, args.small_batch, args.small_seconds, args.reps)
    print(small)
    if args.write:
        write_docs(command, shaped, small)


def write_docs(command: str, shaped, small: dict) -> None:
    import pandas as pd

    from bench_docs import table as md_table
    from bench_docs import write_section

    parts = [f"## MusicGen (the `musicgen` family)\n\n`OMP_NUM_THREADS=1 {command}` on this "
             "machine's CPU, one thread."]
    if shaped:
        rows, sizes, loss = shaped
        size = ", ".join(f"{k} {v:.1f} M" for k, v in sizes.items())
        parts.append(f"""**A MusicGen-shaped model** (measured by a run of this script without
`--only-small`, its results kept in `OUT/shaped.json`; real transformers classes, random weights:
EnCodec at 32 kHz with MusicGen's strides and 4 codebooks of 2048 codes at 50 frames/s; parameters:
{size}), through every stage on the demo corpus (clips resampled to 32 kHz, up to 6 s = 300
frames); final fine-tune loss {loss:.3f}:

{md_table(pd.DataFrame(rows))}""")
    parts.append(f"""**MusicGen-small's configuration** (24-layer decoder of width 1024, T5-base,
random weights), the per-sample loss the attribution and opt-out methods evaluate:

{md_table(pd.DataFrame([small]))}

At this rate one exact attribution pass (a loss per training track) over 100,000 10-s tracks
takes {100_000 * small["s per loss (forward)"] / 86400:.1f} days on one {small["device"]} thread;
batching samples does not pay on a CPU (the model's own loss, one track at a time, costs the
same). On a GPU: `--only-small --device cuda --small-batch 16`.""")
    write_section("musicgen", "\n\n".join(parts))


if __name__ == "__main__":
    main()
