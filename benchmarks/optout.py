"""Opt-out benchmark: unlearn two artists with every method, audited against retraining.

Builds the demo corpus, trains the demo-scale model, opts each artist out with every registered
method, retrains without each artist (the gold standard) and writes the audit tables into
docs/benchmarks.md (the `optout` section; other sections are kept). Every stage is cached
under --work, so an interrupted run resumes where it stopped.

    .venv/bin/python benchmarks/optout.py            # full scale (about an hour on 2 cores)
    .venv/bin/python benchmarks/optout.py --quick    # reduced check (about 15 minutes)

The same audit of the autoregressive reference (No Encore's setting: a MusicGen-architecture
model), into the `optout-ar` section, with an ar-reference run trained on the same corpus:

    linernotes train --family ar-reference --corpus demo/corpus -o demo/ar --seconds 6 \
        --batch-size 16
    .venv/bin/python benchmarks/optout.py --corpus demo/corpus --run demo/ar
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import platform
import re
import time
from pathlib import Path

import torch

from bench_docs import write_section
from linernotes.cli.demo import DEMO_ARTISTS, DemoSettings
from linernotes.corpus.build import build_corpus
from linernotes.evaluation.audit import EMBEDDERS, AuditSettings, audit
from linernotes.models.clap import ClapSettings
from linernotes.models.denoiser import DenoiserConfig
from linernotes.models.mel import FeatureSettings
from linernotes.models.reference import train
from linernotes.run import load_run
from linernotes.training import TrainSettings
from linernotes.unlearning.trainer import available_methods, method_settings, optout

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Scale:
    """Corpus, model training, unlearning and audit sizes of one benchmark scale."""

    name: str
    corpus_size: int
    clap: ClapSettings
    train: TrainSettings
    method_overrides: dict
    audit: AuditSettings


DEMO = DemoSettings()
FEATURES = FeatureSettings(seconds=DEMO.seconds, hop_length=750)  # 128 frames x 64 mels
FULL = Scale("full", DEMO.size, ClapSettings(), TrainSettings(), {}, AuditSettings(pairs=0))
QUICK = Scale(
    "quick",
    96,
    ClapSettings(steps=100),
    TrainSettings(steps=300, batch_size=16, checkpoint_every=100),
    {"steps": 20},
    AuditSettings(prompts=4, other_prompts=8, generate_steps=10, pairs=0, max_retain=48,
                  score_timesteps=5, score_stride=200),
)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def proxies(table) -> str:
    """How far the retrained model's forget loss is from what a method could aim at without it."""
    rows = table.set_index("model")
    o, r = rows.loc["original"], rows.loc["retrained"]
    target = float(r["forget_loss"])
    guesses = {
        "the original's forget loss × its holdout/retain loss ratio (the stop_at_gap target)":
            float(o["forget_loss"] * o["holdout_loss"] / o["retain_loss"]),
        "the original's mean holdout loss (other artists)": float(o["holdout_loss"]),
    }
    text = "; ".join(f"{name}: {value:.3f} ({value / target - 1:+.1%})"
                     for name, value in guesses.items())
    return (f"Retraining puts the forget loss at {target:.3f}. Aims that need no retraining: "
            f"{text}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced scale (a check)")
    parser.add_argument("--work", type=Path, default=None, help="cache folder")
    parser.add_argument("--artists", nargs="+", default=["J.S. Bach", "O'Neill's Music of Ireland"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="an existing corpus folder instead of building the demo's")
    parser.add_argument("--run", type=Path, default=None,
                        help="an existing run (any family) instead of training the reference; "
                        "a run of another family writes its own section (optout-<family>)")
    parser.add_argument("--basic-pitch", action="store_true",
                        help="add a basic-pitch Fréchet distance (Griffin-Lim per clip: slow)")
    args = parser.parse_args()
    if args.basic_pitch:
        from linernotes.attribution.similarity import basic_pitch_frames

        EMBEDDERS["basic_pitch"] = basic_pitch_frames
    scale = QUICK if args.quick else FULL
    work = args.work or ROOT / "runs" / f"bench-optout-{scale.name}"
    started = time.perf_counter()

    if args.corpus:
        manifest = args.corpus / "manifest.parquet"
    else:
        print(f"== corpus ({scale.corpus_size} excerpts of {DEMO.seconds:g} s)")
        corpus = build_corpus(work / "corpus", scale.corpus_size, DEMO.seconds, DEMO.seed,
                              list(DEMO_ARTISTS), progress=False)
        manifest = corpus.manifest_path
    print("== model")
    t0 = time.perf_counter()
    if args.run:
        run = load_run(args.run)
    else:
        run = train(manifest, work / "run", scale.train, DenoiserConfig(), FEATURES,
                    clap_settings=scale.clap)
    loss = run.config["final_loss"]
    print(f"   {time.perf_counter() - t0:.0f} s (~0 if cached); final loss {loss:.4f}")
    family = run.family.name
    section = "optout" if family == "reference" else f"optout-{family}"
    # methods that steer a diffusion model's noise prediction do not apply to other families
    diffusion_only = {"concept_ablation", "siss"} if run.task.deterministic else set()
    methods = args.methods or sorted(set(available_methods()) - diffusion_only)
    if args.run:
        work = work / f"{family}-{run.hash}"

    sections = []
    for artist in args.artists:
        print(f"== {artist}")
        unlearned = []
        for method in methods:
            t0 = time.perf_counter()
            settings = method_settings(method, scale.method_overrides)
            folder = work / "unlearned" / slug(artist) / f"{method}-{settings.hash()[:8]}"
            unlearned.append(optout(run, manifest, f"artist={artist}", method, settings, folder,
                                    progress=False))
            print(f"   {method}: {time.perf_counter() - t0:.1f} s")
        result = audit(run, unlearned, manifest, f"artist={artist}",
                       work / "audit" / slug(artist), settings=scale.audit)
        print(result.markdown())
        passing = [m for m, ok in result.passed.items() if ok]
        sections.append(f"### {artist}: {len(result.forget.forget_ids)} training tracks removed "
                        f"(of {len(result.forget.forget_ids) + len(result.forget.retain_ids)})\n\n"
                        + f"**Passes: {', '.join(passing) or 'none'}.** " + proxies(result.table)
                        + "\n\n" + result.markdown() + "\n")

    minutes = (time.perf_counter() - started) / 60
    cmd = "benchmarks/optout.py" + (" --quick" if args.quick else "") + (
        f" --corpus {args.corpus} --run {args.run}" if args.run else "")
    steps = run.config["train"]["steps"]
    title = ("## Opt-out: unlearning an artist, audited against retraining" if family == "reference"
             else f"## Opt-out on the autoregressive reference ({family}), audited against "
             "retraining")
    body = "\n".join([
        title,
        "",
        f"`.venv/bin/python {cmd}` ({scale.name} scale: {scale.corpus_size}-excerpt demo corpus, "
        f"{steps} training steps, method settings = defaults"
        + (f" with {scale.method_overrides}" if scale.method_overrides else "")
        + f"); {dt.date.today()}, {platform.machine()}, torch on {torch.get_num_threads()} "
        f"thread(s); {minutes:.0f} min wall clock for this invocation, whose stages cached by "
        "earlier invocations cost nothing (each model's own time is in its table's Seconds).",
        "",
        "Each table has one row per model: the original, the model retrained without the "
        "artist (the reference a method should land near on forgetting), and each unlearning "
        "method. Losses are at fixed draws (the same timesteps and noise for every model); "
        "MIA AUC is a loss-based membership test of the forget tracks against held-out tracks "
        "(0.5 = indistinguishable); generation metrics use CLAP-audio embeddings of clips from "
        "the same prompts and noise; cost is wall-clock seconds and the fraction of the "
        "retraining time.",
        "",
        f"A method passes when it lands within the stated distance of the retrained model on "
        f"forgetting (forget loss within ±{scale.audit.forget_tol:.0%} of the retrained model's; "
        f"MIA AUC within ±{scale.audit.auc_tol:.2f} of its; the CLAP similarity of the artist's "
        f"prompts' generations keeps at most {scale.audit.resemblance_tol:.0%} of the original's "
        f"excess over the retrained model's) while keeping utility near the original (retain "
        f"and holdout loss at most +{scale.audit.utility_tol:.0%}). "
        + ("concept_ablation's step count (200) was chosen on the J.S. Bach audit, so its J.S. "
           "Bach row is in-sample and its O'Neill's row is the out-of-sample check."
           if family == "reference" else
           f"Losses are the model's next-token cross-entropy (no draws). Not run: "
           f"{', '.join(sorted(diffusion_only))} (they steer a diffusion model's noise "
           "prediction)."),
        "",
        "Each artist's heading also gives two aims for the forget loss that a method could use "
        "without retraining (a stopping rule's target). Where both miss the retrained model's "
        "forget loss by more than the tolerance, no stopping rule built on them can land every "
        "artist within it: how much higher an unseen artist's loss is than a seen one's depends "
        "on how unlike the other artists it is, which only retraining shows.",
        "",
        *sections,
    ])
    write_section(section, body, args.doc)
    print(f"wrote {args.doc} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
