"""Projections for the linear mode: the dense Rademacher matrix against the sparse map.

Measures (A) the time to project ONE vector of the run's parameter group (the linear mode's per
query cost) at each k, and (B) how well `unlearning-linear` scores computed through each
projection agree with the unprojected (exact-gradient) linear scores, on a subset of the run's
training tracks with self-influence queries, and (C) each map's error tails on heavy-tailed
synthetic vectors. Prints a Markdown report; writes nothing.

    OMP_NUM_THREADS=1 python benchmarks/projection.py --seeds 4   # as reported: ~5 min
    OMP_NUM_THREADS=1 python benchmarks/projection.py --run demo/run --corpus demo/corpus
    OMP_NUM_THREADS=1 python benchmarks/projection.py --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch.utils.data import Subset

from bench_docs import table
from linernotes.attribution.gradients import Projector, matvec
from linernotes.attribution.linear import LinearUnlearningAttributor
from linernotes.attribution.losses import ScoreSettings
from linernotes.attribution.query import Query
from linernotes.curvature import FisherSettings
from linernotes.data.manifest import read_manifest
from linernotes.run import load_run
from linernotes.unlearning.newton import UnlearnSettings


def kinds(nnz: list[int]) -> list[tuple[str, str, int]]:
    """(label, kind, s) of every projection compared."""
    return [("rademacher", "rademacher", 1)] + [(f"sparse s={s}", "sparse", s) for s in nnz]


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    k = min(k, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def one_vector(n_params: int, dims: list[int], nnz: list[int]) -> pd.DataFrame:
    """Seconds to project one vector (B = 1), first call and a later call (sparse: map made)."""
    x = torch.randn(1, n_params, generator=torch.Generator().manual_seed(0))
    rows = []
    for k in dims:
        for label, kind, s in kinds(nnz):
            p = Projector(n_params, k, kind, seed=0, nnz=s)
            t0 = time.perf_counter()
            p(x)
            first = time.perf_counter() - t0
            if kind == "sparse":  # the map is kept: later calls are the per-query cost
                t0 = time.perf_counter()
                p(x)
                later = time.perf_counter() - t0
            else:  # the matrix is too large to keep: every call regenerates it
                later = first
            rows.append({"k": k, "projection": label, "first call s": first,
                         "later calls s": later})
            print(f"  k={k} {label}: {first:.3g} s, then {later:.3g} s", flush=True)
    return pd.DataFrame(rows)


def agreement(args, run, manifest, dims: list[int], nnz: list[int]) -> tuple[pd.DataFrame, dict]:
    """Spearman / top-10 of projected linear scores against unprojected ones, mean over queries."""
    _, train, ids = run.train_set(manifest, progress=False)
    fisher = run.fisher(manifest, FisherSettings(), progress=False)
    n = min(args.tracks, len(ids))
    sub, sub_ids = Subset(train, range(n)), ids[:n]
    score = ScoreSettings(timesteps=args.timesteps, stride=max(1, 1000 // args.timesteps))
    unlearn = UnlearnSettings(draws=args.draws, probe_draws=args.probe_draws)
    cache = Path(tempfile.mkdtemp(prefix="ln-projection-"))
    full = LinearUnlearningAttributor(run.task, run.model, run.hash, manifest, sub, sub_ids,
                                      fisher, cache, score, False, unlearn, projection_dim=0)
    t0 = time.perf_counter()
    phi0 = torch.from_numpy(np.asarray(full.train_features()))  # D^{1/2} g_i, exact
    grad_s = time.perf_counter() - t0
    scale = full.features()[0].scale
    steps = []
    for i in np.linspace(0, n - 1, args.queries).astype(int):
        it = sub[int(i)]
        q = Query(it["track_id"], it["features"], it["mask"], it["caption"],
                  track_id=it["track_id"])
        g, rec = full.query_step(q, unlearn)
        steps.append((g, rec["step"]))
    reference = [full.scores_from(g, step) for g, step in steps]
    before = full.baseline()
    psi0 = torch.stack([scale * g.float() for g, _ in steps])  # D^{1/2} g_q
    exact_ip = phi0.double() @ psi0.double().T  # (n, Q) inner products the projection estimates
    norms = phi0.double().norm(dim=1)[:, None] * psi0.double().norm(dim=1)[None, :]
    rows = []
    for k in dims:
        for label, kind, s in kinds(nnz):
            sp, top, sq, proj_s = [], [], [], 0.0
            for seed in range(args.seeds):
                p = Projector(phi0.shape[1], k, kind, seed=seed, nnz=s)
                t0 = time.perf_counter()
                # training rows and queries in one pass (a row's projection is batch-independent)
                y = p(torch.cat([phi0, psi0])).numpy()
                proj_s += (time.perf_counter() - t0) / args.seeds
                for j, ((_, step), ref) in enumerate(zip(steps, reference)):
                    sc = step * matvec(y[:n], y[n + j].astype(np.float64))
                    sc = sc if before is None else sc / before
                    sp.append(spearmanr(sc, ref)[0])
                    top.append(top_overlap(sc, ref))
                est = torch.from_numpy(y[:n]).double() @ torch.from_numpy(y[n:]).double().T
                # JL error of an inner product in units of |φ_i||ψ_q|/sqrt(k): ~1 for a good map
                sq.append(float(((est - exact_ip) / norms).pow(2).mean()) * k)
            err = float(np.sqrt(np.mean(sq)))
            rows.append({"k": k, "projection": label, "Spearman vs unprojected": np.mean(sp),
                         "min Spearman": np.min(sp), "top-10 overlap": np.mean(top),
                         "RMS error (JL units)": err,
                         f"project {n}+{len(steps)} rows s": proj_s, "SE of Spearman":
                         np.std(sp) / np.sqrt(len(sp))})
            print(f"  k={k} {label}: Spearman {np.mean(sp):.3f}, top-10 {np.mean(top):.2f}",
                  flush=True)
    info = {"n": n, "queries": len(steps), "seeds": args.seeds, "grad_s": grad_s,
            "score": score, "unlearn": unlearn}
    return pd.DataFrame(rows), info


def tails(nnz: list[int], n: int = 20000, k: int = 256, seeds: int = 10) -> pd.DataFrame:
    """Error quantiles of projected inner products of heavy-tailed (Student t, 1.5 degrees of
    freedom) vectors, in units of |x||y|/sqrt(k): where the number of non-zeros shows."""
    x = torch.from_numpy(np.random.default_rng(0).standard_t(1.5, (40, n))).float()
    exact = x.double() @ x.double().T
    norm = exact.diag().sqrt()
    off = ~torch.eye(len(x), dtype=torch.bool)
    rows = []
    for label, kind, s in kinds(sorted({1, *nnz})):
        errs = []
        for seed in range(seeds):
            y = Projector(n, k, kind, seed=seed, nnz=s)(x).double()
            errs.append(((y @ y.T - exact) / (norm[:, None] * norm[None, :]))[off] * k**0.5)
        e = torch.cat(errs).abs().numpy()
        rows.append({"projection": label, "RMS": float(np.sqrt((e**2).mean())),
                     "99%": float(np.quantile(e, 0.99)), "99.9%": float(np.quantile(e, 0.999)),
                     "max": float(e.max())})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("demo/run"))
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs end to end")
    ap.add_argument("--dims", default="256,1024,4096")
    ap.add_argument("--nnz", default="1,4", help="non-zeros per parameter of the sparse map")
    ap.add_argument("--tracks", type=int, default=64)
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--timesteps", type=int, default=2)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--probe-draws", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1, help="projection seeds averaged over")
    args = ap.parse_args()
    if args.quick:
        args.dims, args.tracks, args.queries, args.draws, args.probe_draws = "32,64", 8, 2, 4, 4
        args.timesteps = 1
    dims = [int(x) for x in args.dims.split(",")]
    nnz = [int(x) for x in args.nnz.split(",")]
    if not (args.run / "config.json").exists():
        raise SystemExit(f"No run at {args.run}: train one (`linernotes demo`) or pass --run.")
    torch.set_num_threads(1)
    started = time.perf_counter()
    run = load_run(args.run)
    manifest = read_manifest(args.corpus)
    n_params = sum(p.numel() for p in run.task.parameters(run.model, "transformer").values())
    print(f"(A) one vector of {n_params:,} parameters ...", flush=True)
    speed = one_vector(n_params, dims, nnz)
    print("(B) agreement with unprojected linear scores ...", flush=True)
    agree, info = agreement(args, run, manifest, dims, nnz)
    print("(C) error tails on heavy-tailed vectors ...", flush=True)
    tail = tails(nnz)
    minutes = (time.perf_counter() - started) / 60
    print(f"""
## Projections for the linear mode (`benchmarks/projection.py`)

`OMP_NUM_THREADS=1 python benchmarks/projection.py{' --quick' if args.quick else ''}`;
{dt.date.today()}, torch {torch.__version__}, {minutes:.1f} min in all, 1 thread on a machine
shared with other jobs. Run `{run.hash}`, group "transformer" (P = {n_params:,}).

### (A) Projecting one vector (a query's gradient)

{table(speed, ".3g")}

### (B) Agreement with unprojected linear scores

{info['n']} training tracks, {info['queries']} self-influence queries, scoring at
{info['score'].timesteps} timestep(s) ({info['score'].kind} score), {info['unlearn'].draws} query
draws; exact per-sample gradients took {info['grad_s']:.1f} s. Spearman and top-10 overlap of the
projected scores against the unprojected linear scores, mean over {info['seeds']} projection
seed(s) × queries (and the worst);
the RMS error (JL units) of the projected inner products φ_iᵀψ_q over all (track, query) pairs,
in units of ‖φ_i‖‖ψ_q‖/√k (about 1 for both maps unless a few coordinates dominate).

{table(agree, ".3g")}

### (C) Error tails on heavy-tailed vectors

40 vectors of 20,000 Student-t (1.5 degrees of freedom) coordinates, k = 256, 10 seeds: quantiles
of |⟨Πx, Πy⟩ − ⟨x, y⟩| over all pairs, in units of ‖x‖‖y‖/√k. Every map has the same variance
(RMS ≈ 1); with one non-zero per parameter a few dominant coordinates collide, fattening the tail.

{table(tail, ".3g")}
""")


if __name__ == "__main__":
    main()
