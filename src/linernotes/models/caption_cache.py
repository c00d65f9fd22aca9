"""Caption encodings, kept per caption: in memory, and in the run's cache folder on disk.

A text-to-music Task conditions every training track on its caption's encoding (MiniLM + CLAP
for the reference model, T5 for Stable Audio and MusicGen). Each caption is encoded alone (a
batch's padding and size change the last bits), in float32 outside autocast and inference mode,
so an encoding never depends on when, or beside what, it was first made. Encoding one at a time
is slow next to scoring: ~30 captions/s on one CPU thread for the reference model, 5 minutes for
the 8,556 distinct captions of the whole music21 corpus, paid again by every process. So a run
keeps them under `cache/captions-<key>/` (`Family.keep_captions`; a retrain in its run's
`retrains/` shares its run's): each process writes the encodings it made as part files (every
`SAVE_SECONDS` while encoding, when the cache is dropped, and at exit), and every later process
reads them instead of encoding. A killed process loses at most the encodings of
its last `SAVE_SECONDS`; parts that cannot be read are dropped and encoded again; many parts are
merged into one when read. Every process that shares the folder gets the same bytes.
"""

from __future__ import annotations

import atexit
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from linernotes import device
from linernotes.artifacts import atomic_path, load_cached

Encoding = tuple[torch.Tensor, ...]

#: while encoding, write what is new at least this often (seconds)
SAVE_SECONDS = 30.0
#: merge the parts read when there are more than this many
MERGE_FROM = 16
FORMAT = "linernotes-captions-1"

_KEPT: weakref.WeakSet[CaptionCache] = weakref.WeakSet()  # caches with a folder, saved at exit


@atexit.register
def _save_all() -> None:
    for cache in list(_KEPT):
        cache.save()


def _read(path: Path) -> dict[str, Encoding]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a linernotes caption part")
    return {str(k): tuple(v) for k, v in data["entries"].items()}


class CaptionCache:
    """Encodings of captions by `encode` (one caption -> a tuple of CPU tensors), made once.

    `encode` runs without grad, outside inference mode (so a cache filled while scoring still
    serves gradient computations) and outside autocast (`device.full_precision`).
    """

    def __init__(self, encode: Callable[[str], Encoding]):
        self.encode = encode
        self.memory: dict[str, Encoding] = {}
        self.folder: Path | None = None
        self._read_disk = False
        self._unsaved: dict[str, Encoding] = {}
        self._saved_at = time.monotonic()

    def keep_in(self, folder: str | Path) -> None:
        """Keep the encodings in `folder` too (read on the first caption not in memory)."""
        self.folder, self._read_disk = Path(folder), False
        _KEPT.add(self)

    def __del__(self) -> None:  # a run dropped before the process ends keeps what it made
        try:
            self.save()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def get(self, captions: Sequence[str]) -> list[Encoding]:
        """The encodings of `captions` (in order; repeats allowed)."""
        todo = [c for c in dict.fromkeys(captions) if c not in self.memory]
        if todo and self.folder is not None and not self._read_disk:
            self._load()
            todo = [c for c in todo if c not in self.memory]
        if todo:
            self._fill(todo)
        return [self.memory[c] for c in captions]

    @torch.inference_mode(False)
    @torch.no_grad()
    @device.full_precision()
    def _fill(self, todo: list[str]) -> None:
        for caption in todo:
            encoded = tuple(t.detach().to("cpu").clone() for t in self.encode(caption))
            self.memory[caption] = encoded
            if self.folder is not None:
                self._unsaved[caption] = encoded
                if time.monotonic() - self._saved_at >= SAVE_SECONDS:
                    self.save()

    def save(self) -> None:
        """Write the encodings made since the last save as a new part (a no-op without a
        folder or anything new). A folder that cannot be written is said once and dropped."""
        self._saved_at = time.monotonic()
        if self.folder is None or not self._unsaved:
            return
        try:
            self._write(self._unsaved)
        except OSError as exc:
            print(f"linernotes: cannot keep caption encodings in {self.folder} ({exc}); "
                  "they stay in memory only.", file=sys.stderr, flush=True)
            self.folder = None
        self._unsaved = {}

    def _write(self, entries: dict[str, Encoding]) -> None:
        path = self.folder / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.pt"
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, "entries": entries}, tmp)

    def _load(self) -> None:
        """Read every part in the folder (the bad ones deleted), and merge them when many."""
        self._read_disk = True
        read: list[Path] = []
        for part in sorted(self.folder.glob("part-*.pt")):
            entries = load_cached(part, _read)  # None also for a part merged away meanwhile
            if entries is None:
                part.unlink(missing_ok=True)
                continue
            read.append(part)
            for caption, encoded in entries.items():
                self.memory.setdefault(caption, encoded)
        if len(read) > MERGE_FROM:
            try:
                self._write({c: e for c, e in self.memory.items() if c not in self._unsaved})
            except OSError:
                return
            for part in read:
                part.unlink(missing_ok=True)
