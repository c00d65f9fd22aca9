"""Forget sets: which training tracks an opt-out removes, and the retain set that stays.

A `ForgetSpec` names artists, explicit track ids and/or `column=value` filters on the manifest;
`resolve_forget_set` turns it into the exact track ids of a run's train split (the rest of that
split, minus anything removed earlier, is the retain set).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence

import pandas as pd

from linernotes.artifacts import hash_json
from linernotes.config import Settings
from linernotes.errors import LinernotesError

#: Keys of the text form that select something other than a manifest column.
_ARTIST_KEYS = ("artist", "artists")
_TRACK_KEYS = ("track", "tracks", "track_id", "track_ids", "id")


@dataclasses.dataclass(frozen=True)
class ForgetSpec(Settings):
    """What to forget: the union of `artists`, `track_ids` and the tracks matching every `where`.

    `where` holds `column=value` conditions (case-insensitive equality) that must all hold.
    """

    artists: tuple[str, ...] = ()
    track_ids: tuple[str, ...] = ()
    where: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("artists", "track_ids", "where"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(str(v).strip() for v in value if str(v).strip()))
        super().__post_init__()

    def validate(self) -> None:
        if not (self.artists or self.track_ids or self.where):
            raise LinernotesError(
                "Empty forget set specification: name at least one artist (artist=NAME), track "
                "id (track=ID,ID) or manifest filter (column=value)."
            )
        for cond in self.where:
            column, sep, value = cond.partition("=")
            if not sep or not column.strip() or not value.strip():
                raise LinernotesError(
                    f"Bad forget filter {cond!r}: write it as column=value, e.g. instrument=organ."
                )

    @classmethod
    def parse(cls, text: str) -> ForgetSpec:
        """Read `artist=NAME; track=ID,ID; column=value` (items separated by ';').

        A bare item without '=' is an artist name.
        """
        artists: list[str] = []
        tracks: list[str] = []
        where: list[str] = []
        for item in (p.strip() for p in text.split(";")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep:
                artists.append(item)
            elif key in _ARTIST_KEYS:
                artists.append(value.strip())
            elif key in _TRACK_KEYS:
                tracks.extend(v.strip() for v in value.split(","))
            else:
                where.append(f"{key}={value.strip()}")
        return cls(tuple(artists), tuple(tracks), tuple(where))

    def describe(self) -> str:
        """A short human-readable description (for records and tables)."""
        parts = [f"artist={a}" for a in self.artists]
        if self.track_ids:
            parts.append(f"tracks={len(self.track_ids)}")
        parts += list(self.where)
        return "; ".join(parts)


def as_forget_spec(spec: ForgetSpec | str | Mapping) -> ForgetSpec:
    """A ForgetSpec from itself, its text form (`ForgetSpec.parse`) or its dict form."""
    if isinstance(spec, ForgetSpec):
        return spec
    if isinstance(spec, str):
        return ForgetSpec.parse(spec)
    if isinstance(spec, Mapping):
        return ForgetSpec.from_dict(dict(spec))
    raise LinernotesError(f"Cannot read a forget set specification from {type(spec).__name__}.")


@dataclasses.dataclass(frozen=True)
class ForgetSet:
    """A resolved forget set: forget and retain track ids (manifest order) of one train pool."""

    spec: ForgetSpec
    forget_ids: tuple[str, ...]
    retain_ids: tuple[str, ...]
    artists: tuple[str, ...]  # artists of the forgotten tracks
    holdout_ids: tuple[str, ...]  # holdout tracks of those artists (never trained on)
    removed_before: tuple[str, ...] = ()  # removed by earlier opt-outs (in neither set)

    def key(self) -> str:
        """Hash of exactly which tracks are forgotten (for caches)."""
        return hash_json(sorted(self.forget_ids))

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict(),
            "track_ids": list(self.forget_ids),
            "artists": list(self.artists),
            "n_forget": len(self.forget_ids),
            "n_retain": len(self.retain_ids),
            "removed_before": list(self.removed_before),
        }


def _match_artists(manifest: pd.DataFrame, names: Sequence[str]) -> list[str]:
    known = sorted(a for a in manifest["artist"].astype(str).unique() if a)
    by_lower: dict[str, list[str]] = {}
    for a in known:
        by_lower.setdefault(a.lower(), []).append(a)
    out = []
    for name in names:
        if name in known:
            out.append(name)
            continue
        folded = by_lower.get(name.lower(), [])
        if len(folded) == 1:
            out.append(folded[0])
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        close += [a for a in difflib.get_close_matches(name.lower(), list(by_lower), n=3,
                                                       cutoff=0.5)
                  for a in by_lower[a] if a not in close]
        hint = f" Did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""
        listing = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "")
        raise LinernotesError(
            f"Unknown artist {name!r} in the forget set.{hint} Known artists: {listing}."
        )
    return out


def _filter_mask(manifest: pd.DataFrame, where: Sequence[str]) -> pd.Series:
    mask = pd.Series(True, index=manifest.index)
    for cond in where:
        column, _, value = (s.strip() for s in cond.partition("="))
        if column not in manifest.columns:
            raise LinernotesError(
                f"Forget filter {cond!r} names no manifest column; columns are "
                f"{', '.join(manifest.columns)}."
            )
        col = manifest[column].astype(str).str.strip().str.lower()
        mask &= col == value.lower()
    return mask


def resolve_forget_set(
    manifest: pd.DataFrame,
    spec: ForgetSpec | str | Mapping,
    exclude: Sequence[str] = (),
    removed_before: Sequence[str] = (),
) -> ForgetSet:
    """Resolve `spec` against the train split minus `exclude` (never trained on) and minus
    `removed_before` (earlier opt-outs); raise a clear error for empty or whole-split sets."""
    spec = as_forget_spec(spec)
    ids = manifest["track_id"].astype(str)
    split = manifest["split"].astype(str)
    gone = set(map(str, exclude)) | set(map(str, removed_before))
    pool = (split == "train") & ~ids.isin(gone)
    selected = pd.Series(False, index=manifest.index)
    if spec.artists:
        artists = _match_artists(manifest, spec.artists)
        selected |= manifest["artist"].astype(str).isin(artists)
    if spec.track_ids:
        known = set(ids)
        unknown = [t for t in spec.track_ids if t not in known]
        if unknown:
            raise LinernotesError(
                f"Forget set names track id(s) not in the manifest: {unknown[:5]}; check them "
                "against the manifest's track_id column."
            )
        held = sorted(set(spec.track_ids) & set(ids[split != "train"]))
        if held:
            raise LinernotesError(
                f"Forget set names holdout track(s) {held[:5]}: the model never trained on them, "
                "so there is nothing to unlearn. Name training tracks only."
            )
        selected |= ids.isin(spec.track_ids)
    if spec.where:
        selected |= _filter_mask(manifest, spec.where)
    forget = selected & pool
    if not forget.any():
        earlier = int((selected & ids.isin(gone) & (split == "train")).sum())
        why = (
            f" ({earlier} matching track(s) were already removed or excluded from training)"
            if earlier
            else ""
        )
        raise LinernotesError(
            f"The forget set {spec.describe()!r} matches no training track of this run{why}; "
            "check the artist names, track ids and filters."
        )
    retain = pool & ~forget
    if not retain.any():
        raise LinernotesError(
            f"The forget set {spec.describe()!r} covers the whole training set "
            f"({int(forget.sum())} tracks): nothing would remain. Train a new model instead."
        )
    artists = tuple(dict.fromkeys(a for a in manifest.loc[forget, "artist"].astype(str) if a))
    holdout = (split == "holdout") & manifest["artist"].astype(str).isin(artists)
    return ForgetSet(
        spec=spec,
        forget_ids=tuple(ids[forget]),
        retain_ids=tuple(ids[retain]),
        artists=artists,
        holdout_ids=tuple(ids[holdout]),
        removed_before=tuple(sorted(set(map(str, removed_before)))),
    )
