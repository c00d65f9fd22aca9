"""The shared pieces of the `linernotes` command: the typer apps, options made from settings
dataclasses, and small helpers.

Command options come from the settings dataclasses (`with_settings`): one option per field, its
default and help the field's own, so a default lives in one place; anything else is `--set
key=value` (`config.parse_assignments`, typed by the settings that take it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from linernotes.config import Settings
from linernotes.errors import LinernotesError

app = typer.Typer(
    help="linernotes: credit for AI music (training-data attribution and opt-out unlearning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Build a corpus, train a model, generate, and credit the training tracks behind a clip."""


corpus_app = typer.Typer(help="Build or import a corpus (audio + captions manifest).",
                         no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")
evaluate_app = typer.Typer(help="Check attributions and opt-outs against counterfactuals.",
                           no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def print_table(df, title: str | None = None) -> None:
    """Print a DataFrame as an aligned plain-text table."""
    if title:
        typer.echo(title)
    typer.echo(df.to_string(index=False))


def read_corpus(corpus: Path):
    """The manifest of a corpus folder (or file)."""
    from linernotes.data.manifest import read_manifest

    return read_manifest(corpus)


def read_ids(path: Path) -> tuple[str, ...]:
    """Track ids from a file, one per line."""
    if not path.exists():
        raise LinernotesError(f"{path} does not exist (expected one track id per line).")
    return tuple(x.strip() for x in path.read_text().splitlines() if x.strip())


# ---------------------------------------------------------------- plain numeric options

#: The largest count a plain integer option takes.
INT_MAX = 2**31 - 1


def int_option(default: int | None, help: str, *, min: int = 0) -> Any:
    """An integer option that refuses values below `min` (or above INT_MAX) with a usage error
    naming the flag."""
    return typer.Option(default, help=help, min=min, max=INT_MAX)


def _positive_finite(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a positive finite number.")
    return value


def seconds_option(default: float, help: str) -> Any:
    """A length in seconds: a positive finite number."""
    return typer.Option(default, help=help, callback=_positive_finite)


# ---------------------------------------------------------------- options from settings


@dataclasses.dataclass(frozen=True)
class Options:
    """Options made from the fields of a Settings class, received by the command's parameter
    `param` as one settings object.

    `fields`: which fields (None: all but tuple-typed ones); `flags`: option names for fields
    whose option is not named after them. With `overrides`, the options default to "not given"
    and the command receives a dict of the values given (for settings whose class is known only
    at run time, e.g. the run's family's generate settings).
    """

    param: str
    cls: type[Settings]
    fields: tuple[str, ...] | None = None
    flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    overrides: bool = False

    def chosen(self) -> list[dataclasses.Field]:
        hints = typing.get_type_hints(self.cls)
        out = []
        for f in dataclasses.fields(self.cls):
            if self.fields is not None and f.name not in self.fields:
                continue
            if typing.get_origin(hints[f.name]) is tuple:
                continue  # given with --set
            out.append(f)
        return out

    def flag(self, name: str) -> str:
        return self.flags.get(name, name.replace("_", "-"))


def with_settings(*groups: Options) -> Callable:
    """Decorate a command: each group's fields become options, and the command gets one
    settings object per group instead. A value the settings refuse is a one-line error naming
    the options given."""

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        taken = {g.param for g in groups}
        params = [p for p in sig.parameters.values() if p.name not in taken]
        routes: dict[str, tuple[Options, str]] = {}
        annotations = dict(getattr(fn, "__annotations__", {}))
        for g in groups:
            hints = typing.get_type_hints(g.cls)
            defaults = g.cls()
            for f in g.chosen():
                flag = g.flag(f.name)
                pname = flag.replace("-", "_")
                if pname in routes or pname in sig.parameters:
                    raise ValueError(f"{fn.__name__}: option --{flag} is declared twice.")
                decl = f"--{flag}/--no-{flag}" if hints[f.name] is bool else f"--{flag}"
                hint, default, help_ = hints[f.name], getattr(defaults, f.name), \
                    f.metadata.get("help", "")
                if g.overrides:
                    hint, default = hint | None, None
                    if "default" not in help_:
                        help_ = f"{help_} (default: the model's)".strip()
                option = typer.Option(default, decl, help=help_)
                params.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY,
                                                default=option, annotation=hint))
                annotations[pname] = hint
                routes[pname] = (g, f.name)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            for g in groups:
                given = {name: kwargs.pop(p) for p, (grp, name) in routes.items() if grp is g}
                if g.overrides:  # checked against the class's bounds, applied by the command
                    given = {k: v for k, v in given.items() if v is not None}
                    build_settings(g, given)
                    kwargs[g.param] = given
                else:
                    kwargs[g.param] = build_settings(g, given)
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = annotations
        return command

    return decorate


def on_device(fn: Callable) -> Callable:
    """Decorate a command that runs a model: it gets `--device auto|cpu|cuda` (auto: CUDA when
    available), selected (`linernotes.device.select`) before the command runs."""
    sig = inspect.signature(fn)
    option = typer.Option("auto", "--device", help="Where the model runs: auto (CUDA when "
                          "available), cpu or cuda.")
    param = inspect.Parameter("device", inspect.Parameter.KEYWORD_ONLY, default=option,
                              annotation=str)

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        from linernotes import device

        device.select(kwargs.pop("device"))
        return fn(**kwargs)

    command.__signature__ = sig.replace(parameters=[*sig.parameters.values(), param])
    command.__annotations__ = {**getattr(fn, "__annotations__", {}), "device": str}
    return command


def build_settings(group: Options, values: Mapping[str, Any]) -> Settings:
    """`group.cls(**values)`; a refused value is an error naming the options that set it."""
    try:
        return group.cls(**values)
    except LinernotesError as exc:
        defaults = group.cls().to_dict()
        given = [f"--{group.flag(k)} {v}" for k, v in values.items() if defaults.get(k) != v]
        raise LinernotesError(f"{exc}" + (f" (given: {', '.join(given)})" if given else "")
                              ) from None
