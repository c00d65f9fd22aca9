"""Reference corpus (real music21 scores, real FluidSynth, real FLAC) and audio-folder import."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from linernotes.corpus.build import build_corpus
from linernotes.corpus.captions import CaptionFacts, caption_for
from linernotes.corpus.importer import import_folder
from linernotes.corpus.music21_source import list_works, work_from_file, works_per_artist
from linernotes.data.manifest import COLUMNS, read_manifest
from linernotes.errors import LinernotesError

pytestmark = pytest.mark.skipif(
    shutil.which("fluidsynth") is None, reason="FluidSynth is not installed"
)

# Light scores (tunes and chorales) keep the builds fast.
ARTISTS = [
    "J.S. Bach",
    "O'Neill's Music of Ireland",
    "Essen folksongs (China)",
    "Ryan's Mammoth Collection",
]
SECONDS = 3.0


def _build(out, **kw):
    args = dict(size=12, seconds=SECONDS, seed=0, artists=ARTISTS, workers=2, progress=False)
    return build_corpus(out, **{**args, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus_a")
    return out, _build(out)


def test_list_works_covers_the_collections():
    works = list_works()
    counts = works_per_artist(works)
    for artist in [
        "J.S. Bach",
        "Palestrina",
        "Monteverdi",
        "Josquin des Prez",
        "Beethoven",
        "Essen folksongs (China)",
        "Essen folksongs (Germany)",
        "O'Neill's Music of Ireland",
        "Ryan's Mammoth Collection",
        "Aird's Airs",
        "Trecento",
    ]:
        assert counts[artist] >= 3, artist
    assert len({w.work_id for w in works}) == len(works)
    assert [w.work_id for w in list_works()] == [w.work_id for w in works]
    bach = [w for w in works if w.artist == "J.S. Bach"]
    assert sum("BWV" in w.title for w in bach) == len(bach)
    assert all(w.licence for w in works)
    assert any("non-commercial" in w.licence for w in works if w.artist.startswith("Essen"))
    with pytest.raises(LinernotesError, match="Unknown artist"):
        list_works(["Nobody at all"])


def test_build_writes_audio_manifest_and_captions(built):
    out, result = built
    df = read_manifest(out)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 12 and not result.skipped
    assert result.counts_per_artist() == dict.fromkeys(sorted(ARTISTS), 3)
    for _, row in df.iterrows():
        info = sf.info(str(out / row["path"]))
        assert info.samplerate == 16000 and info.channels == 1
        assert 0 < row["duration"] <= SECONDS
        assert info.frames == round(row["duration"] * 16000)
        caption = row["caption"]
        assert row["artist"] in caption and row["instrument"] in caption
        assert row["track_id"] not in caption
        assert row["licence"] and row["source"] and row["key"]
    assert set(df["split"]) == {"train", "holdout"}
    assert (df.groupby("artist")["split"].apply(lambda s: (s == "holdout").sum()) >= 1).all()
    table = result.summary_table()
    assert table.iloc[-1]["tracks"] == 12
    assert (out / "build_log.jsonl").exists()


def test_build_is_deterministic_across_folders_and_workers(built, tmp_path):
    out_a, result_a = built
    result_b = _build(tmp_path, workers=1)
    a, b = read_manifest(out_a), read_manifest(tmp_path)
    pd.testing.assert_frame_equal(a, b)
    for rel in a["path"]:
        assert (out_a / rel).read_bytes() == (tmp_path / rel).read_bytes()
    assert result_b.rendered == 12


def test_build_resumes_without_rerendering(built, tmp_path):
    out_a, _ = built
    out = tmp_path / "corpus"
    shutil.copytree(out_a, out)
    before = read_manifest(out)
    gone = list(before["path"][:3])
    for rel in gone:
        (out / rel).unlink()
    (out / "manifest.parquet").unlink()
    mtimes = {rel: (out / rel).stat().st_mtime_ns for rel in before["path"] if rel not in gone}
    result = _build(out)
    assert (result.rendered, result.reused) == (3, 9)
    assert all((out / rel).stat().st_mtime_ns == t for rel, t in mtimes.items())
    pd.testing.assert_frame_equal(read_manifest(out), before)
    with pytest.raises(LinernotesError, match="other settings"):
        _build(out, seed=1)


def test_broken_score_is_skipped_with_reason(tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    (scores / "broken.xml").write_text("<?xml version='1.0'?><score-partwise><part><measure>")
    (scores / "empty.abc").write_text("X:1\nT:No notes\nM:4/4\nK:C\n")
    tune = "X:1\nT:{t}\nM:3/4\nL:1/4\nK:G\n|: G A B | [M:3/4] [M:3/4] c d e | d c B :| G3 |]\n"
    for name in ("one", "two"):
        (scores / f"{name}.abc").write_text(tune.format(t=name))
    works = [
        work_from_file(scores / n, artist="Test band")
        for n in ("broken.xml", "empty.abc", "one.abc", "two.abc")
    ]
    result = build_corpus(
        tmp_path / "out", size="all", seconds=2.0, works=works, workers=1, progress=False
    )
    assert len(result.manifest) == 2
    reasons = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in result.skipped}
    assert reasons["broken.xml"].startswith("does not parse")
    assert reasons["empty.abc"] == "score has no pitched notes"
    log = [
        json.loads(x) for x in (tmp_path / "out" / "build_log.jsonl").read_text().split("\n") if x
    ]
    assert len(log) == 2
    assert result.skip_reasons() == {"does not parse": 1, "score has no pitched notes": 1}
    # A fixed size replaces a skipped score with the artist's next candidate.
    again = build_corpus(
        tmp_path / "out2", size=2, seconds=2.0, works=works, workers=1, progress=False
    )
    assert sorted(again.manifest["title"]) == ["one", "two"]


def test_tune_that_breaks_music21_midi_export_still_renders(tmp_path):
    from music21 import corpus, midi

    from linernotes.corpus.render import render_excerpt

    score = corpus.parse("oneills1850/0001-0050.abc", number=6)
    with pytest.raises(Exception, match="already found"):  # duplicate time signature
        midi.translate.streamToMidiFile(score)
    work = next(w for w in list_works() if w.source == "oneills1850/0001-0050.abc#6")
    rendered = render_excerpt(work, 0, tmp_path / "tune.flac", seconds=2.0)
    assert rendered.duration == 2.0 and sf.info(str(tmp_path / "tune.flac")).frames == 32000


def test_captions_vary_but_repeat_for_the_same_seed():
    facts = CaptionFacts(
        "J.S. Bach", "a four-part chorale", "church organ", "organ", "slow", "F-sharp minor", "4/4"
    )
    texts = {caption_for(facts, 0, f"track-{i}") for i in range(30)}
    assert len(texts) >= 3
    for text in texts:
        assert all(w in text for w in ("J.S. Bach", "church organ", "slow", "F-sharp minor", "4/4"))
    assert caption_for(facts, 0, "x") == caption_for(facts, 0, "x")
    folk = CaptionFacts("Aird's Airs", "an air", is_composer=False)
    folk_texts = [caption_for(folk, 0, f"y{i}") for i in range(20)]
    assert any("from Aird's Airs" in t for t in folk_texts)
    assert not any("by Aird's Airs" in t for t in folk_texts)


def _tone(seconds, sr, channels=1, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def test_import_folder_reports_every_problem(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    sf.write(audio / "good.wav", _tone(2.0, 44100, channels=2), 44100)
    long = _tone(20.0, 22050)
    long[int(7.5 * 22050) : int(16.5 * 22050)] = 0  # a silent middle excerpt (8-16 s)
    sf.write(audio / "sub" / "long.flac", long, 22050)
    sf.write(audio / "silent.wav", np.zeros(32000, dtype=np.float32), 16000)
    sf.write(audio / "uncaptioned.wav", _tone(1.0, 16000), 16000)
    sf.write(audio / "blank.wav", _tone(1.0, 16000), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x01junk that is not audio" * 10)
    (audio / "empty.ogg").write_bytes(b"")
    (audio / "song.m4a").write_bytes(b"\x00" * 64)
    (audio / "notes.txt").write_text("not audio")
    rows = [
        {"path": "good.wav", "caption": "A fiddle tune", "artist": "Alice", "title": "Good"},
        {"path": "sub/long.flac", "caption": "A long drone", "artist": "Bob"},
        {"path": "silent.wav", "caption": "Nothing", "artist": "Bob"},
        {"path": "corrupt.wav", "caption": "Broken", "artist": "Bob"},
        {"path": "empty.ogg", "caption": "Empty", "artist": "Bob"},
        {"path": "blank.wav", "caption": "", "artist": "Bob"},
        {"path": "good.wav", "caption": "Again", "artist": "Alice"},
        {"path": "missing.wav", "caption": "Not there", "artist": "Bob"},
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = import_folder(audio, captions, tmp_path / "out", seconds=8.0, progress=False)

    problems = dict(result.problems)
    assert len(result.problems) == 9
    assert "silent" in problems["silent.wav"]
    assert "corrupt" in problems["corrupt.wav"]
    assert "empty" in problems["empty.ogg"]
    assert "missing caption" in problems["blank.wav"]
    assert "duplicate" in problems["good.wav"]
    assert "no such audio file" in problems["missing.wav"]
    assert "no caption" in problems["uncaptioned.wav"]
    assert "not supported" in problems["song.m4a"]
    assert result.counts["other_files_ignored"] == 1
    assert "excerpt 1 (8-16 s) is silent" in problems["sub/long.flac"]

    df = read_manifest(tmp_path / "out")
    assert sorted(df["title"]) == ["Good", "long", "long"]
    long = df[df["title"] == "long"]
    assert long["parent_id"].nunique() == 1 and long["track_id"].nunique() == 2
    assert list(long["duration"]) == pytest.approx([8.0, 4.0])
    good = df[df["title"] == "Good"].iloc[0]
    assert good["caption"] == "A fiddle tune" and good["duration"] == pytest.approx(2.0)
    for rel in df["path"]:
        info = sf.info(str(tmp_path / "out" / rel))
        assert info.samplerate == 16000 and info.channels == 1
    assert result.counts["imported_files"] == 2 and result.counts["excerpts"] == 3
    assert result.summary_table().iloc[-1]["tracks"] == 3


def test_import_keeps_stereo_when_asked(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    left, right = _tone(10.0, 22050, freq=440.0), _tone(10.0, 22050, freq=660.0)
    sf.write(audio / "stereo.wav", np.stack([left, right], axis=1), 22050)
    sf.write(audio / "mono.wav", _tone(3.0, 22050), 22050)
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\nstereo.wav,two tones\nmono.wav,one tone\n")
    out = tmp_path / "out"
    result = import_folder(audio, captions, out, 44100, 8.0, channels=2, progress=False)
    assert result.counts["excerpts"] == 3 and not result.problems
    for rel in result.manifest["path"]:
        data, sr = sf.read(str(out / rel), dtype="float32")
        assert sr == 44100 and data.ndim == 2 and data.shape[1] == 2
        same = np.allclose(data[:, 0], data[:, 1], atol=1e-3)
        assert same == rel.startswith("audio/mono")  # the two channels stay apart
    durations = dict(zip(result.manifest["path"], result.manifest["duration"]))
    assert sorted(durations.values()) == pytest.approx([2.0, 3.0, 8.0])
    with pytest.raises(LinernotesError, match="channels=3"):
        import_folder(audio, captions, out, channels=3, progress=False)


def test_import_rejects_a_captions_file_without_the_columns(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    bad = tmp_path / "captions.csv"
    bad.write_text("file,text\na.wav,hello\n")
    with pytest.raises(LinernotesError, match=r"captions\.csv.*path, caption"):
        import_folder(tmp_path, bad, tmp_path / "out", progress=False)


def _noisy_tone(seconds, sr, seed=0):
    """A tone with noise: it compresses poorly, so a 10 s OGG Vorbis is about 100 kB."""
    noise = np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32)
    return _tone(seconds, sr) + 0.05 * noise


def test_import_leaves_out_truncated_or_corrupt_audio(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sr = 44100
    names = ["whole.ogg", "cut.ogg", "gap.ogg", "cut.wav", "cut.flac"]
    for name in names:
        fmt = {"ogg": "OGG", "wav": "WAV", "flac": "FLAC"}[name.rsplit(".", 1)[1]]
        sf.write(audio / name, _noisy_tone(10.0, sr), sr, format=fmt,
                 subtype="VORBIS" if fmt == "OGG" else "PCM_16")
    whole = (audio / "whole.ogg").read_bytes()
    assert len(whole) > 60_000
    (audio / "cut.ogg").write_bytes(whole[:20_000])  # the first 20 kB
    mid = len(whole) // 2
    (audio / "gap.ogg").write_bytes(whole[: mid - 20_000] + bytes(40_000) + whole[mid + 20_000 :])
    for name in ("cut.wav", "cut.flac"):
        data = (audio / name).read_bytes()
        (audio / name).write_bytes(data[: len(data) // 2])
    if "MP3" in sf.available_formats():
        sf.write(audio / "cut.mp3", _noisy_tone(10.0, sr), sr, format="MP3")
        data = (audio / "cut.mp3").read_bytes()
        (audio / "cut.mp3").write_bytes(data[: len(data) // 4])
        names.append("cut.mp3")
    # What libsndfile makes of them: a cut-off Ogg declares only the pages it still has, a WAV's
    # length is trimmed to the bytes present; the Ogg with a zeroed stretch decodes short.
    assert sf.info(str(audio / "cut.ogg")).frames == len(sf.read(str(audio / "cut.ogg"))[0])
    assert sf.info(str(audio / "cut.wav")).frames == len(sf.read(str(audio / "cut.wav"))[0])
    assert len(sf.read(str(audio / "gap.ogg"))[0]) < 0.9 * sf.info(str(audio / "gap.ogg")).frames
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption\n" + "".join(f"{n},noise {n}\n" for n in names))

    result = import_folder(audio, captions, tmp_path / "out", seconds=8.0, progress=False)
    problems = dict(result.problems)
    assert set(problems) == set(names) - {"whole.ogg"}
    assert sorted(result.manifest["title"]) == ["whole", "whole"]  # 8 s + 2 s, all of it
    assert result.total_duration == pytest.approx(10.0)
    assert problems["cut.ogg"].startswith("decoded 1.")
    assert "end-of-stream" in problems["cut.ogg"]
    assert problems["cut.wav"].startswith("decoded 5.0 s of a declared 10.0 s")
    assert "decoded" in problems["gap.ogg"] and "of a declared 10.0 s" in problems["gap.ogg"]
    for name in {"cut.ogg", "gap.ogg", "cut.wav", "cut.mp3"} & set(names):
        assert "truncated or corrupt; left out (pass --keep-truncated" in problems[name], name
    assert "unreadable or corrupt" in problems["cut.flac"]  # libsndfile: "lost sync"
    assert result.counts["files_not_imported"] == len(names) - 1
    log = [json.loads(x) for x in (tmp_path / "out" / "import_log.jsonl").read_text().split("\n")
           if x]
    assert {e["path"]: e["kind"] for e in log} == dict.fromkeys(problems, "file")

    kept = import_folder(
        audio, captions, tmp_path / "kept", seconds=8.0, keep_truncated=True, progress=False
    )
    problems = dict(kept.problems)
    assert set(problems) == set(names) - {"whole.ogg"}
    assert "unreadable or corrupt" in problems["cut.flac"]
    short = set(names) - {"whole.ogg", "cut.flac"}
    assert all("imported what decodes" in problems[n] for n in short)
    assert kept.counts["truncated_kept"] == len(short) and kept.counts["files_not_imported"] == 1
    names = kept.manifest["source"].map(lambda s: s.rsplit("/", 1)[-1])
    seconds = kept.manifest.groupby(names)["duration"].sum()
    assert seconds["whole.ogg"] == pytest.approx(10.0)
    assert seconds["cut.wav"] == pytest.approx(5.0, abs=0.01)
    assert 1.0 < seconds["cut.ogg"] < 2.0 and 1.0 < seconds["gap.ogg"] < 9.0


def test_import_refuses_symbolic_links_out_of_the_folder(tmp_path):
    audio, elsewhere = tmp_path / "audio", tmp_path / "elsewhere"
    audio.mkdir()
    elsewhere.mkdir()
    for path in (audio / "inside.wav", elsewhere / "far.wav", elsewhere / "near.wav"):
        sf.write(path, _tone(2.0, 16000), 16000)
    (audio / "out.wav").symlink_to(elsewhere / "far.wav")
    (audio / "in.wav").symlink_to("inside.wav")
    (audio / "linked").symlink_to(elsewhere, target_is_directory=True)
    rows = [
        ("inside.wav", "the file"),
        ("in.wav", "a link inside"),
        ("out.wav", "a link out"),
        ("linked/near.wav", "in a linked folder"),
        ("../elsewhere/far.wav", "a relative path out"),
        (str(elsewhere / "near.wav"), "an absolute path out"),
        ("../elsewhere/none.wav", "nothing there"),
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in rows))

    result = import_folder(audio, captions, tmp_path / "out", progress=False)
    problems = dict(result.problems)
    assert sorted(result.manifest["caption"]) == ["a link inside", "the file"]
    for rel in ("out.wav", "linked/near.wav"):
        assert problems[rel].startswith("symbolic link to a file outside the audio folder (")
        assert str(elsewhere.resolve()) in problems[rel] and "--follow-links" in problems[rel]
    for rel in ("../elsewhere/far.wav", str(elsewhere / "near.wav")):
        assert problems[rel].startswith("outside the audio folder (")
    assert problems["../elsewhere/none.wav"] == "caption given but no such audio file"
    assert result.counts["files_not_imported"] == 4
    assert result.counts["caption_rows_not_used"] == 1

    followed = import_folder(audio, captions, tmp_path / "out2", follow_links=True, progress=False)
    assert sorted(followed.manifest["caption"]) == [
        "a link inside", "a link out", "in a linked folder", "the file"
    ]
    assert set(dict(followed.problems)) == {
        "../elsewhere/far.wav", str(elsewhere / "near.wav"), "../elsewhere/none.wav"
    }


def test_import_counts_files_and_excerpts_apart(tmp_path):
    from typer.testing import CliRunner

    from linernotes.cli import app

    audio = tmp_path / "audio"
    audio.mkdir()
    gappy = _tone(8.0, 16000)
    gappy[16000:-16000] = 0  # excerpts 1-6 of 1 s are silent
    sf.write(audio / "gappy.wav", gappy, 16000)
    sf.write(audio / "good.wav", _tone(1.0, 16000), 16000)
    sf.write(audio / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    sf.write(audio / "uncaptioned.wav", _tone(1.0, 16000), 16000)
    sf.write(audio / "blank.wav", _tone(1.0, 16000), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x01junk that is not audio" * 10)
    captions = tmp_path / "captions.csv"
    captions.write_text(
        "path,caption,artist\ngappy.wav,a gappy tone,Ann\ngood.wav,a tone,Ann\n"
        "silent.wav,nothing,Ann\nblank.wav,,Bo\ncorrupt.wav,broken,Bo\nmissing.wav,gone,Bo\n"
    )
    result = import_folder(audio, captions, tmp_path / "out", seconds=1.0, progress=False)
    assert len(result.problems) == 11
    c = result.counts
    assert (c["files_not_imported"], c["excerpts_skipped"], c["caption_rows_not_used"]) == (4, 6, 1)
    assert c["imported_files"] == 2 and c["excerpts"] == 3
    summary = "4 file(s) not imported, 6 excerpt(s) skipped, 1 captions row(s) not used"
    assert result.problem_summary() == summary
    table = result.summary_table().set_index("artist")
    assert list(table.columns) == [
        "tracks", "holdout", "seconds", "files_not_imported", "excerpts_skipped"
    ]
    assert table.loc["Ann"].tolist() == [3, table.loc["Ann", "holdout"], 3.0, 1, 6]
    assert table.loc["Bo", "files_not_imported"] == 2  # blank caption, corrupt
    assert table.loc["", "files_not_imported"] == 1  # the uncaptioned file has no artist
    assert table.loc["total"].tolist()[-2:] == [4, 6]

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["corpus", "import", "--audio", str(audio), "--captions",
                                   str(captions), "-o", str(out), "--seconds", "1"])
    assert res.exit_code == 0, res.output
    assert f"{summary} (see {out / 'import_log.jsonl'}):" in res.output
    assert "file(s) not imported (see" not in res.output.replace(summary, "")
