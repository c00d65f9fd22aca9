"""Stable Audio on this machine: a Stable-Audio-shaped pipeline through every stage, and the
published Stable Audio Open 1.0 configuration's cost.

    OMP_NUM_THREADS=1 python benchmarks/stable_audio.py --corpus demo/corpus
    OMP_NUM_THREADS=1 python benchmarks/stable_audio.py --quick        # a tiny check (minutes)

(A) A StableAudioPipeline of the real classes with random weights, shaped like Stable Audio Open
(Oobleck VAE at 44.1 kHz stereo with SAO's strides, hop 2048, fewer latent channels; a T5
encoder; the DiT with SAO's layout but narrower), saved and taken through `init` (every corpus track
encoded by the VAE), a fine-tune with three planted tracks (each 20x), generation from the planted
tracks' captions and attribution by unlearning: throughput of each stage and the planted tracks'
ranks. The VAE is untrained, its posterior mean calibrated to unit variance on 8 tracks.
(B) The Stable Audio Open 1.0 DiT configuration (24 layers, 24 heads x 64, cross-attention 768)
with random weights: per-sample loss throughput at 1024 latent frames, peak memory, the Fisher's
size, and what one exact query over 115,000 tracks costs at that rate. Writes the `stable-audio`
section of docs/benchmarks.md (not with --quick).

    python benchmarks/stable_audio.py --only-sao --device cuda --sao-batch 8   # (B) on a GPU
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_docs import table as md_table
from bench_docs import write_section
from linernotes import device
from linernotes.attribution.front import attribute_run
from linernotes.attribution.losses import ScoreSettings, track_losses
from linernotes.clips import generate
from linernotes.data.dataset import split_rows
from linernotes.data.manifest import read_manifest
from linernotes.models.stable_audio.family import StableAudioFamily
from linernotes.task import draw_noise
from linernotes.training import TrainSettings

PAPER_TRACKS, PAPER_TIMESTEPS = 115_000, 20
#: Stable Audio Open 1.0's DiT (its diffusers transformer config).
SAO_DIT = dict(sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, num_key_value_attention_heads=12, out_channels=64,
               cross_attention_dim=768, time_proj_dim=256, global_states_input_dim=1536,
               cross_attention_input_dim=768)


def shaped_pipeline(path: Path, dit: dict, vae_hidden: int, text_dim: int,
                    calibration: list[str]) -> Path:
    """Save a Stable-Audio-shaped pipeline with random weights, its VAE calibrated on a few
    tracks (`calibrate_vae`)."""
    from diffusers import (
        AutoencoderOobleck,
        CosineDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderOobleck(encoder_hidden_size=2 * dit["in_channels"],
                             channel_multiples=[1, 2, 2, 4, 4], decoder_channels=vae_hidden,
                             decoder_input_channels=dit["in_channels"], audio_channels=2,
                             sampling_rate=44100)
    calibrate_vae(vae, calibration)
    words = sorted({w for line in (path.parent / "captions.txt").read_text().splitlines()
                    for w in line.lower().replace(",", " , ").replace(".", " . ").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>", model_max_length=64)
    text = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=32,
                                   d_ff=2 * text_dim, num_layers=2, num_heads=4))
    projection = StableAudioProjectionModel(text_encoder_dim=text_dim,
                                            conditioning_dim=dit["cross_attention_dim"],
                                            min_value=0, max_value=512)
    pipe = StableAudioPipeline(vae=vae, text_encoder=text, projection_model=projection,
                               tokenizer=tokenizer, transformer=StableAudioDiTModel(**dit),
                               scheduler=CosineDPMSolverMultistepScheduler())
    pipe.save_pretrained(str(path))
    return path


def calibrate_vae(vae, paths: list[str], seconds: float = 6.0) -> None:
    """Shift and scale a random VAE's posterior mean to zero mean and unit variance per channel
    over `paths` (folded into the encoder's last convolution). Untouched, a random Oobleck
    encoder's output is a near-constant offset (every track's latent alike, mean square 1.2
    against 0.02 of variance): nothing to memorise or attribute. A trained VAE's latents are
    about unit variance by its KL term."""
    from linernotes.models.stable_audio.latents import VaeLatents

    enc = VaeLatents(vae, int(seconds * vae.config.sampling_rate) // int(vae.hop_length), "")
    z = enc.encode(np.stack([enc.waveform(p)[0] for p in paths]))  # (B, frames, C)
    mean = torch.from_numpy(z.mean((0, 1))).view(-1, 1, 1)
    std = torch.from_numpy(z.std((0, 1))).view(-1, 1, 1)
    conv, c = vae.encoder.conv2, z.shape[-1]  # its first c output channels are the mean
    with torch.no_grad():
        conv.weight_g[:c] /= std
        conv.bias[:c] = (conv.bias[:c] - mean.view(-1)) / std.view(-1)


def stage_a(args, work: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    manifest = read_manifest(args.corpus)
    (work / "captions.txt").write_text("\n".join(manifest["caption"].astype(str)))
    dit = dict(SAO_DIT, sample_size=512, in_channels=args.latent, out_channels=args.latent,
               num_layers=args.layers, num_attention_heads=args.heads,
               num_key_value_attention_heads=max(1, args.heads // 2), attention_head_dim=32,
               cross_attention_dim=args.heads * 32, cross_attention_input_dim=args.heads * 32,
               global_states_input_dim=2 * args.heads * 32, time_proj_dim=64)
    spread = manifest.iloc[np.linspace(0, len(manifest) - 1, 8).astype(int)]
    model = shaped_pipeline(work / "model", dit, args.vae_hidden, 128,
                            [str(Path(args.corpus) / p) for p in spread["path"]])
    t0 = time.perf_counter()
    run = StableAudioFamily.init_run(model, manifest, work / "init", progress=False)
    init_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in run.model.parameters())
    rows = split_rows(manifest, "train")
    by_artist = manifest.iloc[rows].groupby("artist", sort=True).head(1)
    planted = by_artist["track_id"].tolist()[: args.planted]
    s = TrainSettings(steps=args.steps, batch_size=8, lr=1e-3, warmup=50, ema_decay=0.0,
                      checkpoint_every=200, duplicate=tuple((t, 20) for t in planted))
    t0 = time.perf_counter()
    tuned = run.family.finetune(manifest, work / "ft", s, progress=False)
    ft_s = time.perf_counter() - t0
    captions = manifest.set_index("track_id").loc[planted, "caption"].tolist()
    t0 = time.perf_counter()
    clips = generate(tuned, captions, work / "clips", seeds=list(range(len(captions))),
                     settings=tuned.family.generate_settings(steps=args.sample_steps,
                                                             guidance=3.0), progress=False)
    gen_s = (time.perf_counter() - t0) / len(clips)
    store, train, ids = tuned.train_set(manifest, progress=False)
    score = ScoreSettings()
    t0 = time.perf_counter()
    track_losses(tuned.task, tuned.model, torch.utils.data.Subset(train, range(32)), score)
    losses_per_s = 32 * score.timesteps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    tables = attribute_run(tuned, manifest, [str(c) for c in clips], work / "scores",
                           progress=False)
    attr_s = (time.perf_counter() - t0) / len(clips)
    ranks = pd.DataFrame([{
        "planted track": tid, "clip": c.name,
        "rank (log-ratio)": int(t.set_index("track_id").loc[tid, "rank"]),
        "top-1": t["track_id"].iloc[0]} for tid, c, t in zip(planted, clips, tables)])
    g = run.config["features"]
    cost = pd.DataFrame([
        {"stage": "init: encode the corpus with the VAE", "value": len(manifest) / init_s,
         "unit": "tracks/s"},
        {"stage": f"fine-tune ({args.steps} steps of 8)", "value": args.steps / ft_s,
         "unit": "steps/s"},
        {"stage": f"generate ({args.sample_steps} sampler steps)", "value": gen_s,
         "unit": "s/clip"},
        {"stage": f"scoring losses ({g['n_frames']} frames)", "value": losses_per_s,
         "unit": "losses/s"},
        {"stage": f"attribute one query over {len(ids)} tracks", "value": attr_s,
         "unit": "s/query"},
    ])
    facts = {"dit_params": n_params, "frames": g["n_frames"], "seconds": g["seconds"],
             "tracks": len(manifest), "train": len(ids), "finetune_minutes": ft_s / 60,
             "dit": dit}
    return cost, ranks, facts


def stage_b(args) -> dict:
    """The SAO 1.0 DiT at random init: per-sample loss throughput, peak memory, Fisher size."""
    from diffusers import StableAudioDiTModel
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    from linernotes.models.stable_audio.task import StableAudioTask

    dev = device.resolve(args.device)
    dit = dict(SAO_DIT, num_layers=args.sao_layers)
    torch.manual_seed(0)
    model = StableAudioDiTModel(**dit).eval().to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    projection = StableAudioProjectionModel(text_encoder_dim=768, conditioning_dim=768,
                                            min_value=0, max_value=512).to(dev)

    class Tokens:  # the T5 stand-in: 64 zero tokens per caption (cost is the DiT's)
        model_max_length = 64

        def __call__(self, captions, **_):
            class Out:
                input_ids = torch.zeros(len(captions), 64, dtype=torch.long)
                attention_mask = torch.ones(len(captions), 64, dtype=torch.long)
            return Out()

    class Text(torch.nn.Module):
        def forward(self, ids, attention_mask=None):
            return (torch.zeros(ids.shape[0], ids.shape[1], 768),)

    frames = dit["sample_size"]
    task = StableAudioTask(Text(), Tokens(), projection, frames, 64, 2048, 44100,
                           ["time_proj.weight"])
    batch = {"features": torch.randn(1, frames, 64), "mask": torch.ones(1, frames, dtype=bool),
             "caption": ["a"]}
    out = {"params": n_params, "layers": dit["num_layers"], "frames": frames, "device": dev.type}
    for precision in ("float32", "bfloat16"):
        times = []
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                    enabled=precision == "bfloat16"):
            for k in range(args.sao_reps + 1):
                b = args.sao_batch
                t, noise = draw_noise(["q"] * b, [k * b + i for i in range(b)], (frames, 64))
                many = {"features": batch["features"].expand(b, -1, -1),
                        "mask": batch["mask"].expand(b, -1), "caption": batch["caption"] * b}
                many = device.move(many, dev)
                t0 = time.perf_counter()
                task.per_sample_loss(model, many, t[:, 0].to(dev), noise[:, 0].to(dev))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / args.sao_batch)
        out[f"s_per_loss_{precision}"] = float(np.median(times[1:]))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if dev.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    out["fisher_gb"] = n_params * 4 / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--work", type=Path, default=Path("runs/bench-stable-audio"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--latent", type=int, default=16, help="latent channels (SAO: 64)")
    ap.add_argument("--vae-hidden", type=int, default=16, help="the VAE decoder's width")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--planted", type=int, default=3)
    ap.add_argument("--sao-layers", type=int, default=24)
    ap.add_argument("--sao-reps", type=int, default=2)
    ap.add_argument("--sao-batch", type=int, default=1, help="losses per forward in (B)")
    ap.add_argument("--device", default="cpu", help="(B)'s device: cpu, cuda or auto")
    ap.add_argument("--only-sao", action="store_true", help="(B) alone (a GPU check)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.heads, args.vae_hidden, args.steps, args.latent = 2, 2, 4, 20, 4
        args.sample_steps, args.planted, args.sao_layers, args.sao_reps = 2, 1, 1, 1
    command = "OMP_NUM_THREADS=1 python benchmarks/stable_audio.py " + shlex.join(sys.argv[1:])
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.only_sao:
        cost, ranks, facts = stage_a(args, args.work)
        print(cost.to_string(index=False), ranks.to_string(index=False), facts, sep="\n",
              flush=True)
    sao = stage_b(args)
    print(sao, flush=True)
    if args.only_sao:
        return
    total_losses = PAPER_TRACKS * PAPER_TIMESTEPS
    hours = {p: total_losses * sao[f"s_per_loss_{p}"] / 3600 for p in ("float32", "bfloat16")}
    minutes = (time.perf_counter() - started) / 60
    if args.quick or args.no_write:
        return
    body = f"""## Stable Audio: a user's diffusers pipeline through every stage

`{command}` ({minutes:.0f} min on this 2-core CPU machine, one thread).

**(A) A Stable-Audio-shaped pipeline** of the real diffusers classes with random weights: the
Oobleck VAE with Stable Audio Open's strides (44.1 kHz stereo, hop 2048) but
{facts['dit']['in_channels']} latent channels (SAO: 64; its encoder at full width costs minutes per
track on this CPU), untrained, its posterior mean shifted and scaled per channel to zero mean and
unit variance over 8 corpus tracks (a random encoder's raw output is a near-constant offset that
makes every track's latent alike); a 2-layer T5;
and a DiT with SAO's layout at {facts['dit']['num_layers']} layers x
{facts['dit']['num_attention_heads']} heads x 32 ({facts['dit_params'] / 1e6:.1f} M parameters).
`linernotes init` over the demo corpus
({facts['tracks']} tracks, {facts['frames']} latent frames = {facts['seconds']:.2f} s each), then a
fine-tune of {args.steps} steps with {args.planted} planted tracks (each 20x;
{facts['finetune_minutes']:.1f} min), then one clip from each planted track's caption, attributed by
unlearning (default settings) against the {facts['train']} training tracks.

{md_table(cost)}

{md_table(ranks)}

**(B) The Stable Audio Open 1.0 DiT configuration** ({sao['layers']} layers, 24 heads x 64,
cross-attention 768; {sao['params'] / 1e9:.2f} B parameters) with random weights, one per-sample
loss at {sao['frames']} latent frames (47.6 s), one thread: {sao['s_per_loss_float32']:.1f} s in
float32, {sao['s_per_loss_bfloat16']:.1f} s under bfloat16 autocast; peak resident memory
{sao['peak_rss_gb']:.1f} GB; a diagonal Fisher over all its parameters is {sao['fisher_gb']:.1f} GB
(float32). One exact query over {PAPER_TRACKS:,} tracks at {PAPER_TIMESTEPS} timesteps is
{total_losses:,} losses: {hours['float32']:,.0f} h in float32 and {hours['bfloat16']:,.0f} h in
bfloat16 on one CPU thread here: a GPU job (the paper: ~5 h on 8 H100s). On a GPU: still to be
measured (no GPU was lent to the session that wrote this).
"""
    write_section("stable-audio", body)
    print(f"wrote docs/benchmarks.md ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
