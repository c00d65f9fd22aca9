"""Settings as dataclasses: validated on creation, serialised for provenance, hashed for caches."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from linernotes.artifacts import hash_json
from linernotes.errors import LinernotesError

S = TypeVar("S", bound="Settings")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base class: subclasses declare fields with defaults and may override `validate`."""

    def __post_init__(self) -> None:
        self.check_numbers()
        self.validate()

    def check_numbers(self) -> None:
        """What holds for every setting: numbers are finite, integers fit in 64 bits, seeds are
        not negative (each field's own bounds are `validate`'s)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise LinernotesError(f"{f.name} must be a finite number, not {value}.")
            if isinstance(value, int) and not -(2**63) < value < 2**63:
                raise LinernotesError(f"{f.name}={value} is out of range.")
            if (f.name == "seed" or f.name.endswith("_seed")) and value < 0:
                raise LinernotesError(f"{f.name} must be >= 0.")

    def validate(self) -> None:
        """Raise LinernotesError for an invalid combination of values."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LinernotesError(
                f"Unknown {cls.__name__} setting(s): {', '.join(unknown)}. "
                f"Known: {', '.join(sorted(names))}."
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_toml(cls: type[S], path: str | Path, section: str | None = None) -> S:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LinernotesError(f"Cannot read settings from {path}: {exc}") from exc
        if section is not None:
            data = data.get(section, {})
        return cls.from_dict(data)

    @classmethod
    def parse_value(cls, name: str, text: str) -> Any:
        """A command-line string as field `name`'s type (read from its annotation).

        Raises ValueError whose message says what the field takes (e.g. "an integer").
        """
        kind = {f.name: f for f in dataclasses.fields(cls)}[name].type
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        text = text.strip()
        if "None" in kind and text.lower() in ("none", ""):
            return None
        if kind.startswith("bool"):
            if text.lower() not in TRUE + FALSE:
                raise ValueError("true or false")
            return text.lower() in TRUE
        if kind.startswith("tuple"):
            conv = float if "float" in kind else int if "int" in kind else str
            try:
                return tuple(conv(x.strip()) for x in text.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"comma-separated {conv.__name__} values") from None
        for conv, what in ((int, "an integer"), (float, "a number")):
            if kind.startswith(conv.__name__):
                try:
                    return conv(text)
                except ValueError:
                    raise ValueError(what) from None
        return text

    @classmethod
    def coerce(cls, name: str, value: Any, label: str | None = None) -> Any:
        """A value for field `name`: a string parsed by the field's type (`parse_value`), a list
        as a tuple, anything else as it is. A bad string is a clear error naming the setting as
        the user wrote it (`label`, default `--set name`), what it takes and its default."""
        if isinstance(value, list):
            return tuple(value)
        if not isinstance(value, str):
            return value
        try:
            return cls.parse_value(name, value)
        except ValueError as exc:
            default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
            raise LinernotesError(f"{label or '--set ' + name}={value}: {name} takes {exc} "
                                  f"(default {default}).") from None

    @classmethod
    def overrides(cls, assignments: Mapping[str, Any]) -> dict[str, Any]:
        """`--set` assignments (`parse_assignments`) as typed field values; an unknown name is
        a clear error with the closest names."""
        names = [f.name for f in dataclasses.fields(cls)]
        out = {}
        for key, value in assignments.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=2)
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise LinernotesError(f"--set {key}={value}: {cls.__name__} has no setting "
                                      f"{key!r}.{hint} Settings: {', '.join(sorted(names))}.")
            out[key] = cls.coerce(key, value)
        return out

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    def hash(self) -> str:
        return hash_json({"class": type(self).__name__, **self.to_dict()})


def parse_assignments(items: Sequence[str] | None) -> dict[str, str]:
    """The command line's `--set key=value` items as {key: value} strings (`-` in a key is
    `_`); the values are typed by the settings that take them (`Settings.overrides`)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LinernotesError(f"--set takes key=value (e.g. --set steps=100), not {item!r}.")
        out[key] = value.strip()
    return out


def setting(default: Any, help: str = "") -> Any:
    """A settings field: its default and one line of help (commands show it as the option's)."""
    return dataclasses.field(default=default, metadata={"help": help})


def require(condition: bool, message: str) -> None:
    """Raise LinernotesError(message) unless condition holds."""
    if not condition:
        raise LinernotesError(message)
