"""`chextrain study ...`: run a study of stages, show its status, write its report."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from chextrain.cli import print_error
from chextrain.training.stage import StageError

STATE_STYLE = {
    "done": "green",
    "running": "yellow",
    "pending": "white",
    "failed": "red",
    "blocked": "magenta",
}


def register(app: typer.Typer) -> None:
    """Add the `study` group to the app."""
    study_app = typer.Typer(
        help="Run the paper's studies (DAGs of stages) and report them.", no_args_is_help=True
    )
    study_app.command("run")(run)
    study_app.command("status")(status)
    study_app.command("report")(report)
    app.add_typer(study_app, name="study")


def run(
    study_file: Path = typer.Argument(..., help="Study YAML (e.g. configs/studies/chextraining.yaml)."),
    data: Path = typer.Option(
        ..., "--data", help="Data root holding the CheXpert/CheXphoto release folders."
    ),
    out: Path = typer.Option(..., "--out", help="Study output folder (re-use it to resume)."),
    profile: str = typer.Option(None, "--profile", help="A profile of the study file, e.g. demo."),
    only: list[str] = typer.Option(
        None, "--only", help="Run only this stage (and what it needs); repeatable."
    ),
    overrides: list[str] = typer.Option(None, "--set", help="variable=value or stage key=value; repeatable."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write the report at the end."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
) -> None:
    """Run the stages of STUDY_FILE in dependency order; finished ones are skipped, killed ones resume."""
    from chextrain.training.study import load_study
    from chextrain.training.study_run import run_study

    console = Console()
    try:
        study = load_study(study_file, profile=profile, overrides=overrides or [])
    except StageError as err:
        print_error(err)
        raise typer.Exit(2) from err
    t0 = time.time()
    state = run_study(
        study,
        data,
        out,
        only=only or None,
        progress=not no_progress,
        log=lambda line: console.print(line, markup=False, highlight=False),
    )
    console.print(f"study {study.name!r} finished in {(time.time() - t0) / 60:.1f} min")
    print_status(state["stages"], console)
    if not no_report:
        _report(out, console)
    if any(s["state"] == "failed" for s in state["stages"]):
        raise typer.Exit(1)


def status(out: Path = typer.Argument(..., help="Study output folder.")) -> None:
    """Show each stage's state (done / running / pending / failed / blocked), time and headline metrics."""
    from chextrain.training.study_run import study_status

    try:
        stages = study_status(out)
    except FileNotFoundError as err:
        print_error(err)
        raise typer.Exit(2) from err
    print_status(stages, Console())


def report(
    out: Path = typer.Argument(..., help="Study output folder."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the confidence intervals."),
) -> None:
    """Write report.md, report.html and tables/*.csv from the saved predictions (never retrains)."""
    _report(out, Console(), n_boot=n_boot)


def _report(out: Path, console: Console, n_boot: int = 1000) -> None:
    from chextrain.evaluation.report import ReportError, headline_table, write_report

    try:
        paths = write_report(out, n_boot=n_boot)
    except ReportError as err:
        print_error(err)
        raise typer.Exit(2) from err
    console.print(headline_table(out))
    console.print(f"report: {paths.html}")
    console.print(f"        {paths.md}")


def print_status(stages: list[dict], console: Console) -> None:
    """A rich table of the stages."""
    table = Table(title="Stages")
    for column in ("stage", "strategy", "state", "time", "headline", "reason"):
        table.add_column(column)
    for s in stages:
        style = STATE_STYLE.get(s["state"], "white")
        seconds = f"{s['seconds']:.0f} s" if s.get("seconds") else ""
        head = ", ".join(f"{k} {v:.3f}" for k, v in list(s.get("metrics", {}).items())[:3])
        table.add_row(
            s["name"],
            s.get("label", ""),
            f"[{style}]{s['state']}[/{style}]",
            seconds,
            head,
            s.get("reason", ""),
        )
    console.print(table)
