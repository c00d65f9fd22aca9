"""Planted memorisation: duplicate a few training tracks many times, generate from their
captions, and check that attribution by unlearning credits the planted track first.

    python benchmarks/planted.py --corpus demo/corpus --out demo/planted --planted 3 \\
        --copies 20 --write

Trains a model like the demo's with the planted tracks repeated (`--duplicate`), so it takes
about as long as the demo's training. One training track is planted per artist: the artists are
the first `--planted` in name order (`--pick first`, the default), drawn with `--seed`
(`--pick random`) or named (`--artist`, repeated); the track is the artist's first training
track, or a drawn one with `--pick random`. `--seed` also seeds training and generation.

The CLAP (the text/audio encoder that conditions the model) is trained here on `--corpus`
unless `--clap` names one trained on the same corpus; a CLAP of another corpus is refused.
docs/benchmarks.md's `planted` section is rewritten only with `--write`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.artifacts import read_json
from linernotes.attribution.front import attribute_run
from linernotes.attribution.losses import score_of
from linernotes.clips import generate
from linernotes.data.dataset import split_rows
from linernotes.data.manifest import manifest_hash, read_manifest
from linernotes.errors import LinernotesError
from linernotes.models.clap import CLAP_CONFIG, ClapSettings
from linernotes.models.mel import FeatureSettings
from linernotes.models.pipeline import GenerateSettings
from linernotes.models.reference import train
from linernotes.training import TrainSettings


def pick_tracks(manifest: pd.DataFrame, n: int, artists: list[str] | None = None,
                pick: str = "first", seed: int = 0) -> list[str]:
    """One training track per artist, for `n` artists (or the named `artists`)."""
    train_rows = manifest.iloc[split_rows(manifest, "train")]
    known = sorted(train_rows["artist"].astype(str).unique())
    rng = np.random.default_rng(seed)
    if artists:
        missing = [a for a in artists if a not in known]
        if missing:
            raise LinernotesError(f"No training tracks by {missing} in this corpus; its artists "
                                  f"are {known}.")
        chosen = list(dict.fromkeys(artists))
    elif n > len(known):
        raise LinernotesError(f"--planted {n}: the corpus has training tracks by only "
                              f"{len(known)} artists.")
    else:
        drawn = rng.choice(known, n, replace=False)
        chosen = known[:n] if pick == "first" else sorted(map(str, drawn))
    out = []
    for artist in chosen:
        ids = train_rows.loc[train_rows["artist"].astype(str) == artist, "track_id"].astype(str)
        out.append(ids.iloc[0] if pick == "first" else str(rng.choice(ids.to_numpy())))
    return out


def matching_clap(path: Path | None, manifest: pd.DataFrame) -> Path | None:
    """`path` if it is a CLAP trained on this corpus, None (train one) if no path is given."""
    if path is None:
        return None
    config = path / CLAP_CONFIG
    if not config.exists():
        raise LinernotesError(f"--clap {path}: no {CLAP_CONFIG} there; give a run's clap/ folder "
                              "or leave --clap out to train one on this corpus.")
    trained_on = read_json(config).get("provenance", {}).get("manifest_hash")
    if trained_on != manifest_hash(manifest):
        raise LinernotesError(f"--clap {path} was trained on another corpus (manifest "
                              f"{trained_on}, this one {manifest_hash(manifest)}); leave --clap "
                              "out to train one on this corpus.")
    return path


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--out", type=Path, default=Path("demo/planted"))
    ap.add_argument("--planted", type=positive, default=3, help="Artists with a planted track.")
    ap.add_argument("--artist", action="append", help="Plant a track of this artist (repeat).")
    ap.add_argument("--pick", choices=("first", "random"), default="first")
    ap.add_argument("--seed", type=int, default=0, help="Pick, training and generation seed.")
    ap.add_argument("--copies", type=positive, default=20)
    ap.add_argument("--clips", type=positive, default=2, help="Generations per planted caption.")
    ap.add_argument("--steps", type=positive, default=1200)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clap", type=Path, default=None,
                    help="A CLAP trained on --corpus (a run's clap/ folder); trained if absent.")
    ap.add_argument("--clap-steps", type=positive, default=ClapSettings().steps)
    ap.add_argument("--write", action="store_true", help="Rewrite docs/benchmarks.md's section.")
    args = ap.parse_args()
    try:
        manifest = read_manifest(args.corpus)
        planted = pick_tracks(manifest, args.planted, args.artist, args.pick, args.seed)
        clap = matching_clap(args.clap, manifest)
    except LinernotesError as exc:
        ap.exit(2, f"planted.py: {exc}\n")
    n_train = len(split_rows(manifest, "train"))
    settings = TrainSettings(steps=args.steps, seed=args.seed,
                             duplicate=tuple((t, args.copies) for t in planted))
    run = train(manifest, args.out / "run", settings,
                features=FeatureSettings(seconds=args.seconds), clap=clap,
                clap_settings=ClapSettings(steps=args.clap_steps, seed=args.seed))
    captions = manifest.set_index("track_id").loc[planted, "caption"].tolist()
    prompts = [c for c in captions for _ in range(args.clips)]
    seeds = [args.seed + i for i in range(len(prompts))]
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
                f"mean rank {np.mean(ranks):.1f} of {n_train}")

    summary = (f"by log-ratio (the default score), the planted track "
               f"{summary_of('rank (log-ratio)')}; by delta (the papers' loss increase), "
               f"{summary_of('rank (delta)')}")
    print(summary)
    if args.write:
        from bench_docs import table as md_table
        from bench_docs import write_section

        command = " ".join(["python", "benchmarks/planted.py", *sys.argv[1:]])
        write_section("planted", f"""## Planted memorisation

`{command}`: {len(planted)} training tracks (one per artist, picked `{args.pick}`, seed
{args.seed}) each appear {args.copies}× in training; the model generates {args.clips} clips from
each planted track's caption; each clip is attributed by unlearning (default settings) against
all {n_train} distinct training tracks.

{md_table(df)}

Result: {summary}. *Loss percentile*: share of training tracks whose loss before
unlearning is lower than the planted track's (a memorised track has a low loss).
""")


if __name__ == "__main__":
    main()
