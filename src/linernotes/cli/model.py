"""Commands that make things: corpus build/import, train, generate."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.cli.common import (
    Options,
    app,
    corpus_app,
    on_device,
    print_table,
    read_corpus,
    read_ids,
    with_settings,
)
from linernotes.config import Settings
from linernotes.errors import LinernotesError
from linernotes.models.family import DEFAULT_FAMILY, family_class
from linernotes.training import TrainSettings

#: The family `train` makes and whose generate settings `generate` offers.
FAMILY = family_class(DEFAULT_FAMILY)


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
@on_device
@with_settings(Options("settings", TrainSettings, ("steps", "batch_size", "seed", "mask_padding")),
               Options("recipe", FAMILY.recipe_settings))
def train(
    corpus: Path = typer.Option(Path("corpus"), help="Corpus folder (manifest.parquet)."),
    out: Path = typer.Option(Path("run"), "--out", "-o", help="Run folder."),
    exclude: Path = typer.Option(None, help="File of track ids to leave out (one per line)."),
    duplicate: list[str] = typer.Option(None, help="TRACK_ID:M repeats a track M times."),
    settings: TrainSettings = None,
    recipe: Settings = None,
) -> None:
    """Train a model (the reference family: CLAP stage, then the DiT); resumes after a kill."""
    dups = []
    for d in duplicate or []:
        tid, _, m = d.rpartition(":")
        if not tid or not m.isdigit():
            raise LinernotesError(f"--duplicate takes TRACK_ID:M, not {d!r}.")
        dups.append((tid, int(m)))
    settings = settings.replace(exclude=read_ids(exclude) if exclude else (),
                                duplicate=tuple(dups))
    run = FAMILY.create(read_corpus(corpus), out, settings, recipe)
    typer.echo(f"Run {run.hash} at {run.path} (final loss {run.config.get('final_loss'):.4f}).")


@app.command()
@on_device
@with_settings(Options("settings", FAMILY.generate_settings,
                       ("steps", "guidance", "sampler", "seconds")))
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts (or --prompts-file)."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    out: Path = typer.Option(Path("clips"), "--out", "-o", help="Folder for clips (or a .wav)."),
    prompts_file: Path = typer.Option(None, help="A file of prompts, one per line."),
    seed: int = typer.Option(0, help="Seed of the first clip (then seed + i)."),
    settings: Settings = None,
) -> None:
    """Generate clips; each gets a JSON sidecar and its latent, for exact attribution later."""
    from linernotes.clips import generate as gen
    from linernotes.clips import move_clip

    texts = list(prompts or [])
    if prompts_file:
        if not prompts_file.exists():
            raise LinernotesError(f"{prompts_file} does not exist.")
        texts += [x.strip() for x in prompts_file.read_text().splitlines() if x.strip()]
    target = out.parent if out.suffix == ".wav" else out
    paths = gen(run, texts, target, seed, settings)
    if out.suffix == ".wav":
        if len(paths) != 1:
            raise LinernotesError("-o NAME.wav takes one prompt; give a folder for several.")
        paths = [move_clip(paths[0], out)]
    for p in paths:
        typer.echo(str(p))
