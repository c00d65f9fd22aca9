"""The shared pieces of the `linernotes` command: the typer apps and small helpers."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.errors import LinernotesError

app = typer.Typer(
    help="linernotes: credit for AI music (training-data attribution and opt-out unlearning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(exc: LinernotesError) -> None:
    """Print a user error without a traceback and exit non-zero."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


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



def _manifest(corpus: Path):
    from linernotes.data.manifest import read_manifest

    return read_manifest(corpus)



def _read_ids(path: Path) -> tuple[str, ...]:
    if not path.exists():
        raise LinernotesError(f"{path} does not exist (expected one track id per line).")
    return tuple(x.strip() for x in path.read_text().splitlines() if x.strip())




def parse_overrides(settings_class, items: list[str] | None, option: str = "--set") -> dict:
    """KEY=VALUE strings as overrides of a settings dataclass, typed like each field's default."""
    import dataclasses
    import difflib

    fields = {f.name: f.default for f in dataclasses.fields(settings_class)}
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or not key:
            raise LinernotesError(f"{option} takes KEY=VALUE, not {item!r}.")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise LinernotesError(f"{option} {item}: {settings_class.__name__} has no setting "
                                  f"{key!r}.{hint} Settings: {', '.join(sorted(fields))}.")
        out[key] = _typed_value(key, text, fields[key], option)
    return out


def _typed_value(key: str, text: str, default, option: str):
    bools = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}
    kind = type(default)
    if kind is bool:
        if text.lower() not in bools:
            raise LinernotesError(f"{option} {key}={text}: {key} takes true or false.")
        return bools[text.lower()]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise LinernotesError(f"{option} {key}={text}: {key} takes {what} "
                                  f"(default {default}).") from None
    if kind is tuple:
        return tuple(x.strip() for x in text.split(",") if x.strip())
    return text


