"""Planted memorisation: duplicate a few training tracks many times, generate from their
captions, and check that attribution by unlearning credits the planted track first.

    python benchmarks/planted.py --corpus demo/corpus --out demo/planted --planted 3 --copies 20

Trains a model like the demo's with the planted tracks repeated (`--duplicate`), so it takes
about as long as the demo's training. Writes the `planted` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.attribution.front import attribute_run
from linernotes.attribution.losses import score_of
from linernotes.clips import generate
from linernotes.data.dataset import split_rows
from linernotes.data.manifest import read_manifest
from linernotes.models.clap import ClapSettings
from linernotes.models.mel import FeatureSettings
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.training import TrainSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--out", type=Path, default=Path("demo/planted"))
    ap.add_argument("--planted", type=int, default=3)
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--clips", type=int, default=2, help="Generations per planted caption.")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clap", type=Path, default=Path("demo/run/clap"),
                    help="Reuse the demo's CLAP (it does not see the duplicates).")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    manifest = read_manifest(args.corpus)
    rows = split_rows(manifest, "train")
    # one planted track per artist, spread over artists, deterministic
    by_artist = manifest.iloc[rows].groupby("artist", sort=True).head(1)
    planted = by_artist["track_id"].tolist()[: args.planted]
    settings = TrainSettings(steps=args.steps, duplicate=tuple((t, args.copies) for t in planted))
    run = train(manifest, args.out / "run", settings,
                features=FeatureSettings(seconds=args.seconds),
                clap=args.clap if args.clap.exists() else None, clap_settings=ClapSettings())
    captions = manifest.set_index("track_id").loc[planted, "caption"].tolist()
    prompts = [c for c in captions for _ in range(args.clips)]
    seeds = list(range(len(prompts)))
    clips = generate(run, prompts, args.out / "clips", seeds, GenerateSettings(), progress=False)
    tables = attribute_run(run, manifest, [str(c) for c in clips], args.out / "scores")
    result = []
    for i, (clip, table) in enumerate(zip(clips, tables)):
        tid = planted[i // args.clips]
        pos = table.index[table["track_id"] == tid][0]
        row = {"planted track": tid, "artist": table["artist"][pos], "clip": clip.name}
        for kind in ("log-ratio", "delta"):
            sc = pd.Series(score_of(table["loss_before"], table["loss_after"], kind))
            ranks = sc.rank(ascending=False, method="min")
            row[f"rank ({kind})"] = int(ranks[pos])
            row[f"top-1 ({kind})"] = table["track_id"][int(np.argmax(sc.to_numpy()))]
        row["loss percentile"] = round(float((table["loss_before"]
                                              < table["loss_before"][pos]).mean()), 3)
        result.append(row)
    df = pd.DataFrame(result)
    print(df.to_string(index=False))

    def summary_of(column: str) -> str:
        ranks = df[column].to_numpy()
        return (f"ranked first for {int((ranks == 1).sum())}/{len(ranks)} generations, "
                f"mean rank {np.mean(ranks):.1f} of {len(rows)}")

    summary = (f"by log-ratio (the default score), the planted track "
               f"{summary_of('rank (log-ratio)')}; by delta (the papers' loss increase), "
               f"{summary_of('rank (delta)')}")
    print(summary)
    if not args.no_write:
        from bench_docs import table as md_table
        from bench_docs import write_section

        write_section("planted", f"""## Planted memorisation

`python benchmarks/planted.py --corpus {args.corpus} --out {args.out} --planted {args.planted} \\
--copies {args.copies} --clips {args.clips} --steps {args.steps}`: {args.planted} training
tracks (one per artist) each appear {args.copies}× in training; the model generates
{args.clips} clips from each planted track's caption; each clip is attributed by unlearning
(default settings) against all {len(rows)} distinct training tracks.

{md_table(df)}

Result: {summary}. *Loss percentile*: share of training tracks whose loss before
unlearning is lower than the planted track's (a memorised track has a low loss).
""")


if __name__ == "__main__":
    main()
