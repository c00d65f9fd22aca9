"""Import a user's folder of audio plus a captions file (CSV or JSONL) as a corpus manifest.

Every file is resampled, downmixed (or kept stereo: `channels=2`), cut into excerpts that share
the file's `parent_id`, and written as FLAC. Bad input is reported as (path, reason) and never
stops the rest: a file that decodes shorter than it declares (cut off, or a corrupt stretch the
decoder skipped) is left out unless `keep_truncated`, and a symbolic link to a file outside the
audio folder is refused unless `follow_links`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from linernotes.artifacts import atomic_path
from linernotes.corpus.build import assign_splits, summary_table
from linernotes.corpus.music21_source import short_hash, slug
from linernotes.data.audio import (
    AUDIO_SUFFIXES,
    load_audio_checked,
    loudness_normalise,
    write_audio,
)
from linernotes.data.manifest import write_manifest
from linernotes.errors import LinernotesError

REQUIRED_COLUMNS = ("path", "caption")
OPTIONAL_COLUMNS = (
    "artist",
    "title",
    "collection",
    "key",
    "meter",
    "tempo",
    "instrument",
    "licence",
)
LOG_NAME = "import_log.jsonl"
#: Audio containers soundfile cannot read: reported, since the user clearly meant them as input.
_UNSUPPORTED_AUDIO = (".m4a", ".aac", ".wma", ".mp4", ".webm", ".mid", ".midi", ".ape", ".alac")
#: What a problem did, in the log's `kind` field and `ImportResult.counts`: an audio file not
#: imported, an excerpt of an imported file skipped, a captions row not used, a cut-off file
#: imported anyway (`keep_truncated`).
FILE, EXCERPT, CAPTION, KEPT = "file", "excerpt", "caption", "kept"
_COUNT_OF = {
    FILE: "files_not_imported",
    EXCERPT: "excerpts_skipped",
    CAPTION: "caption_rows_not_used",
    KEPT: "truncated_kept",
}


@dataclass
class ImportResult:
    """The imported manifest, every problem found as (path, reason), and counts. `log` has each
    problem as a dict: path, reason, kind (FILE, EXCERPT, CAPTION or KEPT) and the artist of its
    captions row ('' if none)."""

    out_dir: Path
    manifest: pd.DataFrame
    problems: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.parquet"

    @property
    def total_duration(self) -> float:
        return float(self.manifest["duration"].sum())

    def summary_table(self) -> pd.DataFrame:
        """Tracks (excerpts), holdout tracks and seconds per artist, then the files not imported
        and the excerpts skipped (the artist of their captions row; '' if none), with a total."""
        skips = [e for e in self.log if e["kind"] in (FILE, EXCERPT)]
        table = summary_table(self.manifest, skips).drop(columns="skipped")
        for kind in (FILE, EXCERPT):
            n = Counter(e["artist"] for e in _distinct(self.log, kind))
            table[_COUNT_OF[kind]] = [n[a] for a in table["artist"][:-1]] + [n.total()]
        return table

    def problem_summary(self) -> str:
        """E.g. '4 file(s) not imported, 6 excerpt(s) skipped, 1 captions row(s) not used'."""
        c = self.counts
        parts = [
            f"{c.get(_COUNT_OF[FILE], 0)} file(s) not imported",
            f"{c.get(_COUNT_OF[EXCERPT], 0)} excerpt(s) skipped",
        ]
        if c.get(_COUNT_OF[CAPTION]):
            parts.append(f"{c[_COUNT_OF[CAPTION]]} captions row(s) not used")
        if c.get(_COUNT_OF[KEPT]):
            parts.append(f"{c[_COUNT_OF[KEPT]]} cut-off file(s) imported anyway")
        return ", ".join(parts)


def import_folder(
    audio_dir: str | Path,
    captions_file: str | Path,
    out_dir: str | Path,
    sample_rate: int = 16000,
    seconds: float = 8.0,
    *,
    channels: int = 1,
    min_seconds: float = 1.0,
    silence_db: float = -60.0,
    normalise: bool = True,
    seed: int = 0,
    holdout_fraction: float = 0.1,
    keep_truncated: bool = False,
    follow_links: bool = False,
    progress: bool = True,
) -> ImportResult:
    """Import `audio_dir` with captions from `captions_file` into `out_dir` (FLAC + manifest).

    Tracks longer than `seconds` become several excerpts; a final piece shorter than
    `min_seconds` is dropped (and counted). Audio quieter than `silence_db` dBFS peak is silent.
    `channels` is 1 (downmixed) or 2 (stereo kept; mono files duplicated), for models such as
    Stable Audio that work in stereo. A file that decodes shorter than its header declares is
    left out unless `keep_truncated` (then imported as far as it decodes, and still reported); a
    symbolic link to a file outside `audio_dir` is refused unless `follow_links`.
    """
    audio_dir, out_dir = Path(audio_dir).resolve(), Path(out_dir).resolve()
    if not audio_dir.is_dir():
        raise LinernotesError(f"Audio folder {audio_dir} does not exist or is not a folder.")
    if not seconds > 0 or min_seconds < 0 or sample_rate < 8000 or channels not in (1, 2):
        raise LinernotesError(
            f"Bad import settings: seconds={seconds} must be > 0, min_seconds={min_seconds} "
            f">= 0, sample_rate={sample_rate} >= 8000 and channels={channels} 1 or 2."
        )
    rows, row_log = _read_captions(captions_file, audio_dir)
    files, others = _audio_files(audio_dir, out_dir, Path(captions_file).resolve())
    counts = Counter(audio_files=len(files), caption_paths=len(rows))
    log = []
    for rel in sorted(set(rows) - set(files)):
        if rel in others:  # captioned but with an unusual suffix: try it, failures are reported
            files[rel] = others[rel]
        else:
            path, reason, kind = _captioned_elsewhere(rel, audio_dir)
            if path is None:
                log.append((rel, reason, kind))
            else:
                files[rel] = path
    # A row without a caption leaves its file out; without a file it is only a captions problem.
    log += [(p, r, CAPTION if k == FILE and p not in files else k) for p, r, k in row_log]
    if not follow_links:
        log += _refuse_outside_links(files, audio_dir)
    for rel in sorted(set(files) - set(rows)):
        log.append((rel, "audio file has no caption in the captions file", FILE))
    for rel in sorted(set(others) - set(rows)):
        if PurePosixPath(rel).suffix.lower() in _UNSUPPORTED_AUDIO:
            log.append((rel, "audio format not supported: convert to WAV or FLAC", FILE))
        else:
            counts["other_files_ignored"] += 1
    cut = _Cut(sample_rate, seconds, min_seconds, 10 ** (silence_db / 20), normalise, channels)
    records = []
    todo = sorted(rel for rel in set(files) & set(rows) if rows[rel]["caption"])
    for rel in tqdm(todo, desc="Importing audio", unit="file", disable=not progress):
        found, trouble = _import_one(
            rel, files[rel], rows[rel], out_dir, cut, counts, keep_truncated
        )
        records += found
        log += [(rel, reason, kind) for kind, reason in trouble]
        counts["imported_files"] += bool(found)
    manifest = _manifest(records, seed, holdout_fraction)
    write_manifest(manifest, out_dir)
    entries = [
        {"path": p, "reason": r, "kind": k, "artist": rows.get(p, {}).get("artist", "")}
        for p, r, k in sorted(log)
    ]
    _write_log(out_dir / LOG_NAME, entries)
    counts.update(excerpts=len(manifest), problems=len(entries))
    counts.update({_COUNT_OF[kind]: len(_distinct(entries, kind)) for kind in _COUNT_OF})
    return ImportResult(
        out_dir=out_dir,
        manifest=manifest,
        problems=[(e["path"], e["reason"]) for e in entries],
        counts=dict(sorted(counts.items())),
        log=entries,
    )


def read_captions(
    captions_file: str | Path, audio_dir: str | Path
) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Rows keyed by audio path relative to `audio_dir`, plus problems (duplicates, blanks).

    A file that cannot be read or lacks the path/caption columns is a LinernotesError.
    """
    rows, problems = _read_captions(captions_file, audio_dir)
    return rows, [(p, r) for p, r, _ in problems]


def _read_captions(
    captions_file: str | Path, audio_dir: Path
) -> tuple[dict[str, dict], list[tuple[str, str, str]]]:
    """`read_captions` with each problem's kind: FILE for a blank caption (its file, if any, is
    not imported), CAPTION for the rest."""
    path = Path(captions_file)
    table = _read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise LinernotesError(
            f"Captions file {path} lacks the column(s) {', '.join(missing)}. Expected columns: "
            f"{', '.join(REQUIRED_COLUMNS)} (required) and {', '.join(OPTIONAL_COLUMNS)} "
            f"(optional); found: {', '.join(map(str, table.columns)) or 'none'}."
        )
    if "license" in table.columns and "licence" not in table.columns:
        table = table.rename(columns={"license": "licence"})
    rows: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    problems: list[tuple[str, str, str]] = []
    audio_dir = Path(audio_dir).resolve()
    for line, record in zip(table["_line"], table.to_dict("records"), strict=True):
        raw = _text(record.get("path"))
        if not raw:
            problems.append((f"{path.name}:{line}", "row has no path", CAPTION))
            continue
        rel = _relative(raw, audio_dir)
        if rel in first_line:
            problems.append(
                (
                    rel,
                    f"duplicate path in {path.name} (line {line}; line {first_line[rel]} is used)",
                    CAPTION,
                )
            )
            continue
        first_line[rel] = line
        caption = _text(record.get("caption"))
        if not caption:
            problems.append((rel, f"missing caption ({path.name} line {line})", FILE))
        rows[rel] = {c: _text(record.get(c)) for c in OPTIONAL_COLUMNS}
        rows[rel]["caption"] = caption  # "" marks a row that is reported and not imported
    return rows, problems


def _read_table(path: Path) -> pd.DataFrame:
    """CSV/TSV or JSON Lines as strings, with a `_line` column of source line numbers."""
    if not path.is_file():
        raise LinernotesError(f"Captions file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            table = pd.read_csv(
                path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ","
            )
            table.columns = [str(c).strip().lower() for c in table.columns]
            table["_line"] = range(2, len(table) + 2)
            return table
        if suffix in (".jsonl", ".json", ".ndjson"):
            records = []
            for i, text in enumerate(path.read_text().splitlines(), start=1):
                if text.strip():
                    obj = json.loads(text)
                    if not isinstance(obj, dict):
                        raise ValueError(f"line {i} is not a JSON object")
                    records.append({**{str(k).lower(): v for k, v in obj.items()}, "_line": i})
            table = pd.DataFrame(records)
            return table if len(table) else pd.DataFrame(columns=["_line"])
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise LinernotesError(
            f"Captions file {path} cannot be read: {exc}. Use a CSV with a header row or JSON "
            "Lines (one object per line) with the columns path and caption."
        ) from exc
    raise LinernotesError(
        f"Captions file {path} must be .csv, .tsv or .jsonl (one JSON object per line)."
    )


def _text(value) -> str:
    """A cell as stripped text; None and NaN (a JSON line without the key) become ''."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _relative(raw: str, audio_dir: Path) -> str:
    """A captions path as a POSIX path relative to `audio_dir` ('./a/../b.wav' is 'b.wav'); a
    path outside it stays absolute or starts with '..' (see `_outside`)."""
    p = Path(os.path.normpath(raw.replace("\\", "/")))
    full = Path(os.path.normpath(audio_dir / p))  # an absolute `p` stays itself
    for q in (full, full.resolve()):
        if q.is_relative_to(audio_dir):
            return q.relative_to(audio_dir).as_posix()
    return p.as_posix()


def _outside(rel: str) -> bool:
    """Whether a captions path (from `_relative`) names a place outside the audio folder."""
    return PurePosixPath(rel).is_absolute() or rel.split("/", 1)[0] == ".."


def _captioned_elsewhere(rel: str, audio_dir: Path) -> tuple[Path | None, str, str]:
    """A captioned file that the folder walk does not list: (its path, '', '') if it is in a
    linked folder (the link is then checked like any other), else (None, why it cannot be
    imported, FILE for a file that exists or CAPTION for a row that names none)."""
    path = audio_dir / rel  # an absolute `rel` stays itself
    if path.is_symlink() and not path.exists():
        return None, f"broken symbolic link (to {os.readlink(path)})", CAPTION
    if not path.is_file():
        return None, "caption given but no such audio file", CAPTION
    if _outside(rel):
        where = f"outside the audio folder ({path.resolve()})"
        return None, f"{where}: copy it into {audio_dir} to import it", FILE
    if path.resolve() != path:  # reached through a linked folder
        return path, "", ""
    return None, "caption given but no such audio file", CAPTION  # hidden, or in the output


def _refuse_outside_links(files: dict[str, Path], audio_dir: Path) -> list[tuple[str, str, str]]:
    """Take out of `files` those whose real path is outside `audio_dir` (a symbolic link to the
    file, or to a folder above it) and report them."""
    refused = []
    for rel, path in sorted(files.items()):
        target = path.resolve()
        if not target.is_relative_to(audio_dir):
            del files[rel]
            refused.append(
                (
                    rel,
                    f"symbolic link to a file outside the audio folder ({target}); pass "
                    "--follow-links to import it",
                    FILE,
                )
            )
    return refused


def _audio_files(
    audio_dir: Path, out_dir: Path, captions: Path
) -> tuple[dict[str, Path], dict[str, Path]]:
    """(audio files, other files) under `audio_dir` by relative path; hidden files, the
    captions file and anything inside `out_dir` are left out."""
    audio, other = {}, {}
    for p in sorted(audio_dir.rglob("*")):
        rel = p.relative_to(audio_dir)
        if (
            not p.is_file()
            or p == captions
            or any(x.startswith(".") for x in rel.parts)
            or out_dir == p.parent
            or out_dir in p.parents
        ):
            continue
        (audio if p.suffix.lower() in AUDIO_SUFFIXES else other)[rel.as_posix()] = p
    return audio, other


@dataclass(frozen=True)
class _Cut:
    """How files become excerpts."""

    sample_rate: int
    seconds: float
    min_seconds: float
    silence: float  # peak amplitude below which audio counts as silent
    normalise: bool
    channels: int = 1


def _import_one(
    rel: str,
    path: Path,
    row: dict,
    out_dir: Path,
    cut: _Cut,
    counts: Counter,
    keep_truncated: bool = False,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Excerpt records of one file and its problems as (kind, reason)."""
    if path.stat().st_size == 0:
        return [], [(FILE, "empty file (0 bytes)")]
    sample_rate = cut.sample_rate
    try:
        decoded = load_audio_checked(path, sample_rate, None if cut.channels == 1 else cut.channels)
    except LinernotesError as exc:
        return [], [(FILE, f"unreadable or corrupt audio: {str(exc).split(': ', 1)[-1]}")]
    audio, problems = decoded.audio.T, []
    if short := decoded.shortfall():
        if not keep_truncated:
            fix = "pass --keep-truncated to import what decodes"
            return [], [(FILE, f"{short}: truncated or corrupt; left out ({fix})")]
        problems.append((KEPT, f"{short}: truncated or corrupt; imported what decodes"))
    if len(audio) == 0:
        return [], [(FILE, "empty audio (no samples)")]
    if not np.isfinite(audio).all():
        return [], [(FILE, "audio contains NaN or infinite samples")]
    if float(np.abs(audio).max()) < cut.silence:
        return [], [(FILE, f"silent audio (peak below {20 * math.log10(cut.silence):g} dBFS)")]
    parent_id = f"{slug(str(PurePosixPath(rel).with_suffix('')))}-{short_hash(rel)}"
    step = int(round(cut.seconds * sample_rate))
    n = max(1, math.ceil(len(audio) / step))
    records = []
    for k in range(n):
        piece = audio[k * step : (k + 1) * step]
        if k > 0 and len(piece) < cut.min_seconds * sample_rate:
            counts["short_tails_dropped"] += 1
            continue
        if float(np.abs(piece).max()) < cut.silence:
            start, end = k * step / sample_rate, (k * step + len(piece)) / sample_rate
            problems.append((EXCERPT, f"excerpt {k} ({start:g}-{end:g} s) is silent; skipped"))
            continue
        track_id = f"{parent_id}-e{k}"
        write_audio(
            out_dir / "audio" / f"{track_id}.flac",
            loudness_normalise(piece) if cut.normalise else piece,
            sample_rate,
        )
        tempo = pd.to_numeric(row.get("tempo") or None, errors="coerce")
        records.append(
            {
                **{c: row.get(c, "") for c in OPTIONAL_COLUMNS if c != "tempo"},
                "track_id": track_id,
                "parent_id": parent_id,
                "path": f"audio/{track_id}.flac",
                "caption": row["caption"],
                "title": row.get("title") or PurePosixPath(rel).stem,
                "tempo": float(tempo) if tempo is not None and not pd.isna(tempo) else float("nan"),
                "duration": len(piece) / sample_rate,
                "sample_rate": sample_rate,
                "source": str(path),
            }
        )
    return records, problems


def _manifest(records: list[dict], seed: int, holdout_fraction: float) -> pd.DataFrame:
    df = pd.DataFrame(records)
    if df.empty:
        df = pd.DataFrame(columns=["track_id", "path", "caption", "artist", "parent_id"])
    df = df.sort_values(["artist", "track_id"], kind="stable").reset_index(drop=True)
    df["split"] = assign_splits(df, seed, holdout_fraction) if len(df) else []
    return df


def _distinct(log: list[dict], kind: str) -> list[dict]:
    """Log entries of `kind`; for FILE one per path (a file left out for two reasons is one)."""
    entries = [e for e in log if e["kind"] == kind]
    return list({e["path"]: e for e in entries}.values()) if kind == FILE else entries


def _write_log(path: Path, entries: list[dict]) -> None:
    """One JSON object per problem: path, reason, kind."""
    keys = ("path", "reason", "kind")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({k: e[k] for k in keys}) + "\n" for e in entries))
