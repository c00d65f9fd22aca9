"""Opt-out commands: optout, audit."""

from __future__ import annotations

from pathlib import Path

import typer

from linernotes.cli.common import (
    Options,
    app,
    int_option,
    on_device,
    read_corpus,
    read_ids,
    with_settings,
)
from linernotes.config import parse_assignments
from linernotes.errors import LinernotesError
from linernotes.evaluation.audit import AuditSettings


def _forget_spec(forget: list[str] | None, forget_file: Path | None):
    """One ForgetSpec from repeated --forget texts and a file of track ids."""
    from linernotes.unlearning.forget import ForgetSpec

    specs = [ForgetSpec.parse(t) for t in forget or []]
    ids = read_ids(forget_file) if forget_file else ()
    if forget_file and not ids:
        raise LinernotesError(f"{forget_file} lists no track ids (expected one per line).")
    return ForgetSpec(artists=tuple(a for s in specs for a in s.artists),
                      track_ids=tuple(t for s in specs for t in s.track_ids) + ids,
                      where=tuple(w for s in specs for w in s.where))


def _print_methods() -> None:
    import dataclasses

    from linernotes.unlearning.trainer import MethodSettings, available_methods

    shared = MethodSettings()
    typer.echo("Unlearning methods (--method) and their own settings (--set KEY=VALUE):")
    for name, cls in sorted(available_methods().items()):
        own = [f"{f.name}={getattr(cls.settings_class(), f.name)}"
               for f in dataclasses.fields(cls.settings_class)
               if not hasattr(shared, f.name) or getattr(shared, f.name) != f.default]
        typer.echo(f"  {name:18s} {cls.summary}")
        if own:
            typer.echo(f"  {'':18s} {', '.join(own)}")
    typer.echo("Shared settings (defaults): " + ", ".join(
        f"{k}={v}" for k, v in shared.to_dict().items()))


@app.command("optout")
@on_device
def optout_cmd(
    forget: list[str] = typer.Option(
        None, "--forget", help="What to forget: 'artist=NAME', 'track=ID,ID' or a manifest filter "
        "'column=value' (items joined by ';'; a bare name is an artist). Repeat to add more; "
        "filters must all hold."),
    forget_file: Path = typer.Option(None, help="A file of track ids to forget, one per line."),
    run: Path = typer.Option(Path("run"), help="Run to unlearn from (may itself be an opt-out)."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    method: str = typer.Option(None, help="Unlearning method (--list-methods). Default: the "
                               "one that came closest to retraining in the audits "
                               "(docs/benchmarks.md): concept_ablation on a diffusion model, "
                               "mirrored on an autoregressive one."),
    set_: list[str] = typer.Option(None, "--set", help="KEY=VALUE overrides a method setting."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for the new (unlearned) run."),
    as_json: bool = typer.Option(False, "--json", help="Print the opt-out record as JSON."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List methods and exit."),
) -> None:
    """Remove tracks (an artist, ids, a filter) from a run, without retraining: a new run."""
    import json

    from linernotes.run import Layout
    from linernotes.unlearning.trainer import get_method, method_settings, optout

    if list_methods:
        _print_methods()
        return
    spec = _forget_spec(forget, forget_file)
    manifest, base = read_corpus(corpus), run
    if method is None:  # the run's kind decides; load it once, for optout too
        from linernotes.run import load_run
        from linernotes.unlearning.trainer import default_method

        base = load_run(run, manifest=manifest)
        method = default_method(base.task)
    settings = method_settings(
        method, get_method(method).settings_class.overrides(parse_assignments(set_)))
    if out is None:
        raise LinernotesError("Give the folder for the new run with -o/--out (e.g. -o "
                              "run-without-bach).")
    reused = Layout(out).optout_record.exists()
    new = optout(base, manifest, spec, method, settings, out)
    record = json.loads(new.optout_record.read_text())
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    _print_record(record, new, settings, reused)


def _print_record(record: dict, new, settings, reused: bool) -> None:
    removed, cost, loss = record["removed"], record["cost"], record["forget_loss"]
    defaults = type(settings)().to_dict()
    changed = {k: v for k, v in settings.to_dict().items() if v != defaults[k]}
    typer.echo(f"Opt-out run {new.hash} at {new.path}"
               f"{' (already done: reused)' if reused else ''}; from run "
               f"{record['base']['hash']} at {record['base']['path']}.")
    typer.echo(f"Removed {removed['n_forget']} training track(s) of "
               f"{', '.join(removed['artists']) or 'no named artist'} "
               f"({removed['n_retain']} retained; {len(record['removed_total'])} removed in total "
               f"along the chain of opt-outs).")
    typer.echo(f"Method {record['method']}"
               + (f" with {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed
                  else " (default settings)") + ".")
    stop = f"; stopped early: {cost['stop_reason']}" if cost.get("stopped_early") else ""
    typer.echo(f"Cost: {cost['seconds']:.1f} s, {cost['steps']} step(s){stop}.")
    change = (loss["after"] - loss["before"]) / loss["before"] if loss["before"] else float("nan")
    typer.echo(f"Forget-set loss at fixed draws: {loss['before']:.4f} -> {loss['after']:.4f} "
               f"({change:+.1%}).")
    typer.echo(f"Record: {new.optout_record}. The run works with `generate` and "
               "`attribute`; check it with `linernotes audit`.")


@app.command("audit")
@on_device
@with_settings(Options("settings", AuditSettings))
def audit_cmd(
    unlearned: list[Path] = typer.Argument(..., help="Opt-out run folders to audit."),
    run: Path = typer.Option(None, help="The original run (default: the base of the first "
                             "opt-out)."),
    corpus: Path = typer.Option(Path("corpus"), help="The corpus the run was trained on."),
    forget: list[str] = typer.Option(None, "--forget", help="The forget set, as for `optout` "
                                     "(default: the one the first opt-out recorded)."),
    forget_file: Path = typer.Option(None, help="A file of track ids to forget, one per line."),
    out: Path = typer.Option(Path("audit"), "--out", "-o", help="Folder for table, plot, JSON."),
    retrains: Path = typer.Option(None, "--retrains", "--retrained", help="Retrain cache "
                                  "(default: the original run's)."),
    retrain_steps: int = int_option(0, "Training steps of the retrained reference (0 = the "
                                    "original's; fewer give a cheaper, weaker reference)."),
    set_: list[str] = typer.Option(None, "--set", help="KEY=VALUE for any audit setting."),
    as_json: bool = typer.Option(False, "--json", help="Print table, verdicts and files as JSON."),
    settings: AuditSettings = None,
) -> None:
    """Audit opt-outs against the original and a model retrained without the forget set."""
    from linernotes.evaluation.audit import audit
    from linernotes.run import Layout, load_run
    from linernotes.unlearning.forget import ForgetSpec
    from linernotes.unlearning.trainer import read_record

    settings = settings.replace(**AuditSettings.overrides(parse_assignments(set_)))
    if retrain_steps < 0:
        raise LinernotesError("--retrain-steps must be >= 0 (0 = the original's recipe).")
    first = read_record(unlearned[0])
    if run is None:
        run = Path(first["base"]["path"])
        if not run.exists():
            raise LinernotesError(f"The original run recorded by {unlearned[0]} ({run}) is not "
                                  "there; give it with --run.")
    spec = (_forget_spec(forget, forget_file) if forget or forget_file
            else ForgetSpec.from_dict(first["removed"]["spec"]))
    if retrains is not None and Layout(retrains).is_run:
        raise LinernotesError(f"--retrains takes the folder that caches retrained references "
                              f"(e.g. {retrains.parent}), not one run.")
    manifest = read_corpus(corpus)
    original = load_run(run, manifest=manifest)
    result = audit(original, unlearned, manifest, spec, out, retrain_steps=retrain_steps,
                   settings=settings, retrain_dir=retrains)
    _print_audit(result, as_json)


def _print_audit(result, as_json: bool) -> None:
    import json

    import pandas as pd

    from linernotes.evaluation.audit import METRICS, _fmt, json_rows

    out = result.out_dir
    files = {"table": [out / "audit.csv", out / "audit.md"], "json": out / "audit.json",
             "plot": result.plot, "optout": list(result.optout_files.values())}
    if (out / "clips").exists():
        files["clips"] = out / "clips"
    if as_json:
        typer.echo(json.dumps({"table": json_rows(result.table), "verdicts": result.verdicts,
                               "passed": result.passed, "notes": result.notes,
                               "retrained": str(result.retrained), "files": files},
                              indent=2, default=str))
        return
    t = result.table
    cols = [c for c in METRICS if c in t.columns]
    view = pd.DataFrame({row["model"]: [_fmt(row[c], c) for c in cols] for _, row in t.iterrows()},
                        index=[METRICS[c] for c in cols])
    forget = result.forget
    typer.secho(f"Audit: {len(forget.forget_ids)} track(s) of "
                f"{', '.join(forget.artists) or forget.spec.describe()} forgotten; reference "
                f"retrained without them at {result.retrained}", bold=True)
    typer.echo(view.to_string())
    typer.echo("\nVerdicts:")
    for model, text in result.verdicts.items():
        if model in result.passed:
            typer.echo(f"  {model}: {text}")
    for note in result.notes:
        typer.echo(f"Note: {note}")
    typer.echo("\nWrote:")
    for path in [*files["table"], files["json"], files["plot"], *files["optout"],
                 *([files["clips"]] if "clips" in files else [])]:
        typer.echo(f"  {path}")


