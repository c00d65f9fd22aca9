"""Build the static HTML report: an index page, one page per query, audio and spectrograms.

The folder opens from disk (no server, no network, no JavaScript). It is built in a temporary
folder beside `out_dir` and swapped in at the end, so a failed build leaves the old report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf

from linernotes.artifacts import atomic_path, hash_file, read_json, write_json
from linernotes.attribution.scores import read_scores
from linernotes.data.audio import load_audio
from linernotes.data.manifest import audio_path, read_manifest
from linernotes.errors import LinernotesError
from linernotes.report.normalise import correlation_matrix, mean_correlation, min_max, softmax
from linernotes.report.plots import (
    correlation_plot,
    distribution_plot,
    spectrogram_figure,
    spectrogram_thumbnail,
)

MARKER = "report.json"
PARALLEL_FROM = 8  # media jobs from which a second thread pays off
AUDIO_FORMATS = {"flac": ("FLAC", "PCM_16", "audio/flac"), "ogg": ("OGG", "VORBIS", "audio/ogg")}
TOP_ARTISTS = 15


@dataclasses.dataclass
class ClipPair:
    """One prompt of the opted-out artist, generated before and after unlearning."""

    prompt: str
    before: str | Path  # clip from the original model
    after: str | Path  # clip from the unlearned model (same prompt and noise)


@dataclasses.dataclass
class OptOut:
    """An artist's opt-out: the audit table and before/after clip pairs, shown in the report.

    `audit` has one row per metric and one column per model (e.g. original, unlearned,
    retrained): a DataFrame, or a dict {metric: {model: value}}.
    """

    artist: str
    audit: pd.DataFrame | Mapping[str, Mapping[str, Any]]
    pairs: list[ClipPair] = dataclasses.field(default_factory=list)
    method: str = ""  # the unlearning method used
    note: str = ""  # one paragraph shown under the heading

    def audit_table(self) -> pd.DataFrame:
        """The audit as a DataFrame (rows: metrics, columns: models)."""
        if isinstance(self.audit, pd.DataFrame):
            return self.audit
        return pd.DataFrame.from_dict({k: dict(v) for k, v in self.audit.items()}, orient="index")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptOut:
        """Read the JSON form: {artist, audit, pairs: [{prompt, before, after}], method, note}."""
        try:
            pairs = [ClipPair(**p) for p in d.get("pairs", [])]
            return cls(
                artist=d["artist"],
                audit=d.get("audit", {}),
                pairs=pairs,
                method=d.get("method", ""),
                note=d.get("note", ""),
            )
        except (KeyError, TypeError) as exc:
            raise LinernotesError(
                f"Opt-out description is malformed ({exc}); it needs 'artist', 'audit' and "
                "'pairs' of {prompt, before, after}."
            ) from exc


@dataclasses.dataclass
class _Input:
    path: Path
    record: dict
    method: str
    query: str


def build_report(
    out_dir: str | Path,
    scores: Sequence[str | Path],
    manifest: pd.DataFrame | str | Path,
    run_hash: str | None = None,
    top_k: int = 5,
    title: str = "Liner notes",
    optout: OptOut | None = None,
    *,
    audio_format: str = "flac",
    workers: int | None = None,
    credit: Sequence[pd.DataFrame] | None = None,
) -> Path:
    """Write the report folder `out_dir` from score tables (+ JSON records); return index.html.

    `audio_format`: "flac" (lossless, plays in every current browser) or "ogg" (Vorbis, about
    five times smaller, for reports over many queries; older Safari cannot play it).
    `workers`: threads converting audio and drawing spectrograms (None: up to 2).
    `credit`: group credit tables (`linernotes.credit`), shown as a "credit by artist" panel on
    their query's page.
    """
    t0 = time.perf_counter()
    if top_k < 1:
        raise LinernotesError(f"top_k must be at least 1 (got {top_k}).")
    if audio_format not in AUDIO_FORMATS:
        raise LinernotesError(f"Unknown audio format {audio_format!r}; use flac or ogg.")
    if not isinstance(manifest, pd.DataFrame):
        manifest = read_manifest(manifest)
    inputs = _read_inputs(scores, run_hash)
    run = inputs[0].record.get("run")
    methods = list(dict.fromkeys(i.method for i in inputs))
    by_query: dict[str, dict[str, _Input]] = {}
    for inp in inputs:
        seen = by_query.setdefault(inp.query, {})
        if inp.method in seen:
            raise LinernotesError(
                f"Query '{inp.query}' has two '{inp.method}' score tables: {seen[inp.method].path} "
                f"and {inp.path}; pass only one."
            )
        seen[inp.method] = inp
    meta = manifest.set_index("track_id", drop=False)
    clips = {q: _clip_source(q, files, manifest, meta) for q, files in by_query.items()}
    group_credit = _group_credit(credit or [], by_query)

    with _staging(Path(out_dir)) as stage:
        media = _Media(stage, manifest, meta, audio_format)
        stats = _Stats(methods, meta)
        pages = [
            _query_page(q, files, methods, meta, top_k, stats) for q, files in by_query.items()
        ]
        for page, q in zip(pages, by_query):
            page["clip"] = media.clip(q, clips[q])
            page["group_credit"] = group_credit.get(q, [])
            for table in page["credits"]:
                for row in table["rows"]:
                    row["media"] = media.track(row["track_id"])
        for i, page in enumerate(pages):
            page["prev"] = pages[i - 1]["slug"] if i > 0 else None
            page["next"] = pages[i + 1]["slug"] if i + 1 < len(pages) else None
        optout_page = _optout_page(optout, media) if optout is not None else None
        summary = stats.summary(stage / "media" / "plots")
        media.render(workers)
        env = _environment()
        common = {
            "title": title,
            "run": run,
            "methods": methods,
            "top_k": top_k,
            "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "has_optout": optout_page is not None,
        }
        (stage / "queries").mkdir()
        for page in pages:
            html = env.get_template("query.html").render(root="../", page=page, **common)
            (stage / "queries" / f"{page['slug']}.html").write_text(html, encoding="utf-8")
        if optout_page is not None:
            html = env.get_template("optout.html").render(root="", optout=optout_page, **common)
            (stage / "optout.html").write_text(html, encoding="utf-8")
        html = env.get_template("index.html").render(
            root="",
            pages=pages,
            summary=summary,
            optout=optout_page,
            n_tracks=stats.n_tracks,
            **common,
        )
        (stage / "index.html").write_text(html, encoding="utf-8")
        write_json(
            stage / MARKER,
            {
                "kind": "linernotes report",
                "run": run,
                "methods": methods,
                "top_k": top_k,
                "queries": list(by_query),
                "title": title,
                "scores": [{"path": str(i.path), "hash": hash_file(i.path)} for i in inputs],
                "manifest": manifest.attrs.get("path", ""),
                "optout": optout is not None,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )
    return Path(out_dir) / "index.html"


# ---------------------------------------------------------------- inputs


def _read_inputs(scores: Sequence[str | Path], run_hash: str | None) -> list[_Input]:
    """Score-table paths (folders expand to their *.parquet) with their JSON records, checked."""
    paths: list[Path] = []
    for p in [Path(s) for s in ([scores] if isinstance(scores, (str, Path)) else scores)]:
        paths.extend(sorted(p.glob("*.parquet")) if p.is_dir() else [p])
    if not paths:
        raise LinernotesError("No score tables given; run `linernotes attribute` first.")
    inputs = []
    for path in paths:
        if not path.exists():
            raise LinernotesError(f"No score table at {path}; run `linernotes attribute` first.")
        rec_path = path.with_suffix(".json")
        if not rec_path.exists():
            raise LinernotesError(
                f"Score table {path} has no record {rec_path.name} beside it (it names the run, "
                "query and generated clip); re-run `linernotes attribute` to write it."
            )
        record = read_json(rec_path)
        missing = [k for k in ("query", "method", "run") if k not in record]
        if missing:
            raise LinernotesError(f"Record {rec_path} lacks {missing}; re-run the attribution.")
        if run_hash is not None and str(record["run"]) != str(run_hash):
            raise LinernotesError(
                f"Score table {path} comes from run {record['run']}, not run {run_hash}; "
                "pass the score tables of this run (or the matching run)."
            )
        inputs.append(_Input(path, record, str(record["method"]), str(record["query"])))
    runs = sorted({str(i.record["run"]) for i in inputs})
    if len(runs) > 1:
        first = {r: next(i.path for i in inputs if str(i.record["run"]) == r) for r in runs}
        raise LinernotesError(
            "Score tables come from different runs: "
            + "; ".join(f"{r} ({p})" for r, p in first.items())
            + ". Pass tables of one run only (or choose one with the run hash)."
        )
    return inputs


def _read_table(inp: _Input, meta: pd.DataFrame) -> pd.DataFrame:
    """One score table, checked against its record and the manifest."""
    df = read_scores(inp.path)
    other = sorted(set(df["query"].astype(str)) - {inp.query})
    if other:
        raise LinernotesError(
            f"Score table {inp.path} holds rows for queries {other[:3]} but its record describes "
            f"'{inp.query}'; write one table per query."
        )
    if set(df["method"].astype(str)) - {inp.method}:
        raise LinernotesError(f"Score table {inp.path} mixes methods; expected '{inp.method}'.")
    if len(df) == 0:
        raise LinernotesError(f"Score table {inp.path} is empty.")
    if not np.isfinite(df["score"].to_numpy(dtype=np.float64)).all():
        raise LinernotesError(f"Score table {inp.path} has NaN or infinite scores; re-run it.")
    unknown = df.loc[~df["track_id"].isin(meta.index), "track_id"]
    if len(unknown):
        raise LinernotesError(
            f"Score table {inp.path} credits {len(unknown)} track(s) that are not in the manifest "
            f"({', '.join(map(str, unknown[:5]))}); use the manifest the scores were made from."
        )
    return df.sort_values(["rank", "track_id"], kind="stable").reset_index(drop=True)


def _clip_source(
    query: str, files: dict[str, _Input], manifest: pd.DataFrame, meta: pd.DataFrame
) -> Path:
    """The generated clip of a query, from its records' `source` (checked to exist)."""
    sources = {str(i.record.get("source") or "") for i in files.values()}
    if len(sources) > 1:
        raise LinernotesError(
            f"Query '{query}' names different clips in its records ({sorted(sources)}); "
            "the methods must score the same clip."
        )
    src = sources.pop()
    inp = next(iter(files.values()))
    track = src[len("train:") :] if src.startswith("train:") else (query if not src else None)
    if track is not None:
        if track not in meta.index:
            raise LinernotesError(
                f"Query '{query}' ({inp.path.with_suffix('.json')}) names no clip and is not a "
                "training track; its record needs `source`, the generated clip's path."
            )
        path = audio_path(manifest, meta.loc[track])
    else:
        path = Path(src)
        if not path.is_absolute():
            here = inp.path.parent / path
            path = here if here.exists() else Path.cwd() / path
    if not path.is_file():
        raise LinernotesError(
            f"Generated clip of query '{query}' is missing: {path} (from "
            f"{inp.path.with_suffix('.json')}). Restore the clip or regenerate it."
        )
    return path


# ---------------------------------------------------------------- pages


def _query_page(
    query: str,
    files: dict[str, _Input],
    methods: list[str],
    meta: pd.DataFrame,
    top_k: int,
    stats: _Stats,
) -> dict:
    """Everything a query page shows (media are added later)."""
    ordered = [m for m in methods if m in files]
    tables = {m: _read_table(files[m], meta) for m in ordered}
    credits = []
    for method, df in tables.items():
        mm, share = min_max(df["score"]), softmax(df["score"])
        stats.add(method, df["track_id"], mm, share)
        rows = []
        for i in range(min(top_k, len(df))):
            r = df.iloc[i]
            m = meta.loc[r["track_id"]]
            rows.append(
                {
                    "track_id": str(r["track_id"]),
                    "rank": int(r["rank"]),
                    "score": float(r["score"]),
                    "minmax": float(mm[i]),
                    "share": float(share[i]),
                    "artist": str(m["artist"]),
                    "title": str(m["title"]),
                    "caption": str(m["caption"]),
                }
            )
        artists = (
            pd.Series(share, index=meta.loc[df["track_id"], "artist"].to_numpy())
            .groupby(level=0)
            .sum()
            .sort_values(ascending=False)
        )
        credits.append(
            {
                "method": method,
                "rows": rows,
                "n_tracks": len(df),
                "artists": [{"artist": a, "share": float(s)} for a, s in artists.head(5).items()],
            }
        )
    correlations = {}
    if len(tables) > 1:
        wide = pd.concat(
            {m: df.set_index("track_id")["score"] for m, df in tables.items()}, axis=1, join="inner"
        )
        correlations = {k: correlation_matrix(wide, k) for k in ("pearson", "spearman")}
        stats.add_correlations(correlations)
    first = files[ordered[0]].record
    return {
        "query": query,
        "slug": _slug(query),
        "prompt": str(first.get("caption", "")),
        "source": str(first.get("source", "")),
        "credits": credits,
        "side_by_side": _side_by_side(credits, top_k),
        "correlations": {k: _matrix(v) for k, v in correlations.items()},
        "records": {m: _record_items(files[m].record) for m in ordered},
    }


def _group_credit(tables: Sequence[pd.DataFrame], queries: Mapping) -> dict[str, list[dict]]:
    """Group credit panels per query: {query: [{method, by, how, caption, score, rows}]}."""
    from linernotes.credit.tables import describe  # credit.tables uses report.normalise

    out: dict[str, list[dict]] = {}
    for t in tables:
        missing = [c for c in ("query", "method", "by", "group", "rank", "score", "share")
                   if c not in t.columns]
        if missing or len(t) == 0:
            raise LinernotesError(f"A credit table is empty or lacks {missing}; pass tables made "
                                  "by `linernotes credit`.")
        q = str(t["query"].iloc[0])
        if q not in queries:
            raise LinernotesError(f"A credit table is for query {q!r}, which has no score table "
                                  "among the report's inputs; attribute it too or drop it.")
        rows = t.sort_values(["rank", "group"], kind="stable")
        method, by = str(t["method"].iloc[0]), str(t["by"].iloc[0])
        out.setdefault(q, []).append({
            "method": method, "by": by, **describe(method, by),
            "interval": bool("share_low" in t.columns and t["share_low"].notna().any()),
            "rows": [{"group": str(r.group), "rank": int(r.rank), "score": float(r.score),
                      "share": float(r.share),
                      "low": float(getattr(r, "share_low", float("nan"))),
                      "high": float(getattr(r, "share_high", float("nan")))}
                     for r in rows.itertuples()],
        })
    return out


def _side_by_side(credits: list[dict], top_k: int) -> list[dict]:
    """Rows of rank position 1..k with each method's track at that position."""
    rows = []
    for i in range(top_k):
        cells = [c["rows"][i] if i < len(c["rows"]) else None for c in credits]
        if any(cells):
            rows.append({"position": i + 1, "cells": cells})
    return rows


def _record_items(record: dict) -> list[tuple[str, str]]:
    """A record's provenance as (key, text) pairs, without the fields shown elsewhere."""
    items = []
    for key in sorted(record):
        if key in ("query", "caption", "source"):
            continue
        value = record[key]
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, sort_keys=True, default=str)
            text = text if len(text) <= 300 else text[:300] + " …"
        else:
            text = str(value)
        items.append((key, text))
    return items


def _matrix(mat: pd.DataFrame) -> dict:
    return {
        "labels": list(mat.columns),
        "rows": [[None if np.isnan(v) else float(v) for v in row] for row in mat.to_numpy()],
    }


def _optout_page(optout: OptOut, media: _Media) -> dict:
    audit = optout.audit_table()
    pairs = []
    for i, pair in enumerate(optout.pairs):
        clips = {}
        for side in ("before", "after"):
            path = Path(getattr(pair, side))
            if not path.is_file():
                raise LinernotesError(
                    f"Opt-out clip '{side}' for prompt {pair.prompt!r} is missing: {path}."
                )
            clips[side] = media.clip(f"optout-{i}-{side}", path, size=(6, 2.4))
        pairs.append({"prompt": pair.prompt, **clips})
    return {
        "artist": optout.artist,
        "method": optout.method,
        "note": optout.note,
        "pairs": pairs,
        "columns": [str(c) for c in audit.columns],
        "rows": [
            {"metric": str(idx), "values": [_cell(v) for v in row]}
            for idx, row in zip(audit.index, audit.to_numpy(dtype=object))
        ],
    }


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "—" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return "—" if value is None else str(value)


# ---------------------------------------------------------------- statistics


class _Stats:
    """Accumulates, query by query, what the index shows: profiles, artist credit, correlations."""

    def __init__(self, methods: list[str], meta: pd.DataFrame):
        self.methods = methods
        self._artist_of = meta["artist"]
        self.sums: dict[str, dict[str, list[np.ndarray]]] = {}
        self.n: dict[str, int] = {}
        self.artist_share: dict[str, pd.Series] = {}
        self.correlations: dict[str, list[pd.DataFrame]] = {"pearson": [], "spearman": []}
        self.n_tracks = 0

    def add(self, method: str, track_ids: pd.Series, mm: np.ndarray, share: np.ndarray) -> None:
        self.n_tracks = max(self.n_tracks, len(track_ids))
        self.n[method] = self.n.get(method, 0) + 1
        acc = self.sums.setdefault(method, {})
        for norm, values in (("min-max", mm), ("softmax", share)):
            curve = np.sort(values)[::-1]
            if norm not in acc:
                acc[norm] = [curve.copy(), curve**2]
            else:
                n = min(len(acc[norm][0]), len(curve))  # tables of different sizes: common ranks
                acc[norm] = [acc[norm][0][:n] + curve[:n], acc[norm][1][:n] + curve[:n] ** 2]
        per_artist = (
            pd.Series(share, index=track_ids.to_numpy())
            .groupby(self._artist_of.loc[track_ids].to_numpy())
            .sum()
        )
        prev = self.artist_share.get(method)
        self.artist_share[method] = (
            per_artist if prev is None else prev.add(per_artist, fill_value=0.0)
        )

    def add_correlations(self, mats: dict[str, pd.DataFrame]) -> None:
        for k, v in mats.items():
            self.correlations[k].append(v)

    def summary(self, plot_dir: Path) -> dict:
        """Artist credit, the distribution plot and (several methods) the correlation plot."""
        plot_dir.mkdir(parents=True, exist_ok=True)
        profiles = {}
        for method, acc in self.sums.items():
            n = self.n[method]
            profiles[method] = {}
            for norm, (s, s2) in acc.items():
                mean = s / n
                profiles[method][norm] = (mean, np.sqrt(np.clip(s2 / n - mean**2, 0, None)))
        n_queries = max(self.n.values())
        distribution_plot(profiles, plot_dir / "distribution.png", n_queries)
        credit = pd.DataFrame({m: s / self.n[m] for m, s in self.artist_share.items()}).fillna(0)
        credit = credit.loc[credit[self.methods[0]].sort_values(ascending=False).index]
        artists = [
            {"artist": str(a), "shares": [float(credit.at[a, m]) for m in credit.columns]}
            for a in credit.index[:TOP_ARTISTS]
        ]
        rest = credit.iloc[TOP_ARTISTS:]
        other = (
            {
                "artist": f"{len(rest)} other artists",
                "shares": [float(rest[m].sum()) for m in credit.columns],
            }
            if len(rest)
            else None
        )
        out = {
            "artists": artists,
            "other_artists": other,
            "artist_methods": list(credit.columns),
            "distribution": "media/plots/distribution.png",
            "correlation": None,
            "matrices": {},
        }
        if self.correlations["pearson"]:
            mats = {k.capitalize(): mean_correlation(v) for k, v in self.correlations.items()}
            correlation_plot(mats, plot_dir / "correlation.png")
            out["correlation"] = "media/plots/correlation.png"
            out["matrices"] = {k: _matrix(v) for k, v in mats.items()}
            out["n_correlated"] = len(self.correlations["pearson"])
        return out


# ---------------------------------------------------------------- media


class _Media:
    """Audio and spectrograms in the report folder: requested while pages are made, then
    rendered once per source (in two threads when there are several)."""

    def __init__(self, root: Path, manifest: pd.DataFrame, meta: pd.DataFrame, fmt: str):
        self.root, self.manifest, self.meta, self.fmt = root, manifest, meta, fmt
        (root / "media" / "audio").mkdir(parents=True)
        (root / "media" / "spectrograms").mkdir(parents=True)
        self._refs: dict[str, dict] = {}
        self._jobs: dict[str, tuple] = {}

    def track(self, track_id: str) -> dict:
        """A training track's player source and spectrogram thumbnail (filled by `render`)."""
        key = f"track:{track_id}"
        if key not in self._refs:
            path = audio_path(self.manifest, self.meta.loc[track_id])
            if not path.is_file():
                raise LinernotesError(
                    f"Audio of training track '{track_id}' is missing: {path}. Restore the corpus "
                    "audio (or rebuild it) before building the report."
                )
            self._request(key, path, f"t-{_slug(track_id)}", None)
        return self._refs[key]

    def clip(self, name: str, path: Path, size: tuple[float, float] = (9, 2.6)) -> dict:
        """A generated clip's player source and labelled spectrogram (`size` in inches)."""
        key = f"clip:{name}:{path}"
        if key not in self._refs:
            self._request(key, path, f"q-{_slug(name)}", size)
        return self._refs[key]

    def _request(self, key: str, path: Path, stem: str, figure: tuple | None) -> None:
        self._refs[key] = {}
        self._jobs[key] = (str(path), str(self.root), stem, figure, self.fmt)

    def render(self, workers: int | None) -> None:
        """Convert every requested source; `workers=None` uses 2 threads when there are several."""
        keys, jobs = list(self._jobs), list(self._jobs.values())
        if workers is None:
            workers = min(2, os.cpu_count() or 1) if len(jobs) >= PARALLEL_FROM else 1
        if workers > 1 and len(jobs) > 1:
            from concurrent.futures import ThreadPoolExecutor

            # threads: decoding, FFTs and PNG encoding release the GIL; no start-up cost
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(_render_media, jobs))
        else:
            results = [_render_media(job) for job in jobs]
        for key, result in zip(keys, results):
            self._refs[key].update(result)
        self._jobs.clear()


def _render_media(job: tuple) -> dict:
    """Write one source as report audio + spectrogram; return what the templates need."""
    src, root, stem, figure, fmt = job
    path, root = Path(src), Path(root)
    try:
        sr = sf.info(src).samplerate
    except Exception as exc:
        raise LinernotesError(f"Cannot read audio file {path}: {exc}") from exc
    audio = load_audio(path, sr)
    audio_rel = f"media/audio/{stem}.{fmt}"
    spec_rel = f"media/spectrograms/{stem}.png"
    container, subtype, mime = AUDIO_FORMATS[fmt]
    with atomic_path(root / audio_rel) as tmp:
        sf.write(str(tmp), np.clip(audio, -1, 1), sr, format=container, subtype=subtype)
    if figure:
        spectrogram_figure(audio, sr, root / spec_rel, size=tuple(figure))
    else:
        spectrogram_thumbnail(audio, sr, root / spec_rel)
    seconds = len(audio) / sr
    return {
        "audio": audio_rel,
        "mime": mime,
        "spectrogram": spec_rel,
        "seconds": seconds,
        "duration": _duration(seconds),
    }


# ---------------------------------------------------------------- helpers


def _slug(key: str) -> str:
    """A file-name-safe, unique stem for an id (readable part + short hash)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:48] or "x"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _duration(seconds: float) -> str:
    whole = max(1, round(seconds)) if seconds > 0 else 0
    return f"{whole // 60}:{whole % 60:02d}"


def _percent(share: float) -> str:
    pct = 100 * share
    if pct == 0:
        return "0%"
    return f"{pct:.1f}%" if pct >= 0.1 else f"{pct:.2g}%"


def _score(value: float) -> str:
    return f"{value:.4g}"


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("linernotes.report", "templates"),
        autoescape=True,  # captions, titles and artists are users' metadata
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        percent=_percent,
        score=_score,
        full=repr,
        bar=lambda s, top=1.0: f"{100 * s / top if top > 0 else 0:.1f}",
    )
    return env


def _readable(root: Path) -> None:
    """Make the report world-readable (temporary files are created private)."""
    os.chmod(root, 0o755)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(folder, d), 0o755)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)


@contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, swapped in for it when the build succeeds."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LinernotesError(f"{out_dir} is a file; choose a folder for the report.")
        if any(out_dir.iterdir()) and not (out_dir / MARKER).exists():
            raise LinernotesError(
                f"{out_dir} is not empty and holds no linernotes report; choose another folder "
                "(the report replaces the folder's contents)."
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield stage
        _readable(stage)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "report")
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
