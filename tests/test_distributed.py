"""Two real processes under torchrun (gloo) give the same Fisher and losses as one process."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from linernotes.curvature import Fisher

from conftest import make_tone_corpus

WORKER = Path(__file__).parent / "dist_worker.py"


def torchrun(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0",
           str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_processes_equal_one_and_resume_after_a_killed_rank(tmp_path):
    from conftest import TINY_FEATURES
    from tiny_task import TinyDiTTask

    make_tone_corpus(tmp_path / "corpus", n_per_artist=4)
    model = TinyDiTTask(TINY_FEATURES.n_frames, TINY_FEATURES.n_mels).make_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    args = [str(tmp_path / "corpus"), str(tmp_path / "model.pt")]
    one = torchrun(1, *args, str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *args, str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "losses.npy"), np.load(tmp_path / "two" / "losses.npy")
    assert np.array_equal(a, b)
    fa = Fisher.load(tmp_path / "one" / "fisher.safetensors")
    fb = Fisher.load(tmp_path / "two" / "fisher.safetensors")
    assert fa.n_examples == fb.n_examples
    for name in fa.diag:
        torch.testing.assert_close(fa.diag[name], fb.diag[name], rtol=1e-5, atol=1e-12)
    # kill rank 1 after its first shard; the rerun resumes from the shards on disk
    killed = torchrun(2, *args, str(tmp_path / "killed"), env={"DIE_AFTER_SHARDS": "1"})
    assert killed.returncode != 0
    written = len(list((tmp_path / "killed" / "losses").glob("shard-*.npy")))
    assert 0 < written < len(a) // 2 + 1
    again = torchrun(2, *args, str(tmp_path / "killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "killed" / "losses.npy"), a)
