"""The `linernotes` command: one typer app; each command is a thin call into the library."""

from __future__ import annotations

import sys
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


def print_table(df, title: str | None = None) -> None:
    """Print a DataFrame as an aligned plain-text table."""
    if title:
        typer.echo(title)
    typer.echo(df.to_string(index=False))


def parse_size(size: str) -> int | str:
    if size == "all":
        return "all"
    try:
        return int(size)
    except ValueError:
        raise LinernotesError(f"--size takes a number of tracks or 'all', not {size!r}.") from None


@corpus_app.command("build")
def corpus_build(
    out: Path = typer.Option(Path("corpus"), "--out", "-o", help="Folder for audio + manifest."),
    size: str = typer.Option("400", help="Number of tracks (balanced over artists), or 'all'."),
    seconds: float = typer.Option(8.0, help="Longest excerpt in seconds."),
    seed: int = typer.Option(0, help="Seed for the selection, instruments, tempi and splits."),
    artists: list[str] = typer.Option(None, "--artist", help="Keep only these artists."),
    workers: int = typer.Option(0, help="Rendering processes (0 = all cores)."),
) -> None:
    """Render music21's bundled scores with FluidSynth into a captioned corpus."""
    from linernotes.corpus.build import build_corpus

    result = build_corpus(out, parse_size(size), seconds, seed, artists or None, workers or None)
    print_table(result.summary_table(), f"Corpus at {result.manifest_path}")
    typer.echo(f"{len(result.manifest)} tracks, {result.total_duration / 60:.1f} min of audio; "
               f"rendered {result.rendered}, reused {result.reused}, in {result.elapsed:.0f} s.")
    if result.skipped:
        typer.echo(f"Skipped {len(result.skipped)} score(s) (see {out / 'build_log.jsonl'}):")
        for reason, n in result.skip_reasons().items():
            typer.echo(f"  {n:5d}  {reason}")


@corpus_app.command("import")
def corpus_import(
    audio: Path = typer.Option(..., "--audio", help="Folder of WAV/FLAC/OGG/MP3 files."),
    captions: Path = typer.Option(..., "--captions", help="CSV or JSONL: path, caption[, artist]."),
    out: Path = typer.Option(Path("corpus"), "--out", "-o", help="Folder for audio + manifest."),
    seconds: float = typer.Option(8.0, help="Excerpt length; longer files are split."),
    sample_rate: int = typer.Option(16000, help="Target sample rate."),
    seed: int = typer.Option(0, help="Seed for the train/holdout split."),
) -> None:
    """Import your own audio folder and captions as a corpus."""
    from linernotes.corpus.importer import import_folder

    result = import_folder(audio, captions, out, sample_rate, seconds, seed=seed)
    print_table(result.summary_table(), f"Corpus at {result.manifest_path}")
    typer.echo(", ".join(f"{k}: {v}" for k, v in result.counts.items()))
    if result.problems:
        typer.echo(f"{len(result.problems)} file(s) not imported (see {out / 'import_log.jsonl'}):")
        for path, reason in result.problems[:50]:
            typer.echo(f"  {path}: {reason}")
        if len(result.problems) > 50:
            typer.echo(f"  ... and {len(result.problems) - 50} more")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for everything it makes."),
    size: int = typer.Option(240, help="Corpus size."),
    seconds: float = typer.Option(6.0, help="Excerpt length."),
    seed: int = typer.Option(0, help="Seed for everything."),
) -> None:
    """Run the whole flow on the embedded default corpus (resumes where it stopped)."""
    from linernotes.demo import DemoSettings, run_demo

    run_demo(out, DemoSettings(size=size, seconds=seconds, seed=seed))


@app.command()
def version() -> None:
    """Print the linernotes version."""
    from linernotes import __version__

    typer.echo(__version__)


def run() -> None:
    """Entry point that turns LinernotesError into a clean message."""
    try:
        app()
    except LinernotesError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
