"""Caption encodings kept on disk against encoding them in every process.

For a run: a fresh process encodes every training caption into an empty caption folder (what
every process paid before the encodings were kept: the straightforward way), then another fresh
process reads them. Reports the seconds of each, captions/s, the folder's size and the ratio;
both children are timed from after the run is loaded. Writes the `captions` section of
docs/benchmarks.md with --write.

    OMP_NUM_THREADS=1 python benchmarks/captions.py --run RUN --corpus CORPUS --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from linernotes.data.manifest import read_manifest
from linernotes.run import load_run


def child(run_dir: Path, corpus: Path, folder: Path) -> dict:
    """Load the run, then time getting every training caption's encoding through `folder`."""
    manifest = read_manifest(corpus / "manifest.parquet")
    run = load_run(run_dir, manifest=manifest)
    ids = run.train_ids(manifest)
    captions = manifest.set_index("track_id").loc[ids, "caption"].tolist()
    cache = run.task.captions
    t0 = time.perf_counter()
    cache.keep_in(folder)
    cache.get(captions)
    cache.save()
    return {"seconds": time.perf_counter() - t0, "distinct": len(set(captions)),
            "tracks": len(captions)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the caption folder
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.run, a.corpus, a.child)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "captions"
        out = {}
        for name in ("encoded", "read"):
            done = subprocess.run([sys.executable, __file__, "--run", str(a.run), "--corpus",
                                   str(a.corpus), "--child", str(folder)], env=env, check=True,
                                  capture_output=True, text=True)
            out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        size = sum(f.stat().st_size for f in folder.glob("*")) / 2**20
    enc, read = out["encoded"]["seconds"], out["read"]["seconds"]
    n = out["encoded"]["distinct"]
    line = (f"{out['encoded']['tracks']} training tracks, {n} distinct captions: encoded (one at "
            f"a time) and kept in {enc:.1f} s ({n / enc:.0f}/s); read back by a new process in "
            f"{read:.2f} s ({n / read:.0f}/s): **{enc / read:.0f}x**; on disk {size:.0f} MB.")
    print(line)
    if a.write:
        from bench_docs import write_section

        write_section("captions", f"""## Caption encodings: kept on disk vs encoded by every process

`OMP_NUM_THREADS={env['OMP_NUM_THREADS']} python benchmarks/captions.py --run {a.run} --corpus
{a.corpus}`; {dt.date.today()}, {platform.machine()}, {torch.get_num_threads()} torch thread(s).
A fresh process encodes every training caption into an empty caption folder (what every process
paid before: the straightforward way), then another fresh process reads them (`CaptionCache`;
each timed after the run is loaded).

{line}
""")


if __name__ == "__main__":
    main()
