"""Two-stage attribution against exact attribution by unlearning, on a run and some clips.

For each clip: exact attribution (every track at every scoring timestep) and two-stage
attribution (every track at `--coarse` timesteps, then the top M at every timestep) for each M,
all with the same unlearned model; recall of the exact top-k among the two-stage top-k, and the
seconds of each scoring pass (the unlearning step and the cached baselines are counted apart,
once). Prints a table; writes nothing else (the passes are cached under --work).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/two_stage.py --run RUN --corpus CORPUS \\
        --clips a.wav b.wav --candidates 10 20 40 --k 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.attribution.front import queries_from_specs
from linernotes.attribution.methods import make_attributor
from linernotes.data.manifest import read_manifest
from linernotes.run import load_run


def recall(exact: pd.DataFrame, two: pd.DataFrame, k: int) -> float:
    """Share of exact attribution's top k found in the two-stage top k."""
    top = set(exact.nsmallest(k, "rank")["track_id"])
    return len(top & set(two.nsmallest(k, "rank")["track_id"])) / len(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--clips", nargs="+", required=True)
    p.add_argument("--candidates", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--coarse", type=int, default=4, help="first-stage timesteps")
    p.add_argument("--k", type=int, nargs="+", default=[10])
    p.add_argument("--work", type=Path, default=Path("runs/bench-two-stage"))
    a = p.parse_args()
    manifest = read_manifest(a.corpus / "manifest.parquet")
    run = load_run(a.run, manifest=manifest)
    queries = queries_from_specs(a.clips, run, manifest, None)
    train_set = run.train_set(manifest, progress=False)
    rows = []
    for m in [0, *a.candidates]:
        att = make_attributor("unlearning", run, manifest, train_set,
                              {"candidates": m, "coarse_timesteps": a.coarse}, progress=False)
        att.baseline()  # one-off, cached
        if m:
            att.baseline_at(att.score.coarse())
        for q in queries:
            t0 = time.perf_counter()
            df = att.attribute(q, a.work / f"m{m}")
            rec = pd.read_json(a.work / f"m{m}" / f"{q.key}.json", typ="series")
            rows.append({"M": m, "query": q.key, "table": df, "seconds_score":
                         float(rec["seconds_score"]), "seconds_unlearn":
                         float(rec["seconds_unlearn"]), "wall": time.perf_counter() - t0})
    res = pd.DataFrame(rows)
    exact = {r["query"]: r["table"] for _, r in res[res["M"] == 0].iterrows()}
    n = len(train_set[2])
    out = []
    for m, part in res.groupby("M", sort=True):
        row = {"M": "exact" if m == 0 else m, "share of tracks": f"{(m or n) / n:.0%}",
               "score s/query": part["seconds_score"].mean()}
        for k in a.k:
            row[f"recall@{k}"] = np.mean([recall(exact[q], t, k)
                                          for q, t in zip(part["query"], part["table"])])
        out.append(row)
    table = pd.DataFrame(out)
    base = table["score s/query"].iloc[0]
    table["speed-up"] = base / table["score s/query"]
    print(f"{n} training tracks, {len(queries)} clips, first stage {a.coarse} timesteps; "
          f"unlearning {res['seconds_unlearn'].mean():.1f} s/query (apart)")
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
