"""Commands that make things: corpus build/import, train, generate."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.cli.common import (
    Options,
    app,
    corpus_app,
    int_option,
    on_device,
    print_table,
    read_corpus,
    read_ids,
    seconds_option,
    with_settings,
)
from linernotes.config import Settings, parse_assignments
from linernotes.errors import LinernotesError
from linernotes.models.family import DEFAULT_FAMILY, family_class
from linernotes.training import TrainSettings

#: The family `train` makes and whose generate settings `generate` offers.
FAMILY = family_class(DEFAULT_FAMILY)
#: The family whose options `init` offers (the one that takes a model folder today).
INIT_FAMILY = family_class("stable-audio")


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
    seconds: float = seconds_option(8.0, "Longest excerpt in seconds."),
    seed: int = int_option(0, "Seed for the selection, instruments, tempi and splits."),
    artists: list[str] = typer.Option(None, "--artist", help="Keep only these artists."),
    workers: int = int_option(0, "Rendering processes (0 = all cores)."),
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
    seconds: float = seconds_option(8.0, "Excerpt length; longer files are split."),
    sample_rate: int = int_option(16000, "Target sample rate.", min=8000),
    channels: int = int_option(1, "1: downmix to mono; 2: keep stereo (Stable Audio).", min=1),
    seed: int = int_option(0, "Seed for the train/holdout split."),
    keep_truncated: bool = typer.Option(False, "--keep-truncated", help="Import files that "
                                        "decode shorter than their header declares (cut off or "
                                        "corrupt) as far as they decode, instead of leaving "
                                        "them out."),
    follow_links: bool = typer.Option(False, "--follow-links", help="Import symbolic links to "
                                      "files outside the audio folder."),
) -> None:
    """Import your own audio folder and captions as a corpus."""
    from linernotes.corpus.importer import LOG_NAME, import_folder

    result = import_folder(audio, captions, out, sample_rate, seconds, seed=seed,
                           channels=channels, keep_truncated=keep_truncated,
                           follow_links=follow_links)
    print_table(result.summary_table(), f"Corpus at {result.manifest_path}")
    typer.echo(", ".join(f"{k}: {v}" for k, v in result.counts.items()))
    if result.problems:
        typer.echo(f"{result.problem_summary()} (see {out / LOG_NAME}):")
        for path, reason in result.problems[:50]:
            typer.echo(f"  {path}: {reason}")
        if len(result.problems) > 50:
            typer.echo(f"  ... and {len(result.problems) - 50} more")



@app.command()
@on_device
@with_settings(Options("given", INIT_FAMILY.recipe_settings, overrides=True))
def init(
    model: Path = typer.Option(..., "--model", help="Your model's folder: a diffusers "
                               "StableAudioPipeline folder (with model_index.json) or a "
                               "transformers MusicGen folder (with its tokenizer)."),
    corpus: Path = typer.Option(Path("corpus"), help="Corpus folder (manifest.parquet)."),
    out: Path = typer.Option(Path("run"), "--out", "-o", help="Run folder."),
    given: dict = None,
) -> None:
    """Make a run of your own model over a corpus (encodes every track once; resumes)."""
    from linernotes.models.family import recognise

    cls = recognise(model)
    run = cls.init_run(model, read_corpus(corpus), out, cls.recipe_settings.from_dict(given))
    g = run.config["features"]
    typer.echo(f"Run {run.hash} ({cls.name}) at {run.path}: {g['n_frames']} frames "
               f"({g['seconds']:.2f} s) per track. Fine-tune it on the corpus with `linernotes "
               f"train --base {run.path} -o RUN2`, or attribute against it as it is.")


@app.command()
@on_device
@with_settings(Options("settings", TrainSettings, ("steps", "batch_size", "lr", "warmup", "seed",
                                                   "param_group", "ema_decay", "mask_padding",
                                                   "precision", "gradient_checkpointing")),
               Options("recipe", FAMILY.recipe_settings))
def train(
    corpus: Path = typer.Option(Path("corpus"), help="Corpus folder (manifest.parquet)."),
    out: Path = typer.Option(Path("run"), "--out", "-o", help="Run folder."),
    base: Path = typer.Option(None, help="A run to fine-tune on the corpus (e.g. one made by "
                              "`linernotes init`) instead of training a reference model."),
    exclude: Path = typer.Option(None, help="File of track ids to leave out (one per line)."),
    duplicate: list[str] = typer.Option(None, help="TRACK_ID:M repeats a track M times."),
    family: str = typer.Option(DEFAULT_FAMILY, "--family", help="The model trained from scratch: "
                               "reference (the diffusion model) or ar-reference (MusicGen's "
                               "architecture over learned tokens)."),
    sets: list[str] = typer.Option(None, "--set", help="KEY=VALUE: another setting of the "
                                   "family's recipe (e.g. codebooks=8 for ar-reference)."),
    settings: TrainSettings = None,
    recipe: Settings = None,
) -> None:
    """Train a reference model (CLAP stage, then the DiT; or the autoregressive one with
    --family ar-reference), or fine-tune a run with --base; resumes after a kill."""
    if settings.steps < 1:
        raise LinernotesError(f"--steps {settings.steps}: training needs at least one step.")
    dups = []
    for d in duplicate or []:
        tid, _, m = d.rpartition(":")
        if not tid or not m.isdigit():
            raise LinernotesError(f"--duplicate takes TRACK_ID:M, not {d!r}.")
        dups.append((tid, int(m)))
    settings = settings.replace(exclude=read_ids(exclude) if exclude else (),
                                duplicate=tuple(dups))
    if base is not None:
        from linernotes.run import load_run

        if recipe != FAMILY.recipe_settings() or sets or family != DEFAULT_FAMILY:
            raise LinernotesError("--seconds, --clap-steps, --clap-seed, --clap, --family and "
                                  "--set make a new model; a fine-tune (--base) keeps its run's.")
        manifest = read_corpus(corpus)
        run = load_run(base, manifest=manifest).family.finetune(manifest, out, settings)
    else:
        cls = family_class(family)
        if "create" not in vars(cls):
            raise LinernotesError(f"--family {family}: the {family} family is not trained from "
                                  "scratch here; make a run of your model with `linernotes init`.")
        given = {**recipe.to_dict(), **cls.recipe_settings.overrides(parse_assignments(sets))}
        run = cls.create(read_corpus(corpus), out, settings, cls.recipe_settings.from_dict(given))
    typer.echo(f"Run {run.hash} at {run.path} (final loss {run.config.get('final_loss'):.4f}).")


@app.command()
@on_device
@with_settings(Options("given", FAMILY.generate_settings, ("steps", "guidance", "seconds"),
                       overrides=True))
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts (or --prompts-file)."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    out: Path = typer.Option(Path("clips"), "--out", "-o", help="Folder for clips (or a .wav)."),
    prompts_file: Path = typer.Option(None, help="A file of prompts, one per line."),
    seed: int = int_option(0, "Seed of the first clip (then seed + i)."),
    sets: list[str] = typer.Option(None, "--set", help="KEY=VALUE: any other setting of the "
                                   "model's sampler (e.g. sampler=ddim for the reference family)."),
    given: dict = None,
) -> None:
    """Generate clips; each gets a JSON sidecar and its latent, for exact attribution later."""
    from linernotes.clips import generate as gen
    from linernotes.clips import move_clip
    from linernotes.run import load_run

    texts = list(prompts or [])
    if prompts_file:
        if not prompts_file.exists():
            raise LinernotesError(f"{prompts_file} does not exist.")
        texts += [x.strip() for x in prompts_file.read_text().splitlines() if x.strip()]
    r = load_run(run)
    cls = r.family.generate_settings
    settings = cls.from_dict({**given, **cls.overrides(parse_assignments(sets))})
    target = out.parent if out.suffix == ".wav" else out
    paths = gen(r, texts, target, seed, settings)
    if out.suffix == ".wav":
        if len(paths) != 1:
            raise LinernotesError("-o NAME.wav takes one prompt; give a folder for several.")
        paths = [move_clip(paths[0], out)]
    for p in paths:
        typer.echo(str(p))
