"""Attribution commands: fisher, methods, attribute, report."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.attribution.losses import ScoreSettings
from linernotes.cli.common import (
    Options,
    app,
    int_option,
    on_device,
    read_corpus,
    with_settings,
)
from linernotes.config import parse_assignments
from linernotes.curvature import FisherSettings
from linernotes.errors import LinernotesError
from linernotes.unlearning.newton import UnlearnSettings

#: The unlearning options of `attribute` and `evaluate consistency`.
UNLEARN_OPTIONS = Options("unlearn", UnlearnSettings, ("group", "alpha", "target_ratio", "draws",
                                                       "steps", "damping", "mask_query"))


@app.command()
@on_device
@with_settings(Options("settings", FisherSettings, ("group", "samples", "draws")))
def fisher(
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    force: bool = typer.Option(False, "--force", help="Compute it again even if it is there."),
    settings: FisherSettings = None,
) -> None:
    """Compute (once) the diagonal Fisher of a run; attribution reuses it. Resumes after a
    kill."""
    from linernotes import distributed
    from linernotes.run import load_run

    distributed.init_from_env()
    r = load_run(run)
    f = r.fisher(read_corpus(corpus), settings, force=force)
    typer.echo(f"Fisher over {f.n_examples} examples at {r.fisher_path(settings)}")


@app.command()
def methods(
    name: str = typer.Argument(None, help="A method: list its --set keys and defaults."),
) -> None:
    """List the attribution methods (name, kind, description), or one method's settings."""
    from linernotes.attribution.methods import ALIASES, method_spec, methods_table, setting_keys

    if name is None:
        typer.echo("Attribution methods (linernotes attribute --method NAME):")
        for row in methods_table().itertuples():
            note = "" if row.available == "yes" else f"  [not here: {row.available}]"
            typer.echo(f"  {row.method:21s} {row.kind:15s} {row.description}{note}")
        typer.echo("Aliases: " + ", ".join(f"{a} = {b}" for a, b in ALIASES.items())
                   + ". Settings of one method: linernotes methods NAME.")
        return
    spec = method_spec(name)
    typer.echo(f"{spec.name} ({spec.kind}): {spec.description}")
    if spec.missing():
        typer.echo(f"Not available here: {spec.missing()}")
    keys = setting_keys(spec.name)
    if not keys:
        typer.echo("No settings.")
    for key, default in keys.items():
        typer.echo(f"  --set {key}={default}")


@app.command()
@on_device
@with_settings(UNLEARN_OPTIONS,
               Options("score", ScoreSettings, ("mask_train", "timesteps", "stride", "kind",
                                                "precision", "candidates", "coarse_timesteps",
                                                "coarse_span", "exact"),
                       {"kind": "score-kind"}))
def attribute(
    queries: list[str] = typer.Argument(..., help="Clips (.wav with sidecar), audio files "
                                        "(with --caption) or train:<track id>."),
    method: str = typer.Option("unlearning", "--method", "-m", help="Attribution method: "
                               "unlearning, trak, dtrak, tracin, fisher-influence, representer, "
                               "clap-audio, clap-text, basic-pitch, chroma-mfcc, lpips-dit, "
                               "dattri-*, kronfluence-* (see `linernotes methods`)."),
    sets: list[str] = typer.Option(None, "--set", help="KEY=VALUE setting of the method "
                                   "(repeatable; `linernotes methods NAME` lists the keys)."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    out: Path = typer.Option(Path("scores"), "--out", "-o", help="Folder for score tables."),
    caption: str = typer.Option(None, help="Caption for a plain audio query."),
    top: int = int_option(5, "How many credited tracks to print.", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    unlearn: UnlearnSettings = None,
    score: ScoreSettings = None,
) -> None:
    """Credit the training tracks behind each query (by unlearning it, or with --method)."""
    from linernotes import distributed
    from linernotes.attribution.front import attribute_run
    from linernotes.attribution.methods import method_spec
    from linernotes.run import load_run

    spec = method_spec(method)
    overrides = parse_assignments(sets)
    if spec.name != "unlearning":
        if unlearn != UnlearnSettings() or score != ScoreSettings():
            raise LinernotesError(f"The unlearning options (--alpha, --draws, --timesteps, ...) "
                                  f"apply to --method unlearning only; give {spec.name}'s "
                                  f"settings with --set (`linernotes methods {spec.name}`).")
        unlearn = score = None
    distributed.init_from_env()
    r = load_run(run)
    tables = attribute_run(r, read_corpus(corpus), queries, out, unlearn, score, caption=caption,
                           method=spec.name, overrides=overrides)
    if distributed.rank() == 0:
        print_credits(tables, top, as_json)


def print_credits(tables, top: int, as_json: bool = False, titles=None) -> None:
    """Print each query's top credited tracks (artist, title, score) under its title."""
    import json

    if as_json:
        typer.echo(json.dumps([t.head(top)[["query", "track_id", "rank", "score", "artist",
                                             "title"]].to_dict("records") for t in tables]))
        return
    for i, t in enumerate(tables):
        typer.secho(f"\n{titles[i] if titles else t['query'][0]}", bold=True)
        view = t.head(top)[["rank", "artist", "title", "score", "track_id"]].copy()
        view["score"] = view["score"].map(lambda x: f"{x:.3g}")
        typer.echo(view.to_string(index=False))
        if "exact" in t and not t["exact"].all():
            typer.echo(f"Two stages: all {len(t):,} tracks ranked at a few timesteps, the top "
                       f"{int(t['exact'].sum()):,} (the table's exact column) then scored "
                       "exactly; --exact scores every track.")


@app.command()
def report(
    scores: list[Path] = typer.Argument(..., help="Score tables or folders of them."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="Report folder."),
    run: Path = typer.Option(None, help="Run folder (checks the scores came from it)."),
    top: int = int_option(5, "Credited tracks shown per query.", min=1),
    title: str = typer.Option("Liner notes", help="Report title."),
    credit: list[Path] = typer.Option(None, "--credit", help="Credit tables of `linernotes "
                                      "credit` (files or folders): a credit-by-artist panel."),
) -> None:
    """Write a static HTML report: clips, credited tracks with players, plots."""
    from linernotes.credit.tables import read_credit
    from linernotes.report import build_report

    credit_tables = [read_credit(f) for c in credit or []
                     for f in (sorted(c.glob("*.parquet")) if c.is_dir() else [c])]

    run_hash = None
    if run is not None:
        from linernotes.run import load_run

        run_hash = load_run(run).hash
    index = build_report(out, scores, read_corpus(corpus), run_hash=run_hash, top_k=top,
                         title=title, credit=credit_tables)
    typer.echo(f"Report: {index}")
