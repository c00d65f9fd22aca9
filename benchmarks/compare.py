"""Is the attribution right? Unlearning against the best similarity and gradient methods and random,
judged by retraining: leave-K-out ΔL, LDS with its noise ceiling, and self-rank.

Evaluation scale (chosen so that the whole comparison fits in about two hours on 2 CPU cores):
a 96-excerpt demo corpus (6 s), 64 frames x 64 mels, a 3-block DiT, 200 training steps of 16
(one retrain ≈ a minute). Stages, every one cached under --work and resumable after a kill:

1. corpus, CLAP and the base model (its training time = the cost of one retrain);
2. generated queries: the evaluated ones, and separate tuning queries;
3. LDS subset models (random halves, recipe seed) + extra seeds of the full model (ceiling);
4. tuning on the tuning queries only (their LDS): the unlearning grid, and which similarity and
   which gradient method count as "the best" of their family;
5. score tables of the evaluated queries for unlearning, the chosen methods and random scores;
6. self-rank on training tracks; leave-K-out retraining (K random as the control);
7. the `compare` section of docs/benchmarks.md and the two plots (score over ranks, correlation).

    .venv/bin/python benchmarks/compare.py --estimate   # base model only: retrain count and time
    .venv/bin/python benchmarks/compare.py              # the full comparison (background it)
    .venv/bin/python benchmarks/compare.py --quick      # tiny end-to-end check (a few minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_docs import table as md_table
from bench_docs import write_section
from linernotes.artifacts import read_json, write_json
from linernotes.attribution.front import query_from_spec
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.scores import read_scores, score_table, write_scores
from linernotes.cli.demo import DEMO_ARTISTS, DemoSettings
from linernotes.clips import generate
from linernotes.corpus.build import build_corpus
from linernotes.evaluation.counterfactual import RANDOM, EvalDraws, leave_k_out
from linernotes.evaluation.grid import LdsMetric, best_point, grid_points, grid_search
from linernotes.evaluation.lds import (
    LdsSettings,
    ceiling_pairs,
    ceiling_variance,
    lds_table,
    subset_losses,
)
from linernotes.evaluation.quality import artist_centroids, assignment_accuracy
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.mel import FeatureSettings
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.run import Retrainer
from linernotes.training import TrainSettings
from linernotes.unlearning.newton import UnlearnSettings

ROOT = Path(__file__).resolve().parents[1]
DEMO = DemoSettings()


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    corpus_size: int
    features: FeatureSettings
    model: DenoiserConfig
    clap: ClapSettings
    train: TrainSettings
    queries: int  # evaluated generated queries
    tuning: int  # held-out generated queries for tuning
    ks: tuple[float, ...]
    lds: LdsSettings
    self_rank: int  # training tracks as self-influence queries
    unlearn: UnlearnSettings
    score: ScoreSettings
    draws: EvalDraws
    generate_steps: int
    grid: dict
    similarity: tuple[str, ...]  # candidates for "the best similarity method"
    gradient: tuple[str, ...]  # candidates for "the best gradient method"
    gradient_overrides: dict


FEATURES = FeatureSettings(seconds=DEMO.seconds, hop_length=1500)  # 64 frames x 64 mels
EVAL = Scale(
    "evaluation", 96, FEATURES,
    DenoiserConfig(layers=3, heads=4, head_dim=24, time_proj_dim=128),
    ClapSettings(steps=150),
    TrainSettings(steps=200, batch_size=16, warmup=20, checkpoint_every=50),
    queries=10, tuning=4, ks=(0.05, 0.1),
    lds=LdsSettings(subsets=16, extra_seeds=2, paired_subsets=8),
    self_rank=5, unlearn=UnlearnSettings(draws=512), score=ScoreSettings(),
    draws=EvalDraws(), generate_steps=25,
    grid={"group": ["transformer", "self_attn", "cross_attn"], "mask_train": [False, True]},
    similarity=("clap-audio", "clap-text", "chroma-mfcc", "lpips-dit"),
    gradient=("trak", "dtrak", "tracin", "fisher-influence", "representer"),
    gradient_overrides={"projection_dim": 1024},
)
QUICK = Scale(
    "quick", 48, FEATURES,
    DenoiserConfig(layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=64, time_proj_dim=64),
    ClapSettings(steps=30, batch_size=16),
    TrainSettings(steps=30, batch_size=8, warmup=5, checkpoint_every=10),
    queries=2, tuning=1, ks=(0.1, 0.2),
    lds=LdsSettings(subsets=4, extra_seeds=1, paired_subsets=3),
    self_rank=2, unlearn=UnlearnSettings(draws=32, probe_draws=8, batch_size=32),
    score=ScoreSettings(timesteps=4, stride=200), draws=EvalDraws(timesteps=4, stride=200,
                                                                  noises=2),
    generate_steps=4, grid={"group": ["transformer", "self_attn"]},
    similarity=("clap-audio", "chroma-mfcc"), gradient=("trak", "tracin"),
    gradient_overrides={"projection_dim": 256, "timesteps": 4, "stride": 200,
                        "query_draws": 16},
)


def retrain_count(s: Scale, methods: int = 3) -> tuple[int, int]:
    """(leave-K-out retrains, LDS retrains) the comparison needs (before cache sharing)."""
    lko = s.queries * (methods + 1) * len(s.ks)
    lds = s.lds.subsets + s.lds.extra_seeds + s.lds.paired_subsets * s.lds.paired_seeds
    return lko, lds


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- methods (one switch point)


def method_scores(name: str, run, manifest, queries, out_dir: Path, base=None,
                  overrides=None) -> pd.DataFrame:
    """Score tables of method `name` for `queries` (cached per query in `out_dir`)."""
    from linernotes.attribution.methods import make_attributor

    todo = [q for q in queries if not (out_dir / f"{q.key}.parquet").exists()]
    if todo:
        att = make_attributor(name, run, manifest, base=base, overrides=overrides,
                              progress=False)
        for q in todo:
            att.attribute(q, out_dir)
    return pd.concat([read_scores(out_dir / f"{q.key}.parquet") for q in queries],
                     ignore_index=True)


def folder(root: Path, name: str, settings=None) -> Path:
    """A score folder named by the method and a hash of its settings (stale tables never mix)."""
    from linernotes.artifacts import hash_json

    if not settings:
        return root / name
    plain = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in settings.items()}
    return root / f"{name}-{hash_json(plain)[:8]}"


def random_scores(run, manifest, queries, out_dir: Path) -> pd.DataFrame:
    """Seeded standard-normal scores per query: the 'random' method."""
    _, _, ids = run.train_set(manifest, progress=False)
    parts = []
    for i, q in enumerate(queries):
        path = out_dir / f"{q.key}.parquet"
        if not path.exists():
            rng = np.random.default_rng(10_000 + i)
            write_scores(score_table(q.key, RANDOM, ids, rng.standard_normal(len(ids)),
                                     manifest), path, {"query": q.key, "method": RANDOM,
                                                       "seconds": 0.0})
        parts.append(read_scores(path))
    return pd.concat(parts, ignore_index=True)


def seconds_per_query(out_dir: Path, queries) -> float:
    """Median over queries of the seconds a method's records report."""
    vals = []
    for q in queries:
        rec = read_json(out_dir / f"{q.key}.json")
        vals.append(sum(float(v) for k, v in rec.items() if k.startswith("seconds")
                        and isinstance(v, (int, float))))
    return float(np.median(vals)) if vals else math.nan


# ---------------------------------------------------------------- stages


def base_model(s: Scale, work: Path):
    say(f"== corpus ({s.corpus_size} excerpts of {DEMO.seconds:g} s)")
    corpus = build_corpus(work / "corpus", s.corpus_size, DEMO.seconds, DEMO.seed,
                          list(DEMO_ARTISTS), progress=False)
    manifest = corpus.manifest
    manifest.attrs.update(root=str(work / "corpus"), path=str(corpus.manifest_path))
    say("== base model")
    timing = work / "base_seconds.json"
    t0 = time.perf_counter()
    # the CLAP is trained first (once); the denoiser's training time is one retrain's cost
    from linernotes.models.reference import train_clap

    train_clap(manifest, work / "clap", s.clap, s.features, progress=False)
    t1 = time.perf_counter()
    run = train(manifest, work / "run", s.train, s.model, s.features, clap=work / "clap",
                progress=False)
    if not timing.exists():
        write_json(timing, {"clap": t1 - t0, "denoiser": time.perf_counter() - t1})
    seconds = read_json(timing)["denoiser"]
    say(f"   run {run.hash}: final loss {run.config['final_loss']:.4f}; one denoiser training "
        f"(= one retrain) took {seconds:.0f} s")
    return manifest, run, seconds


def make_queries(s: Scale, run, manifest, work: Path):
    """Generated clips: the evaluated queries, then the tuning queries (other prompts/seeds)."""
    folder = work / f"queries-{run.hash}"
    index = folder / "queries.json"
    if not index.exists():
        rng = np.random.default_rng(0)
        order = rng.permutation(len(manifest))[: s.queries + s.tuning]
        prompts = [str(manifest["caption"].iloc[i]) for i in order]
        seeds = [100 + i for i in range(len(prompts))]
        paths = generate(run, prompts, folder, seeds, GenerateSettings(steps=s.generate_steps),
                         progress=False)
        write_json(index, {"paths": [str(p) for p in paths],
                           "artists": [str(manifest["artist"].iloc[i]) for i in order]})
    info = read_json(index)
    store = run.feature_store(manifest, progress=False)
    queries = [query_from_spec(p, run, store, manifest) for p in info["paths"]]
    return queries[: s.queries], queries[s.queries:], info["artists"]


def model_check(run, manifest, queries, artists) -> str:
    """Does the model learn its data? train vs holdout loss, artist accuracy of its clips."""
    from linernotes.attribution.embeddings import audio_embeddings, track_embeddings
    from linernotes.attribution.losses import track_losses
    from linernotes.data.dataset import TrackDataset, split_rows

    store, train_ds, _ = run.train_set(manifest, progress=False)
    hold = TrackDataset(store, manifest, split_rows(manifest, "holdout"))
    sc = ScoreSettings(timesteps=10, stride=100)
    l_train = float(track_losses(run.task, run.model, train_ds, sc).mean())
    l_hold = float(track_losses(run.task, run.model, hold, sc).mean())
    emb = track_embeddings(run, store, train_ds.rows)
    cents = artist_centroids(emb, manifest["artist"].to_numpy()[train_ds.rows])
    gen = np.concatenate([audio_embeddings(run, q.features[None], q.mask[None])
                          for q in queries])
    acc, chance = assignment_accuracy(gen, artists[: len(queries)], cents)
    return (f"final training loss {run.config['final_loss']:.3f}; loss at fixed draws: train "
            f"tracks {l_train:.3f}, holdout tracks {l_hold:.3f}; generated queries assigned "
            f"to their prompt's artist (CLAP, nearest train centroid): {acc:.0%} (chance "
            f"{chance:.0%})")


def pick_best(names, run, manifest, tuning, tuning_data, work: Path, overrides=None) -> tuple:
    """The candidate with the highest mean LDS on the tuning queries, and every candidate's."""
    results = {}
    for name in names:
        try:
            df = method_scores(name, run, manifest, tuning, folder(work / "tuning", name,
                                                                   overrides), overrides=overrides)
        except Exception as exc:  # a method that cannot run here is reported, not fatal
            say(f"   {name}: skipped ({exc})")
            continue
        results[name] = float(lds_table(tuning_data, df)["lds"].mean())
        say(f"   {name}: tuning LDS {results[name]:.3f}")
    if not results:
        raise SystemExit("No candidate method could run.")
    return max(results, key=results.get), results


def summarise(lko: pd.DataFrame, lds: pd.DataFrame, self_rank: dict, secs: dict,
              methods: list[str], ks, n_train: int) -> tuple[pd.DataFrame, list[str]]:
    """The one table (per method) and sentences on where unlearning wins or not."""
    rows = []
    for m in [*methods, RANDOM]:
        row = {"method": m}
        for k in ks:
            d = lko[(lko["method"] == m) & (lko["k_spec"] == str(k))]["delta_loss"] * 1e3
            kk = f"K={k:g} ({int(round(k * n_train)) if k < 1 else int(k)})"
            row[f"ΔL×1e-3 {kk}"] = (f"{d.mean():.2f} ± {d.std(ddof=1) / math.sqrt(len(d)):.2f}"
                                    if len(d) > 1 else (f"{d.mean():.2f}" if len(d) else "—"))
        big = lko[(lko["method"] == m) & (lko["k_spec"] == str(ks[-1]))]
        row[f"clip change K={ks[-1]:g} (MSE)"] = (f"{big['delta_gen'].mean():.4f}"
                                                  if len(big) else "—")
        sub = lds[lds["method"] == m]["lds"]
        row["LDS"] = f"{sub.mean():.3f} ± {sub.std(ddof=0):.3f}" if len(sub) else "—"
        row["self-rank"] = f"{self_rank[m]:.1f}" if m in self_rank else "—"
        row["s/query"] = f"{secs[m]:.2g}" if m in secs else "—"
        rows.append(row)
    notes = []
    for k in ks:
        piv = lko[lko["k_spec"] == str(k)].pivot_table(index="query", columns="method",
                                                       values="delta_loss")
        if "unlearning" not in piv:
            continue
        for other in [c for c in piv.columns if c != "unlearning"]:
            diff = (piv["unlearning"] - piv[other]).dropna() * 1e3
            if len(diff) < 2:
                continue
            se = diff.std(ddof=1) / math.sqrt(len(diff))
            verdict = ("unlearning wins" if diff.mean() > 2 * se else
                       f"{other} wins" if diff.mean() < -2 * se else "no clear difference")
            notes.append(f"K={k:g}: ΔL(unlearning) − ΔL({other}) = {diff.mean():.2f} ± "
                         f"{se:.2f} ×1e-3 over {len(diff)} queries (paired): {verdict}.")
    piv = lds.pivot_table(index="query", columns="method", values="lds")
    for other in [c for c in piv.columns if c != "unlearning"] if "unlearning" in piv else []:
        diff = (piv["unlearning"] - piv[other]).dropna()
        if len(diff) < 2:
            continue
        se = diff.std(ddof=1) / math.sqrt(len(diff))
        verdict = ("unlearning wins" if diff.mean() > 2 * se else
                   f"{other} wins" if diff.mean() < -2 * se else "no clear difference")
        notes.append(f"LDS(unlearning) − LDS({other}) = {diff.mean():.3f} ± {se:.3f} over "
                     f"{len(diff)} queries (paired): {verdict}.")
    return pd.DataFrame(rows), notes


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end check")
    ap.add_argument("--estimate", action="store_true",
                    help="train the base model only; print the retrain count and time estimate")
    ap.add_argument("--work", type=Path, default=None, help="cache folder")
    ap.add_argument("--budget", type=int, default=None, help="most retrains in this invocation")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--plots", type=Path, default=None,
                    help="folder for the two plots (default: docs/img/compare; --quick: --work)")
    args = ap.parse_args()
    s = QUICK if args.quick else EVAL
    work = args.work or ROOT / "runs" / f"bench-compare-{s.name}"
    started = time.perf_counter()
    lko_n, lds_n = retrain_count(s)
    full_lko, full_lds = retrain_count(EVAL)
    say(f"== {s.name} scale: {lko_n} leave-K-out retrains ({s.queries} queries x 4 methods x "
        f"{len(s.ks)} K) + {lds_n} LDS retrains = {lko_n + lds_n} (the full comparison: "
        f"{full_lko + full_lds})")
    manifest, run, one = base_model(s, work)
    say(f"   estimate: {lko_n + lds_n} retrains x {one:.0f} s = "
        f"{(lko_n + lds_n) * one / 3600:.2f} h of retraining at this scale (plus scoring)")
    measured = ROOT / "runs" / f"bench-compare-{EVAL.name}" / "base_seconds.json"
    if s is not EVAL and measured.exists():
        full = read_json(measured)["denoiser"]
        say(f"   full comparison: {full_lko + full_lds} retrains x {full:.0f} s (measured by "
            f"--estimate) = {(full_lko + full_lds) * full / 3600:.2f} h of retraining")
    if args.estimate:
        return
    retrainer = Retrainer(run, manifest, work / "retrains", args.budget)
    n_train = len(retrainer.ids)

    say("== queries")
    evaluated, tuning, artists = make_queries(s, run, manifest, work)
    check = model_check(run, manifest, evaluated, artists)
    say(f"   {check}")

    say("== LDS subset models")
    eval_data = subset_losses(run, manifest, evaluated, work / "lds", s.lds, retrainer, s.draws,
                              log=say)
    if not eval_data.complete:
        raise SystemExit(f"Stopped with {eval_data.retrains_left} LDS retrains left; re-run.")
    tuning_data = subset_losses(run, manifest, tuning, work / "lds-tuning", s.lds, retrainer,
                                s.draws, log=say)

    say("== tuning on held-out queries (never the evaluated ones)")
    metric = LdsMetric(run, manifest, tuning, tuning_data)
    grid = grid_search(grid_points(s.grid, s.unlearn, s.score), metric, work / "grid",
                       evaluated=[q.key for q in evaluated], log=say)
    unlearn, score = best_point(grid)
    say(f"   unlearning: group={unlearn.group}, M_L={score.mask_train} (tuning LDS "
        f"{grid.iloc[0]['lds']:.3f})")
    sim, sim_lds = pick_best(s.similarity, run, manifest, tuning, tuning_data, work)
    grad, grad_lds = pick_best(s.gradient, run, manifest, tuning, tuning_data, work,
                               s.gradient_overrides)
    say(f"   best similarity: {sim}; best gradient: {grad}")

    say("== scores of the evaluated queries")
    methods = ["unlearning", sim, grad]
    base = {"unlearn": unlearn, "score": score}
    folders = {"unlearning": folder(work / "scores", "unlearning", base),
               sim: folder(work / "scores", sim), RANDOM: work / "scores" / RANDOM,
               grad: folder(work / "scores", grad, s.gradient_overrides)}
    tables = [method_scores("unlearning", run, manifest, evaluated, folders["unlearning"], base),
              method_scores(sim, run, manifest, evaluated, folders[sim]),
              method_scores(grad, run, manifest, evaluated, folders[grad],
                            overrides=s.gradient_overrides)]
    rand = random_scores(run, manifest, evaluated, folders[RANDOM])
    scores = pd.concat(tables, ignore_index=True)
    secs = {m: seconds_per_query(folders[m], evaluated) for m in methods}

    say("== self-rank (training tracks as queries)")
    store, _, ids = run.train_set(manifest, progress=False)
    picks = [ids[i] for i in np.linspace(0, len(ids) - 1, s.self_rank).round().astype(int)]
    tq = [query_from_spec(f"train:{t}", run, store, manifest) for t in picks]
    self_rank = {}
    for m in methods:
        df = method_scores(m, run, manifest, tq, folders[m].parent.parent / "self-rank"
                           / folders[m].name,
                           base if m == "unlearning" else None,
                           s.gradient_overrides if m == grad else None)
        self_rank[m] = float(np.mean([df[(df["query"] == q.key) & (df["track_id"] == q.key)]
                                      ["rank"].iloc[0] for q in tq]))
    self_rank[RANDOM] = (n_train + 1) / 2  # expected rank of any track under random scores

    say("== LDS")
    lds = lds_table(eval_data, pd.concat([scores, rand], ignore_index=True))
    c_pairs, c_var = ceiling_pairs(eval_data), ceiling_variance(eval_data)

    say("== leave-K-out")
    lko = leave_k_out(run, manifest, evaluated, scores, list(s.ks), work / "lko", retrainer,
                      s.draws, log=say)
    left = lko.attrs["retrains_left"]

    say("== plots")
    from linernotes.evaluation.compare import compare

    plots = args.plots or (work / "plots" if args.quick else ROOT / "docs" / "img" / "compare")
    cmp = compare([folders[m] for m in [*methods, RANDOM]], work / "compare")
    plots.mkdir(parents=True, exist_ok=True)
    for key in ("distribution_png", "correlation_png"):
        if key in cmp.files:
            shutil.copyfile(cmp.files[key], plots / Path(cmp.files[key]).name)
    pearson = cmp.correlations.get("pearson")

    table, notes = summarise(lko, lds, self_rank, secs, methods, s.ks, n_train)
    retrain_secs = [read_json(p)["seconds"] for p in (work / "retrains").glob("*/retrain.json")
                    if not read_json(p)["resumed"]]
    minutes = (time.perf_counter() - started) / 60
    rel = Path("img") / "compare"
    if args.doc.parent.resolve() != (ROOT / "docs").resolve() or args.quick:
        rel = plots
    cmd = "benchmarks/compare.py" + (" --quick" if args.quick else "")
    corr = ""
    if pearson is not None and "unlearning" in pearson:
        corr = ("Pearson correlation of each method's scores with unlearning's (mean over "
                "queries): " + ", ".join(f"{m} {pearson.loc['unlearning', m]:.2f}"
                                        for m in pearson.columns if m != "unlearning") + ".")
    body = "\n".join([
        "## Is the attribution right? Leave-K-out retraining and LDS",
        "",
        f"`.venv/bin/python {cmd}` ({s.name} scale: {s.corpus_size}-excerpt demo corpus, "
        f"{n_train} training tracks, {s.features.n_frames} frames x {s.features.n_mels} mels, "
        f"DiT {s.model.layers} blocks, {s.train.steps} steps of {s.train.batch_size}); "
        f"{dt.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"{minutes:.0f} min wall clock for this invocation (cached stages excluded).",
        "",
        f"Model check: {check}.",
        f"Retraining: one retrain (the base model's denoiser training) took {one:.0f} s; "
        f"{len(retrain_secs)} retrains in the cache took a median "
        f"{np.median(retrain_secs) if retrain_secs else math.nan:.0f} s"
        + (f"; **partial: {left} leave-K-out retrains left** (re-run to finish)" if left else "")
        + ".",
        "",
        f"{s.queries} generated queries (prompts: corpus captions, seeded) are evaluated; "
        f"{s.tuning} other generated queries tune the methods (never the evaluated ones): "
        f"unlearning's grid over {', '.join(s.grid)} chose group={unlearn.group}, "
        f"M_L={'on' if score.mask_train else 'off'}; the best similarity method by tuning LDS "
        f"is {sim} ({', '.join(f'{k} {v:.2f}' for k, v in sim_lds.items())}) and the best "
        f"gradient method {grad} ({', '.join(f'{k} {v:.2f}' for k, v in grad_lds.items())}).",
        "",
        md_table(table),
        "",
        f"ΔL: the query's loss (at {s.draws.timesteps} fixed timesteps x {s.draws.noises} "
        "noises, identical for both models) of the model retrained without the method's top-K "
        "tracks minus the original's, mean ± standard error over queries; random = K random "
        "tracks (seeded). Clip change: mean squared difference of the latents regenerated from "
        "the same noise and prompt, over real frames. LDS: Spearman over "
        f"{s.lds.subsets} models trained on random halves between −Σ scores over the half and "
        "the query's actual loss, mean ± std over queries (random = seeded random scores). "
        f"Noise ceiling: {c_var:.3f} (from {s.lds.extra_seeds} extra seeds of the full model: "
        "seed variance vs. variance over subsets, as a Spearman)"
        + (f"; {c_pairs:.3f} (Spearman between two seeds' losses over "
           f"{s.lds.paired_subsets} subsets)" if math.isfinite(c_pairs) else "")
        + ". Self-rank: the rank of a training track among all when it is the query "
        f"({s.self_rank} tracks; random: the expectation). s/query: median over queries of the "
        "seconds each score record reports (so the one-off training-side cost the first query "
        "pays, e.g. TRAK's training gradients or unlearning's baseline losses, is left out).",
        "",
        *[f"- {n}" for n in notes],
        "",
        corr,
        "",
        f"![score over ranks]({rel}/distribution.png) ![correlation]({rel}/correlation.png)",
    ])
    write_section("compare", body, args.doc)
    say(body)
    say(f"wrote {args.doc} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
