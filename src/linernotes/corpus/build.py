"""Build the reference corpus: choose excerpts balanced over artists, render them on all cores,
write audio/<track_id>.flac, build_log.jsonl and the manifest. Re-running resumes."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import soundfile as sf
from tqdm import tqdm

from linernotes.artifacts import atomic_path, read_json, write_json
from linernotes.corpus.captions import CaptionFacts, caption_for
from linernotes.corpus.music21_source import Work, list_works, select_artists
from linernotes.corpus.render import DEFAULT_SOUNDFONT, RenderSkip, check_tools, rng_for
from linernotes.data.manifest import write_manifest
from linernotes.errors import LinernotesError

RENDER_VERSION = 2  # bump when rendering changes, so old folders are not silently reused
SETTINGS_NAME = "corpus_settings.json"
LOG_NAME = "build_log.jsonl"
RECORDS_DIR = "records"  # one JSON per finished track: what the manifest needs without re-render


@dataclass
class BuildResult:
    """What a corpus build produced: the manifest, what was skipped and why, and timing."""

    out_dir: Path
    manifest: pd.DataFrame
    skipped: list[dict] = field(default_factory=list)
    rendered: int = 0  # rendered in this run
    reused: int = 0  # finished by an earlier (interrupted) run
    elapsed: float = 0.0

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.parquet"

    @property
    def total_duration(self) -> float:
        return float(self.manifest["duration"].sum())

    def counts_per_artist(self) -> dict[str, int]:
        return dict(sorted(Counter(self.manifest["artist"]).items()))

    def skip_reasons(self) -> dict[str, int]:
        """Skips counted by the kind of reason (the text before the first colon)."""
        return dict(Counter(s["reason"].split(":")[0] for s in self.skipped).most_common())

    def summary_table(self) -> pd.DataFrame:
        """Tracks, holdout tracks, seconds of audio and skips per artist, with a total row."""
        return summary_table(self.manifest, self.skipped)


def summary_table(manifest: pd.DataFrame, skipped: list[dict] | None = None) -> pd.DataFrame:
    """Per-artist table of a manifest: tracks, holdout tracks, seconds, skipped items."""
    skips = Counter(s.get("artist", "") for s in skipped or [])
    rows = []
    for artist, group in manifest.groupby("artist", sort=True):
        rows.append(
            {
                "artist": artist,
                "tracks": len(group),
                "holdout": int((group["split"] == "holdout").sum()),
                "seconds": round(float(group["duration"].sum()), 1),
                "skipped": skips.pop(artist, 0),
            }
        )
    for artist, n in sorted(skips.items()):
        rows.append({"artist": artist, "tracks": 0, "holdout": 0, "seconds": 0.0, "skipped": n})
    table = pd.DataFrame(rows, columns=["artist", "tracks", "holdout", "seconds", "skipped"])
    total = {
        "artist": "total",
        "tracks": int(table["tracks"].sum()),
        "holdout": int(table["holdout"].sum()),
        "seconds": round(float(table["seconds"].sum()), 1),
        "skipped": int(table["skipped"].sum()),
    }
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def track_id_for(work: Work, excerpt: int) -> str:
    """Stable track id: the work id (slug + hash of its source) plus the excerpt number."""
    return f"{work.work_id}-e{excerpt}"


def candidate_lists(
    works: list[Work], seed: int, all_excerpts: bool = True
) -> dict[str, list[tuple[Work, int]]]:
    """Per artist, the order in which (work, excerpt) pairs are tried: every work's opening in a
    seeded shuffle, then every long work's second excerpt, and so on."""
    by_artist: dict[str, list[Work]] = {}
    for w in sorted(works, key=lambda w: w.work_id):
        by_artist.setdefault(w.artist, []).append(w)
    lists = {}
    for artist, ws in sorted(by_artist.items()):
        rng_for(seed, "order", artist).shuffle(ws)
        depth = max(w.n_excerpts for w in ws) if all_excerpts else 1
        lists[artist] = [(w, k) for k in range(depth) for w in ws if k < w.n_excerpts]
    return lists


def build_corpus(
    out_dir: str | Path,
    size: int | str = 400,
    seconds: float = 8.0,
    seed: int = 0,
    artists: list[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
    *,
    min_works: int = 3,
    holdout_fraction: float = 0.1,
    sample_rate: int = 16000,
    soundfont: str | Path = DEFAULT_SOUNDFONT,
    works: list[Work] | None = None,
) -> BuildResult:
    """Render a corpus of `size` excerpts (or "all" works once each) balanced over artists.

    `works` replaces music21's corpus with your own list (see `work_from_file`).
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    _validate(size, seconds, holdout_fraction, sample_rate)
    check_tools(soundfont)
    if works is None:
        works = list_works(artists, min_works)
    elif artists is not None:
        works = select_artists(works, artists, min_works)
    if not works:
        raise LinernotesError("No works to render: check `artists` and `min_works`.")
    settings = {
        "seconds": seconds,
        "sample_rate": sample_rate,
        "seed": seed,
        "soundfont": Path(soundfont).name,
        "render_version": RENDER_VERSION,
    }
    _check_settings(out_dir, settings)
    _remove_partial_files(out_dir)
    job = _Job(out_dir, seconds, sample_rate, seed, str(soundfont))
    lists = candidate_lists(works, seed, all_excerpts=size != "all")
    records, skipped, stats = _render_balanced(job, lists, size, seed, workers, progress)
    manifest = _manifest(records, seed, holdout_fraction)
    write_manifest(manifest, out_dir)
    _write_log(out_dir / LOG_NAME, skipped)
    return BuildResult(
        out_dir=out_dir,
        manifest=manifest,
        skipped=skipped,
        rendered=stats["rendered"],
        reused=stats["reused"],
        elapsed=time.monotonic() - started,
    )


def _validate(size, seconds: float, holdout_fraction: float, sample_rate: int) -> None:
    if size != "all" and not (isinstance(size, int) and size > 0):
        raise LinernotesError(f"Corpus size must be a positive number or 'all', not {size!r}.")
    if not seconds > 0:
        raise LinernotesError(f"Excerpt length must be positive, not {seconds} seconds.")
    if not 0 <= holdout_fraction < 1:
        raise LinernotesError(f"Holdout fraction must be in [0, 1), not {holdout_fraction}.")
    if sample_rate < 8000:
        raise LinernotesError(f"Sample rate {sample_rate} Hz is too low; use 8000 or more.")


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS_NAME
    if path.exists():
        old = read_json(path)
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise LinernotesError(
                f"{out_dir} holds a corpus built with other settings ({', '.join(changed)}: "
                f"{[old.get(k) for k in changed]} there, {[settings[k] for k in changed]} now). "
                "Use a new folder, or delete this one to rebuild."
            )
    else:
        write_json(path, settings)


def _remove_partial_files(out_dir: Path) -> None:
    """Delete temporary files an interrupted run left behind (atomic writes not yet renamed)."""
    for folder in (out_dir / "audio", out_dir / RECORDS_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Job:
    out_dir: Path
    seconds: float
    sample_rate: int
    seed: int
    soundfont: str


def _render_balanced(
    job: _Job,
    lists: dict[str, list[tuple[Work, int]]],
    size,
    seed: int,
    workers: int | None,
    progress: bool,
):
    """Render each artist's quota; replace a skipped excerpt with that artist's next candidate
    (or, once an artist runs out, give its share to the artists with the fewest tracks)."""
    order = sorted(lists)
    rng_for(seed, "artist-order").shuffle(order)
    taken = dict.fromkeys(order, 0)  # candidates handed out per artist
    done: dict[str, list[dict]] = {a: [] for a in order}
    skipped: list[dict] = []
    stats = {"rendered": 0, "reused": 0}
    target = sum(len(v) for v in lists.values()) if size == "all" else size
    pending = _allocate(order, lists, taken, done, target)
    workers = max(1, workers or os.cpu_count() or 1)
    bar = tqdm(total=len(pending), desc="Rendering corpus", unit="track", disable=not progress)
    pool = _LazyPool(workers)
    try:
        while pending:
            for outcome in _run(job, pending, pool, stats):
                bar.update(1)
                if "reason" in outcome:
                    skipped.append(outcome)
                else:
                    done[outcome["artist"]].append(outcome)
            pending = [] if size == "all" else _allocate(order, lists, taken, done, target)
            bar.total += len(pending)
            bar.refresh()
    finally:
        bar.close()
        pool.close()
    records = [r for a in order for r in done[a]]
    skipped.sort(key=lambda s: (s["artist"], s["track_id"]))
    return records, skipped, stats


def _allocate(order, lists, taken, done, target) -> list[tuple[Work, int]]:
    """Next candidates to try so that successes reach `target`, round-robin over artists with
    the fewest successes first (deterministic given which renders succeeded)."""
    missing = target - sum(len(v) for v in done.values())
    chosen: list[tuple[Work, int]] = []
    have = {a: len(done[a]) for a in order}
    while missing > 0:
        open_artists = [a for a in order if taken[a] < len(lists[a])]
        if not open_artists:
            break
        level = min(have[a] for a in open_artists)
        for a in open_artists:
            if missing == 0:
                break
            if have[a] == level:
                chosen.append(lists[a][taken[a]])
                taken[a] += 1
                have[a] += 1
                missing -= 1
    return chosen


class _LazyPool:
    """A process pool started only when there is more than one track to render."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def imap_unordered(self, fn, tasks: list):
        if self.workers == 1 or len(tasks) <= 1:
            return map(fn, tasks)
        if self.pool is None:
            # fork where safe (no `if __name__ == "__main__"` needed in user scripts)
            fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"
            ctx = multiprocessing.get_context("fork" if fork else "spawn")
            self.pool = ctx.Pool(self.workers)
        return self.pool.imap_unordered(fn, tasks)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _run(job: _Job, pending: list[tuple[Work, int]], pool: _LazyPool, stats: dict):
    """Yield one outcome (record or skip) per candidate; finished tracks are reused."""
    todo = []
    for work, excerpt in pending:
        record = _finished_record(job, track_id_for(work, excerpt))
        if record is not None:
            stats["reused"] += 1
            yield record
        else:
            todo.append((job, work, excerpt))
    for outcome in pool.imap_unordered(_render_one, todo):
        if "reason" not in outcome:
            stats["rendered"] += 1
        yield outcome


def _finished_record(job: _Job, track_id: str) -> dict | None:
    """The record of a track an earlier run finished, if its FLAC is complete."""
    record_path = job.out_dir / RECORDS_DIR / f"{track_id}.json"
    audio = job.out_dir / "audio" / f"{track_id}.flac"
    if not (record_path.exists() and audio.exists()):
        return None
    try:
        record = json.loads(record_path.read_text())
        complete = sf.info(str(audio)).frames == record["n_frames"]
    except Exception:
        return None
    return record if complete else None


def _render_one(task: tuple[_Job, Work, int]) -> dict:
    """Worker: render one excerpt and write its record; a skip returns the reason instead."""
    from linernotes.corpus.render import render_excerpt

    job, work, excerpt = task
    track_id = track_id_for(work, excerpt)
    base = {"track_id": track_id, "artist": work.artist, "source": work.source, "excerpt": excerpt}
    audio = job.out_dir / "audio" / f"{track_id}.flac"
    try:
        r = render_excerpt(
            work,
            excerpt,
            audio,
            seconds=job.seconds,
            sample_rate=job.sample_rate,
            seed=job.seed,
            soundfont=job.soundfont,
        )
    except RenderSkip as exc:
        return {**base, "reason": str(exc)}
    except LinernotesError:
        raise
    except Exception as exc:  # never let one score stop the build
        return {**base, "reason": f"unexpected error: {type(exc).__name__}: {exc}"[:300]}
    facts = CaptionFacts(
        artist=work.artist,
        kind=work.kind,
        instrument=r.instrument,
        family=r.family,
        tempo_word=r.tempo_word,
        key=r.key,
        meter=r.meter,
        is_composer=work.by_composer,
    )
    record = {
        "track_id": track_id,
        "parent_id": work.work_id,
        "path": f"audio/{track_id}.flac",
        "caption": caption_for(facts, job.seed, track_id),
        "artist": work.artist,
        "collection": work.collection,
        "title": work.title,
        "key": r.key,
        "meter": r.meter,
        "tempo": r.tempo,
        "instrument": r.instrument,
        "duration": r.duration,
        "sample_rate": job.sample_rate,
        "source": work.source,
        "licence": work.licence,
        "n_frames": r.n_frames,
        "render": asdict(r),
        "excerpt": excerpt,
    }
    path = job.out_dir / RECORDS_DIR / f"{track_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True))
    return record


def _manifest(records: list[dict], seed: int, holdout_fraction: float) -> pd.DataFrame:
    columns = [
        "track_id",
        "parent_id",
        "path",
        "caption",
        "artist",
        "collection",
        "title",
        "key",
        "meter",
        "tempo",
        "instrument",
        "duration",
        "sample_rate",
        "source",
        "licence",
    ]
    df = pd.DataFrame([{c: r[c] for c in columns} for r in records], columns=columns)
    df = df.sort_values(["artist", "track_id"], kind="stable").reset_index(drop=True)
    df["split"] = assign_splits(df, seed, holdout_fraction)
    return df


def assign_splits(df: pd.DataFrame, seed: int, holdout_fraction: float = 0.1) -> list[str]:
    """'train'/'holdout' per row, stratified by artist; excerpts of one work stay together.

    An artist with 3 or more tracks gets at least one holdout track (when the fraction is > 0)
    and always keeps at least one training track.
    """
    split = ["train"] * len(df)
    if holdout_fraction <= 0 or df.empty:
        return split
    for artist, group in df.groupby("artist", sort=True):
        n = len(group)
        if n < 3:
            continue
        want = max(1, round(holdout_fraction * n))
        parents = sorted(group["parent_id"].unique())
        rng_for(seed, "split", artist).shuffle(parents)
        size = group.groupby("parent_id").size()
        held = 0
        for parent in parents:
            if held >= want:
                break
            if held + size[parent] <= n - 1:
                for i in group.index[group["parent_id"] == parent]:
                    split[i] = "holdout"
                held += int(size[parent])
    return split


def _write_log(path: Path, skipped: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped))
