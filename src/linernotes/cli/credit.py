"""Artist-level credit: credit, evaluate credit."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.cli.common import (
    app,
    evaluate_app,
    int_option,
    on_device,
    print_table,
    read_corpus,
)
from linernotes.config import parse_assignments
from linernotes.errors import LinernotesError


def _credit_inputs(run: Path, corpus: Path, queries: list[str], caption: str | None):
    from linernotes.attribution.front import queries_from_specs
    from linernotes.run import load_run

    m = read_corpus(corpus)
    r = load_run(run, manifest=m)
    return r, m, queries_from_specs(queries, r, m, caption)


def _credit_settings(method: str, items: list[str] | None):
    from linernotes.credit.front import settings_class

    assignments = parse_assignments(items)
    if method.endswith("-sum"):  # the per-track method's overrides, as `attribute --set`
        return assignments
    cls = settings_class(method)
    if cls is None:
        if items:
            raise LinernotesError(f"Method {method!r} takes no --set settings.")
        return None
    return cls.overrides(assignments)


@app.command("credit")
@on_device
def credit_cmd(
    queries: list[str] = typer.Argument(..., help="Clips (.wav with sidecar), audio files "
                                        "(with --caption) or train:<track id>."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    out: Path = typer.Option(Path("credit"), "--out", "-o", help="Folder for credit tables."),
    by: str = typer.Option("artist", help="Manifest column defining the groups."),
    method: str = typer.Option(None, help="An opt-out method (concept_ablation, grad_diff, "
                               "siss, ...), newton, clap-centroid, unlearning-sum, trak-sum, "
                               "... or logo. Default: the opt-out default of the model's kind "
                               "(concept_ablation for diffusion, mirrored for autoregressive)."),
    settings: list[str] = typer.Option(None, "--set", help="KEY=VALUE setting of the method."),
    caption: str = typer.Option(None, help="Caption for a plain audio query."),
    scores: Path = typer.Option(None, help="-sum methods: a folder of `attribute` score "
                                "tables (<query>.parquet) to sum instead of attributing again."),
    top: int = int_option(10, "How many groups to print per query.", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    reference_tracks: int = int_option(
        0, "Calibrate group unlearning: take off each group's median loss change over this "
        "many training tracks per group (0: no calibration).", min=0),
) -> None:
    """Credit each query to groups of training tracks (artists), by unlearning each group."""
    import json

    from linernotes.credit import CreditSettings, credit
    from linernotes.unlearning.trainer import default_method

    r, m, qs = _credit_inputs(run, corpus, queries, caption)
    method = method or default_method(r.task)
    given = None
    if scores is not None:
        if not method.endswith("-sum") or not scores.is_dir():
            raise LinernotesError("--scores takes a folder of score tables, with a -sum "
                                  "method (e.g. --method unlearning-sum).")
        given = {q.key: scores / f"{q.key}.parquet" for q in qs
                 if (scores / f"{q.key}.parquet").exists()}
    tables = credit(r, m, qs, method, by=by, settings=_credit_settings(method, settings),
                    out_dir=out, track_tables=given,
                    score=CreditSettings(reference_tracks=reference_tracks))
    cols = ["rank", "group", "share", "share_low", "share_high", "softmax", "score", "elbo",
            "n_tracks"]
    if as_json:
        typer.echo(json.dumps([{"query": q.key, "groups": t.head(top)[cols].to_dict("records")}
                               for q, t in zip(qs, tables)]))
        return
    for q, t in zip(qs, tables):
        typer.secho(f"\n{q.key}: {q.caption}", bold=True)
        view = t.head(top)[cols].copy()
        for c in ("share", "softmax"):
            view[c] = view[c].map(lambda x: f"{100 * x:.1f}%")
        view["share_low"] = [f"{100 * lo:.1f}–{100 * hi:.1f}%" if lo == lo else "—"
                             for lo, hi in zip(t.head(top)["share_low"], t.head(top)["share_high"])]
        view = view.drop(columns="share_high").rename(columns={"share_low": "95% (draws)"})
        for c in ("score", "elbo"):
            view[c] = view[c].map(lambda x: f"{x:.3g}")
        typer.echo(view.rename(columns={"group": by}).to_string(index=False))
    typer.echo(f"\nshare: the clip's credit, summing to 100% over the {by}s with positive "
               "credit; 95% (draws): where the share lies when the noise draws behind the loss "
               f"changes are resampled.\nCredit tables in {out}.")


@evaluate_app.command("credit")
@on_device
def evaluate_credit_cmd(
    queries: list[str] = typer.Argument(..., help="Clips (.wav with sidecar), audio files "
                                        "(with --caption) or train:<track id>."),
    run: Path = typer.Option(Path("run"), help="Run folder (a trained run, not an opt-out)."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    out: Path = typer.Option(Path("credit-eval"), "--out", "-o", help="Folder for the results."),
    by: str = typer.Option("artist", help="Manifest column defining the groups."),
    methods: str = typer.Option("concept_ablation,grad_diff,newton,clap-centroid",
                                help="Comma-separated credit methods compared with LOGO."),
    caption: str = typer.Option(None, help="Caption for a plain audio query."),
    k: int = int_option(3, "Cut-off of NDCG@k.", min=1),
    seeds: int = int_option(1, "LOGO's training seeds: the gold standard is the seed-averaged "
                            "change; 2 or more add LOGO's own seed-to-seed agreement (the "
                            "ceiling).", min=1),
) -> None:
    """Compare group-credit methods with leave-one-group-out retraining (retrains are cached)."""
    from linernotes.credit import evaluate_credit

    names = [x.strip() for x in methods.split(",") if x.strip()]
    if not names:
        raise LinernotesError("--methods names no method.")
    r, m, qs = _credit_inputs(run, corpus, queries, caption)
    summary, _ = evaluate_credit(r, m, qs, names, by, out_dir=out, k=k, seeds=seeds)
    cols = ["method", "top1", "top1_low", "top1_high", f"ndcg@{k}", f"ndcg@{k}_low",
            f"ndcg@{k}_high", "spearman", "mrr", "seconds", "fraction_of_logo"]
    print_table(summary[cols].round(4), f"Group credit vs LOGO over {len(qs)} queries ({by}; "
                "_low/_high: 95% bootstrap interval over the queries):")
    typer.echo(f"Wrote {out / 'credit_eval.parquet'} and the per-query detail beside it.")


