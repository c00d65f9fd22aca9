"""Scale: the cost curve of attribution by unlearning on this machine, and the linear mode.

Measures (1) time per query and peak memory against the number of training tracks (tracks of the
run's corpus duplicated up to the largest size; each size in a fresh process), (2) track losses
per second and the scoring loop's FLOP/s against this machine's measured matmul peak, (3) the
linear mode's speed-up per query and agreement with exact unlearning against projection size,
(4) 1 against 2 processes (torchrun, gloo), (5) an extrapolation to 115k tracks, (6) whether
scoring several unlearned models in one pass pays, and (7) `draw_noise`'s speed.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --run demo/run --corpus demo/corpus
    OMP_NUM_THREADS=1 python benchmarks/scale.py --run demo/run --corpus demo/corpus --quick

Writes the `scale` section of docs/benchmarks.md (not with --quick unless --write is given).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, Subset

from linernotes import distributed
from linernotes.attribution.gradients import matvec
from linernotes.attribution.linear import LinearUnlearningAttributor
from linernotes.attribution.losses import ScoreSettings, score_of, sharded_losses, track_losses
from linernotes.attribution.query import Query
from linernotes.attribution.unlearning import UnlearningAttributor
from linernotes.curvature import FisherSettings
from linernotes.data.dataset import collate
from linernotes.data.manifest import read_manifest
from linernotes.run import load_run
from linernotes.task import _key_seed, draw_noise, fixed_timesteps, loss_at_draws
from linernotes.unlearning.newton import UnlearnSettings, applied, unlearn_query

PAPER_TRACKS = 115_000
PAPER_TIMESTEPS = 20
#: assumptions, not measurements: NVIDIA's published dense (no sparsity) H100 SXM peaks
H100_TF32 = 494.7e12
H100_BF16 = 989.4e12


# ------------------------------------------------------------------------------ measurements


def matmul_peak(n: int, threads: int, repeat: int = 5, dtype=torch.float32) -> float:
    """Best FLOP/s of an n × n matmul in `dtype` on `threads` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeat))
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_loss(task, model, train, score: ScoreSettings) -> float:
    """Forward FLOPs of one (track, timestep) loss, counted on one scoring batch."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(q_shape, k_shape, v_shape, *_, out_shape=None, **__) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    batch = collate([train[k] for k in range(min(4, len(train)))])
    t, noise = draw_noise(batch["track_id"], range(score.timesteps), task.latent_shape,
                          seed=score.seed, timesteps=fixed_timesteps(score.timesteps,
                                                                     score.stride))
    # CPU attention kernel: count it like the GPU ones (torch's counter only knows those)
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.inference_mode():
        loss_at_draws(task, model, batch, t, noise)  # conditioning caches filled, not counted
        counter = FlopCounterMode(display=False, custom_mapping=extra)
        with counter:
            loss_at_draws(task, model, batch, t, noise)
    return counter.get_total_flops() / t.numel()


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux: VmHWM); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ the scoring pass, isolated


def worker(spec_path: str) -> None:
    """One scoring pass over `n` (duplicated) tracks with a saved unlearning delta; run as its
    own process (alone or under torchrun) so that its peak memory is its own."""
    spec = json.loads(Path(spec_path).read_text())
    distributed.init_from_env()
    torch.set_num_threads(spec["threads"])
    run = load_run(spec["run"])
    manifest = read_manifest(spec["corpus"])
    _, train, ids = run.train_set(manifest, progress=False)
    idx = [k % len(train) for k in range(spec["n"])]
    names = [f"{ids[i]}#{k}" for k, i in enumerate(idx)]
    score = ScoreSettings(**spec["score"])
    # caption conditioning is cached per caption: fill it outside the timed pass
    track_losses(run.task, run.model, train, score.replace(timesteps=1))
    delta = torch.load(spec["delta"])
    before = _status_mb("VmRSS")
    resettable = reset_peak()
    distributed.barrier()
    t0 = time.perf_counter()
    with applied(run.model, delta):
        sharded_losses(run.task, run.model, Subset(train, idx), names, score,
                       Path(spec["out"]) / "losses", {"bench": "scale", "n": spec["n"]},
                       progress=False)
    distributed.barrier()
    seconds = time.perf_counter() - t0
    peak = (_status_mb("VmHWM") if resettable
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if distributed.rank() == 0:
        Path(spec["result"]).write_text(json.dumps({
            "seconds": seconds, "rss_before_mb": round(before), "peak_mb": round(peak),
            "world": distributed.world_size(), "threads": spec["threads"]}))


def scoring_pass(args, work: Path, n: int, score: ScoreSettings, delta: Path, threads: int = 1,
                 nproc: int = 0) -> dict:
    """Run `worker` in a fresh process (`nproc` > 0: under torchrun with nproc processes)."""
    folder = Path(tempfile.mkdtemp(prefix=f"pass-{n}-", dir=work))
    spec = {"run": str(args.run), "corpus": str(args.corpus), "n": n, "threads": threads,
            "score": score.to_dict(), "delta": str(delta), "out": str(folder),
            "result": str(folder / "result.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    launch = [sys.executable]
    if nproc:
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=0",
                   "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0"]
    cmd = [*launch, str(Path(__file__).resolve()), "--worker", str(folder / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"scoring pass failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    out = json.loads((folder / "result.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    return out


# ------------------------------------------------------------------------- the other sections


def duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "—"
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2g} s"


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    k = min(k, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


#: projections compared in section (3), the linear mode's default first
LINEAR_KINDS = ("sparse", "rademacher")


def linear_vs_exact(args, run, manifest, train, ids, fisher, queries, score, unlearn,
                    cache: Path) -> tuple[pd.DataFrame, dict]:
    """Exact unlearning and the linear mode at each projection size, on the same queries."""
    exact = UnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids, fisher,
                                 cache, score, progress=False, unlearn=unlearn)
    baseline_s = _timed(exact.baseline)
    ex_scores, ex_seconds = [], []
    for q in queries:
        df = exact.attribute(q, cache / "exact")
        rec = json.loads((cache / "exact" / f"{q.key}.json").read_text())
        ex_scores.append(df.set_index("track_id").loc[ids, "score"].to_numpy())
        ex_seconds.append(rec["seconds_unlearn"] + rec["seconds_score"])
    exact_s = float(np.mean(ex_seconds))
    # per-sample gradients once (k = 0: D^{1/2} g_i), projected for every k below
    full = LinearUnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids, fisher,
                                      cache, score, False, unlearn, projection_dim=0,
                                      memory_mb=args.memory_mb)
    grad_s = _timed(full.train_features)
    phi0 = full.train_features()
    steps, step_s = [], []
    for q in queries:
        t0 = time.perf_counter()
        steps.append(full.query_step(q, unlearn))
        step_s.append(time.perf_counter() - t0)
    reference = [full.scores_from(g, rec["step"]) for g, rec in steps]
    rows = []
    # the default kind first: section (5) reads the first row at its k
    for k, kind in [(d, name) for d in args.dims for name in (LINEAR_KINDS if d else ("",))]:
        if k == 0:
            att, proj_s = full, 0.0
        else:
            att = LinearUnlearningAttributor(run.task, run.model, run.hash, manifest, train, ids,
                                             fisher, cache, score, False, unlearn,
                                             projection_dim=k, projection=kind,
                                             memory_mb=args.memory_mb)
            feats = att.features()[0]
            t0 = time.perf_counter()
            feats._features = np.concatenate([
                feats.projector(torch.from_numpy(np.asarray(phi0[lo : lo + 256]))).numpy()
                for lo in range(0, len(phi0), 256)])
            proj_s = time.perf_counter() - t0
        per_query, sp, top, sp_ref = [], [], [], []
        for (g, rec), e, ref in zip(steps, ex_scores, reference):
            t0 = time.perf_counter()
            s = att.scores_from(g, rec["step"])
            per_query.append(time.perf_counter() - t0)
            sp.append(spearmanr(s, e)[0])
            top.append(top_overlap(s, e))
            sp_ref.append(spearmanr(s, ref)[0])
        lin_s = float(np.mean(step_s) + np.mean(per_query))
        rows.append({
            "projection k": "none (exact gradients)" if k == 0 else str(k),
            "projection": kind or "—",
            "one-off features s": grad_s + proj_s, "s/query": lin_s,
            "of which projection + dot products s": float(np.mean(per_query)),
            "speed-up vs exact": exact_s / lin_s,
            "Spearman vs exact": float(np.mean(sp)), "top-10 overlap vs exact": float(np.mean(top)),
            "Spearman vs unprojected": float(np.mean(sp_ref)),
        })
    info = {"exact_s": exact_s, "baseline_s": baseline_s, "grad_s": grad_s,
            "step_s": float(np.mean(step_s)), "n": len(ids),
            "alpha": [rec["alpha"] for _, rec in steps],
            "grads_per_s": len(ids) * score.timesteps / grad_s}
    return pd.DataFrame(rows), info


def mixed_precision(run, train, ids, fisher, queries, unlearn, score: ScoreSettings,
                    n_train: int) -> pd.DataFrame:
    """bfloat16 autocast against float32 on the same queries: a scoring pass's speed and the
    scores' agreement, beside float32 against itself under other draws (the method's own noise)."""
    variants = {"float32": score, "bfloat16 autocast": score.replace(precision="bfloat16"),
                "float32, other draws (seed + 1)": score.replace(seed=score.seed + 1)}
    track_losses(run.task, run.model, Subset(train, range(1)), score)  # caption cache, warm-up
    before, seconds, scores = {}, {}, {name: [] for name in variants}
    for name, s in variants.items():
        t0 = time.perf_counter()
        before[name] = track_losses(run.task, run.model, train, s)
        seconds[name] = time.perf_counter() - t0
    for q in queries:
        delta, _ = unlearn_query(run.task, run.model, q, fisher, unlearn, n_train)
        with applied(run.model, delta):
            for name, s in variants.items():
                after = track_losses(run.task, run.model, train, s)
                scores[name].append(score_of(before[name], after, s.kind))
    rows = []
    for name in variants:
        pairs = list(zip(scores[name], scores["float32"]))
        rows.append({
            "scoring": name,
            "pass s": seconds[name],
            "losses/s": len(train) * score.timesteps / seconds[name],
            "speed-up": seconds["float32"] / seconds[name],
            "loss rel. diff (max)": float(np.max(np.abs(before[name] / before["float32"] - 1))),
            "Spearman vs float32": float(np.mean([spearmanr(a, b)[0] for a, b in pairs])),
            "top-10 overlap vs float32": float(np.mean([top_overlap(a, b) for a, b in pairs])),
            "self-rank": float(np.mean([1 + np.sum(sc > sc[ids.index(q.track_id)])
                                        for sc, q in zip(scores[name], queries)])),
        })
    return pd.DataFrame(rows)


def many_queries(run, train, score: ScoreSettings, n: int, q: int) -> dict:
    """Q unlearned models: Q passes, against one pass reusing each batch, against vmap over
    stacked parameter copies (torch.func)."""
    from torch.func import functional_call, stack_module_state, vmap

    task, model = run.task, run.model
    sub = Subset(train, range(min(n, len(train))))
    params = task.parameters(model, "transformer")
    gen = torch.Generator().manual_seed(0)
    deltas = [{k: 1e-3 * torch.randn(p.shape, generator=gen) for k, p in params.items()}
              for _ in range(q)]
    models = []
    for d in deltas:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for k, p in m.named_parameters():
                if k in d:
                    p.add_(d[k])
        models.append(m.eval())
    track_losses(task, model, sub, score)  # warm the caches
    ts = fixed_timesteps(score.timesteps, score.stride)

    def batches():
        for batch in DataLoader(sub, batch_size=score.batch_size, collate_fn=collate):
            t, noise = draw_noise(batch["track_id"], range(score.timesteps), task.latent_shape,
                                  seed=score.seed, timesteps=ts)
            yield batch, t, noise

    def one_pass_each():
        return [track_losses(task, m, sub, score) for m in models]

    def one_pass_for_all():
        shared = [[] for _ in models]
        with torch.inference_mode():
            for batch, t, noise in batches():
                for k, m in enumerate(models):
                    shared[k].append(loss_at_draws(task, m, batch, t, noise, score.mask_train))
        return shared

    t_seq, t_shared = float("inf"), float("inf")
    for _ in range(2):  # alternated, best of two: the machine is shared
        t0 = time.perf_counter()
        seq = one_pass_each()
        t1 = time.perf_counter()
        shared = one_pass_for_all()
        t_seq, t_shared = min(t_seq, t1 - t0), min(t_shared, time.perf_counter() - t1)
    same = all(np.array_equal(torch.cat(shared[k]).double().numpy(), seq[k]) for k in range(q))
    stacked = stack_module_state(models)

    class Bound(torch.nn.Module):
        def __init__(self, state):
            super().__init__()
            self.state, self.config = state, model.config

        def forward(self, *a, **kw):
            return functional_call(model, self.state, a, kw)

    t0 = time.perf_counter()
    out = []
    try:
        import warnings

        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for batch, t, noise in batches():
                one = lambda p, b, batch=batch, t=t, noise=noise: loss_at_draws(  # noqa: E731
                    task, Bound((p, b)), batch, t, noise, score.mask_train)
                out.append(vmap(one, randomness="same")(*stacked))
        t_vmap = time.perf_counter() - t0
        v = torch.cat(out, 1).double().numpy()
        vmap_diff = float(max(np.abs(v[k] - seq[k]).max() for k in range(q)))
    except Exception as exc:  # a model vmap cannot batch
        print(f"vmap failed: {type(exc).__name__}: {exc}")
        t_vmap, vmap_diff = float("nan"), float("nan")
    return {"n": len(sub), "q": q, "sequential": t_seq, "shared": t_shared, "vmap": t_vmap,
            "shared_same": same, "vmap_diff": vmap_diff}


def _draw_noise_loop(keys, draws, shape, seed=0, timesteps=None, t_min=1e-3, t_max=1 - 1e-3):
    """`draw_noise` as it was before (one element assignment per sample and draw): reference."""
    b, d = len(keys), len(draws)
    t, noise = torch.empty(b, d), torch.empty(b, d, *shape)
    gen = torch.Generator()
    for i, key in enumerate(keys):
        base = _key_seed(key, seed)
        for j, draw in enumerate(draws):
            gen.manual_seed((base + 1_000_003 * int(draw)) % (1 << 63))
            u = torch.rand((), generator=gen)
            noise[i, j] = torch.randn(shape, generator=gen)
            t[i, j] = (float(timesteps[int(draw) % len(timesteps)]) if timesteps is not None
                       else t_min + (t_max - t_min) * u)
    return t, noise


def noise_speed(shape, cases) -> list[dict]:
    import timeit

    rows = []
    for label, b, d, ts in cases:
        keys = [f"track-{i}" for i in range(b)]
        args = (keys, range(d), shape, 3, ts)
        new = lambda args=args: draw_noise(*args)  # noqa: E731
        old = lambda args=args: _draw_noise_loop(*args)  # noqa: E731
        same = all(torch.equal(x, y) for x, y in zip(new(), old()))
        t_old = min(timeit.repeat(old, number=5, repeat=7)) / 5
        t_new = min(timeit.repeat(new, number=5, repeat=7)) / 5
        rows.append({"call": label, "before ms": 1e3 * t_old, "after ms": 1e3 * t_new,
                     "speed-up": t_old / t_new, "bit-identical": same})
    return rows


# ------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("demo/run"))
    ap.add_argument("--corpus", type=Path, default=Path("demo/corpus"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks it runs end to end")
    ap.add_argument("--sizes", default="2500,5000,10000,20000")
    ap.add_argument("--sweep-timesteps", type=int, default=2,
                    help="timesteps per track in the size sweep (the default scoring uses 20)")
    ap.add_argument("--dist-n", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--draws", type=int, default=1024)
    ap.add_argument("--dims", default="256,1024,4096,0")
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--write", action="store_true", help="write docs even with --quick")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.sizes, args.sweep_timesteps, args.dist_n = "24,48,96,192", 1, 48
        args.queries, args.draws, args.dims, args.matmul_n = 1, 32, "64,0", 512
    args.dims = [int(x) for x in args.dims.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    if not (args.run / "config.json").exists():
        raise SystemExit(f"No run at {args.run}: train one (`linernotes demo`) or pass --run.")
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ln-scale-"))
    try:
        body = measure(args, sizes, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - started) / 60
    body = body.replace("{minutes}", f"{minutes:.0f}")
    print(body)
    if args.write or not args.quick:
        from bench_docs import write_section

        write_section("scale", body)


def measure(args, sizes: list[int], work: Path) -> str:
    from bench_docs import table as md_table

    load = os.getloadavg()[0]  # before this run's own work
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    flags = {f for line in lines if line.startswith("flags") for f in line.split()}
    found = sorted(flags & {"amx_bf16", "avx512_bf16"})
    bf16_cpu = f"has {' and '.join(found)}" if found else "has no bfloat16 instructions"
    run = load_run(args.run)
    manifest = read_manifest(args.corpus)
    _, train, ids = run.train_set(manifest, progress=False)
    fisher = run.fisher(manifest, FisherSettings(), progress=False)
    # float32, 16 tracks per batch: the scoring defaults when this section was measured (section
    # (8) compares bfloat16 against it; attribution_speed.py measures today's defaults)
    full_score = ScoreSettings(precision="float32", batch_size=16)
    if args.quick:
        full_score = full_score.replace(timesteps=2, stride=400)
    unlearn = UnlearnSettings(draws=args.draws, probe_draws=16 if args.quick else 64)
    n_lin = min(len(ids), 24) if args.quick else len(ids)
    lin_train, lin_ids = Subset(train, range(n_lin)), ids[:n_lin]
    queries = []
    for k in np.linspace(0, n_lin - 1, args.queries).astype(int):
        it = train[int(k)]
        queries.append(Query(it["track_id"], it["features"], it["mask"], it["caption"],
                             track_id=it["track_id"]))
    print("matmul peak ...", flush=True)
    peak1, peak2 = matmul_peak(args.matmul_n, 1), matmul_peak(args.matmul_n, 2)
    rows_per_forward = full_score.batch_size * full_score.timesteps
    t_sweep = args.sweep_timesteps
    sweep = ScoreSettings(timesteps=t_sweep, stride=max(1, 1000 // t_sweep) if t_sweep > 1 else 50,
                          batch_size=max(1, rows_per_forward // t_sweep), shard_size=2048)
    flops = flops_per_loss(run.task, run.model, train, sweep)

    # (3) first: it unlearns the queries; the first query's delta drives the scoring passes
    print("linear vs exact ...", flush=True)
    lin_table, lin = linear_vs_exact(args, run, manifest, lin_train, lin_ids, fisher, queries,
                                     full_score, unlearn, work / "cache")
    t0 = time.perf_counter()
    delta, _ = unlearn_query(run.task, run.model, queries[0], fisher, unlearn, len(ids))
    unlearn_s = time.perf_counter() - t0
    torch.save(delta, work / "delta.pt")

    # (1) and (2): the size sweep, one fresh process per size
    sweep_rows = []
    for n in sizes:
        print(f"scoring pass, {n} tracks ...", flush=True)
        r = scoring_pass(args, work, n, sweep, work / "delta.pt")
        sweep_rows.append({"training tracks": n, "scoring pass s": r["seconds"],
                           "s per 1k tracks": 1e3 * r["seconds"] / n,
                           "s/query (unlearn + pass)": unlearn_s + r["seconds"],
                           f"s/query at {PAPER_TIMESTEPS} timesteps": unlearn_s
                           + r["seconds"] * PAPER_TIMESTEPS / t_sweep,
                           "RSS before pass MB": r["rss_before_mb"], "peak RSS MB": r["peak_mb"]})
    sw = pd.DataFrame(sweep_rows)
    x, y = sw["training tracks"].to_numpy(float), sw["scoring pass s"].to_numpy()
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - ((y - (slope * x + intercept)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    losses_per_s = x[-1] * t_sweep / y[-1]
    achieved = losses_per_s * flops

    # (4) 1 vs 2 processes (and 1 process on 2 threads)
    print("1 vs 2 processes ...", flush=True)
    # ranks take every n-th shard: 16 shards, so that both ranks have work
    sharded = sweep.replace(shard_size=max(1, -(-args.dist_n // 16)))
    one = scoring_pass(args, work, args.dist_n, sharded, work / "delta.pt", threads=1, nproc=1)
    two = scoring_pass(args, work, args.dist_n, sharded, work / "delta.pt", threads=1, nproc=2)
    thr = scoring_pass(args, work, args.dist_n, sharded, work / "delta.pt", threads=2)
    dist = pd.DataFrame([
        {"layout": "1 process × 1 thread (torchrun)", "scoring pass s": one["seconds"],
         "speed-up": 1.0, "peak RSS MB (rank 0)": one["peak_mb"]},
        {"layout": "2 processes × 1 thread (torchrun, gloo)", "scoring pass s": two["seconds"],
         "speed-up": one["seconds"] / two["seconds"], "peak RSS MB (rank 0)": two["peak_mb"]},
        {"layout": "1 process × 2 threads", "scoring pass s": thr["seconds"],
         "speed-up": one["seconds"] / thr["seconds"], "peak RSS MB (rank 0)": thr["peak_mb"]},
    ])
    dist_speedup = one["seconds"] / two["seconds"]

    # (8) bfloat16 autocast against float32
    print("mixed precision ...", flush=True)
    bf16 = mixed_precision(run, lin_train, lin_ids, fisher, queries, unlearn, full_score,
                           len(ids))
    bf = bf16.set_index("scoring")

    # (6) several unlearned models in one pass; (7) draw_noise
    print("many queries per pass ...", flush=True)
    mq = many_queries(run, train, full_score, 8 if args.quick else 32, 2)
    best = float(np.nanmax([mq["sequential"] / mq["shared"], mq["sequential"] / mq["vmap"]]))
    many_verdict = (
        f"The best pays {best:.2f}× (≥ 1.3×): worth a multi-query scoring pass." if best >= 1.3
        else f"Neither pays (best {best:.2f}×, < 1.3×): loading a batch and drawing its noise is "
        "a small share of a forward, and CPU attention has no vmap batching rule, so "
        "`attribute_many` is not provided.")
    noise_rows = noise_speed(run.task.latent_shape, [
        (f"scoring batch: {full_score.batch_size} tracks × {full_score.timesteps} timesteps",
         full_score.batch_size, full_score.timesteps, fixed_timesteps()),
        (f"query gradient: 1 query × {unlearn.draws} draws", 1, unlearn.draws, None),
    ])

    # (5) extrapolation to the paper's corpus
    n_losses = PAPER_TRACKS * PAPER_TIMESTEPS
    here_pass = n_losses / losses_per_s
    here_two = here_pass / dist_speedup
    total_flop = n_losses * flops
    frac = achieved / peak1
    h100_same = total_flop / (H100_TF32 * frac)
    matvec_k = max([k for k in args.dims if k > 0] or [256])
    phi = np.random.default_rng(0).standard_normal((20_000, matvec_k), dtype=np.float32)
    mv_s = _timed(lambda: matvec(phi, np.ones(matvec_k))) * PAPER_TRACKS / 20_000
    lin_row = lin_table[lin_table["projection k"] == str(matvec_k)]
    proj_s = (float(lin_row["of which projection + dot products s"].iloc[0]) if len(lin_row)
              else float("nan"))
    lin_query_115k = lin["step_s"] + proj_s + mv_s
    feats_115k = n_losses / lin["grads_per_s"]
    hours = 3600.0
    extrap = pd.DataFrame([
        {"setting": "this machine, 1 process × 1 thread, exact",
         "scoring pass": here_pass, "per query": unlearn_s + here_pass},
        {"setting": "this machine, 2 processes, exact",
         "scoring pass": here_two, "per query": unlearn_s + here_two},
        {"setting": f"this machine, linear mode k={matvec_k} (after the one-off gradients)",
         "scoring pass": float("nan"), "per query": lin_query_115k},
        {"setting": f"one H100, our model, TF32 at {100 * frac:.1f}% of peak (assumed)",
         "scoring pass": h100_same, "per query": float("nan")},
        {"setting": "paper: 8 H100s (scoring) + one H100 (one unlearning step)",
         "scoring pass": 5 * hours, "per query": 5 * hours + 20 * 60},
    ])
    for col in ("scoring pass", "per query"):
        extrap[col] = extrap[col].map(duration)
    n_params = sum(p.numel() for p in run.task.parameters(run.model, unlearn.group).values())
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.2f} at the "
               "start" + (" (shared with other jobs: timings are inflated; ratios are measured "
                          "within this run)" if load > 0.5 else " (otherwise idle)"))
    return f"""## Scale: the cost curve, the linear mode and processes (`benchmarks/scale.py`)

`OMP_NUM_THREADS=1 python benchmarks/scale.py --run {args.run} --corpus {args.corpus}{
' --quick' if args.quick else ''}`; {dt.date.today()}, {machine}, torch {torch.__version__},
{{minutes}} min in all. Model: run `{run.hash}` ({sum(p.numel() for p in run.model.parameters()):,}
parameters, latent {run.task.latent_shape}); its training set has {len(ids)} tracks.

**Matmul peak (float32, {args.matmul_n}²):** {peak1 / 1e9:.1f} GFLOP/s on 1 thread,
{peak2 / 1e9:.1f} GFLOP/s on 2 threads{
' (below 1 thread: the other core was busy with other jobs)' if peak2 < peak1 else ''}.
**Scoring FLOPs:** {flops / 1e9:.3f} GFLOP per (track, timestep) loss (forward of the
denoiser, counted with torch's FlopCounterMode on one batch, CPU attention counted like the GPU
kernels).

### (1) Time per query and memory vs. training tracks

The run's tracks duplicated up to each size (duplicates are fine for timing); each size scored in
a fresh process on 1 thread (peak RSS: the process's high-water mark, reset just before
the pass) with the first query's unlearned weights, {t_sweep} fixed
timestep(s) per track and {sweep.batch_size} tracks per batch (the same {rows_per_forward} rows per
forward as the default scoring, {full_score.timesteps} timesteps × {full_score.batch_size} tracks).
Unlearning the query ({unlearn.draws} draws, α for a 1.5× loss ratio) took {unlearn_s:.1f} s,
independent of the number of tracks; the per-query column at {PAPER_TIMESTEPS} timesteps scales
the pass by {PAPER_TIMESTEPS}/{t_sweep}.

{md_table(sw, ".4g")}

Linear fit: {slope * 1e3:.3f} s per 1000 tracks {intercept:+.2f} s (R² = {r2:.4f}). Peak
memory during the pass is flat: {sw['peak RSS MB'].min():.0f}–{sw['peak RSS MB'].max():.0f} MB from
{int(x[0])} to {int(x[-1])} tracks (losses are written shard by shard; nothing grows with N
but the N-float result).

### (2) Throughput and FLOP/s

{losses_per_s:.1f} track losses/s (one loss = one (track, timestep) forward) on 1 thread at
{int(x[-1])} tracks: {achieved / 1e9:.2f} GFLOP/s achieved, **{100 * frac:.0f}%** of the
1-thread matmul peak ({100 * achieved / peak2:.0f}% of the 2-thread peak).

### (3) Linear mode against exact unlearning

{n_lin} training tracks, {len(queries)} self-influence queries, {full_score.timesteps} scoring
timesteps, {unlearn.draws} query draws, α chosen by exact unlearning's rule (the linear mode
picks the bit-identical α). Exact: {lin['exact_s']:.1f} s/query (unlearning + one scoring
pass; the cached baseline, once, took {lin['baseline_s']:.1f} s). Linear: per-sample gradients
of all tracks once ({lin['grad_s']:.1f} s, {lin['grads_per_s']:.1f} gradients/s), projected per
k (the one-off column adds that projection); per query, the query gradient and α search
({lin['step_s']:.1f} s, the same work exact unlearning does) plus projecting the query and
N dot products. Agreement is Spearman and top-10 overlap of the scores, mean over queries.

{md_table(lin_table)}

The linear mode cannot beat the query's own cost (gradient + α search), so its speed-up grows with
N: exact pays a pass over N × {full_score.timesteps} losses per query, linear N·k multiply-adds.
Projecting the query with the dense Rademacher matrix costs generating it (P × k random numbers,
P = {n_params:,} parameters), which dominates at large k unless the matrix fits the memory budget
and is kept; the sparse map (the default: 4 entries ±1/2 per parameter, made once and kept)
costs O(P) whatever k.

### (4) 1 vs 2 processes

{args.dist_n} tracks in {-(-args.dist_n // sharded.shard_size)} shards, {t_sweep} timestep(s) each,
under `torch.distributed.run` (gloo on CPU),
each rank scoring every other shard and writing its own shard files (identical scores: see
tests/test_distributed.py).

{md_table(dist, ".4g")}

### (5) One query on {PAPER_TRACKS:,} tracks, extrapolated

Arithmetic: {PAPER_TRACKS:,} tracks × {PAPER_TIMESTEPS} timesteps = {n_losses:,} losses per
scoring pass. This machine: {n_losses:,} / {losses_per_s:.1f} losses/s =
{here_pass / hours:.1f} h on 1 thread, / {dist_speedup:.2f} = {here_two / hours:.1f} h on 2
processes, plus {unlearn_s:.0f} s to unlearn. One H100, our model: {n_losses:,} ×
{flops / 1e9:.3f} GFLOP = {total_flop / 1e15:.1f} PFLOP; **assuming** the published dense TF32
peak of {H100_TF32 / 1e12:.1f} TFLOP/s (BF16: {H100_BF16 / 1e12:.1f}) and the same
{100 * frac:.1f}% utilisation as here, {h100_same:.0f} s (a model this small would likely use
an H100 less well; the number is a bound on the arithmetic, not a measurement). Linear mode,
k = {matvec_k}: per query {lin['step_s']:.0f} s (query gradient + α) + {proj_s:.1f} s
(projection) + {mv_s:.2f} s ({PAPER_TRACKS:,} × {matvec_k} dot products, measured on 20,000
rows and scaled): **{(unlearn_s + here_pass) / lin_query_115k:.0f}×** faster per query
than exact on 1 thread, after a one-off {feats_115k / hours:.1f} h of per-sample gradients at
{lin['grads_per_s']:.1f}/s. The paper (SPEC §1; a much larger model): ~20 min
for the unlearning step on one H100 and ~5 h on 8 H100s for the scoring pass, i.e. 115,000 × 20 /
(5 h × 8 GPUs) ≈ {PAPER_TRACKS * PAPER_TIMESTEPS / (5 * hours * 8):.0f} losses per GPU-second if
it used 20 timesteps.

{md_table(extrap)}

### (6) Several queries in one pass over the training data

{mq['n']} tracks × {full_score.timesteps} timesteps, {mq['q']} unlearned models:
{mq['sequential']:.1f} s as {mq['q']} passes; {mq['shared']:.1f} s as one pass reusing each loaded
batch and its noise for every model ({mq['sequential'] / mq['shared']:.2f}×; bit-identical:
{mq['shared_same']}); {mq['vmap']:.1f} s stacking the models' parameters and vmapping
`functional_call` over them ({mq['sequential'] / mq['vmap']:.2f}×; max difference
{mq['vmap_diff']:.2g}). {many_verdict}

### (7) `draw_noise`

Noise must stay a pure function of (track id, draw, seed): torch's CPU generator is seeded once
per (track, draw), so the draws cannot be fused into one call without changing every number. The
loop now only seeds and fills in place, with the timesteps computed for all draws at once.

{md_table(pd.DataFrame(noise_rows))}

### (8) Mixed precision: bfloat16 autocast on the CPU

{n_lin} training tracks × {full_score.timesteps} timesteps, {len(queries)} self-influence queries
(the unlearning step itself in float32). Each row scores the same unlearned models; the last row
is float32 under other fixed draws, the scale of change the method has anyway. Self-rank is the
query's own rank among its scores (1 = best), mean over queries. This CPU {bf16_cpu}; without
bfloat16 instructions autocast is no faster.

{md_table(bf16, ".3g")}

bfloat16 is {bf.loc['bfloat16 autocast', 'speed-up']:.2f}× faster; its scores agree with float32
at Spearman {bf.loc['bfloat16 autocast', 'Spearman vs float32']:.3f}, against
{bf.loc['float32, other draws (seed + 1)', 'Spearman vs float32']:.3f} for float32 under other
draws. It is `--precision bfloat16` (`ScoreSettings.precision`); since 2026-12-02 the default
is `auto` (bfloat16 where the device runs it natively).
"""


if __name__ == "__main__":
    main()
