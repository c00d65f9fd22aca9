"""Enumerate music21's bundled corpus into candidate works, with an artist and a licence note each.

Listing reads music21's shipped metadata cache only (about a second); scores are parsed later,
and only the ones chosen to render.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from linernotes.errors import LinernotesError

#: Collections hold pieces in several formats; a duplicate (same folder and stem) keeps the first.
_FORMAT_PREFERENCE = (".mxl", ".xml", ".musicxml", ".krn", ".abc")
#: A work of this many quarter notes or more can give a further excerpt (up to MAX_EXCERPTS).
QUARTERS_PER_EXCERPT = 16.0
MAX_EXCERPTS = 8
_MAJOR_TONICS = (
    "C-flat",
    "G-flat",
    "D-flat",
    "A-flat",
    "E-flat",
    "B-flat",
    "F",
    "C",
    "G",
    "D",
    "A",
    "E",
    "B",
    "F-sharp",
    "C-sharp",
)
_MINOR_TONICS = (
    "A-flat",
    "E-flat",
    "B-flat",
    "F",
    "C",
    "G",
    "D",
    "A",
    "E",
    "B",
    "F-sharp",
    "C-sharp",
    "G-sharp",
    "D-sharp",
    "A-sharp",
)


@dataclass(frozen=True)
class Work:
    """One score (or one tune of a multi-tune file) that can be rendered into excerpts."""

    work_id: str  # stable: slug + hash of `source`
    artist: str
    collection: str
    title: str
    path: str  # corpus-relative path inside music21/corpus, or an absolute path
    number: int | None  # tune number inside a multi-tune ABC file
    kind: str  # "a four-part chorale", "a dance tune", ... (used in captions)
    style: str  # key into the instrument palettes and tempo ranges of render.py
    licence: str
    key_signature: int | None = None  # sharps (+) or flats (-) of the first key signature
    meter: str = ""
    tempo: float | None = None  # quarter notes per minute, when the score gives one
    quarter_length: float = 0.0
    n_parts: int = 1
    merge_tunes: bool = False  # the file's tunes are the voices of one piece (Josquin)
    by_composer: bool = True  # captions say "by <artist>"; collections say "from <artist>"

    @property
    def source(self) -> str:
        """Where the work comes from: corpus path, plus `#n` for a tune in a multi-tune file."""
        return self.path if self.number is None else f"{self.path}#{self.number}"

    @property
    def key(self) -> str:
        """The key signature as its two possible keys, e.g. 'G major / E minor' ('' if unknown)."""
        if self.key_signature is None or not -7 <= self.key_signature <= 7:
            return ""
        i = self.key_signature + 7
        return f"{_MAJOR_TONICS[i]} major / {_MINOR_TONICS[i]} minor"

    @property
    def n_excerpts(self) -> int:
        """How many evenly spaced excerpts the work can give (1 for short pieces)."""
        return max(1, min(MAX_EXCERPTS, int(self.quarter_length // QUARTERS_PER_EXCERPT)))


@dataclass(frozen=True)
class _Collection:
    artist: str | None  # None: derived per work (Essen regions)
    collection: str
    kind: str
    style: str
    licence: str
    by_composer: bool = True


_NONCOMMERCIAL = "research and non-commercial use only"
_UNSTATED = (
    "the encoding's licence is not stated; music21 distributes it with the encoders' "
    f"permission (music21/corpus/license.txt). Treat as {_NONCOMMERCIAL}"
)

#: Corpus folder (or folder/file prefix) -> how it becomes an artist. Longest prefix wins.
COLLECTIONS: dict[str, _Collection] = {
    "bach": _Collection(
        "J.S. Bach",
        "Bach chorales (music21 corpus)",
        "a four-part chorale",
        "chorale",
        "Composition public domain. Encodings distributed with music21; the kern versions are "
        "Copyright 1994 CCARH (MuseData), licensed for research, not commercial use; the "
        f"MusicXML versions state no licence. Treat as {_NONCOMMERCIAL}.",
    ),
    "palestrina": _Collection(
        "Palestrina",
        "Palestrina masses (Humdrum, John Miller)",
        "a mass movement",
        "renaissance_sacred",
        "Composition public domain. Encoding Copyright 2000 John Miller (Ohio State Humdrum "
        "Palestrina database): 'rights to all derivative electronic formats reserved', see "
        "its licence agreement. Rendered audio is a derivative: "
        f"{_NONCOMMERCIAL}, do not redistribute.",
    ),
    "monteverdi": _Collection(
        "Monteverdi",
        "Monteverdi madrigals (music21 corpus)",
        "a madrigal",
        "madrigal",
        "Composition public domain. Encodings carry Ut Orpheus Edizioni (2003) edition "
        f"notices; {_UNSTATED}.",
    ),
    "josquin": _Collection(
        "Josquin des Prez",
        "Josquin chansons (ABC, Laura Conrad)",
        "a polyphonic chanson",
        "renaissance_sacred",
        "Composition public domain. Encoding Copyright 1999 Laura E. Conrad, GNU GPL v2 or "
        "later (stated in each file).",
    ),
    "beethoven": _Collection(
        "Beethoven",
        "Beethoven string quartets (music21 corpus)",
        "a string quartet movement",
        "string_quartet",
        "Composition public domain. Kern encodings by Craig Stuart Sapp (CCARH), research use; "
        f"MusicXML {_UNSTATED}.",
    ),
    "mozart": _Collection(
        "Mozart",
        "Mozart quartets and sonata (music21 corpus)",
        "a string quartet movement",
        "string_quartet",
        f"Composition public domain; {_UNSTATED}.",
    ),
    "mozart/k545": _Collection(
        "Mozart",
        "Mozart quartets and sonata (music21 corpus)",
        "a piano sonata movement",
        "string_quartet",
        f"Composition public domain; {_UNSTATED}.",
    ),
    "haydn": _Collection(
        "Haydn",
        "Haydn string quartets (music21 corpus)",
        "a string quartet movement",
        "string_quartet",
        f"Composition public domain; {_UNSTATED}.",
    ),
    "schumann_robert": _Collection(
        "Robert Schumann",
        "Robert Schumann (music21 corpus)",
        "a chamber piece",
        "string_quartet",
        f"Composition public domain; {_UNSTATED}.",
    ),
    "schumann_clara": _Collection(
        "Clara Schumann",
        "Clara Schumann (music21 corpus)",
        "a piano piece",
        "romantic_piano",
        f"Composition public domain; {_UNSTATED}.",
    ),
    "trecento": _Collection(
        "Trecento",
        "Trecento polyphony (PMFC-based encodings, music21)",
        "a fourteenth-century Italian piece",
        "medieval",
        f"Compositions public domain; encodings by the music21 team; {_UNSTATED}.",
        by_composer=False,
    ),
    "oneills1850": _Collection(
        "O'Neill's Music of Ireland",
        "O'Neill's Music of Ireland (1903), ABC",
        "an Irish tune",
        "irish_dance",
        "Tunes public domain (O'Neill 1903). ABC transcriptions by Norbert Paap and others; "
        f"{_UNSTATED}.",
        by_composer=False,
    ),
    "ryansMammoth": _Collection(
        "Ryan's Mammoth Collection",
        "Ryan's Mammoth Collection (1883), ABC",
        "a dance tune",
        "american_dance",
        "Tunes public domain (Ryan 1883). ABC contributed by volunteers (e.g. Ray Davies); "
        f"{_UNSTATED}.",
        by_composer=False,
    ),
    "airdsAirs": _Collection(
        "Aird's Airs",
        "Aird's Selection of Scotch, English, Irish and Foreign Airs, ABC",
        "an air",
        "scottish_air",
        f"Tunes public domain (Aird 1778-1803). ABC by Jack Campin (2009); {_UNSTATED}.",
        by_composer=False,
    ),
    "miscFolk/northumbrianminstrelsyopus": _Collection(
        "Northumbrian Minstrelsy",
        "Northumbrian Minstrelsy (Bruce and Stokoe 1882), ABC",
        "a song tune",
        "northumbrian",
        f"Tunes public domain (1882). ABC by Jack Campin (2007); {_UNSTATED}.",
        by_composer=False,
    ),
    "miscFolk/americanfifeopus": _Collection(
        "American fife tunes",
        "Colonial and Civil War American fife music, ABC",
        "a fife tune",
        "fife",
        f"Tunes public domain. ABC tidied by Jack Campin from an unknown source; {_UNSTATED}.",
        by_composer=False,
    ),
    "essenFolksong": _Collection(
        None,
        "Essen Folksong Collection (EsAC), ABC by Seymour Schlien",
        "a folk song",
        "german_folk",
        "Essen Folksong Collection: legal status unclear (many encoders); Ewa Dahlig-Turek "
        "permits non-commercial distribution and use in music21 (essenFolksong/license.txt). "
        f"{_NONCOMMERCIAL[0].upper()}{_NONCOMMERCIAL[1:]}.",
        by_composer=False,
    ),
}
#: Folders that are not repertoire (tests, demos, exercises) or analyses without notes.
_EXCLUDED = (
    "demos",
    "theoryExercises",
    "leadSheet",
    "bach/choraleAnalyses",
    "essenFolksong/test",
    "schumann_robert/opus48no2",
)  # last: dichterliebe_no2 again

#: Composers of the small folders: one artist each, usually below `min_works`.
_MINOR_COMPOSERS = {
    "handel": "Handel",
    "chopin": "Chopin",
    "corelli": "Corelli",
    "cpebach": "C.P.E. Bach",
    "ciconia": "Ciconia",
    "luca": "Luca",
    "lusitano": "Lusitano",
    "beach": "Amy Beach",
    "joplin": "Joplin",
    "schubert": "Schubert",
    "verdi": "Verdi",
    "weber": "Weber",
    "webern": "Webern",
    "schoenberg": "Schoenberg",
    "johnson_j_r": "J. Rosamond Johnson",
    "liliuokalani": "Liliuokalani",
    "nottingham-dataset": "Nottingham Music Database",
}

#: Essen region names (first country named in the locale) -> English region.
_ESSEN_REGIONS = {
    "deutschland": "Germany",
    "luxemburg": "Luxembourg",
    "lothringen": "Lorraine",
    "china": "China",
    "oesterreich": "Austria",
    "steiermark": "Austria",
    "tirol": "Austria",
    "burgenland": "Austria",
    "schweiz": "Switzerland",
    "niederlande": "Netherlands",
    "irland": "Ireland",
    "ungarn": "Eastern Europe",
    "polen": "Eastern Europe",
    "tschechoslowakei": "Eastern Europe",
    "udssr": "Eastern Europe",
    "jugoslawien": "Eastern Europe",
    "rumaenien": "Eastern Europe",
    "schweden": "Scandinavia",
    "daenemark": "Scandinavia",
    "norwegen": "Scandinavia",
    "frankreich": "France",
    "elsass": "France",
}
_CONTINENTS = {
    "europa",
    "mitteleuropa",
    "osteuropa",
    "suedosteuropa",
    "nordeuropa",
    "westeuropa",
    "asien",
    "ostasien",
    "amerika",
    "mittelamerika",
}


def essen_region(locale: str | None, path: str) -> str:
    """English region of an Essen tune from its locale text (e.g. 'Europa, ..., Deutschland')."""
    text = (locale or "").lower()
    if "china" in text or PurePosixPath(path).name.startswith("han"):
        return "China"
    if "lothringen" in text:
        return "Lorraine"
    for token in re.split(r"[,;/()]", text):
        word = token.strip().split(" ")[0] if token.strip() else ""
        if not word or word in _CONTINENTS:
            continue
        return _ESSEN_REGIONS.get(word, "other regions")
    return "other regions"


def essen_artist(region: str) -> str:
    """Artist name of an Essen region, e.g. 'Essen folksongs (China)'."""
    return f"Essen folksongs ({region})"


def slug(text: str, limit: int = 40) -> str:
    """Lower-case ASCII slug of a path or title."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].rstrip("-") or "work"


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def work_id_for(source: str) -> str:
    """Stable work id from a source string such as 'essenFolksong/lux.abc#5'."""
    stem = re.sub(r"\.(mxl|xml|musicxml|krn|abc)", "", source)
    return f"{slug(stem)}-{short_hash(source)}"


def _collection_for(path: str) -> tuple[str, _Collection] | None:
    best = None
    for prefix, coll in COLLECTIONS.items():
        if (path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, coll)
    return best


def _minor_collection(path: str) -> _Collection | None:
    top = path.split("/")[0]
    name = _MINOR_COMPOSERS.get(top)
    if name is None:
        return None
    return _Collection(
        name,
        f"{name} (music21 corpus)",
        "a piece",
        "generic",
        f"See the file's own notes; {_UNSTATED}.",
    )


@functools.lru_cache(maxsize=1)
def _bach_titles() -> dict[str, dict]:
    from music21.corpus import chorales

    return dict(chorales.ChoraleListRKBWV().byBWV)


def _title(path: str, md, number: int | None) -> str:
    stem = PurePosixPath(path).stem
    if path.startswith("bach/"):
        bwv = stem.removeprefix("bwv")
        info = _bach_titles().get(bwv) or _bach_titles().get(bwv.split("-")[0])
        name = info["title"] if info else ""
        return f"{name} (BWV {bwv})" if name else f"Chorale BWV {bwv}"
    if path.startswith("monteverdi/"):
        parts = stem.split(".")  # madrigal.3.1 -> book 3, no. 1
        head = (md.composer or "").strip()
        name = re.sub(r"^\d+\.\s*", "", head).title() if re.match(r"^\d+\.", head) else ""
        label = f"Madrigal book {parts[1]}, no. {parts[2]}" if len(parts) == 3 else stem
        return f"{name} ({label})" if name else label
    title = (md.title or "").strip()
    parent = getattr(md, "parentTitle", None)
    if parent and title:
        title = f"{parent}: {title}"
    if not title:
        title = (md.movementName or "").strip() if md.movementName else ""
        if not title or title.lower().endswith((".mxl", ".xml", ".krn")):
            folder = PurePosixPath(path).parent.name
            title = f"{folder} {stem}" if folder and "movement" in stem else stem
    title = title.strip().rstrip(".,")
    if stem.startswith("movement") and "movement" not in title.lower():
        title += ", " + stem.replace("movement", "movement ").replace("_", " ")
    return title + (f" (tune {number})" if not md.title and number else "")


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _quarter_bpm(tempo_text: str | None) -> float | None:
    """Quarter-note BPM from a cached MetronomeMark text like '<... Half=112>'."""
    if not tempo_text:
        return None
    m = re.search(r"(\w+(?:\s\w+)?)=(\d+(?:\.\d+)?)", str(tempo_text))
    if not m:
        return None
    unit = {
        "whole": 4.0,
        "half": 2.0,
        "quarter": 1.0,
        "eighth": 0.5,
        "16th": 0.25,
        "dotted half": 3.0,
        "dotted quarter": 1.5,
        "dotted eighth": 0.75,
    }
    factor = unit.get(m.group(1).lower())
    return float(m.group(2)) * factor if factor else None


@functools.lru_cache(maxsize=1)
def _metadata_entries() -> tuple:
    from music21 import corpus

    try:
        bundle = corpus.corpora.CoreCorpus().metadataBundle
    except Exception as exc:  # a music21 without its corpus or cache
        raise LinernotesError(
            f"music21's bundled corpus metadata could not be read ({exc}). Reinstall music21 "
            "with its corpus (`pip install --force-reinstall music21`)."
        ) from exc
    if bundle is None or len(bundle) == 0:
        raise LinernotesError(
            "music21's corpus metadata cache is empty; reinstall music21 with its corpus."
        )
    entries = getattr(bundle, "_metadataEntries", None)  # iterating the bundle is quadratic
    return tuple(entries.values()) if isinstance(entries, dict) else tuple(bundle)


def list_works(artists: list[str] | None = None, min_works: int = 3) -> list[Work]:
    """Every renderable work of music21's bundled corpus, sorted by (artist, source).

    Artists with fewer than `min_works` works are dropped unless named in `artists`.
    """
    return select_artists(list(_all_works()), artists, min_works)


@functools.lru_cache(maxsize=1)
def _all_works() -> tuple[Work, ...]:
    works: dict[str, Work] = {}
    seen_stems: set[tuple[str, int | None]] = set()
    entries = sorted(
        (e for e in _metadata_entries() if e.metadata is not None),
        key=lambda e: (
            _stem_key(str(e.sourcePath)),
            _format_rank(str(e.sourcePath)),
            int(e.number) if e.number else 0,
        ),
    )
    josquin_seen: set[str] = set()
    for entry in entries:
        path = str(entry.sourcePath).replace("\\", "/")
        if path.startswith(_EXCLUDED) or Path(path).suffix not in _FORMAT_PREFERENCE:
            continue
        number = int(entry.number) if entry.number else None
        stem_key = (_stem_key(path), number)
        if stem_key in seen_stems:
            continue  # same piece in another format
        seen_stems.add(stem_key)
        found = _collection_for(path)
        coll = found[1] if found else _minor_collection(path)
        if coll is None:
            continue
        md = entry.metadata
        artist = coll.artist or essen_artist(essen_region(md.localeOfComposition, path))
        merge = path.startswith("josquin/")
        if merge:  # each tune is one voice: the file is the work
            if path in josquin_seen:
                continue
            josquin_seen.add(path)
            number = None
        work = Work(
            work_id="",
            artist=artist,
            collection=coll.collection,
            title=_title(path, md, number) if not merge else (md.title or "").strip(" ,"),
            path=path,
            number=number,
            kind=coll.kind,
            style=coll.style if coll.artist or "China" not in artist else "chinese_folk",
            licence=coll.licence,
            key_signature=md.keySignatureFirst if isinstance(md.keySignatureFirst, int) else None,
            meter=str(md.timeSignatureFirst or ""),
            tempo=_quarter_bpm(md.tempoFirst),
            quarter_length=_float(md.scoreQuarterLength),
            n_parts=int(md.numberOfParts or 1) if not merge else 4,
            merge_tunes=merge,
            by_composer=coll.by_composer,
        )
        work = _with_id(work)
        works[work.work_id] = work
    return tuple(sorted(works.values(), key=lambda w: (w.artist, w.source)))


def _with_id(work: Work) -> Work:
    from dataclasses import replace

    return replace(work, work_id=work_id_for(work.source))


def _stem_key(path: str) -> str:
    return str(PurePosixPath(path).with_suffix(""))


def _format_rank(path: str) -> int:
    suffix = PurePosixPath(path).suffix
    return _FORMAT_PREFERENCE.index(suffix) if suffix in _FORMAT_PREFERENCE else 99


def select_artists(works: list[Work], artists: list[str] | None, min_works: int) -> list[Work]:
    """Keep the named artists (case-insensitive), or all with at least `min_works` works."""
    counts = Counter(w.artist for w in works)
    if artists is None:
        keep = {a for a, n in counts.items() if n >= min_works}
    else:
        by_lower = {a.lower(): a for a in counts}
        unknown = [a for a in artists if a.lower() not in by_lower]
        if unknown:
            raise LinernotesError(
                f"Unknown artist(s): {', '.join(unknown)}. Known artists: "
                f"{', '.join(sorted(counts))}."
            )
        keep = {by_lower[a.lower()] for a in artists}
    return [w for w in works if w.artist in keep]


def works_per_artist(works: list[Work]) -> dict[str, int]:
    """Number of works per artist, sorted by artist."""
    return dict(sorted(Counter(w.artist for w in works).items()))


def work_from_file(
    path: str | Path,
    artist: str,
    title: str = "",
    kind: str = "a piece",
    style: str = "generic",
    licence: str = "",
    number: int | None = None,
) -> Work:
    """A Work for a score file of your own (MusicXML, kern, ABC, MIDI, ...)."""
    path = Path(path).resolve()
    work = Work(
        work_id="",
        artist=artist,
        collection="user scores",
        title=title or path.stem,
        path=str(path),
        number=number,
        kind=kind,
        style=style,
        licence=licence,
    )
    return _with_id(work)
