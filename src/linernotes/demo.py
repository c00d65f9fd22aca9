"""The demo: the whole flow on the embedded default corpus, every stage cached and resumable."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer

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
class DemoSettings:
    """Small defaults that keep the whole demo within about 20 minutes on 2 CPU cores."""

    size: int = 240
    seconds: float = 6.0
    seed: int = 0
    steps: int = 1200  # denoiser training steps
    clap_steps: int = 300
    top: int = 5


def _stage(n: int, title: str) -> float:
    typer.secho(f"\n{n}. {title}", bold=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    typer.echo(f"   ({time.perf_counter() - t0:.0f} s)")


def run_demo(out: Path, s: DemoSettings = DemoSettings()) -> None:
    """Corpus → model → clips → Fisher → attribution → credits → report, in `out`."""
    from linernotes.attribution.front import attribute_run
    from linernotes.corpus.build import build_corpus
    from linernotes.data.features import FeatureSettings
    from linernotes.models.clap import ClapSettings
    from linernotes.models.pipeline import load_clip
    from linernotes.report import build_report
    from linernotes.training import TrainSettings, train

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
    run = train(manifest, out / "run", TrainSettings(steps=s.steps, seed=s.seed),
                features=FeatureSettings(seconds=s.seconds),
                clap_settings=ClapSettings(steps=s.clap_steps, seed=s.seed))
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
    from linernotes.cli import print_credits

    print_credits(tables, s.top, titles=[f"{c.name}: {load_clip(c).prompt}" for c in clips])

    t0 = _stage(5, "Report")
    index = build_report(out / "report", [out / "scores"], manifest, run_hash=run.hash,
                         top_k=s.top, title="linernotes demo")
    typer.echo(f"Report: {index}")
    _done(t0)


def _clips(run, folder: Path, s: DemoSettings) -> list[Path]:
    """The demo clips: reused when they exist for this run, generated otherwise."""
    from linernotes.models.pipeline import GenerateSettings, generate, load_clip, move_clip

    paths = [folder / f"clip-{i}.wav" for i in range(len(DEMO_PROMPTS))]
    try:
        if all(load_clip(p, run=run).prompt == t for p, t in zip(paths, DEMO_PROMPTS)):
            return paths
    except LinernotesError:  # missing, or made by another run: generate them again
        pass
    made = generate(run, list(DEMO_PROMPTS), folder, s.seed, GenerateSettings(), progress=False)
    return [move_clip(src, dst) for src, dst in zip(made, paths)]
