"""Commands that make things: corpus build/import, train-clap, train, generate, demo."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.cli.common import (
    _manifest,
    _read_ids,
    app,
    corpus_app,
    print_table,
)
from linernotes.errors import LinernotesError


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



@app.command("train-clap")
def train_clap_cmd(
    corpus: Path = typer.Option(Path("corpus"), help="Corpus folder (manifest.parquet)."),
    out: Path = typer.Option(Path("run/clap"), "--out", "-o", help="Folder for the encoder."),
    steps: int = typer.Option(300, help="Training steps."),
    seconds: float = typer.Option(8.0, help="Feature length in seconds (the model's clip length)."),
) -> None:
    """Train the CLAP-style text/audio encoder alone (`train` runs it first by itself)."""
    from linernotes.artifacts import read_json
    from linernotes.data.features import FeatureSettings
    from linernotes.models.clap import CLAP_CONFIG, ClapSettings
    from linernotes.training import train_clap

    path = train_clap(_manifest(corpus), out, ClapSettings(steps=steps),
                      FeatureSettings(seconds=seconds))
    typer.echo(f"CLAP at {path}; holdout retrieval:")
    for k, v in read_json(Path(path) / CLAP_CONFIG).get("eval", {}).items():
        typer.echo(f"  {k}: {v}")


@app.command()
def train(
    corpus: Path = typer.Option(Path("corpus"), help="Corpus folder (manifest.parquet)."),
    out: Path = typer.Option(Path("run"), "--out", "-o", help="Run folder."),
    steps: int = typer.Option(1200, help="Denoiser training steps."),
    clap_steps: int = typer.Option(300, help="CLAP training steps (when no --clap is given)."),
    batch_size: int = typer.Option(32, help="Batch size."),
    seconds: float = typer.Option(8.0, help="Feature length in seconds (the model's clip length)."),
    seed: int = typer.Option(0, help="Seed."),
    clap: Path = typer.Option(None, help="Reuse a trained CLAP folder instead of training one."),
    exclude: Path = typer.Option(None, help="File of track ids to leave out (one per line)."),
    duplicate: list[str] = typer.Option(None, help="TRACK_ID:M repeats a track M times."),
    mask_padding: bool = typer.Option(False, help="Train on real frames only."),
) -> None:
    """Train the reference model (CLAP stage, then the DiT); resumes after a kill."""
    from linernotes.data.features import FeatureSettings
    from linernotes.models.clap import ClapSettings
    from linernotes.training import TrainSettings
    from linernotes.training import train as train_run

    excluded = _read_ids(exclude) if exclude else ()
    dups = []
    for d in duplicate or []:
        tid, _, m = d.rpartition(":")
        if not tid or not m.isdigit():
            raise LinernotesError(f"--duplicate takes TRACK_ID:M, not {d!r}.")
        dups.append((tid, int(m)))
    settings = TrainSettings(steps=steps, batch_size=batch_size, seed=seed, exclude=excluded,
                             duplicate=tuple(dups), mask_padding=mask_padding)
    run = train_run(_manifest(corpus), out, settings, features=FeatureSettings(seconds=seconds),
                    clap=clap, clap_settings=ClapSettings(steps=clap_steps))
    typer.echo(f"Run {run.hash} at {run.path} (final loss {run.config.get('final_loss'):.4f}).")



@app.command()
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts (or --prompts-file)."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    out: Path = typer.Option(Path("clips"), "--out", "-o", help="Folder for clips (or a .wav)."),
    prompts_file: Path = typer.Option(None, help="A file of prompts, one per line."),
    seconds: float = typer.Option(None, help="Clip length (default: the model's length)."),
    seed: int = typer.Option(0, help="Seed of the first clip (then seed + i)."),
    steps: int = typer.Option(25, help="Sampler steps."),
    guidance: float = typer.Option(2.0, help="Classifier-free guidance scale."),
    sampler: str = typer.Option("dpm", help="dpm (DPM-Solver++) or ddim."),
) -> None:
    """Generate clips; each gets a JSON sidecar and its latent, for exact attribution later."""
    from linernotes.models.pipeline import GenerateSettings, move_clip
    from linernotes.models.pipeline import generate as gen

    texts = list(prompts or [])
    if prompts_file:
        if not prompts_file.exists():
            raise LinernotesError(f"{prompts_file} does not exist.")
        texts += [x.strip() for x in prompts_file.read_text().splitlines() if x.strip()]
    settings = GenerateSettings(steps=steps, guidance=guidance, sampler=sampler, seconds=seconds)
    target = out.parent if out.suffix == ".wav" else out
    paths = gen(run, texts, target, seed, settings)
    if out.suffix == ".wav":
        if len(paths) != 1:
            raise LinernotesError("-o NAME.wav takes one prompt; give a folder for several.")
        paths = [move_clip(paths[0], out)]
    for p in paths:
        typer.echo(str(p))



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


