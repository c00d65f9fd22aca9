"""The demo: the whole flow on the embedded default corpus, every stage cached and resumable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

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


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Small defaults that keep the whole demo within about 20 minutes on 2 CPU cores."""

    size: int = 240
    seconds: float = 6.0
    seed: int = 0


def run_demo(out: Path, settings: DemoSettings = DemoSettings()) -> None:
    """Build the corpus (and, as the stages land, train, generate, attribute, report)."""
    from linernotes.corpus.build import build_corpus

    typer.secho("1. Corpus", bold=True)
    result = build_corpus(out / "corpus", settings.size, settings.seconds, settings.seed,
                          list(DEMO_ARTISTS))
    typer.echo(result.summary_table().to_string(index=False))
    typer.echo(f"{len(result.manifest)} tracks, {result.total_duration / 60:.1f} min of audio; "
               f"rendered {result.rendered}, reused {result.reused}, in {result.elapsed:.0f} s.")
    if result.skipped:
        typer.echo(f"Skipped {len(result.skipped)} score(s):")
        for reason, n in result.skip_reasons().items():
            typer.echo(f"  {n:5d}  {reason}")
