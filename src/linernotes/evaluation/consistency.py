"""Self-influence consistency: unlearn a training track; it should rank first among all tracks.

The music paper's check (SPEC §3): k-means-diverse training tracks are each unlearned as the query;
report the mean self-rank (1.0 is perfect) and the mean embedding similarity of the query to its
top-k and bottom-k credited tracks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.unlearning.newton import UnlearnSettings


def diverse_tracks(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Positions of k diverse rows: the row nearest each k-means centroid (distinct rows)."""
    from sklearn.cluster import KMeans

    k = min(k, len(embeddings))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(embeddings)
    chosen: list[int] = []
    for c in range(k):
        d = np.linalg.norm(embeddings - km.cluster_centers_[c], axis=1)
        for i in np.argsort(d):
            if int(i) not in chosen:
                chosen.append(int(i))
                break
    return np.array(sorted(chosen))


@dataclasses.dataclass
class ConsistencyResult:
    per_query: pd.DataFrame  # query, self_rank, sim_top, sim_bottom, alpha, seconds

    def summary(self) -> dict:
        q = self.per_query
        return {
            "queries": len(q),
            "mean_self_rank": float(q["self_rank"].mean()),
            "rank1_fraction": float((q["self_rank"] == 1).mean()),
            "sim_top": float(q["sim_top"].mean()),
            "sim_bottom": float(q["sim_bottom"].mean()),
            "seconds_per_query": float(q["seconds"].mean()),
        }


def self_influence(
    attributor: UnlearningAttributor,
    queries: list[Query],
    settings: UnlearnSettings,
    out_dir: str | Path,
    embeddings: dict[str, np.ndarray] | None = None,
    k: int = 10,
) -> ConsistencyResult:
    """Unlearn each training-track query; its own rank, and similarity to its top/bottom k.

    `embeddings` maps track id -> L2-normalised embedding (e.g. CLAP audio), for the similarity
    columns; the query's own track is left out of its top-k.
    """
    rows = []
    for q in queries:
        df = attributor.attribute(q, out_dir, settings)
        rec = pd.read_json(Path(out_dir) / f"{q.key}.json", typ="series")
        own = df.set_index("track_id").loc[q.track_id or q.key]
        others = df[df["track_id"] != (q.track_id or q.key)]
        sim_top = sim_bottom = np.nan
        if embeddings is not None:
            e = embeddings[q.track_id or q.key]
            top = others.head(k)["track_id"]
            bottom = others.tail(k)["track_id"]
            sim_top = float(np.mean([e @ embeddings[t] for t in top]))
            sim_bottom = float(np.mean([e @ embeddings[t] for t in bottom]))
        rows.append({
            "query": q.key, "self_rank": int(own["rank"]), "self_score": float(own["score"]),
            "sim_top": sim_top, "sim_bottom": sim_bottom, "alpha": float(rec["alpha"]),
            "seconds": float(rec["seconds_unlearn"] + rec["seconds_score"]),
        })
    return ConsistencyResult(pd.DataFrame(rows))
