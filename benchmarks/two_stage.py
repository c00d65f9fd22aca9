"""Two-stage attribution against exact attribution by unlearning, on a run and some clips.

For each clip: exact attribution (every track at every scoring timestep), and two-stage
attribution (every track at K coarse timesteps, then the top M at every timestep) for each K,
all with the same unlearned model (one unlearning step per clip; each K in its own work folder,
so that no second stage reuses another K's exact losses). The two-stage pass runs with the
smallest M; larger M are derived from its first-stage scores and the exact scores (the second
stage scores exactly, the same numbers as the exact pass), their second stage timed at the
measured pass's seconds per track. Reports the recall of the exact top k among the two-stage top
k, the seconds of each stage per query and the speed-up over the exact pass; the one-off
baselines (every track's loss before unlearning, at the exact and at each coarse setting) are
timed apart. Every pass is cached under --work and resumes after a kill, so a long benchmark runs
in pieces:

    # the one-off baselines, split over two processes
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -- benchmarks/two_stage.py --run RUN \\
        --corpus CORPUS --baselines-only
    # the clips, half each, side by side; then the table (everything cached)
    OMP_NUM_THREADS=1 python benchmarks/two_stage.py ... --part 0/2 &
    OMP_NUM_THREADS=1 python benchmarks/two_stage.py ... --part 1/2
    OMP_NUM_THREADS=1 python benchmarks/two_stage.py ... --write

Scoring runs with --precision auto (bfloat16 where the CPU has it), the exact reference
included, and keeps the full scoring timesteps. Writes the `two-stage` section of
docs/benchmarks.md with --write.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Subset

from linernotes import distributed
from linernotes.attribution.front import queries_from_specs
from linernotes.attribution.methods import make_attributor
from linernotes.attribution.scores import read_scores
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.clips import generate
from linernotes.data.manifest import read_manifest
from linernotes.run import load_run


def recall(exact: pd.DataFrame, two: pd.DataFrame, k: int) -> float:
    """Share of exact attribution's top k found in the two-stage top k."""
    top = set(exact.nsmallest(k, "rank")["track_id"])
    return len(top & set(two.nsmallest(k, "rank")["track_id"])) / len(top)


def derived(exact: pd.DataFrame, two: pd.DataFrame, m: int) -> pd.DataFrame:
    """The two-stage table with M = m from a two-stage pass's first-stage scores and the exact
    scores: the first stage's top m, by exact score (a two-stage pass's exact scores are the exact
    pass's: tests/test_attribution.py), then the rest by first-stage score."""
    coarse = two.set_index("track_id")["coarse_score"]
    chosen = coarse.nlargest(m).index
    top = exact.set_index("track_id").loc[chosen, "score"].sort_values(ascending=False)
    rest = coarse.drop(chosen).sort_values(ascending=False)
    order = [*top.index, *rest.index]
    return pd.DataFrame({"track_id": order, "rank": np.arange(1, len(order) + 1)})


def cached(att, query, out: Path, work: Path, score,
           rescore: bool = False) -> tuple[pd.DataFrame, dict]:
    """The score table and record of `query` under `score`: read when written, else scored.
    `rescore`: a table written before is made again once from its cached passes (after the
    baselines were recomputed), keeping the seconds its record measured."""
    table, record = out / f"{query.key}.parquet", out / f"{query.key}.json"
    done, written = out / f"{query.key}.rescored", table.exists() and record.exists()
    old = json.loads(record.read_text()) if rescore and written and not done.exists() else None
    if old is not None or not written:
        att.score = score
        scored = att.scores(query, work)
        if old is not None:
            for new, was in ((scored.record, old),
                             (scored.record.get("two_stage", {}), old.get("two_stage", {}))):
                new.update({k: v for k, v in was.items() if k.startswith("seconds")})
        att.write(query, scored, out)
        if old is not None:
            done.touch()
    return read_scores(table), json.loads(record.read_text())


def tag(k: int, span: float) -> str:
    """A first stage's name in folders: K, and its span unless the whole schedule."""
    return f"k{k}" if span == 1.0 else f"k{k}-s{span:g}"


def one_off(att, variants: list[tuple[int, float]], work: Path) -> dict:
    """Seconds of each baseline pass (the first time it is computed; then read from disk)."""
    path = work / "one-off.json"
    seconds = json.loads(path.read_text()) if path.exists() else {}
    names = {f"coarse {k}" + ("" if sp == 1.0 else f" over {sp:g}"): (k, sp)
             for k, sp in variants}
    for name, score in [("exact", att.score)] + [
            (name, att.score.replace(coarse_timesteps=k, coarse_span=sp).coarse())
            for name, (k, sp) in names.items()]:
        t0 = time.perf_counter()
        att.baseline_at(score)
        if name not in seconds:
            seconds[name] = time.perf_counter() - t0
    if distributed.rank() == 0:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seconds, indent=1))
    return {name: s for name, s in seconds.items() if name == "exact" or name in names}


def generated(run, manifest: pd.DataFrame, n: int, folder: Path) -> list[Path]:
    """n generated clips (made once): the caption of one holdout track (seeded) of each of the
    n artists with the most tracks."""
    known = sorted(folder.glob("*.wav"))
    if len(known) == n:
        return known
    hold = manifest[manifest["split"] == "holdout"]
    artists = manifest["artist"].value_counts().index[:n]
    prompts = [hold[hold["artist"] == x].sample(1, random_state=0)["caption"].iloc[0]
               for x in artists]
    return generate(run, prompts, folder, 0, progress=False)


def warm_captions(run, manifest: pd.DataFrame, ids: list[str]) -> float:
    """Every training caption's encoding made ready (encoded, or read from the run's caption
    folder), so that no timed pass pays for it; returns the seconds (a one-off of every
    process)."""
    if not hasattr(run.task, "text_condition"):
        return 0.0
    captions = manifest.set_index("track_id").loc[ids, "caption"].tolist()
    t0 = time.perf_counter()
    for lo in range(0, len(captions), 256):
        run.task.text_condition(captions[lo : lo + 256], run.model.config.max_words)
    return time.perf_counter() - t0


def peak_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def at_scale(att, train, ids: list[str], query, n: int, k: int, m: int, work: Path) -> dict:
    """One two-stage query over n tracks (the training tracks repeated under new ids, so the
    first stage scores n distinct rows): the one-off first-stage baseline and each stage's
    seconds, and the peak memory after each. Cached in <work>/scale-<n>-k<k>-m<m>.json."""
    path = work / f"scale-{n}-k{k}-m{m}.json"
    if path.exists():
        return json.loads(path.read_text())
    idx = [j % len(train) for j in range(n)]
    names = [ids[i] if j < len(train) else f"{ids[i]}#{j // len(train)}"
             for j, i in enumerate(idx)]
    score = att.score.replace(exact=False, candidates=m, coarse_timesteps=k)
    big = UnlearningAttributor(att.task, att.model, att.run_hash, att.manifest,
                               Subset(train, idx), names, att.fisher,
                               work / f"scale-{n}-cache", score, False, att.unlearn)
    t0 = time.perf_counter()
    big.baseline_at(score.coarse())
    out = {"tracks": n, "K": k, "M": m, "one-off s": time.perf_counter() - t0,
           "one-off peak MB": peak_mb()}
    record = big.scores(query, work / f"scale-{n}-work").record
    two = record["two_stage"]
    out.update({"unlearn s": record["seconds_unlearn"], "first s": two["seconds_first"],
                "second s": two["seconds_baseline"] + two["seconds_second"],
                "query peak MB": peak_mb()})
    path.write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--clips", nargs="+", help="query clips (default: --generate's)")
    p.add_argument("--generate", type=int, default=12, help="without --clips: generate this "
                   "many clips into <work>/clips, prompted with the caption of one holdout "
                   "track of each of the largest artists")
    p.add_argument("--span", type=float, nargs="+", default=[1.0],
                   help="first-stage spans (coarse_span) to compare, each with every K")
    p.add_argument("--coarse", type=int, nargs="+", default=[1, 2, 4],
                   help="first-stage timesteps")
    p.add_argument("--share", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1],
                   help="candidates M as a share of the training tracks")
    p.add_argument("--k", type=int, nargs="+", default=[10, 100])
    p.add_argument("--work", type=Path, default=Path("runs/bench-two-stage"))
    p.add_argument("--part", default="0/1", help="i/n: score every n-th clip from the i-th")
    p.add_argument("--fisher-samples", type=int, default=0,
                   help="training tracks behind the Fisher (0: all, the default)")
    p.add_argument("--baselines-only", action="store_true")
    p.add_argument("--rescore", action="store_true",
                   help="make every table written before again, once, from its cached passes "
                   "(after the baselines were recomputed), keeping its measured seconds")
    p.add_argument("--in-pieces", nargs="+", default=[], metavar="QUERY",
                   help="queries whose exact pass was killed and resumed: its recorded seconds "
                   "cover only the last piece, so they are left out of the exact mean")
    p.add_argument("--tracks", type=int, nargs="+", default=[],
                   help="instead of the clips: one two-stage query (the first clip) over this "
                   "many tracks each, the training tracks repeated under new ids; with "
                   "--scale-k and --scale-m")
    p.add_argument("--scale-k", type=int, default=1)
    p.add_argument("--scale-m", type=int, default=1000)
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    a = p.parse_args()
    t_start = time.perf_counter()
    distributed.init_from_env()
    manifest = read_manifest(a.corpus / "manifest.parquet")
    run = load_run(a.run, manifest=manifest)
    if not a.clips and distributed.rank() == 0:
        generated(run, manifest, a.generate, a.work / "clips")
    distributed.barrier()
    clips = a.clips or [str(c) for c in generated(run, manifest, a.generate, a.work / "clips")]
    queries = queries_from_specs(clips, run, manifest, None)
    train_set = run.train_set(manifest, progress=False)
    n = len(train_set[2])
    settings = {"exact": True, "precision": "auto",
                **({"samples": a.fisher_samples} if a.fisher_samples else {})}
    att = make_attributor("unlearning", run, manifest, train_set, settings, progress=False)
    exact_score = att.score
    ms = sorted({min(n, math.ceil(s * n)) for s in a.share})
    measured = ms[0]  # the one M each K's two-stage pass really runs; the others are derived
    variants = [(k, sp) for sp in a.span for k in a.coarse]
    tables = [a.work / d / f"{q.key}.parquet" for q in queries
              for d in ["exact"] + [f"{tag(k, sp)}-m{measured}" for k, sp in variants]]
    if a.tracks or a.baselines_only or a.rescore or not all(t.exists() for t in tables):
        captions = warm_captions(run, manifest, train_set[2])
        print(f"captions ready in {captions:.0f} s (once per process)")
    if a.tracks:
        for n_tracks in a.tracks:
            print(json.dumps(at_scale(att, train_set[1], train_set[2], queries[0], n_tracks,
                                      a.scale_k, a.scale_m, a.work)))
        return
    seconds = one_off(att, variants, a.work)
    if a.baselines_only:
        return
    i, parts = (int(x) for x in a.part.split("/"))

    def two_stage(q, k, sp):
        return cached(att, q, a.work / f"{tag(k, sp)}-m{measured}", a.work / f"work-{tag(k, sp)}",
                      exact_score.replace(exact=False, candidates=measured, coarse_timesteps=k,
                                          coarse_span=sp), a.rescore)

    for q in queries[i::parts]:  # two-stage first: it is the cheap part
        for k, sp in variants:
            two_stage(q, k, sp)
        cached(att, q, a.work / "exact", a.work / "work", exact_score, a.rescore)
    if parts > 1:
        print(f"part {a.part}: done; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        return
    rows, exact_s = [], []
    for q in queries:
        exact, rec = cached(att, q, a.work / "exact", a.work / "work", exact_score)
        if q.key not in a.in_pieces:
            exact_s.append(rec["seconds_score"])
        for k, sp in variants:
            table, r = two_stage(q, k, sp)
            # the second stage scores each candidate before and after unlearning (records older
            # than seconds_baseline timed only after: the same work again, as the one before)
            second = r["two_stage"]["seconds_second"]
            # a first stage read back from an earlier run's cache (~0 s) was not timed: left out
            # of the mean
            first = r["two_stage"]["seconds_first"]
            first = first if first >= 1 else np.nan
            per_track = (second + r["two_stage"].get("seconds_baseline", second)) / measured
            for m in ms:
                two = derived(exact, table, m)
                if m == measured:  # the derivation is the library's two-stage table
                    assert two["track_id"].head(m).tolist() == table.nsmallest(
                        m, "rank")["track_id"].tolist()
                rows.append({"K": k, "span": sp, "M": m, "query": q.key, "first s": first,
                             "second s": per_track * m,
                             **{f"recall@{kk}": recall(exact, two, kk) for kk in a.k}})
    res = pd.DataFrame(rows)
    exact_mean = float(np.mean(exact_s))
    table = res.groupby(["K", "span", "M"], sort=True).agg(
        **{"share": ("M", lambda x: x.iloc[0] / n), "first s": ("first s", "mean"),
           "second s": ("second s", "mean"),
           **{f"recall@{kk}": (f"recall@{kk}", "mean") for kk in a.k},
           **{f"min recall@{kk}": (f"recall@{kk}", "min") for kk in a.k}}).reset_index()
    table["M"] = table["M"].astype(int)
    table["s/query"] = table["first s"] + table["second s"]
    table["speed-up"] = exact_mean / table["s/query"]
    peak = peak_mb()
    print(f"{n} training tracks, {len(queries)} clips; exact scoring {exact_mean:.0f} s/query "
          f"(mean of {len(exact_s)} uninterrupted passes) "
          f"({exact_score.precision}); one-off: " + ", ".join(
              f"{name} {s:.0f} s" for name, s in seconds.items()))
    print(table.round(3).to_string(index=False))
    if a.write:
        from bench_docs import table as md_table
        from bench_docs import write_section

        fisher = f" --fisher-samples {a.fisher_samples}" if a.fisher_samples else ""
        given = f"--clips <{len(queries)} clips>" if a.clips else f"--generate {a.generate}"
        span = f" --span {' '.join(f'{x:g}' for x in a.span)}" if a.span != [1.0] else ""
        write_section("two-stage", f"""## Two-stage attribution against exact attribution

`OMP_NUM_THREADS=1 python benchmarks/two_stage.py --run {a.run} --corpus {a.corpus} {given}
--coarse {' '.join(map(str, a.coarse))}{span} --share
{' '.join(map(str, a.share))} --k {' '.join(map(str, a.k))}{fisher}`; {dt.date.today()},
{platform.machine()}, 1 torch thread per process ({torch.get_num_threads()} here), the passes run
in pieces (`--part`) and cached; this invocation {(time.perf_counter() - t_start) / 60:.0f} min,
peak RSS {peak:.0f} MB.
{n} training tracks; scoring precision {exact_score.precision}; exact attribution scores every
track at {exact_score.timesteps} timesteps: **{exact_mean:.0f} s per query** (mean over
{len(exact_s)} clips whose exact pass ran uninterrupted; unlearning the clip, the same for
both, is apart). One-off: every track's
loss before unlearning (on 2 processes), {', '.join(f'{name}: {s:.0f} s' for name, s in
seconds.items())}; two-stage scoring needs only its first stage's.
K: first-stage timesteps, spread over the first `span` of the schedule (1: all of it, K = 1 at
t = 0.5; 0.45: K = 1 at t = 0.225); M: tracks scored exactly in the second stage (before and after
unlearning, in the same batches: its seconds count both); first s: the mean over the clips
whose first stage was timed (not read back from an earlier run's cache). Recall@k: the share
of exact attribution's top k in the two-stage top k (mean and minimum over clips).

{md_table(table.assign(K=table["K"].map(str), M=table["M"].map(str)))}
""")


if __name__ == "__main__":
    main()
