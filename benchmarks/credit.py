"""Artist-level credit benchmark: every group-credit method against LOGO retraining.

Builds the 8-artist demo corpus at the opt-out benchmark's quick scale (96 excerpts of 6 s, 300
training steps: one retrain takes a few minutes on one thread), trains the model, generates 24
queries (8 prompts naming one artist, 8 naming two, 8 naming none), retrains the model without
each artist (LOGO, the gold standard) and compares every method's artist ranking with LOGO's,
writing the `credit` section of docs/benchmarks.md. Every stage is cached under --work, so an
interrupted run resumes where it stopped (the model and corpus are those of
`benchmarks/optout.py --quick`: `--work runs/bench-optout-quick` reuses them and its two
retrains).

    .venv/bin/python benchmarks/credit.py            # evaluation scale (about 1-2 h, 1 thread)
    .venv/bin/python benchmarks/credit.py --quick    # smoke test at a tiny scale (minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from bench_docs import table, write_section
from linernotes.attribution.front import query_from_spec
from linernotes.cli.demo import DEMO_ARTISTS
from linernotes.clips import generate
from linernotes.corpus.build import build_corpus
from linernotes.credit import CreditSettings, evaluate_credit, groups, logo_runs
from linernotes.credit.unlearn import OPTOUT_BUDGET, NewtonGroupSettings
from linernotes.data.manifest import read_manifest
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.mel import FeatureSettings
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.training import TrainSettings
from linernotes.unlearning.trainer import available_methods

ROOT = Path(__file__).resolve().parents[1]
GUDA = {"top1": 0.727, "ndcg@3": 0.677}  # GUDA on CIFAR-10 classes (SPEC §7)

NO_ARTIST = (
    "A slow piece played on piano, in C major, 4/4 time.",
    "A lively dance tune on fiddle, in D major, 6/8 time.",
    "A folk song on flute, in G major, 2/4 time.",
    "A choral piece for voices at a slow tempo, in F major.",
    "A fast tune on accordion, in A minor.",
    "A melody on strings at a moderate tempo, in E minor, 3/4 time.",
    "A hymn played on church organ, in B-flat major.",
    "A short piece on plucked strings, lively tempo.",
)


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    corpus_size: int
    seconds: float
    artists: tuple[str, ...]
    features: FeatureSettings
    model: DenoiserConfig
    clap: ClapSettings
    train: TrainSettings
    per_kind: int  # prompts per kind (one artist, two artists, none)
    generate: GenerateSettings
    score: CreditSettings
    optout: dict  # opt-out budget per group
    newton: dict
    unlearning: dict  # per-track unlearning (unlearning-sum)
    gradients: dict  # per-track gradients (trak-sum)


EVAL = Scale(
    "eval", 96, 6.0, DEMO_ARTISTS, FeatureSettings(seconds=6.0, hop_length=750),
    DenoiserConfig(), ClapSettings(steps=100),
    TrainSettings(steps=300, batch_size=16, checkpoint_every=100), 8,
    GenerateSettings(steps=25), CreditSettings(elbo_timesteps=32, elbo_noise=1), OPTOUT_BUDGET,
    {}, {"draws": 256}, {},
)
QUICK = Scale(
    "quick", 24, 2.0, DEMO_ARTISTS[:3], FeatureSettings(seconds=2.0, hop_length=750, n_mels=32),
    DenoiserConfig(layers=2, heads=2, head_dim=16, kv_heads=1, cross_dim=32, time_proj_dim=32,
                   max_words=12),
    ClapSettings(dim=32, hidden=32, layers=2, steps=20, batch_size=16),
    TrainSettings(steps=20, batch_size=8, warmup=5, checkpoint_every=100), 1,
    GenerateSettings(steps=4, griffin_lim_iters=2),
    CreditSettings(timesteps=4, stride=200, elbo_timesteps=4, elbo_noise=1),
    {"steps": 2, "batch_size": 4, "retain_batch_size": 4}, {"draws": 4},
    {"draws": 8, "probe_draws": 8},
    {"projection_dim": 64, "timesteps": 2, "stride": 400, "query_draws": 4},
)


def prompts(manifest: pd.DataFrame, artists: list[str], n: int) -> list[tuple[str, str]]:
    """(kind, prompt): n naming one artist (its holdout caption), n naming two, n naming none."""
    out = []
    for a in artists[:n]:
        rows = manifest[manifest["artist"] == a].sort_values(["split", "track_id"])
        out.append(("one artist", str(rows["caption"].iloc[0])))  # "holdout" sorts first
    pairs = [(i, (i + 1) % len(artists)) for i in range(0, len(artists), 2)]
    pairs += [(i, (i + len(artists) // 2) % len(artists)) for i in range(len(artists))]
    for i, j in list(dict.fromkeys(pairs))[:n]:
        out.append(("two artists", f"A piece in the style of {artists[i]} and {artists[j]}."))
    out += [("no artist", p) for p in NO_ARTIST[:n]]
    return out


def method_specs(scale: Scale, names: list[str] | None) -> dict:
    optouts = {m: (m, scale.optout) for m in sorted(available_methods())}
    specs = {"newton": ("newton", scale.newton), **optouts,
             "unlearning-sum": ("unlearning-sum", scale.unlearning),
             "trak-sum": ("trak-sum", scale.gradients), "clap-centroid": "clap-centroid"}
    return {k: v for k, v in specs.items() if names is None or k in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke scale")
    parser.add_argument("--work", type=Path, default=None, help="cache folder")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method")
    parser.add_argument("--doc", type=Path, default=None,
                        help="default: docs/benchmarks.md (quick: <work>/credit.md)")
    args = parser.parse_args()
    scale = QUICK if args.quick else EVAL
    work = args.work or ROOT / "runs" / f"bench-credit-{scale.name}"
    doc = args.doc or (work / "credit.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    started = time.perf_counter()

    print(f"== corpus ({scale.corpus_size} excerpts of {scale.seconds:g} s, "
          f"{len(scale.artists)} artists)", flush=True)
    corpus = build_corpus(work / "corpus", scale.corpus_size, scale.seconds, 0,
                          list(scale.artists), progress=False)
    manifest = read_manifest(corpus.manifest_path)
    print("== model", flush=True)
    t0 = time.perf_counter()
    run = train(manifest, work / "run", scale.train, scale.model, scale.features,
                clap_settings=scale.clap)
    print(f"   {time.perf_counter() - t0:.0f} s (~0 if cached); final loss "
          f"{run.config['final_loss']:.4f}", flush=True)
    artists = list(groups(manifest, run, "artist"))

    print("== queries", flush=True)
    kinds = prompts(manifest, artists, scale.per_kind)
    listing = work / "queries.json"
    known = json.loads(listing.read_text()) if listing.exists() else {}
    if known.get("run") != run.hash or [k["prompt"] for k in known.get("queries", [])] != [
            p for _, p in kinds] or not all(Path(k["path"]).exists() for k in known["queries"]):
        paths = generate(run, [p for _, p in kinds], work / "clips", 0, scale.generate,
                         progress=False)
        known = {"run": run.hash, "queries": [{"kind": k, "prompt": p, "path": str(path)}
                                              for (k, p), path in zip(kinds, paths)]}
        listing.write_text(json.dumps(known, indent=2))
    store = run.feature_store(manifest, progress=False)
    queries = [query_from_spec(k["path"], run, store, manifest) for k in known["queries"]]
    info = {q.key: k for q, k in zip(queries, known["queries"])}
    print(f"   {len(queries)} clips: " + ", ".join(
        f"{n} {k}" for k, n in pd.Series([k["kind"] for k in info.values()]).value_counts()
        .items()))

    print("== LOGO: retraining without each artist", flush=True)
    t0 = time.perf_counter()
    retrained = logo_runs(run, manifest, "artist")
    logo_seconds = sum(s for _, s in retrained.values())
    print(f"   {time.perf_counter() - t0:.0f} s now; {logo_seconds:.0f} s of retraining in all",
          flush=True)

    print("== methods vs LOGO", flush=True)
    specs = method_specs(scale, args.methods)
    summary, detail = evaluate_credit(run, manifest, queries, specs, "artist", scale.score,
                                      work / "evaluation")
    print(summary.round(3).to_string(index=False), flush=True)
    minutes = (time.perf_counter() - started) / 60
    write_section("credit", section(scale, args, summary, detail, info, manifest, artists,
                                    logo_seconds, minutes), doc)
    print(f"wrote {doc} ({minutes:.1f} min)")


def section(scale: Scale, args, summary: pd.DataFrame, detail: pd.DataFrame, info: dict,
            manifest: pd.DataFrame, artists: list[str], logo_seconds: float,
            minutes: float) -> str:
    """The Markdown section: setup, the comparison table, Top-1 per prompt kind, GUDA."""
    detail = detail.assign(kind=detail["query"].map(lambda q: info[q]["kind"]))
    cols = ["method", "top1", "ndcg@3", "ndcg@3_centred", "spearman", "mrr", "ndcg_queries",
            "seconds", "fraction_of_logo"]
    view = summary[cols].copy()
    view["fraction_of_logo"] = view["fraction_of_logo"].map(lambda x: f"{100 * x:.1f}%")
    view["seconds"] = view["seconds"].map(lambda x: f"{x:.0f}")
    view = view.rename(columns={"top1": "Top-1", "mrr": "MRR", "spearman": "Spearman",
                                "ndcg_queries": "queries with NDCG", "fraction_of_logo":
                                "cost / LOGO"})
    per_kind = detail.pivot_table(index="method", columns="kind", values="top1",
                                  aggfunc="mean", sort=False).reset_index()
    ranked = summary[summary["method"] != "logo"].sort_values(["top1", "ndcg@3"],
                                                              ascending=False)
    best = ranked.iloc[0]
    one = detail[(detail["method"] == "logo") & (detail["kind"] == "one artist")]
    named = [next((a for a in artists if a in info[q]["prompt"]), None) for q in one["query"]]
    hits = sum(a == t for a, t in zip(named, one["logo_top"]))
    cmd = "benchmarks/credit.py" + (" --quick" if args.quick else "")
    n_train = len(manifest[manifest["split"] == "train"])
    return "\n".join([
        "## Artist-level credit: unlearning each artist vs leave-one-artist-out retraining",
        "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python {cmd}` ({scale.name} scale: {scale.corpus_size}"
        f"-excerpt demo corpus of {len(artists)} artists ({n_train} training tracks), "
        f"{scale.train.steps} training steps: "
        + ("a smoke test, the numbers mean nothing" if args.quick else
           "the opt-out benchmark's quick scale, chosen so that each of the "
           f"{len(artists)} LOGO retrains takes a few minutes on one thread")
        + f"; {logo_seconds / max(len(artists), 1) / 60:.1f} min per retrain here); "
        f"{dt.date.today()}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads, {minutes:.0f} min wall "
        "clock for this invocation (cached stages excluded).",
        "",
        f"{len(info)} generated clips (prompts naming one artist, two artists or none). "
        f"LOGO credit of an artist = the clip's loss increase ({scale.score.timesteps} fixed "
        "timesteps, noise keyed "
        "by the clip) when the model is retrained without the artist (same recipe, seed and "
        "CLAP). Each method ranks the artists for each clip: group unlearning (`newton`: one "
        "Fisher/Newton step per artist, α chosen so the artist's own loss rises "
        f"×{NewtonGroupSettings(**scale.newton).target_ratio:g}; the "
        f"opt-out methods with {scale.optout}), `[elbo]` rows rank by the ELBO-style estimate "
        f"({scale.score.elbo_timesteps} timesteps) instead, and the baselines sum per-track "
        "scores (`unlearning-sum`, "
        "`trak-sum`) or compare CLAP embeddings with each artist's centroid. NDCG@3 uses "
        "LOGO's positive loss increases as gains (clips where no artist has one are left out: "
        "*queries with NDCG*); `ndcg@3_centred` uses increases over the median artist. Cost: "
        "seconds of unlearning every artist plus scoring every clip, and its fraction of "
        f"LOGO's {logo_seconds:.0f} s of retraining (the `-sum` baselines count their per-clip "
        "work only: training-side features and losses are computed once per run and cached).",
        "",
        table(view, ".3f"),
        "",
        "Top-1 agreement with LOGO by prompt kind:",
        "",
        table(per_kind, ".2f"),
        "",
        f"LOGO's top artist is the named artist for {hits} of {len(one)} one-artist prompts "
        "(a check of the gold standard's own signal at this scale).",
        "",
        f"**Best method: {best['method']}**, Top-1 agreement {100 * best['top1']:.1f}% and "
        f"NDCG@3 {best['ndcg@3']:.3f} against LOGO, at {100 * best['fraction_of_logo']:.1f}% of "
        f"LOGO's compute ({best['seconds']:.0f} s vs {logo_seconds:.0f} s). GUDA reports "
        f"{100 * GUDA['top1']:.1f}% and {GUDA['ndcg@3']:.3f} on CIFAR-10 classes at ~1% of "
        "LOGO's cost (SPEC §7): different data, model and groups (10 image classes there, "
        f"{len(artists)} artists of ~{n_train // len(artists)} excerpts here), so the numbers "
        "place ours beside theirs, they do not rank them.",
    ])


if __name__ == "__main__":
    main()
