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
        out[key] = _typed_value(settings_class, key, text, fields[key], option)
    return out


def _typed_value(settings_class, key: str, text: str, default, option: str):
    try:
        return settings_class.parse_value(key, text)
    except ValueError as exc:
        raise LinernotesError(f"{option} {key}={text}: {key} takes {exc} (default {default})."
                              ) from None


