"""Where the model runs: the one helper that picks a device and moves tensors to it.

`select("auto" | "cpu" | "cuda")` sets the device runs are loaded and trained on (auto: CUDA when
available); every command that runs a model takes `--device`. Data stays on the CPU until it
meets the model: a Task moves its inputs to the model's device (`move`), draws of noise are made
on the CPU (so they are the same bits on every device), and results come back to the CPU before
they are stored. On the CPU every move is a no-op: results are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from linernotes.errors import LinernotesError

DEVICES = ("auto", "cpu", "cuda")
_current = torch.device("cpu")


def resolve(name: str | torch.device) -> torch.device:
    """The torch device for a `--device` value."""
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LinernotesError("--device cuda: no CUDA device is available here (this torch "
                                  "build or machine has none); use --device cpu or auto.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise LinernotesError(f"--device takes {', '.join(DEVICES)}, not {name!r}.")


def select(name: str | torch.device) -> torch.device:
    """Make `name` the device runs are loaded and trained on from now on; returns it."""
    global _current
    _current = resolve(name)
    return _current


def current() -> torch.device:
    """The selected device (the CPU unless `select` chose another)."""
    return _current


def of(model: nn.Module) -> torch.device:
    """The device a model's parameters are on."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively (a GPU with bfloat16, a CPU with
    AVX512-BF16 or AMX), so that bfloat16 autocast is faster rather than slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


@contextmanager
def full_precision() -> Iterator[None]:
    """A block (or, as a decorator, a function) that runs in its tensors' own precision even
    inside a bfloat16 autocast region. Caches filled there (caption encodings) must hold the
    same numbers whether their first use came under autocast (a scoring pass) or not (an
    unlearning step): else a resumed job, whose first use differs, scores differently."""
    with ExitStack() as stack:
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def move(obj: Any, device: torch.device) -> Any:
    """Tensors in `obj` (a tensor, or dicts, lists and tuples of them) on `device`; anything
    else as it is. A no-op for tensors already there."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj

