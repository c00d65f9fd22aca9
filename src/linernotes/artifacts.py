"""Small helpers for artifacts on disk: atomic writes, content hashes, JSON records."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from linernotes.errors import LinernotesError

T = TypeVar("T")


def _file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path` (with the mode a
    plain write would give it, not the temporary file's private 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, _file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def load_cached(path: str | os.PathLike, load: Callable[[Path], T]) -> T | None:
    """`load(path)`, or None when the file is missing or cannot be read: a truncated or corrupt
    cache file is a cache miss, which the caller recomputes and rewrites. The miss is said once
    on stderr. `load` raises (any exception) for a file it finds damaged or of the wrong shape."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as exc:  # noqa: BLE001 - whatever the reader's complaint, the file is bad
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"linernotes: {path} cannot be read ({reason}); computing it again.",
              file=sys.stderr, flush=True)
        return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON, with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise LinernotesError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LinernotesError(f"{path} is not valid JSON ({exc}); delete it and re-run.") from exc


def hash_json(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Short sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint_file(path: str | Path, blocks: int = 16, block: int = 1 << 16) -> str:
    """A short fingerprint of a (possibly multi-GB) file: sha256 of its size and of `blocks`
    evenly spaced blocks of `block` bytes (the whole file when it is smaller than those)."""
    path = Path(path)
    size = path.stat().st_size
    if size <= blocks * block:
        return hash_file(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(blocks):
            f.seek((size - block) * k // (blocks - 1))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def fingerprint_tree(root: str | Path) -> str:
    """Fingerprint of a folder: every file's relative path and `fingerprint_file`."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return hash_json([[str(p.relative_to(root)), fingerprint_file(p)] for p in files])


def link_tree(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Every file under `src` at the same place under `dst`, hard-linked (copied when a link is
    impossible); top-level entries named in `skip` are left out; files already there are kept."""
    src, dst = Path(src), Path(dst)
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or not path.is_file():
            continue
        target = dst / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
