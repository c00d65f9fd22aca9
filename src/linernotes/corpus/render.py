"""Render one excerpt of a score: notes -> MIDI -> FluidSynth -> mono, loudness-normalised FLAC.

Deterministic: the instrument and any drawn tempo come from a hash of (seed, work, excerpt), the
MIDI holds only plain notes, and FluidSynth renders files identically run to run.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from linernotes.corpus.music21_source import Work
from linernotes.data.audio import loudness_normalise, write_audio
from linernotes.errors import LinernotesError

DEFAULT_SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
RELEASE_SECONDS = 0.6  # sound kept after the last note ends (short pieces only)
FADE_SECONDS = 0.03
MAX_PARTS = 15  # MIDI channels left after the percussion channel
VELOCITY = 80


@dataclass(frozen=True)
class Instrument:
    """A General MIDI program with the words captions use for it."""

    name: str
    family: str
    program: int


INSTRUMENTS = {
    i.name: i
    for i in (
        Instrument("piano", "keyboard", 0),
        Instrument("harpsichord", "keyboard", 6),
        Instrument("hammered dulcimer", "struck strings", 15),
        Instrument("church organ", "organ", 19),
        Instrument("reed organ", "organ", 20),
        Instrument("accordion", "free reeds", 21),
        Instrument("harmonica", "free reeds", 22),
        Instrument("nylon guitar", "plucked strings", 24),
        Instrument("violin", "strings", 40),
        Instrument("cello", "strings", 42),
        Instrument("harp", "plucked strings", 46),
        Instrument("string ensemble", "strings", 48),
        Instrument("choir", "voices", 52),
        Instrument("voice oohs", "voices", 53),
        Instrument("trombones", "brass", 57),
        Instrument("brass section", "brass", 61),
        Instrument("oboe", "woodwind", 68),
        Instrument("clarinet", "woodwind", 71),
        Instrument("piccolo", "woodwind", 72),
        Instrument("flute", "woodwind", 73),
        Instrument("recorder", "woodwind", 74),
        Instrument("pan flute", "woodwind", 75),
        Instrument("shakuhachi", "woodwind", 77),
        Instrument("tin whistle", "woodwind", 78),
        Instrument("banjo", "plucked strings", 105),
        Instrument("shamisen", "plucked strings", 106),
        Instrument("koto", "plucked strings", 107),
        Instrument("bagpipes", "pipes", 109),
        Instrument("fiddle", "strings", 110),
    )
}

#: Style -> weighted instruments: an artist leans on a timbre but does not own it.
PALETTES: dict[str, tuple[tuple[str, float], ...]] = {
    "chorale": (
        ("church organ", 40),
        ("string ensemble", 25),
        ("choir", 15),
        ("harpsichord", 10),
        ("brass section", 5),
        ("piano", 5),
    ),
    "renaissance_sacred": (
        ("choir", 45),
        ("church organ", 20),
        ("recorder", 15),
        ("string ensemble", 10),
        ("trombones", 10),
    ),
    "madrigal": (
        ("choir", 35),
        ("string ensemble", 20),
        ("recorder", 15),
        ("nylon guitar", 15),
        ("harpsichord", 15),
    ),
    "medieval": (
        ("recorder", 30),
        ("harp", 20),
        ("voice oohs", 20),
        ("nylon guitar", 15),
        ("hammered dulcimer", 15),
    ),
    "string_quartet": (
        ("string ensemble", 45),
        ("piano", 25),
        ("violin", 10),
        ("clarinet", 10),
        ("church organ", 5),
        ("harpsichord", 5),
    ),
    "romantic_piano": (("piano", 60), ("string ensemble", 20), ("cello", 10), ("harp", 10)),
    "irish_dance": (
        ("fiddle", 30),
        ("tin whistle", 25),
        ("flute", 15),
        ("accordion", 15),
        ("bagpipes", 10),
        ("harp", 5),
    ),
    "scottish_air": (
        ("flute", 30),
        ("fiddle", 25),
        ("piccolo", 15),
        ("bagpipes", 15),
        ("harp", 15),
    ),
    "american_dance": (
        ("fiddle", 35),
        ("banjo", 20),
        ("piano", 15),
        ("accordion", 10),
        ("flute", 10),
        ("harmonica", 10),
    ),
    "fife": (
        ("piccolo", 45),
        ("flute", 25),
        ("fiddle", 10),
        ("tin whistle", 10),
        ("brass section", 10),
    ),
    "northumbrian": (
        ("bagpipes", 30),
        ("fiddle", 25),
        ("accordion", 15),
        ("flute", 15),
        ("harp", 15),
    ),
    "german_folk": (
        ("accordion", 20),
        ("voice oohs", 20),
        ("recorder", 15),
        ("nylon guitar", 15),
        ("violin", 15),
        ("clarinet", 15),
    ),
    "chinese_folk": (
        ("flute", 20),
        ("koto", 15),
        ("shamisen", 15),
        ("fiddle", 15),
        ("hammered dulcimer", 15),
        ("pan flute", 10),
        ("shakuhachi", 10),
    ),
    "generic": (("piano", 40), ("string ensemble", 30), ("flute", 15), ("nylon guitar", 15)),
}

#: Style -> range of beats per minute drawn when the score gives no tempo.
TEMPO_RANGES: dict[str, tuple[float, float]] = {
    "chorale": (56, 84),
    "renaissance_sacred": (50, 76),
    "madrigal": (60, 92),
    "medieval": (60, 100),
    "string_quartet": (60, 132),
    "romantic_piano": (60, 120),
    "irish_dance": (88, 128),
    "scottish_air": (72, 118),
    "american_dance": (90, 130),
    "fife": (92, 120),
    "northumbrian": (72, 112),
    "german_folk": (70, 118),
    "chinese_folk": (56, 108),
    "generic": (60, 120),
}


class RenderSkip(Exception):
    """A score that cannot be rendered; the message is the reason recorded in the build log."""


@dataclass(frozen=True)
class Rendered:
    """What rendering one excerpt produced (everything the manifest needs about the audio)."""

    key: str
    meter: str
    tempo: float  # quarter notes per minute
    tempo_word: str
    tempo_source: str  # "score" or "drawn"
    instrument: str
    family: str
    duration: float
    n_frames: int
    start_quarter: float
    n_parts: int


def rng_for(*parts: object) -> random.Random:
    """A random generator seeded by a stable hash of `parts` (never Python's salted hash)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def choose_instrument(style: str, rng: random.Random) -> Instrument:
    """Draw an instrument from the style's weighted palette."""
    palette = PALETTES.get(style, PALETTES["generic"])
    names, weights = zip(*palette, strict=True)
    return INSTRUMENTS[rng.choices(names, weights=weights, k=1)[0]]


def tempo_word(beats_per_minute: float) -> str:
    """Caption word for a pace in beats (of the meter) per minute."""
    if beats_per_minute < 66:
        return "slow"
    if beats_per_minute < 96:
        return "moderate"
    if beats_per_minute < 126:
        return "lively"
    return "fast"


def check_tools(soundfont: str | Path = DEFAULT_SOUNDFONT) -> str:
    """Path of the fluidsynth executable; LinernotesError if it or the soundfont is missing."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise LinernotesError(
            "FluidSynth is not installed: install it (e.g. `apt-get install fluidsynth`) to build "
            "the reference corpus."
        )
    if not Path(soundfont).is_file():
        raise LinernotesError(
            f"Soundfont {soundfont} not found: install `fluid-soundfont-gm` or pass another "
            "General MIDI .sf2 file."
        )
    return exe


def render_excerpt(
    work: Work,
    excerpt: int,
    out_path: str | Path,
    *,
    seconds: float = 8.0,
    sample_rate: int = 16000,
    seed: int = 0,
    soundfont: str | Path = DEFAULT_SOUNDFONT,
) -> Rendered:
    """Render excerpt number `excerpt` of `work` into `out_path` (FLAC); RenderSkip if it can't."""
    rng = rng_for(seed, work.work_id, excerpt)
    instrument = choose_instrument(work.style, rng)
    score = _parse(work)
    parts = _note_lists(score)
    if not any(parts):
        raise RenderSkip("score has no pitched notes")
    start = _excerpt_start(score, parts, excerpt, work.n_excerpts)
    flat = score.flatten()
    meter_text, beat = _meter_at(flat, start)
    quarter_bpm, source = _tempo_at(flat, start)
    if quarter_bpm is None:
        lo, hi = TEMPO_RANGES.get(work.style, TEMPO_RANGES["generic"])
        quarter_bpm, source = round(rng.uniform(lo, hi) * beat, 1), "drawn"
    window = _phrase_window(score, start, Fraction(seconds * quarter_bpm / 60).limit_denominator(
        10_000), rng_for(seed, work.work_id, excerpt, "phrase"))
    chosen = [
        [
            (o - start, min(q, start + window - o), p)
            for o, q, p in notes
            if start <= o < start + window
        ]
        for notes in parts
    ]
    chosen = [c for c in chosen if c][:MAX_PARTS]
    if not chosen:
        raise RenderSkip(f"no notes in excerpt {excerpt}")
    music_end = max(o + q for c in chosen for o, q, _ in c)
    duration = min(seconds, float(music_end) * 60 / quarter_bpm + RELEASE_SECONDS)
    with tempfile.TemporaryDirectory(prefix="linernotes-render-") as tmp:
        midi_path, wav_path = Path(tmp) / "excerpt.mid", Path(tmp) / "excerpt.wav"
        _write_midi(chosen, quarter_bpm, instrument.program, midi_path)
        _fluidsynth(midi_path, wav_path, sample_rate, soundfont)
        audio, sr = sf.read(str(wav_path), dtype="float32", always_2d=True)
    if sr != sample_rate:
        raise RenderSkip(f"FluidSynth wrote {sr} Hz instead of {sample_rate} Hz")
    audio = _fit(audio.mean(axis=1), int(round(duration * sample_rate)), sample_rate)
    if float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) < 1e-4:
        raise RenderSkip("rendered audio is silent")
    write_audio(out_path, loudness_normalise(audio), sample_rate)
    beats_per_minute = quarter_bpm / beat
    return Rendered(
        key=_key_name(flat, chosen),
        meter=meter_text,
        tempo=float(quarter_bpm),
        tempo_word=tempo_word(beats_per_minute),
        tempo_source=source,
        instrument=instrument.name,
        family=instrument.family,
        duration=len(audio) / sample_rate,
        n_frames=len(audio),
        start_quarter=float(start),
        n_parts=len(chosen),
    )


def _parse(work: Work):
    from music21 import common, converter, stream

    path = Path(work.path)
    if not path.is_absolute():
        path = Path(common.getCorpusFilePath()) / path
    try:
        score = converter.parseFile(path, number=work.number, forceSource=True, storePickle=False)
    except Exception as exc:  # music21 raises many types for bad input
        raise RenderSkip(f"does not parse: {_describe(exc)}") from exc
    if isinstance(score, stream.Opus):
        scores = list(score.scores)
        if not scores:
            raise RenderSkip("file holds no scores")
        if work.merge_tunes and len(scores) > 1:
            try:
                score = score.mergeScores()
            except Exception as exc:
                raise RenderSkip(f"voices do not merge: {_describe(exc)}") from exc
        else:
            score = scores[0]
    return score


def _note_lists(score) -> list[list[tuple[Fraction, Fraction, tuple[int, ...]]]]:
    """Per part: (offset, quarter length, MIDI pitches) of every sounding note, ties joined.

    Copying plain notes out of the flattened parts sidesteps repeats, duplicate time signatures
    and other markup that breaks music21's MIDI export.
    """
    from music21 import harmony

    result = []
    for part in list(score.parts) or [score]:
        notes: list[list] = []
        open_ties: dict[int, int] = {}  # MIDI pitch -> index of the note its tie continues
        for el in part.flatten().notes:
            if isinstance(el, harmony.Harmony) or el.duration.isGrace:
                continue
            ql = Fraction(el.quarterLength).limit_denominator(10_000)
            offset = Fraction(el.offset).limit_denominator(10_000)
            pitches = tuple(
                sorted({p.midi for p in getattr(el, "pitches", ()) if 0 <= p.midi <= 127})
            )
            if ql <= 0 or not pitches:
                continue
            tie = el.tie.type if el.tie is not None else None
            held = open_ties.get(pitches[0]) if len(pitches) == 1 else None
            if tie in ("stop", "continue") and held is not None:
                start, length, _ = notes[held]
                if start + length == offset:  # the tied note continues: lengthen it
                    notes[held][1] = length + ql
                    if tie == "stop":
                        del open_ties[pitches[0]]
                    continue
            notes.append([offset, ql, pitches])
            if tie == "start" and len(pitches) == 1:
                open_ties[pitches[0]] = len(notes) - 1
        result.append(sorted(tuple(n) for n in notes))
    return result


def _phrase_window(score, start: Fraction, window: Fraction, rng: random.Random) -> Fraction:
    """End the excerpt on a barline: a drawn number of whole measures that fit in `window`.

    Lengths then vary (from a third of the window to all of it), as in real corpora, which is
    what makes the padding mask matter downstream.
    """
    measures = score.parts[0].getElementsByClass("Measure") if score.parts else []
    ends = sorted({Fraction(m.offset).limit_denominator(10_000) for m in measures}
                  | {Fraction(m.offset + m.duration.quarterLength).limit_denominator(10_000)
                     for m in measures})
    ends = [e for e in ends if start + window / 3 <= e <= start + window]
    return rng.choice(ends) - start if ends else window


def _excerpt_start(score, parts, excerpt: int, n_excerpts: int) -> Fraction:
    onsets = sorted({o for notes in parts for o, _, _ in notes})
    first, end = onsets[0], max(o + q for notes in parts for o, q, _ in notes)
    if excerpt <= 0:
        return first
    target = first + (end - first) * excerpt / max(n_excerpts, excerpt + 1)
    measures = score.parts[0].getElementsByClass("Measure") if score.parts else []
    starts = [Fraction(m.offset).limit_denominator(10_000) for m in measures]
    downbeat = max((s for s in starts if first < s <= target), default=target)
    later = [o for o in onsets if o >= downbeat]
    if not later:
        raise RenderSkip(f"excerpt {excerpt} starts after the last note")
    return later[0]


def _meter_at(flat, start: Fraction) -> tuple[str, float]:
    """Time signature sounding at `start` (ignoring pickup artefacts like 1/16) and beat length."""
    from music21 import meter

    signatures = [
        ts
        for ts in flat.getElementsByClass(meter.TimeSignature)
        if ts.barDuration.quarterLength >= 1.0
    ]
    before = [ts for ts in signatures if ts.offset <= start]
    ts = before[-1] if before else (signatures[0] if signatures else None)
    if ts is None:
        return "", 1.0
    return ts.ratioString, float(ts.beatDuration.quarterLength) or 1.0


def _tempo_at(flat, start: Fraction) -> tuple[float | None, str]:
    """Quarter-note BPM from the score's metronome mark at `start`, if plausible."""
    from music21 import tempo

    marks = []
    for mm in flat.getElementsByClass(tempo.MetronomeMark):
        if mm.number is None and mm.numberSounding == 120:
            continue  # Finale's default playback tempo, not the composer's or editor's
        try:
            bpm = mm.getQuarterBPM()
        except Exception:
            continue
        if bpm and 30 <= bpm <= 300:
            marks.append((mm.offset, float(bpm)))
    before = [bpm for offset, bpm in marks if offset <= start]
    if before:
        return round(before[-1], 1), "score"
    return (round(marks[0][1], 1), "score") if marks else (None, "drawn")


def _key_name(flat, chosen) -> str:
    """Key of the excerpt: the score's key if it names a mode, else the best analysed key
    that fits the key signature."""
    from music21 import key, note, stream

    signatures = list(flat.getElementsByClass(key.KeySignature))
    first = signatures[0] if signatures else None
    if isinstance(first, key.Key):
        return _pretty_key(first)
    s = stream.Stream()
    for notes in chosen:
        for offset, ql, pitches in notes:
            for p in pitches:
                n = note.Note(p)
                n.quarterLength = ql
                s.insert(offset, n)
    try:
        best = s.analyze("key")
    except Exception:
        return ""
    if first is None:
        return _pretty_key(best)
    for candidate in [best, *best.alternateInterpretations]:
        if candidate.sharps == first.sharps:
            return _pretty_key(candidate)
    return _pretty_key(first.asKey("major"))


def _pretty_key(k) -> str:
    acc = k.tonic.accidental
    suffix = f"-{acc.name}" if acc is not None and acc.name != "natural" else ""
    return f"{k.tonic.step}{suffix} {k.mode}"


def _write_midi(chosen, quarter_bpm: float, program: int, path: Path) -> None:
    from music21 import chord, instrument, midi, note, stream, tempo

    score = stream.Score()
    score.insert(0, tempo.MetronomeMark(number=quarter_bpm, referent=1.0))
    for notes in chosen:
        part = stream.Part()
        inst = instrument.Instrument()
        inst.midiProgram = program
        part.insert(0, inst)
        for offset, ql, pitches in notes:
            el = note.Note(pitches[0]) if len(pitches) == 1 else chord.Chord(list(pitches))
            el.quarterLength = ql
            el.volume.velocity = VELOCITY
            part.insert(offset, el)
        score.insert(0, part)
    try:
        mf = midi.translate.streamToMidiFile(score)
        mf.open(str(path), "wb")
        try:
            mf.write()
        finally:
            mf.close()
    except Exception as exc:
        raise RenderSkip(f"MIDI export failed: {_describe(exc)}") from exc


def _fluidsynth(midi_path: Path, wav_path: Path, sample_rate: int, soundfont) -> None:
    cmd = [
        check_tools(soundfont),
        "-ni",
        "-q",
        "-g",
        "0.8",
        "-r",
        str(sample_rate),
        "-O",
        "float",
        "-T",
        "wav",
        "-F",
        str(wav_path),
        str(soundfont),
        str(midi_path),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise RenderSkip("FluidSynth timed out") from exc
    if proc.returncode != 0 or not wav_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RenderSkip(f"FluidSynth failed (exit {proc.returncode}): {tail[0][:200]}")


def _fit(audio: np.ndarray, n: int, sample_rate: int) -> np.ndarray:
    """Cut or zero-pad to `n` samples, with a short fade-out against clicks."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(audio))] = audio[:n]
    fade = min(n, int(FADE_SECONDS * sample_rate))
    if fade:
        out[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return out


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:200]}"
