"""`linernotes evaluate ...`: consistency, compare, leave-k-out, lds, grid."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.attribution.losses import ScoreSettings
from linernotes.cli.attribution import UNLEARN_OPTIONS
from linernotes.cli.common import (
    Options,
    evaluate_app,
    int_option,
    on_device,
    print_table,
    read_corpus,
    read_ids,
    with_settings,
)
from linernotes.errors import LinernotesError
from linernotes.evaluation.counterfactual import EvalDraws
from linernotes.evaluation.lds import LdsSettings
from linernotes.unlearning.newton import UnlearnSettings

#: The query draws of `leave-k-out` and `lds`.
DRAW_OPTIONS = Options("draws", EvalDraws, ("timesteps", "stride", "noises"))


@evaluate_app.command("consistency")
@on_device
@with_settings(UNLEARN_OPTIONS,
               Options("score", ScoreSettings, ("mask_train", "timesteps", "stride")))
def evaluate_consistency(
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    queries: int = int_option(8, "Training tracks unlearned as queries (k-means-diverse on "
                              "audio embeddings).", min=1),
    out: Path = typer.Option(Path("consistency"), "--out", "-o", help="Folder for score "
                             "tables and the summary."),
    top_k: int = int_option(10, "k of the audio similarity to the top-k / bottom-k.", min=1),
    seed: int = int_option(0, "Seed of the k-means choice of queries."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    unlearn: UnlearnSettings = None,
    score: ScoreSettings = None,
) -> None:
    """Self-influence: unlearn diverse training tracks; each should credit itself first."""
    import json

    from linernotes.artifacts import write_json
    from linernotes.attribution.embeddings import track_embeddings
    from linernotes.attribution.query import Query
    from linernotes.attribution.unlearning import UnlearningAttributor
    from linernotes.curvature import FisherSettings, covering_group
    from linernotes.evaluation.consistency import diverse_tracks, self_influence
    from linernotes.run import load_run

    if queries < 1 or top_k < 1:
        raise LinernotesError("--queries and --top-k must be >= 1.")
    manifest = read_corpus(corpus)
    r = load_run(run, manifest=manifest)
    store, train, ids = r.train_set(manifest)
    if queries > len(ids):
        raise LinernotesError(f"--queries {queries} exceeds the run's {len(ids)} training tracks.")
    emb = track_embeddings(r, store, train.rows)
    chosen = []
    for k in diverse_tracks(emb, queries, seed=seed):
        item = train[int(k)]
        chosen.append(Query(item["track_id"], item["features"], item["mask"], item["caption"],
                            source=f"train:{item['track_id']}", track_id=item["track_id"]))
    fisher = r.fisher(manifest, FisherSettings(group=covering_group(unlearn.group)))
    att = UnlearningAttributor(r.task, r.model, r.hash, manifest, train, ids, fisher,
                               r.cache_dir, score)
    result = self_influence(att, chosen, unlearn, out, dict(zip(ids, emb)), k=top_k)
    per = result.per_query
    info = manifest.set_index("track_id").loc[per["query"], ["artist", "title"]]
    per.insert(1, "artist", info["artist"].to_numpy())
    per.insert(2, "title", info["title"].to_numpy())
    summary = {**result.summary(), "train_tracks": len(ids), "top_k": top_k, "run": r.hash,
               "unlearn": unlearn.to_dict(), "score": score.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    per.to_csv(out / "consistency.csv", index=False)
    doc = {"summary": summary, "per_query": json.loads(per.to_json(orient="records"))}
    write_json(out / "consistency.json", doc)
    if as_json:
        typer.echo(json.dumps(doc))
        return
    view = per[["query", "artist", "title", "self_rank", "sim_top", "sim_bottom", "seconds"]]
    print_table(view.round(3), f"Self-influence of {len(per)} training tracks (run {r.hash})")
    typer.echo(f"Mean self-rank {summary['mean_self_rank']:.2f} (1.0 is perfect; chance "
               f"~{len(ids) / 2:.0f} of {len(ids)} tracks); rank 1 for "
               f"{summary['rank1_fraction']:.0%} of queries.")
    typer.echo(f"CLAP similarity of a query to its top-{top_k}: {summary['sim_top']:.3f}, to its "
               f"bottom-{top_k}: {summary['sim_bottom']:.3f}.")
    typer.echo(f"Wrote {out / 'consistency.csv'} and {out / 'consistency.json'}.")


@evaluate_app.command("compare")
def evaluate_compare(
    scores: list[Path] = typer.Argument(..., help="Score folders (one per method, from "
                                        "`linernotes attribute --method ... -o DIR`) or tables."),
    out: Path = typer.Option(Path("compare"), "--out", "-o", help="Folder for plots and tables."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Methods side by side: normalised score over ranks, and their correlation matrices."""
    import json

    from linernotes.evaluation.compare import compare

    result = compare(scores, out)
    if as_json:
        typer.echo(json.dumps(result.summary()))
        return
    typer.echo("Queries per method: " + ", ".join(f"{m} {n}" for m, n in result.queries.items()))
    for kind, mat in result.correlations.items():
        print_table(mat.round(3).reset_index(names="method"),
                    f"\n{kind.capitalize()} correlation (mean over {result.n_correlated} "
                    "queries):")
    if not result.correlations:
        typer.echo("No query has scores of two methods: no correlation matrix.")
    typer.echo("\nWrote " + ", ".join(result.files.values()))


def _cf_setup(run: Path, corpus: Path, specs: list[str], caption: str | None = None):
    """(manifest, run, queries) for the counterfactual commands."""
    from linernotes.attribution.front import queries_from_specs
    from linernotes.run import load_run

    manifest = read_corpus(corpus)
    r = load_run(run, manifest=manifest)
    return manifest, r, queries_from_specs(specs, r, manifest, caption)


def _cf_scores(paths: list[Path], queries) -> object:
    """Score tables of every method for the queries (folders or files), as one DataFrame."""
    from linernotes.evaluation.compare import read_score_tables

    table = read_score_tables(paths)
    keys = [q.key for q in queries]
    missing = sorted(set(keys) - set(table["query"]))
    if missing:
        raise LinernotesError(f"No score table for query {missing[0]!r} under "
                              f"{', '.join(map(str, paths))}; attribute it first.")
    return table[table["query"].isin(keys)]


def _retrainer(r, manifest, retrains: Path | None, budget: int | None):
    """The run's retrain cache (or `retrains`), at most `budget` new retrains."""
    from linernotes.run import Retrainer

    return Retrainer(r, manifest, retrains, budget, progress=True)


@evaluate_app.command("leave-k-out")
@on_device
@with_settings(DRAW_OPTIONS)
def evaluate_leave_k_out(
    queries: list[str] = typer.Argument(..., help="Clips (.wav with sidecar), audio files "
                                        "(with --caption) or train:<track id>."),
    scores: list[Path] = typer.Option(..., help="Score folders or tables (one folder per "
                                      "method); repeat the option for several."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    k: list[str] = typer.Option(["0.01", "0.02", "0.05"], help="K: a fraction of the training "
                                "set (< 1) or a count; repeat for several."),
    out: Path = typer.Option(Path("leave-k-out"), "--out", "-o", help="Folder for the table."),
    retrains: Path = typer.Option(None, help="Retrain cache (default: the run's)."),
    budget: int = int_option(None, "Most retrains this invocation may train."),
    random: bool = typer.Option(True, help="Add K random tracks as a control."),
    random_seed: int = int_option(0, "Seed of the random control."),
    generation: bool = typer.Option(True, help="Also measure the regenerated clip's change."),
    caption: str = typer.Option(None, help="Caption for a plain audio query."),
    draws: EvalDraws = None,
) -> None:
    """Retrain without each method's top-K tracks: the query's loss increase (vs K random)."""
    from linernotes.evaluation.counterfactual import leave_k_out

    manifest, r, qs = _cf_setup(run, corpus, queries, caption)
    table = _cf_scores(scores, qs)
    retrainer = _retrainer(r, manifest, retrains, budget)
    res = leave_k_out(r, manifest, qs, table, k, out, retrainer, draws, random, random_seed,
                      generation, log=typer.echo)
    if res.empty:
        typer.echo("No row finished yet.")
        return
    view = res.groupby(["method", "k"], sort=False)[["delta_loss", "delta_gen"]].agg(
        ["mean", "std"]).round(5)
    view.columns = [f"{a}_{b}" for a, b in view.columns]
    print_table(view.reset_index(), f"Leave-K-out over {res['query'].nunique()} queries "
                "(delta_loss = retrained − original query loss; higher = the removed tracks "
                "mattered more):")
    typer.echo(f"Wrote {out / 'leave_k_out.parquet'}.")


@evaluate_app.command("lds")
@on_device
@with_settings(Options("s", LdsSettings, ("subsets", "fraction", "seed", "extra_seeds",
                                          "paired_subsets")), DRAW_OPTIONS)
def evaluate_lds(
    queries: list[str] = typer.Argument(..., help="Queries (as for `attribute`)."),
    scores: list[Path] = typer.Option(..., help="Score folders or tables; repeat for several."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    out: Path = typer.Option(Path("lds"), "--out", "-o", help="Folder for the tables."),
    retrains: Path = typer.Option(None, help="Retrain cache (default: the run's)."),
    budget: int = int_option(None, "Most retrains this invocation may train."),
    caption: str = typer.Option(None, help="Caption for a plain audio query."),
    s: LdsSettings = None,
    draws: EvalDraws = None,
) -> None:
    """Linear datamodeling score: scores summed over subsets vs retrained models' losses."""
    from linernotes.evaluation.lds import lds_summary, lds_table, subset_losses

    manifest, r, qs = _cf_setup(run, corpus, queries, caption)
    table = _cf_scores(scores, qs)
    retrainer = _retrainer(r, manifest, retrains, budget)
    data = subset_losses(r, manifest, qs, out, s, retrainer, draws, log=typer.echo)
    per_query = lds_table(data, table)
    summary = lds_summary(per_query, data)
    out.mkdir(parents=True, exist_ok=True)
    per_query.to_csv(out / "lds_per_query.csv", index=False)
    summary.to_csv(out / "lds.csv", index=False)
    note = "" if data.complete else f" (partial: {data.retrains_left} retrains left)"
    print_table(summary.round(4), f"LDS over {int(per_query['models'].max())} subset models, "
                f"{len(qs)} queries{note}:")
    typer.echo(f"Wrote {out / 'lds.csv'} and {out / 'lds_per_query.csv'}.")


def _grid_axis(cls, name: str, items: list[str] | None) -> list:
    """Repeated --NAME values of a grid axis, typed by the settings field they set."""
    return [cls.coerce(name, x, f"--{name.replace('_', '-')}") for x in items or []]


@evaluate_app.command("grid")
@on_device
def evaluate_grid(
    queries: list[str] = typer.Argument(..., help="Tuning queries: train:<track id> for "
                                        "self-rank, held-out clips for LDS."),
    run: Path = typer.Option(Path("run"), help="Run folder."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    metric: str = typer.Option("self-rank", help="self-rank or lds."),
    out: Path = typer.Option(Path("grid"), "--out", "-o", help="Folder for the results."),
    evaluated: Path = typer.Option(None, help="File of evaluated query keys (one per line): "
                                   "refused as tuning queries."),
    group: list[str] = typer.Option(None, help="Parameter groups to try (repeat)."),
    mask_query: list[str] = typer.Option(None, help="M_U values: on/off (repeat)."),
    mask_train: list[str] = typer.Option(None, help="M_L values: on/off (repeat)."),
    alpha: list[str] = typer.Option(None, help="Step sizes (0 = by target ratio)."),
    target_ratio: list[str] = typer.Option(None, help="Target loss ratios."),
    steps: list[str] = typer.Option(None, help="Unlearning steps."),
    draws: list[str] = typer.Option(None, help="Query-gradient draws."),
    retrains: Path = typer.Option(None, help="Retrain cache for --metric lds (default: the "
                                  "run's)."),
    subsets: int = int_option(16, "Subset models for --metric lds.", min=3),
    budget: int = int_option(None, "Most retrains this invocation may train."),
) -> None:
    """Grid search over unlearning settings, judged on tuning queries; resumes row by row."""
    from linernotes.evaluation.grid import LdsMetric, SelfRankMetric, grid_points, grid_search

    axes = {name: vals for name, vals in {
        "group": _grid_axis(UnlearnSettings, "group", group),
        "mask_query": _grid_axis(UnlearnSettings, "mask_query", mask_query),
        "mask_train": _grid_axis(ScoreSettings, "mask_train", mask_train),
        "alpha": _grid_axis(UnlearnSettings, "alpha", alpha),
        "target_ratio": _grid_axis(UnlearnSettings, "target_ratio", target_ratio),
        "steps": _grid_axis(UnlearnSettings, "steps", steps),
        "draws": _grid_axis(UnlearnSettings, "draws", draws)}.items() if vals}
    excluded = read_ids(evaluated) if evaluated else ()
    if metric == "self-rank":
        bad = [q for q in queries if not q.startswith("train:")]
        if bad:
            raise LinernotesError(f"--metric self-rank takes train:<track id> queries, not "
                                  f"{bad[0]!r}.")
        from linernotes.run import load_run

        manifest = read_corpus(corpus)
        r = load_run(run, manifest=manifest)
        m = SelfRankMetric(r, manifest, [q.removeprefix("train:") for q in queries],
                           progress=True)
    elif metric == "lds":
        from linernotes.evaluation.lds import subset_losses

        manifest, r, qs = _cf_setup(run, corpus, queries)
        retrainer = _retrainer(r, manifest, retrains, budget)
        data = subset_losses(r, manifest, qs, out / "lds", LdsSettings(subsets=subsets,
                             extra_seeds=0), retrainer, log=typer.echo)
        m = LdsMetric(r, manifest, qs, data, progress=True)
    else:
        raise LinernotesError(f"--metric takes self-rank or lds, not {metric!r}.")
    table = grid_search(grid_points(axes), m, out, evaluated=excluded, log=typer.echo)
    cols = [*axes, *[c for c in table.columns if c in ("mean_self_rank", "rank1_fraction",
                                                       "lds", "lds_std", "seconds")]]
    print_table(table[cols].round(4), f"Grid over {len(table)} settings (best first, by "
                f"{m.primary}):")
    typer.echo(f"Wrote {out / 'grid.parquet'}.")


