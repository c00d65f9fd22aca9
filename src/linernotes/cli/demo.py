"""`linernotes demo`: the whole flow on the embedded default corpus, every stage cached and
resumable (corpus, model, clips, attribution, credits, report)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

from linernotes.cli.attribution import print_credits
from linernotes.cli.common import Options, app, on_device, with_settings
from linernotes.config import Settings, require, setting
from linernotes.errors import LinernotesError

#: Eight artists with distinct styles (choral, polyphony, fiddle tunes, folk songs).
DEMO_ARTISTS = (
    "J.S. Bach",
    "Palestrina",
    "Monteverdi",
    "Trecento",
    "O'Neill's Music of Ireland",
    "Ryan's Mammoth Collection",
    "Essen folksongs (China)",
    "Essen folksongs (Germany)",
)

#: Prompts in the corpus' caption style, each naming one artist.
DEMO_PROMPTS = (
    "A four-part chorale by J.S. Bach, played on church organ at a slow tempo, in G major, 4/4.",
    "O'Neill's Music of Ireland: an Irish tune, in D major, 6/8 time, on tin whistle, lively.",
    "A mass movement by Palestrina, played on choir (voices) at a slow tempo, in F major, 4/2.",
    "Essen folksongs (China): a folk song, in C major, 2/4 time, on koto (plucked strings).",
)


@dataclasses.dataclass(frozen=True)
class DemoSettings(Settings):
    """Small defaults that keep the whole demo within about 20 minutes on 2 CPU cores."""

    size: int = setting(240, "Corpus size.")
    seconds: float = setting(6.0, "Excerpt length.")
    seed: int = setting(0, "Seed for everything.")
    steps: int = setting(1200, "Model training steps.")
    clap_steps: int = setting(300, "CLAP training steps.")
    top: int = setting(5, "Credited tracks printed per clip.")

    def validate(self) -> None:
        require(self.size >= len(DEMO_ARTISTS),
                f"size must be >= {len(DEMO_ARTISTS)} (a track per artist).")
        require(0 < self.seconds <= 60, "seconds must be in (0, 60].")
        require(min(self.steps, self.clap_steps, self.top) >= 1,
                "steps, clap_steps and top must be >= 1.")


@app.command()
@on_device
@with_settings(Options("settings", DemoSettings, ("size", "seconds", "seed")))
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for everything it makes."),
    settings: DemoSettings = None,
) -> None:
    """Run the whole flow on the embedded default corpus (resumes where it stopped)."""
    run_demo(out, settings)


def _stage(n: int, title: str) -> float:
    typer.secho(f"\n{n}. {title}", bold=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    typer.echo(f"   ({time.perf_counter() - t0:.0f} s)")


def run_demo(out: Path, s: DemoSettings | None = None) -> None:
    """Corpus → model → clips → Fisher → attribution → credits → report, in `out`."""
    from linernotes.attribution.front import attribute_run
    from linernotes.clips import load_clip
    from linernotes.corpus.build import build_corpus
    from linernotes.models.family import DEFAULT_FAMILY, family_class
    from linernotes.report import build_report
    from linernotes.training import TrainSettings

    s = s or DemoSettings()

    t0 = _stage(1, "Corpus: music21 scores rendered with FluidSynth")
    corpus = build_corpus(out / "corpus", s.size, s.seconds, s.seed, list(DEMO_ARTISTS))
    typer.echo(corpus.summary_table().to_string(index=False))
    typer.echo(f"{len(corpus.manifest)} tracks, {corpus.total_duration / 60:.1f} min of audio; "
               f"rendered {corpus.rendered}, reused {corpus.reused}.")
    for reason, n in corpus.skip_reasons().items():
        typer.echo(f"   skipped {n}: {reason}")
    manifest = corpus.manifest
    manifest.attrs.update(root=str(out / "corpus"), path=str(corpus.manifest_path))
    _done(t0)

    t0 = _stage(2, "Model: CLAP-style encoder, then a Stable-Audio-style DiT")
    family = family_class(DEFAULT_FAMILY)
    recipe = family.recipe_settings(seconds=s.seconds, clap_steps=s.clap_steps, clap_seed=s.seed)
    run = family.create(manifest, out / "run", TrainSettings(steps=s.steps, seed=s.seed), recipe)
    typer.echo(f"run {run.hash}: final training loss {run.config['final_loss']:.4f}")
    _done(t0)

    t0 = _stage(3, "Generate clips from prompts naming artists")
    clips = _clips(run, out / "clips", s)
    for c in clips:
        typer.echo(f"   {c}")
    _done(t0)

    t0 = _stage(4, "Attribute: unlearn each clip, score every training track")
    tables = attribute_run(run, manifest, [str(c) for c in clips], out / "scores")
    _done(t0)

    typer.secho("\nCredits: the training tracks each clip owes most to", bold=True)
    print_credits(tables, s.top, titles=[f"{c.name}: {load_clip(c).prompt}" for c in clips])

    t0 = _stage(5, "Report")
    index = build_report(out / "report", [out / "scores"], manifest, run_hash=run.hash,
                         top_k=s.top, title="linernotes demo")
    typer.echo(f"Report: {index}")
    _done(t0)


def _clips(run, folder: Path, s: DemoSettings) -> list[Path]:
    """The demo clips: reused when they exist for this run, generated otherwise."""
    from linernotes.clips import generate, load_clip, move_clip

    paths = [folder / f"clip-{i}.wav" for i in range(len(DEMO_PROMPTS))]
    try:
        if all(load_clip(p, run=run).prompt == t for p, t in zip(paths, DEMO_PROMPTS)):
            return paths
    except LinernotesError:  # missing, or made by another run: generate them again
        pass
    made = generate(run, list(DEMO_PROMPTS), folder, s.seed, progress=False)
    return [move_clip(src, dst) for src, dst in zip(made, paths)]
