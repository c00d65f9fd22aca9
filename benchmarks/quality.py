"""Reference-model quality: conditional fidelity, Fréchet distances, training and sampling speed.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --run demo/run --corpus demo/corpus

Generates clips for prompts naming each artist (holdout captions, which name the artist) with
the trained model and with an untrained copy (same architecture, random init), assigns each
clip to the nearest artist centroid of real train audio (CLAP audio and basic-pitch
embeddings), and measures Fréchet distances to the real holdout clips between a real-vs-real
floor and the untrained ceiling. Also: how each similarity baseline separates artists, and
speeds. Writes the `quality` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_docs import table, write_section
from linernotes.attribution.embeddings import audio_embeddings, track_embeddings
from linernotes.attribution.query import Query
from linernotes.attribution.similarity import (
    BASIC_PITCH_DIM,
    BASIC_PITCH_RATE,
    SIMILARITY_METHODS,
    BasicPitchSimilarity,
    ChromaMfccSimilarity,
    basic_pitch_embedding,
    similarity_method,
    track_audio,
)
from linernotes.clips import generate, load_clip
from linernotes.data.audio import load_audio
from linernotes.data.dataset import split_rows
from linernotes.data.descriptors import chroma_mfcc
from linernotes.data.manifest import audio_path, read_manifest
from linernotes.evaluation.quality import (
    artist_centroids,
    assignment_accuracy,
    frechet_distance,
    leave_one_out_accuracy,
)
from linernotes.run import load_run
from linernotes.training import LOSS_LOG

DASH = "–"


def _prompts(manifest: pd.DataFrame, rows: np.ndarray, per_artist: int) -> tuple[list, list]:
    """`per_artist` holdout captions per artist (cycled), with their artists."""
    prompts, artists = [], []
    sub = manifest.iloc[rows]
    for artist in sorted(sub["artist"].unique()):
        caps = sub.loc[sub["artist"] == artist, "caption"].tolist()
        for k in range(per_artist):
            prompts.append(caps[k % len(caps)])
            artists.append(artist)
    return prompts, artists


def _sample_with(run, model, prompts: list, seeds: list, n_frames: int, gen) -> torch.Tensor:
    """Features sampled by the run's family with another model of its architecture."""
    family, kept = run.family, run.family.model
    family.model = model
    try:
        return torch.cat([family.sample(prompts[lo : lo + gen.batch_size],
                                        seeds[lo : lo + gen.batch_size], n_frames, gen)
                          for lo in range(0, len(prompts), gen.batch_size)])
    finally:
        family.model = kept


def _bp_of_frames(run, latents: np.ndarray, masks: np.ndarray, gen) -> np.ndarray:
    """basic-pitch embeddings of frames through the product vocoder (peak-normalised)."""
    rate = run.family.sample_rate
    out = []
    for x, m in zip(latents, masks):
        audio = run.family.decode(x, m, gen)
        peak = float(np.abs(audio).max()) if len(audio) else 0.0
        out.append(basic_pitch_embedding(audio * (0.99 / peak) if peak > 0.99 else audio, rate))
    return np.stack(out)


def _floor(train: np.ndarray, holdout: np.ndarray, n: int, draws: int, seed: int) -> float:
    """Mean FD of random size-`n` train subsets to the holdout (same sample size as generated)."""
    rng = np.random.default_rng(seed)
    n = min(n, len(train))
    return float(np.mean([frechet_distance(train[rng.choice(len(train), n, replace=False)],
                                           holdout) for _ in range(draws)]))


def _fidelity_row(label: str, n: int, artists, cents: dict, ref: dict, emb: dict,
                  fd: dict) -> dict:
    """One fidelity row: artist accuracy and FD to the holdout per embedding ("clap", "bp")."""
    out: dict = {"clips": label, "n": n}
    for key, name in (("clap", "CLAP"), ("bp", "basic-pitch")):
        e = emb.get(key)
        out[f"artist acc, {name}"] = DASH if e is None else \
            assignment_accuracy(e, artists, cents[key])[0]
        out[f"FD {name}"] = fd.get(key, DASH if e is None else frechet_distance(e, ref[key]))
    return {k: out[k] for k in ("clips", "n", "artist acc, CLAP", "artist acc, basic-pitch",
                                "FD CLAP", "FD basic-pitch")}


def _training_speed(run) -> dict:
    """Steps, steps/s and minutes of the denoiser's training, from the run's loss log."""
    log = Path(run.path) / LOSS_LOG
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] \
        if log.exists() else []
    if len(rows) < 2:
        return {}
    span = rows[-1]["time"] - rows[0]["time"]
    steps = rows[-1]["step"] - rows[0]["step"]
    return {"steps": rows[-1]["step"] + 1, "steps_per_s": steps / span if span > 0 else np.nan,
            "train_minutes": (rows[-1]["step"] + 1) * (span / steps) / 60 if steps else np.nan}


def _method_agreement(run, manifest: pd.DataFrame, store, rows: np.ndarray) -> pd.DataFrame:
    """Each similarity method with holdout tracks (their FLAC and frames) as queries."""
    artists = manifest["artist"].to_numpy()
    out = []
    for name in SIMILARITY_METHODS:
        method = similarity_method(name, run, manifest, progress=False)
        train_art = artists[method.rows]
        top1, top5, secs = [], [], []
        for r in rows:
            row = manifest.iloc[int(r)]
            query = Query(key=row["track_id"], features=torch.from_numpy(store.features(int(r))),
                          mask=torch.from_numpy(np.array(store.mask[r], dtype=bool)),
                          caption=row["caption"], source=str(audio_path(manifest, row)))
            t1 = time.perf_counter()
            scores, _ = method.similarity(query)
            secs.append(time.perf_counter() - t1)
            order = np.argsort(-scores, kind="stable")
            top1.append(train_art[order[0]] == row["artist"])
            top5.append(np.mean(train_art[order[:5]] == row["artist"]))
        out.append({"method": name, "top-1 same artist": float(np.mean(top1)),
                    "top-5 same artist": float(np.mean(top5)),
                    "s per query": float(np.median(secs[1:] or secs))})
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--corpus", default="demo/corpus")
    ap.add_argument("--per-artist", type=int, default=4)
    ap.add_argument("--out", default=None, help="clip folder (default: <run>/quality-clips)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = ap.parse_args(argv)
    command = "OMP_NUM_THREADS=1 python benchmarks/quality.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    run = load_run(args.run)
    manifest = read_manifest(args.corpus)
    out = Path(args.out) if args.out else Path(args.run) / "quality-clips"
    gen = run.family.generate_settings()

    # real embeddings: train (centroids) and holdout (the reference set)
    bp_method = BasicPitchSimilarity(run, manifest, progress=False)
    store, rows_train = bp_method.store, bp_method.rows
    rows_hold = split_rows(manifest, "holdout")
    art_train = manifest["artist"].to_numpy()[rows_train]
    art_hold = manifest["artist"].to_numpy()[rows_hold]
    clap_train = track_embeddings(run, store, rows_train)
    clap_hold = track_embeddings(run, store, rows_hold)
    bp_train = bp_method.train_embeddings()
    t0 = time.perf_counter()
    bp_hold = np.stack([basic_pitch_embedding(track_audio(run, manifest, r, BASIC_PITCH_RATE),
                                              BASIC_PITCH_RATE) for r in rows_hold])
    bp_seconds = (time.perf_counter() - t0) / len(rows_hold)
    hold_lat = np.stack([store.features(int(r)) for r in rows_hold])
    hold_mask = np.asarray(store.mask[rows_hold], dtype=bool)
    t0 = time.perf_counter()
    voc_real = [run.family.decode(x, m, gen) for x, m in zip(hold_lat, hold_mask)]
    gl_seconds = (time.perf_counter() - t0) / len(rows_hold)
    rate = run.family.sample_rate
    bp_hold_voc = np.stack([basic_pitch_embedding(a, rate) for a in voc_real])
    print(f"real embeddings: {time.perf_counter() - t_start:.0f} s", flush=True)

    # generated clips: the trained model through `generate` (the product path) ...
    prompts, art_gen = _prompts(manifest, rows_hold, args.per_artist)
    seeds = list(range(args.seed, args.seed + len(prompts)))
    t0 = time.perf_counter()
    paths = generate(run, prompts, out, seeds=seeds, settings=gen, progress=False)
    clip_seconds = (time.perf_counter() - t0) / len(paths)
    print(f"trained: {len(paths)} clips, {clip_seconds:.1f} s/clip", flush=True)
    clips = [load_clip(p) for p in paths]
    gen_lat = torch.stack([c.latent for c in clips]).float()
    gen_mask = torch.stack([c.mask for c in clips])
    clap_gen = audio_embeddings(run, gen_lat, gen_mask)
    bp_gen = np.stack([basic_pitch_embedding(load_audio(p, BASIC_PITCH_RATE),
                                                  BASIC_PITCH_RATE) for p in paths])
    # ... and the untrained copy (its latents through the same vocoder)
    t0 = time.perf_counter()
    blank = run.family.untrained(args.seed)  # the same architecture at random init
    n_frames = run.task.latent_shape[0]
    un_lat = _sample_with(run, blank, prompts, seeds, n_frames, gen)
    un_mask = torch.ones(un_lat.shape[:2], dtype=torch.bool)
    clap_un = audio_embeddings(run, un_lat, un_mask)
    t_un = time.perf_counter()
    bp_un = _bp_of_frames(run, un_lat.numpy(), un_mask.numpy(), gen)
    un_vocode_seconds = (time.perf_counter() - t_un) / len(prompts)
    print(f"untrained: {time.perf_counter() - t0:.0f} s", flush=True)

    # conditional fidelity and Fréchet distances
    cents = {"clap": artist_centroids(clap_train, art_train),
             "bp": artist_centroids(bp_train, art_train)}
    n_gen = len(prompts)
    chance = 1.0 / len(cents["clap"])

    ref = {"clap": clap_hold, "bp": bp_hold}

    def row(label: str, n: int, artists, fd: dict | None = None, **emb) -> dict:
        return _fidelity_row(label, n, artists, cents, ref, emb, fd or {})

    n_hold = len(rows_hold)
    fidelity = pd.DataFrame([
        row("real holdout: FLAC (reference; FD = real-vs-real floor)", n_hold, art_hold,
            {"clap": _floor(clap_train, clap_hold, n_gen, 20, args.seed),
             "bp": _floor(bp_train, bp_hold, n_gen, 20, args.seed)},
            clap=clap_hold, bp=bp_hold),
        row("real holdout, vocoded (what the vocoder alone costs)", n_hold, art_hold,
            bp=bp_hold_voc),
        row("trained model, product WAV", n_gen, art_gen, clap=clap_gen, bp=bp_gen),
        row("untrained model (ceiling)", n_gen, art_gen, clap=clap_un, bp=bp_un),
    ])

    # how well each real-audio embedding separates artists
    cm_train = ChromaMfccSimilarity(run, manifest, progress=False).train_embeddings()
    mu, sd = cm_train.mean(0), np.where(cm_train.std(0) > 1e-8, cm_train.std(0), 1.0)
    cm_hold = np.stack([chroma_mfcc(track_audio(run, manifest, r, rate), rate)
                        for r in rows_hold])
    cm_cents = artist_centroids((cm_train - mu) / sd, art_train)
    sep = pd.DataFrame([
        {"embedding": "CLAP audio (the run's CLAP)", "dim": clap_train.shape[1],
         "holdout acc": assignment_accuracy(clap_hold, art_hold, cents["clap"])[0],
         "train leave-one-out acc": leave_one_out_accuracy(clap_train, art_train)},
        {"embedding": "basic-pitch (pooled activations)", "dim": BASIC_PITCH_DIM,
         "holdout acc": assignment_accuracy(bp_hold, art_hold, cents["bp"])[0],
         "train leave-one-out acc": leave_one_out_accuracy(bp_train, art_train)},
        {"embedding": "chroma + MFCC (z-scored)", "dim": cm_train.shape[1],
         "holdout acc": assignment_accuracy((cm_hold - mu) / sd, art_hold, cm_cents)[0],
         "train leave-one-out acc": leave_one_out_accuracy((cm_train - mu) / sd, art_train)},
    ])
    methods = _method_agreement(run, manifest, store, rows_hold)

    speed = _training_speed(run)
    timing = pd.DataFrame([{
        "train steps": str(speed.get("steps", run.config.get("steps"))),
        "batch": str(run.config["train"]["batch_size"]),
        "steps/s": speed.get("steps_per_s", np.nan),
        "denoiser training (min)": speed.get("train_minutes", np.nan),
        "s per clip (generate: sampling + Griffin-Lim)": clip_seconds,
        "s per vocode, real clip": gl_seconds,
        "s per vocode + basic-pitch, untrained clip": un_vocode_seconds,
        "s per basic-pitch embedding (FLAC)": bp_seconds,
    }])
    total = time.perf_counter() - t_start

    family = run.family.name
    title, section = (("Reference model", "quality") if family == "reference" else
                      (f"Autoregressive reference model ({family})", f"quality-{family}"))
    sampler = ", ".join(f"{k} {v}" for k, v in gen.to_dict().items()
                        if k in ("steps", "sampler", "guidance", "temperature", "top_k"))
    body = "\n".join([
        f"## {title} quality (`benchmarks/quality.py`)",
        "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other jobs, "
        f"{torch.get_num_threads()} torch thread(s), no GPU; {total / 60:.1f} min in all. "
        f"Run `{run.path}` ({run.hash}), corpus `{args.corpus}`: {len(rows_train)} train / "
        f"{n_hold} holdout tracks, {len(cents['clap'])} artists.",
        f"Command: `{command}`",
        "",
        f"**Conditional fidelity and Fréchet distance.** {args.per_artist} clips per artist, "
        f"prompted with holdout captions (each names its artist); sampler {sampler}. "
        "*Artist acc*: share assigned to the prompted artist's "
        f"nearest centroid of real **train** embeddings (chance {chance:.3f}). *FD*: against "
        f"the {n_hold} real holdout clips; the reference row gives the real-vs-real floor "
        f"(mean over 20 random {n_gen}-track train subsets: the generated sample size, since FD "
        "is biased upwards at small n). CLAP embeds frames, so its numbers do not depend on "
        "the vocoder; basic-pitch embeds audio, through the product vocoder (per-frame exact "
        "NNLS mel inversion + seeded Griffin-Lim) for every generated row.",
        "",
        table(fidelity),
        "",
        f"**Artist separation of real-audio embeddings** (nearest train centroid, chance "
        f"{chance:.3f}; {n_hold} holdout tracks, so one track = {1 / n_hold:.3f}).",
        "",
        table(sep),
        "",
        "**Similarity baselines, holdout track as query** (`attribution/similarity.py`): share "
        "of queries whose top-1 credited training track has the query's artist, and mean share "
        f"among the top 5 (chance {chance:.3f}); seconds per query once the training side is "
        "cached in the run.",
        "",
        table(methods),
        "",
        "**Speed.** Steps/s and training time from the run's loss log (the denoiser; the CLAP "
        "stage is not logged); the other columns measured here, under the machine's load.",
        "",
        table(timing),
    ])
    print(body)
    if not args.no_write:
        print(f"\nwrote {write_section(section, body)}")


if __name__ == "__main__":
    main()
