"""Self-influence consistency on the demo model: the music paper's table (SPEC §3), on our data.

For k-means-diverse training tracks (CLAP audio embeddings), unlearn each track as the query and
find its own rank among all training tracks, for each parameter group and masking scheme.

    python benchmarks/consistency.py --run demo/run --corpus demo/corpus --queries 12

Writes the `consistency` section of docs/benchmarks.md. Cached: a re-run reuses finished queries.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from linernotes.attribution.embeddings import track_embeddings
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.curvature import FisherSettings
from linernotes.data.manifest import read_manifest
from linernotes.evaluation.consistency import diverse_tracks, self_influence
from linernotes.run import load_run
from linernotes.unlearning.newton import UnlearnSettings

#: (label, group, M_U, M_L) as in the music paper's table
CONFIGS = [
    ("cross-attn to_kv", "cross_attn_kv", True, False),
    ("cross-attn", "cross_attn", True, False),
    ("self-attn", "self_attn", True, False),
    ("all transformer", "transformer", True, True),
    ("all transformer", "transformer", False, False),
    ("all transformer (mixed, default)", "transformer", True, False),
]
PAPER = {  # mean self-rank, CLAP top-k, CLAP bottom-k (115k tracks)
    0: (103.2, 0.38, 0.35), 1: (1.4, 0.60, 0.32), 2: (1.1, 0.63, 0.30),
    3: (1.0, 0.80, 0.38), 4: (6615.7, 0.82, 0.42), 5: (1.0, 0.66, 0.26),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("demo/run"))
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--draws", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true", help="Print only; leave the docs alone.")
    args = ap.parse_args()
    run = load_run(args.run)
    manifest = read_manifest(args.corpus)
    store, train, ids = run.train_set(manifest, progress=False)
    emb = track_embeddings(run, store, train.rows)
    chosen = diverse_tracks(emb, args.queries, seed=0)
    embeddings = dict(zip(ids, emb))
    queries = []
    for k in chosen:
        item = train[int(k)]
        queries.append(Query(item["track_id"], item["features"], item["mask"], item["caption"],
                             source=f"train:{item['track_id']}", track_id=item["track_id"]))
    fisher = run.fisher(manifest, FisherSettings(group="transformer"), progress=False)
    out = args.out or Path(run.path) / "benchmarks" / "consistency"
    rows = []
    for i, (label, group, m_u, m_l) in enumerate(CONFIGS):
        score = ScoreSettings(mask_train=m_l)
        att = UnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids, fisher,
                                   Path(run.path) / "cache", score, progress=False)
        settings = UnlearnSettings(group=group, mask_query=m_u, draws=args.draws)
        t0 = time.perf_counter()
        res = self_influence(att, queries, settings, out / f"config-{i}", embeddings, k=10)
        s = res.summary()
        paper = PAPER[i]
        rows.append({
            "params updated": label, "M_U": "on" if m_u else "off", "M_L": "on" if m_l else "off",
            "mean self-rank": s["mean_self_rank"], "rank-1 share": s["rank1_fraction"],
            "CLAP top-10": s["sim_top"], "CLAP bottom-10": s["sim_bottom"],
            "s/query": s["seconds_per_query"],
            "paper self-rank": paper[0], "paper CLAP top/bottom": f"{paper[1]}/{paper[2]}",
        })
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if not args.no_write:
        from bench_docs import table as md_table
        from bench_docs import write_section

        body = f"""## Self-influence consistency (attribution by unlearning)

`python benchmarks/consistency.py --run {args.run} --corpus {args.corpus} \\
--queries {args.queries} --draws {args.draws}` on the demo model ({len(ids)} training tracks,
{torch.get_num_threads()} torch threads). {len(queries)} k-means-diverse training tracks (CLAP
audio embeddings) are each unlearned (one Newton step, α chosen so the query's loss rises
×1.5, {args.draws} query draws) and ranked among all {len(ids)} training tracks; chance is a
mean rank of {len(ids) / 2:.0f}.
CLAP top-10 / bottom-10: mean cosine similarity of the query to its 10 most and least credited
other tracks. The paper's columns are its 115k-track model (SPEC §3); ranks are not comparable in
scale, their ordering is.

{md_table(table, ".4g")}
"""
        write_section("consistency", body)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
