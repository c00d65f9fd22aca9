"""The HTML report: built from synthetic inputs, then opened in headless Chromium (Playwright)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from scipy.stats import pearsonr

from linernotes.attribution.scores import read_scores, score_table, write_scores
from linernotes.data.manifest import read_manifest, write_manifest
from linernotes.errors import LinernotesError
from linernotes.report import ClipPair, OptOut, build_report
from linernotes.report.normalise import (
    correlation_matrix,
    credit_by,
    mean_correlation,
    min_max,
    normalise_scores,
    softmax,
)

SR = 16000
RUN = "run-test"
SCRIPT = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOP_K = 3


# ---------------------------------------------------------------- synthetic inputs


def tone(f0: float, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f0 * t) * np.exp(-t)).astype(np.float32)


def make_inputs(root: Path) -> dict:
    """A manifest of 8 tracks (WAV and FLAC), 2 generated clips, 2 methods' score tables."""
    (root / "audio").mkdir(parents=True)
    artists = ["Alpha", "Beta", "<i>Gamma</i>"]
    rows = []
    for i in range(8):
        ext, sr = ("flac", 22050) if i % 2 else ("wav", SR)
        path = f"audio/t{i}.{ext}"
        sf.write(root / path, tone(220 * 2 ** (i / 12), 1.0 + 0.25 * i, sr), sr)
        rows.append(
            {
                "track_id": f"t{i}",
                "path": path,
                "artist": artists[i % 3],
                "title": "<b>Bold title</b>" if i == 0 else f"Tune {i}",
                "caption": f"{SCRIPT} and <b>not bold</b>" if i == 0 else f"A tune number {i}",
                "duration": 1.0 + 0.25 * i,
                "sample_rate": sr,
            }
        )
    write_manifest(pd.DataFrame(rows), root)
    manifest = read_manifest(root)
    (root / "clips").mkdir()
    sf.write(root / "clips" / "organ.wav", tone(261.6, 2.0), SR)
    sf.write(root / "clips" / "whistle.flac", tone(880.0, 1.5), SR)
    queries = {
        "q-organ": ("An organ chorale <i>in</i> the style of Bach", str(root / "clips/organ.wav")),
        "q whistle/2": ("A whistle tune", "../clips/whistle.flac"),  # relative to the table
    }
    rng = np.random.default_rng(0)
    paths = []
    ids = list(manifest["track_id"])
    for q, (caption, source) in queries.items():
        base = rng.standard_normal(len(ids))
        base[0] = 5.0  # the track whose caption holds a script is credited first
        for method, scores in (
            ("unlearning", 1e-3 * np.exp(base)),
            ("clap", base + rng.standard_normal(len(ids))),
        ):
            df = score_table(q, method, ids, scores, manifest)
            record = {
                "query": q,
                "caption": caption,
                "source": source,
                "method": method,
                "run": RUN,
            }
            name = re.sub(r"\W", "_", q)
            paths.append(write_scores(df, root / "scores" / f"{method}-{name}.parquet", record))
    sf.write(root / "clips" / "before.wav", tone(330.0, 1.0), SR)
    sf.write(root / "clips" / "after.wav", tone(300.0, 1.0), SR)
    optout = OptOut(
        artist="<i>Gamma</i>",
        method="gradient ascent",
        note="Gamma asked to be removed.",
        audit={
            "forget loss": {"original": 0.41, "unlearned": 0.63, "retrained": 0.6},
            "MIA AUC": {"original": 0.71, "unlearned": 0.52, "retrained": 0.5},
        },
        pairs=[
            ClipPair("A <b>Gamma</b> tune", root / "clips/before.wav", root / "clips/after.wav")
        ],
    )
    return {"root": root, "manifest": manifest, "scores": paths, "optout": optout}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    return make_inputs(tmp_path_factory.mktemp("report-inputs"))


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-out") / "report"
    return build_report(
        out,
        inputs["scores"],
        inputs["manifest"],
        run_hash=RUN,
        top_k=TOP_K,
        title="Test <em>credits</em>",
        optout=inputs["optout"],
    )


# ---------------------------------------------------------------- the browser


def ensure_chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing (root only); skip if impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    reason = "not root or no apt-get"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # stale package lists: update once and retry
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        reason = (done.stderr or done.stdout).strip()[-300:]
    if not CHROMIUM.exists():
        pytest.skip(f"headless Chromium is not available and could not be installed: {reason}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (never `playwright install`: Debian's browser)."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright for Python is missing (pip install playwright)"
    )
    chromium = ensure_chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    """Load a report page; return it with the console errors and dialogs it produced."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))

    def on_dialog(d):
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, errors, dialogs


AUDIO_JS = """async () => Promise.all([...document.querySelectorAll('audio')].map(a =>
  new Promise(resolve => {
    const source = a.querySelector('source');
    const done = ok => resolve({src: source.src, type: source.type, can: a.canPlayType(source.type),
      ok, duration: a.duration, label: a.getAttribute('aria-label') || ''});
    if (a.readyState >= 1) return done(true);
    const timer = setTimeout(() => done(false), 10000);
    a.addEventListener('loadedmetadata', () => { clearTimeout(timer); done(true); }, {once: true});
    source.addEventListener('error', () => { clearTimeout(timer); done(false); }, {once: true});
    a.preload = 'metadata';
    a.load();
  })))"""

IMAGES_JS = """async () => {
  await Promise.all([...document.images].map(i => i.complete ? null :
    new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); })));
  return [...document.images].map(i => ({src: i.src, width: i.naturalWidth, alt: i.alt}));
}"""


def check_page(browser, path: Path, root: Path, shot: Path | None = None):
    """Load, check console, audio, images and accessibility basics; return the open page."""
    page, errors, dialogs = open_page(browser, path)
    audios = page.evaluate(AUDIO_JS)
    for a in audios:
        file = Path(unquote(urlparse(a["src"]).path))
        assert file.is_file() and file.resolve().is_relative_to(root.resolve()), a
        assert a["can"] in ("probably", "maybe"), a
        assert a["ok"] and a["duration"] > 0.5, a
        assert a["label"].strip(), a
    images = page.evaluate(IMAGES_JS)
    assert images, path
    for img in images:
        assert img["width"] > 0 and img["alt"].strip(), img
    assert page.evaluate("document.scripts.length") == 0
    assert page.evaluate("[...document.querySelectorAll('th')].every(th => th.scope)")
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    assert errors == [], errors
    assert dialogs == [], dialogs
    return page, audios


def test_report_opens_in_chromium(report, inputs, browser, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    root = report.parent
    index_page, _ = check_page(browser, report, root, shots / "index.png")
    assert "Test <em>credits</em>" in index_page.inner_text("h1")
    assert "<i>Gamma</i>" in index_page.inner_text("table.artists")
    links = index_page.eval_on_selector_all("table.queries a", "els => els.map(e => e.href)")
    assert len(links) == 2
    index_page.close()

    tables = {}
    for p in inputs["scores"]:
        df = read_scores(p)
        tables[(df["query"][0], df["method"][0])] = df
    queries_seen = set()
    for n, link in enumerate(links):
        path = Path(unquote(urlparse(link).path))
        page, audios = check_page(browser, path, root, shots / f"query-{n}.png")
        # one clip and top-k tracks per method, all playable
        assert len(audios) == 1 + 2 * TOP_K
        query = page.inner_text(".kicker .id")
        queries_seen.add(query)
        for method in ("unlearning", "clap"):
            rows = page.eval_on_selector_all(
                f'table.credits[data-method="{method}"] tbody tr',
                "rs => rs.map(r => ({id: r.dataset.trackId, rank: +r.dataset.rank, "
                "score: +r.dataset.score, text: r.textContent}))",
            )
            expected = tables[(query, method)].head(TOP_K)
            assert [r["id"] for r in rows] == list(expected["track_id"])
            assert [r["rank"] for r in rows] == list(expected["rank"])
            assert np.allclose([r["score"] for r in rows], expected["score"], rtol=1e-12)
            for r, score in zip(rows, expected["score"]):
                assert f"{score:.4g}" in r["text"]
        # the caption's script is shown as text and did not run
        text = page.inner_text("table.credits")
        assert SCRIPT in text and "<b>not bold</b>" in text and "<b>Bold title</b>" in text
        assert page.evaluate("document.querySelectorAll('.sleeve b, .sleeve i').length") == 0
        page.close()
    assert queries_seen == {"q-organ", "q whistle/2"}

    optout_page, audios = check_page(browser, root / "optout.html", root, shots / "optout.png")
    assert len(audios) == 2
    assert "MIA AUC" in optout_page.inner_text("table.audit")
    optout_page.close()
    print(f"screenshots in {shots}")


def test_report_is_self_contained(report):
    for html in report.parent.rglob("*.html"):
        text = html.read_text()
        assert "<script" not in text.lower()
        for url in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert not re.match(r"^(https?:)?//", url), (html, url)
            if url.startswith(("#", "data:")):
                continue
            assert (html.parent / unquote(url)).exists(), (html, url)


def test_report_rebuilds_in_place(inputs, tmp_path):
    out = tmp_path / "r"
    build_report(out, inputs["scores"][:2], inputs["manifest"], top_k=2)
    first = {p.name for p in (out / "queries").iterdir()}
    build_report(out, inputs["scores"], inputs["manifest"], top_k=2)
    assert first < {p.name for p in (out / "queries").iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


# ---------------------------------------------------------------- bad input


def test_wrong_run_is_refused(inputs, tmp_path):
    with pytest.raises(LinernotesError, match="not run other-run"):
        build_report(tmp_path / "r", inputs["scores"], inputs["manifest"], run_hash="other-run")
    assert not (tmp_path / "r").exists()


def test_mixed_runs_are_refused(inputs, tmp_path):
    df = read_scores(inputs["scores"][0])
    other = write_scores(
        df.assign(query="q-x"),
        tmp_path / "x.parquet",
        {"query": "q-x", "caption": "", "source": "", "method": "unlearning", "run": "run-other"},
    )
    with pytest.raises(LinernotesError, match="different runs"):
        build_report(tmp_path / "r", [inputs["scores"][0], other], inputs["manifest"])


def test_tracks_missing_from_manifest(inputs, tmp_path):
    manifest = inputs["manifest"]
    smaller = manifest[manifest["track_id"] != "t3"].reset_index(drop=True)
    smaller.attrs = manifest.attrs
    with pytest.raises(LinernotesError, match="not in the manifest.*t3"):
        build_report(tmp_path / "r", inputs["scores"], smaller)


def test_missing_record_clip_and_track_audio(inputs, tmp_path):
    scores = inputs["scores"][0]
    bare = tmp_path / "bare.parquet"
    shutil.copy(scores, bare)
    with pytest.raises(LinernotesError, match="no record bare.json"):
        build_report(tmp_path / "r", [bare], inputs["manifest"])

    record = {
        "query": "q-organ",
        "caption": "",
        "source": str(tmp_path / "gone.wav"),
        "method": "unlearning",
        "run": RUN,
    }
    lost = write_scores(read_scores(scores), tmp_path / "lost.parquet", record)
    with pytest.raises(LinernotesError, match="clip of query 'q-organ' is missing.*gone.wav"):
        build_report(tmp_path / "r", [lost], inputs["manifest"])

    manifest = inputs["manifest"].copy()
    top = read_scores(scores)["track_id"][0]
    manifest.loc[manifest["track_id"] == top, "path"] = "audio/nowhere.wav"
    with pytest.raises(LinernotesError, match=f"training track '{top}' is missing"):
        build_report(tmp_path / "r", [scores], manifest)
    assert not (tmp_path / "r").exists()


def test_refuses_to_replace_a_foreign_folder(inputs, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(LinernotesError, match="holds no linernotes report"):
        build_report(tmp_path / "r", inputs["scores"], inputs["manifest"])
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- normalisation


def test_softmax_and_min_max():
    s = np.array([3.0, -1.0, 0.5, 10.0, 2.0])
    share = softmax(s)
    assert np.isclose(share.sum(), 1.0) and (share > 0).all()
    assert list(np.argsort(-share)) == list(np.argsort(-s))
    assert np.allclose(softmax(1e-4 * s), share)  # units do not matter with the default temperature
    plain = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    assert np.allclose(softmax(s, temperature=1.0), plain)
    mm = min_max(s)
    assert mm.min() == 0.0 and mm.max() == 1.0 and ((mm >= 0) & (mm <= 1)).all()
    huge = softmax(np.exp(50 * s))  # no overflow
    assert np.isclose(huge.sum(), 1.0) and huge.argmax() == 3


def test_constant_and_degenerate_scores():
    const = np.full(7, 0.25)
    assert np.allclose(softmax(const), 1 / 7)
    assert np.array_equal(min_max(const), np.zeros(7))
    assert np.allclose(softmax([2.0]), [1.0]) and np.array_equal(min_max([2.0]), [0.0])
    assert len(softmax([])) == 0 and len(min_max([])) == 0
    with pytest.raises(ValueError, match="NaN"):
        min_max([1.0, np.nan])


def test_correlations():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(50)
    wide = pd.DataFrame({"a": a, "b": 2 * a + 1, "c": np.exp(a), "d": rng.standard_normal(50)})
    p = correlation_matrix(wide, "pearson")
    assert np.isclose(p.loc["a", "b"], 1.0) and np.isclose(p.loc["a", "d"], pearsonr(a, wide.d)[0])
    assert np.isclose(correlation_matrix(wide, "spearman").loc["a", "c"], 1.0)
    assert np.isnan(correlation_matrix(wide.assign(e=1.0)).loc["a", "e"])
    mean = mean_correlation([p, correlation_matrix(wide.assign(e=1.0))])
    assert np.isclose(mean.loc["a", "b"], 1.0) and np.isnan(mean.loc["a", "e"])


def test_normalise_scores_and_credit_by_artist(inputs):
    df = pd.concat([read_scores(p) for p in inputs["scores"]], ignore_index=True)
    norm = normalise_scores(df)
    sums = norm.groupby(["query", "method"])["share"].sum()
    assert np.allclose(sums, 1.0)
    assert norm.groupby(["query", "method"])["minmax"].max().eq(1.0).all()
    credit = credit_by(norm, "artist")
    assert set(credit.columns) == {"unlearning", "clap"}
    assert np.allclose(credit.sum(), 1.0)
    assert credit.index[0] == "Alpha"  # t0 (Alpha) is credited first everywhere
