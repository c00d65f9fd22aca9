"""Reference-model quality: conditional fidelity, Fréchet distances, training and sampling speed.

    OMP_NUM_THREADS=1 python benchmarks/quality.py --run demo/run --corpus demo/corpus

Generates clips for prompts naming each artist (holdout captions, which name the artist) with
the trained model and with an untrained copy (same architecture, random init), assigns each
clip to the nearest artist centroid of real train audio (CLAP audio and basic-pitch
embeddings), and measures Fréchet distances to the real holdout clips between a real-vs-real
floor and the untrained ceiling. Writes the `quality` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from linernotes.attribution.embeddings import clap_audio, track_embeddings
from linernotes.attribution.query import Query
from linernotes.attribution.similarity import (
    BASIC_PITCH_DIM,
    BASIC_PITCH_RATE,
    SIMILARITY_METHODS,
    BasicPitchSimilarity,
    ChromaMfccSimilarity,
    basic_pitch_embedding,
    chroma_mfcc,
    frames_to_audio,
    similarity_method,
    track_audio,
)
from linernotes.data.audio import load_audio
from linernotes.data.dataset import split_rows
from linernotes.data.manifest import audio_path, read_manifest
from linernotes.evaluation.quality import (
    artist_centroids,
    assignment_accuracy,
    frechet_distance,
    leave_one_out_accuracy,
)
from linernotes.models.denoiser import Denoiser, DenoiserConfig
from linernotes.models.pipeline import GenerateSettings, generate, load_clip, sample_latents
from linernotes.training import LOSS_LOG, load_run


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


def _untrained(run, seed: int):
    """The run with its denoiser replaced by the same architecture at random init."""
    torch.manual_seed(seed)
    described = run.config["model"]
    model = Denoiser(DenoiserConfig.from_dict(described["config"]), described["n_mels"],
                     described["clap_dim"]).eval()
    return dataclasses.replace(run, model=model, hash=f"{run.hash}-untrained")


def _clip_embeddings(run, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """CLAP audio (from the clip's frames) and basic-pitch (from its WAV) embeddings."""
    clips = [load_clip(p) for p in paths]
    clap = clap_audio(run.clap, torch.stack([c.latent for c in clips]).float(),
                      torch.stack([c.mask for c in clips]))
    bp = np.stack([basic_pitch_embedding(load_audio(p, BASIC_PITCH_RATE), BASIC_PITCH_RATE)
                   for p in paths])
    return clap, bp


def _sampled_embeddings(model_run, prompts: list[str], seeds: list[int], gen: GenerateSettings,
                        db_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """CLAP and basic-pitch embeddings of full-length samples, vocoded with dB clipped to the
    real range (an untrained model's frames are out of range and stall the mel inversion)."""
    n = model_run.features.n_frames
    lat = torch.cat([sample_latents(model_run, prompts[lo : lo + gen.batch_size],
                                    seeds[lo : lo + gen.batch_size], n, gen)
                     for lo in range(0, len(prompts), gen.batch_size)])
    mask = torch.ones(lat.shape[:2], dtype=torch.bool)
    clap = clap_audio(model_run.clap, lat.float(), mask)
    rate = model_run.features.sample_rate
    bp = np.stack([basic_pitch_embedding(frames_to_audio(model_run, x, m, gen.griffin_lim_iters,
                                                         db_range), rate)
                   for x, m in zip(lat.numpy(), mask.numpy())])
    return clap, bp


def _floor(train: np.ndarray, holdout: np.ndarray, n: int, draws: int, seed: int) -> float:
    """Mean FD of random size-`n` train subsets to the holdout (same sample size as generated)."""
    rng = np.random.default_rng(seed)
    n = min(n, len(train))
    return float(np.mean([frechet_distance(train[rng.choice(len(train), n, replace=False)],
                                           holdout) for _ in range(draws)]))


def _training_speed(run) -> dict:
    log = Path(run.path) / LOSS_LOG
    if not log.exists():
        return {}
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if len(rows) < 2:
        return {}
    span = rows[-1]["time"] - rows[0]["time"]
    steps = rows[-1]["step"] - rows[0]["step"]
    return {"steps": rows[-1]["step"] + 1, "steps_per_s": steps / span if span > 0 else np.nan,
            "train_minutes": (rows[-1]["step"] + 1) * (span / steps) / 60 if steps else np.nan,
            "batch_size": run.config["train"]["batch_size"]}


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

    run = load_run(args.run)
    manifest = read_manifest(args.corpus)
    out = Path(args.out) if args.out else Path(args.run) / "quality-clips"
    gen = GenerateSettings()

    # real embeddings: train (centroids) and holdout (reference set)
    t0 = time.perf_counter()
    bp_method = BasicPitchSimilarity(run, manifest, progress=False)
    store, rows_train = bp_method.store, bp_method.rows
    rows_hold = split_rows(manifest, "holdout")
    art_train = manifest["artist"].to_numpy()[rows_train]
    art_hold = manifest["artist"].to_numpy()[rows_hold]
    clap_train = track_embeddings(run, store, rows_train)
    clap_hold = track_embeddings(run, store, rows_hold)
    bp_train = bp_method.train_embeddings()
    t1 = time.perf_counter()
    bp_hold = np.stack([basic_pitch_embedding(track_audio(run, manifest, r, BASIC_PITCH_RATE),
                                              BASIC_PITCH_RATE) for r in rows_hold])
    bp_seconds = (time.perf_counter() - t1) / len(rows_hold)
    t1 = time.perf_counter()
    vocoded = [frames_to_audio(run, store.features(int(r)), np.asarray(store.mask[r]),
                               n_iter=gen.griffin_lim_iters) for r in rows_hold]
    gl_seconds = (time.perf_counter() - t1) / len(rows_hold)
    bp_voc = np.stack([basic_pitch_embedding(a, run.features.sample_rate) for a in vocoded])
    print(f"real embeddings: {time.perf_counter() - t0:.0f} s", flush=True)

    # generated clips: trained and untrained
    prompts, art_gen = _prompts(manifest, rows_hold, args.per_artist)
    seeds = list(range(args.seed, args.seed + len(prompts)))
    t1 = time.perf_counter()
    paths = generate(run, prompts, out, seeds=seeds, settings=gen, progress=False)
    clip_seconds = (time.perf_counter() - t1) / len(paths)
    print(f"trained: {len(paths)} clips, {clip_seconds:.1f} s/clip", flush=True)
    emb = {"trained": _clip_embeddings(run, paths)}
    real = np.asarray(store.db[np.sort(rows_train)])[np.asarray(store.mask[np.sort(rows_train)])]
    db_range = (run.features.db_floor, float(real.max()))
    t1 = time.perf_counter()
    emb["untrained"] = _sampled_embeddings(_untrained(run, args.seed), prompts, seeds, gen,
                                           db_range)
    print(f"untrained: {time.perf_counter() - t1:.0f} s", flush=True)

    # conditional fidelity and Fréchet distances
    cents = {"clap": artist_centroids(clap_train, art_train),
             "bp": artist_centroids(bp_train, art_train)}
    n_gen = len(prompts)
    chance = 1.0 / len(cents["clap"])
    fid_rows = [{
        "clips": "real holdout (reference)", "n": len(rows_hold),
        "artist acc, CLAP": assignment_accuracy(clap_hold, art_hold, cents["clap"])[0],
        "artist acc, basic-pitch": assignment_accuracy(bp_hold, art_hold, cents["bp"])[0],
        "FD CLAP": _floor(clap_train, clap_hold, n_gen, 20, args.seed),
        "FD basic-pitch": _floor(bp_train, bp_hold, n_gen, 20, args.seed),
    }, {
        "clips": "real holdout, Griffin-Lim round trip", "n": len(rows_hold),
        "artist acc, CLAP": np.nan,
        "artist acc, basic-pitch": assignment_accuracy(bp_voc, art_hold, cents["bp"])[0],
        "FD CLAP": np.nan, "FD basic-pitch": frechet_distance(bp_voc, bp_hold),
    }]
    for name in ("trained", "untrained"):
        clap_g, bp_g = emb[name]
        fid_rows.append({
            "clips": f"generated, {name} model" + (" (dB clipped to the real range)"
                                                     if name == "untrained" else ""),
            "n": n_gen,
            "artist acc, CLAP": assignment_accuracy(clap_g, art_gen, cents["clap"])[0],
            "artist acc, basic-pitch": assignment_accuracy(bp_g, art_gen, cents["bp"])[0],
            "FD CLAP": frechet_distance(clap_g, clap_hold),
            "FD basic-pitch": frechet_distance(bp_g, bp_hold),
        })
    fidelity = pd.DataFrame(fid_rows)

    # how well each real-audio embedding separates artists
    cm_train = ChromaMfccSimilarity(run, manifest, progress=False).train_embeddings()
    mu, sd = cm_train.mean(0), np.where(cm_train.std(0) > 1e-8, cm_train.std(0), 1.0)
    cm_hold = _chroma_hold(run, manifest, rows_hold)
    sep = pd.DataFrame([
        {"embedding": "CLAP audio (run's CLAP)", "dim": clap_train.shape[1],
         "holdout acc": assignment_accuracy(clap_hold, art_hold, cents["clap"])[0],
         "train leave-one-out acc": leave_one_out_accuracy(clap_train, art_train)},
        {"embedding": "basic-pitch (pooled activations)", "dim": BASIC_PITCH_DIM,
         "holdout acc": assignment_accuracy(bp_hold, art_hold, cents["bp"])[0],
         "train leave-one-out acc": leave_one_out_accuracy(bp_train, art_train)},
        {"embedding": "chroma + MFCC (z-scored)", "dim": cm_train.shape[1],
         "holdout acc": assignment_accuracy((cm_hold - mu) / sd, art_hold,
                                            artist_centroids((cm_train - mu) / sd,
                                                             art_train))[0],
         "train leave-one-out acc": leave_one_out_accuracy((cm_train - mu) / sd, art_train)},
    ])

    methods = _method_agreement(run, manifest, store, rows_hold)

    speed = _training_speed(run)
    timing = pd.DataFrame([{
        "train steps": speed.get("steps", run.config.get("steps")),
        "batch": speed.get("batch_size", run.config["train"]["batch_size"]),
        "steps/s": speed.get("steps_per_s", np.nan),
        "denoiser training (min)": speed.get("train_minutes", np.nan),
        "s per clip (sampling + Griffin-Lim)": clip_seconds,
        "s per Griffin-Lim (32 iters)": gl_seconds,
        "s per basic-pitch embedding": bp_seconds,
    }])

    n_artists = len(cents["clap"])
    body = "\n".join([
        "## Reference model quality (`benchmarks/quality.py`)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU only "
        f"(2 cores shared). Run `{run.path}` ({run.hash}), corpus `{args.corpus}`: "
        f"{len(rows_train)} train / {len(rows_hold)} holdout tracks, {n_artists} artists. "
        f"Command: `{command}`",
        "",
        f"**Conditional fidelity and Fréchet distance.** {args.per_artist} clips per artist "
        f"from holdout captions (each names its artist), {gen.steps} {gen.sampler} steps, "
        f"guidance {gen.guidance}. Artist accuracy: nearest centroid of real *train* "
        f"embeddings (chance {chance:.3f}). FD: against the {len(rows_hold)} real holdout "
        f"clips; the reference row's FD is the real-vs-real floor (mean over 20 random "
        f"{n_gen}-track train subsets, the generated sample size). CLAP embeds frames; "
        "basic-pitch embeds audio (generated clips: their Griffin-Lim WAV; real: the FLAC), so "
        "the round-trip row shows what the vocoder alone costs.",
        "",
        table(fidelity),
        "",
        f"**Artist separation of real-audio embeddings** (nearest train centroid; chance "
        f"{chance:.3f}; {len(rows_hold)} holdout tracks, so one track = "
        f"{1 / len(rows_hold):.3f}).",
        "",
        table(sep),
        "",
        "**Similarity baselines, holdout track as query.** Share of queries whose top-1 "
        "(top-5: mean share of the top 5) credited training tracks have the query's artist "
        f"(chance {chance:.3f}); seconds per query once the training side is cached.",
        "",
        table(methods),
        "",
        "**Speed.** Steps/s and training time from the run's loss log (denoiser only; the "
        "CLAP stage is not logged).",
        "",
        table(timing),
    ])
    print(body)
    if not args.no_write:
        print(f"\nwrote {write_section('quality', body)}")


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
                          mask=torch.from_numpy(np.asarray(store.mask[r], dtype=bool)),
                          caption=row["caption"], source=str(audio_path(manifest, row)))
            t0 = time.perf_counter()
            scores, _ = method.scores(query)
            secs.append(time.perf_counter() - t0)
            order = np.argsort(-scores, kind="stable")
            top1.append(train_art[order[0]] == row["artist"])
            top5.append(np.mean(train_art[order[:5]] == row["artist"]))
        out.append({"method": name, "top-1 same artist": float(np.mean(top1)),
                    "top-5 same artist": float(np.mean(top5)),
                    "s per query": float(np.median(secs[1:] or secs))})
    return pd.DataFrame(out)


def _chroma_hold(run, manifest: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    sr = run.features.sample_rate
    return np.stack([chroma_mfcc(track_audio(run, manifest, r, sr), sr) for r in rows])


if __name__ == "__main__":
    main()
