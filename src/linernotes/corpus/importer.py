"""Import a user's folder of audio plus a captions file (CSV or JSONL) as a corpus manifest.

Every file is resampled, downmixed (or kept stereo: `channels=2`), cut into excerpts that share
the file's `parent_id`, and written as FLAC. Bad input is reported as (path, reason) and never
stops the rest.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from linernotes.artifacts import atomic_path
from linernotes.corpus.build import assign_splits, summary_table
from linernotes.corpus.music21_source import short_hash, slug
from linernotes.data.audio import AUDIO_SUFFIXES, load_audio, loudness_normalise, write_audio
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


@dataclass
class ImportResult:
    """The imported manifest, every problem found as (path, reason), and counts."""

    out_dir: Path
    manifest: pd.DataFrame
    problems: list[tuple[str, str]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "manifest.parquet"

    @property
    def total_duration(self) -> float:
        return float(self.manifest["duration"].sum())

    def summary_table(self) -> pd.DataFrame:
        """Tracks (excerpts), holdout tracks and seconds per artist, with a total row."""
        return summary_table(self.manifest)


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
    progress: bool = True,
) -> ImportResult:
    """Import `audio_dir` with captions from `captions_file` into `out_dir` (FLAC + manifest).

    Tracks longer than `seconds` become several excerpts; a final piece shorter than
    `min_seconds` is dropped (and counted). Audio quieter than `silence_db` dBFS peak is silent.
    `channels` is 1 (downmixed) or 2 (stereo kept; mono files duplicated), for models such as
    Stable Audio that work in stereo.
    """
    audio_dir, out_dir = Path(audio_dir).resolve(), Path(out_dir).resolve()
    if not audio_dir.is_dir():
        raise LinernotesError(f"Audio folder {audio_dir} does not exist or is not a folder.")
    if not seconds > 0 or min_seconds < 0 or sample_rate < 8000 or channels not in (1, 2):
        raise LinernotesError(
            f"Bad import settings: seconds={seconds} must be > 0, min_seconds={min_seconds} "
            f">= 0, sample_rate={sample_rate} >= 8000 and channels={channels} 1 or 2."
        )
    rows, problems = read_captions(captions_file, audio_dir)
    files, others = _audio_files(audio_dir, out_dir, Path(captions_file).resolve())
    counts = Counter(audio_files=len(files), caption_paths=len(rows))
    for rel in sorted(set(files) - set(rows)):
        problems.append((rel, "audio file has no caption in the captions file"))
    for rel in sorted(set(others) - set(rows)):
        if PurePosixPath(rel).suffix.lower() in _UNSUPPORTED_AUDIO:
            problems.append((rel, "audio format not supported: convert to WAV or FLAC"))
        else:
            counts["other_files_ignored"] += 1
    for rel in sorted(set(rows) - set(files)):
        if rel in others:  # captioned but with an unusual suffix: try it, failures are reported
            files[rel] = others[rel]
        else:
            problems.append((rel, "caption given but no such audio file"))
    cut = _Cut(sample_rate, seconds, min_seconds, 10 ** (silence_db / 20), normalise, channels)
    records = []
    todo = sorted(rel for rel in set(files) & set(rows) if rows[rel]["caption"])
    for rel in tqdm(todo, desc="Importing audio", unit="file", disable=not progress):
        found, trouble = _import_one(rel, files[rel], rows[rel], out_dir, cut, counts)
        records += found
        problems += trouble
        counts["imported_files"] += bool(found)
    manifest = _manifest(records, seed, holdout_fraction)
    write_manifest(manifest, out_dir)
    problems.sort()
    _write_log(out_dir / LOG_NAME, problems)
    counts.update(excerpts=len(manifest), problems=len(problems))
    return ImportResult(
        out_dir=out_dir, manifest=manifest, problems=problems, counts=dict(sorted(counts.items()))
    )


def read_captions(
    captions_file: str | Path, audio_dir: str | Path
) -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """Rows keyed by audio path relative to `audio_dir`, plus problems (duplicates, blanks).

    A file that cannot be read or lacks the path/caption columns is a LinernotesError.
    """
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
    problems: list[tuple[str, str]] = []
    audio_dir = Path(audio_dir).resolve()
    for line, record in zip(table["_line"], table.to_dict("records"), strict=True):
        raw = _text(record.get("path"))
        if not raw:
            problems.append((f"{path.name}:{line}", "row has no path"))
            continue
        rel = _relative(raw, audio_dir)
        if rel in first_line:
            problems.append(
                (
                    rel,
                    f"duplicate path in {path.name} (line {line}; line {first_line[rel]} is used)",
                )
            )
            continue
        first_line[rel] = line
        caption = _text(record.get("caption"))
        if not caption:
            problems.append((rel, f"missing caption ({path.name} line {line})"))
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
    p = Path(raw.replace("\\", "/"))
    if p.is_absolute():
        try:
            p = p.resolve().relative_to(audio_dir)
        except ValueError:
            return p.as_posix()
    return PurePosixPath(*[x for x in p.parts if x != "."]).as_posix()


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
    rel: str, path: Path, row: dict, out_dir: Path, cut: _Cut, counts: Counter
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Excerpt records of one file and its problems."""
    if path.stat().st_size == 0:
        return [], [(rel, "empty file (0 bytes)")]
    sample_rate = cut.sample_rate
    try:
        audio = load_audio(path, sample_rate, None if cut.channels == 1 else cut.channels).T
    except LinernotesError as exc:
        return [], [(rel, f"unreadable or corrupt audio: {str(exc).split(': ', 1)[-1]}")]
    if len(audio) == 0:
        return [], [(rel, "empty audio (no samples)")]
    if not np.isfinite(audio).all():
        return [], [(rel, "audio contains NaN or infinite samples")]
    if float(np.abs(audio).max()) < cut.silence:
        return [], [(rel, f"silent audio (peak below {20 * math.log10(cut.silence):g} dBFS)")]
    parent_id = f"{slug(str(PurePosixPath(rel).with_suffix('')))}-{short_hash(rel)}"
    step = int(round(cut.seconds * sample_rate))
    n = max(1, math.ceil(len(audio) / step))
    records, problems = [], []
    for k in range(n):
        piece = audio[k * step : (k + 1) * step]
        if k > 0 and len(piece) < cut.min_seconds * sample_rate:
            counts["short_tails_dropped"] += 1
            continue
        if float(np.abs(piece).max()) < cut.silence:
            start, end = k * step / sample_rate, (k * step + len(piece)) / sample_rate
            problems.append((rel, f"excerpt {k} ({start:g}-{end:g} s) is silent; skipped"))
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


def _write_log(path: Path, problems: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"path": p, "reason": r}) + "\n" for p, r in problems))
