"""Captions from metadata: varied templates, picked by a seeded hash so a build is reproducible."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption may mention; empty strings are left out."""

    artist: str
    kind: str = "a piece"  # with its article: "a four-part chorale"
    instrument: str = ""
    family: str = ""
    tempo_word: str = ""
    key: str = ""
    meter: str = ""
    is_composer: bool = True  # "by Bach" versus "from O'Neill's Music of Ireland"


# {kind} "a four-part chorale", {who} "by J.S. Bach", {on} "on church organ",
# {details} ", in F-sharp minor, 4/4"; the first letter of the caption is capitalised.
_TEMPLATES = (
    "{kind} {who}{details}, played {on}{at_tempo}",
    "{kind} {who}, played {on}{at_tempo}{details}",
    "{Tempo_kind} {who} {on}{details}",
    "{artist}: {kind}{details}, {on}{tempo_tail}",
    "{A_instrument} rendering of {kind} {who}{details}{tempo_tail}",
    "{kind} {who}{tempo_tail}, arranged for {instrument_words}{details}",
)


def caption_for(facts: CaptionFacts, seed: int, key: str) -> str:
    """A one-sentence caption; the template is chosen by a hash of (seed, key).

    `key` only picks the template (pass the track id); it never appears in the text.
    """
    digest = hashlib.sha256(f"caption|{seed}|{key}".encode()).digest()
    template = _TEMPLATES[digest[0] % len(_TEMPLATES)]
    text = template.format(**_fields(facts))
    text = " ".join(text.split()).replace(" ,", ",")
    return text[0].upper() + text[1:] + "."


def _fields(f: CaptionFacts) -> dict[str, str]:
    who = f"by {f.artist}" if f.is_composer else f"from {f.artist}"
    instrument_words = _instrument_words(f.instrument, f.family)
    on = f"on {instrument_words}" if instrument_words else "on a synthesizer"
    if f.key and f.meter:
        details = f"in {f.key}, {f.meter} time"
    else:
        details = f"in {f.key}" if f.key else (f"in {f.meter} time" if f.meter else "")
    kind_bare = f.kind.split(" ", 1)[1] if f.kind.startswith(("a ", "an ")) else f.kind
    tempo_adj = {
        "slow": "slow",
        "moderate": "moderately paced",
        "lively": "lively",
        "fast": "fast",
    }.get(f.tempo_word, "")
    tempo_kind = f"{_article(tempo_adj)} {tempo_adj} {kind_bare}" if tempo_adj else f.kind
    instrument = instrument_words or "synthesizer"
    return {
        "kind": f.kind,
        "who": who,
        "on": on,
        "artist": f.artist,
        "A_instrument": f"{_article(instrument)} {instrument}",
        "instrument_words": instrument,
        "details": f", {details}" if details else "",
        "at_tempo": f" at a {f.tempo_word} tempo" if f.tempo_word else "",
        "tempo_tail": f", {f.tempo_word} tempo" if f.tempo_word else "",
        "Tempo_kind": tempo_kind,
    }


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _instrument_words(instrument: str, family: str) -> str:
    """'church organ', or 'fiddle (strings)' when the family word is not already there."""
    if not instrument:
        return family
    if not family or family.split()[-1] in instrument or instrument in family:
        return instrument
    return f"{instrument} ({family})"
