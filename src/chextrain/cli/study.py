"""`chextrain study ...`: run a study of stages, show its status, write its report.

Arguments are checked first (cli/checks.py); the study, training and report code are imported
inside the commands only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from chextrain.cli import checks, print_error

if TYPE_CHECKING:
    from rich.console import Console


STATE_STYLE = {
    "done": "green",
    "running": "yellow",
    "stopped": "yellow",
    "pending": "white",
    "queued": "cyan",
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
    executor: str = typer.Option(
        "inline", "--executor", help="inline (one after another here), local (--slots processes) or slurm."
    ),
    slots: int = typer.Option(1, "--slots", help="--executor local: stages running at once."),
    gpus_per_stage: int = typer.Option(
        None, "--gpus-per-stage", help="--executor local: GPUs of each stage (default: its devices, or 1)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="--executor slurm: print the jobs, submit nothing."
    ),
) -> None:
    """Run the stages of STUDY_FILE in dependency order; finished ones are skipped, killed ones resume.

    With --executor local or slurm, independent stages run at once (see README: "Running the study
    on a cluster"); --executor slurm returns after submitting and prints the job ids.
    """
    from rich.console import Console

    with checks.reported():
        checks.choice(executor, ("inline", "local", "slurm"), "--executor")
        checks.readable(study_file, "study")
        checks.overrides(overrides or [])
        checks.data_root(data)
        checks.out_dir(out)
        if slots < 1:
            raise checks.ArgumentError(f"--slots {slots}: expected 1 or more")
        if gpus_per_stage is not None and gpus_per_stage < 0:
            raise checks.ArgumentError(f"--gpus-per-stage {gpus_per_stage}: expected 0 or more")
        if dry_run and executor != "slurm":
            raise checks.ArgumentError("--dry-run goes with --executor slurm")
    t0 = time.time()
    warm = _start_slots(slots, out) if executor == "local" else []  # they import while the study is read
    try:
        study = _checked_study(study_file, data, profile, overrides or [], only or None)
        from chextrain.training.study_run import run_study

        console = Console()
        log = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
        if executor == "slurm":
            _submit(study, data, out, only or None, dry_run, log, console)
            return
        if executor == "local":
            state = _run_local(study, data, out, only or None, slots, gpus_per_stage, log, warm)
        else:
            state = run_study(study, data, out, only=only or None, progress=not no_progress, log=log)
    finally:
        for slot in warm:  # started but never taken by the scheduler (a refused study, fewer slots used)
            slot.kill()
    console.print(f"study {study.name!r} finished in {(time.time() - t0) / 60:.1f} min")
    print_status(state["stages"], console)
    if not no_report:
        _report(out, console)
    if any(s["state"] == "failed" for s in state["stages"]):
        raise typer.Exit(1)


def _checked_study(
    study_file: Path, data: Path, profile: str | None, overrides: list[str], only: list[str] | None
) -> Any:
    """The study, refused (once, before anything is written) for a bad file, override, --only or CSV.

    Each `--set` that is not one of the study's variables is checked on its own first, so a bad
    override is one error, not one per stage; the catalog is read once for the same reason.
    """
    from chextrain.data.catalog import read_catalog
    from chextrain.training.stage import check_overrides, read_yaml
    from chextrain.training.study import load_study
    from chextrain.training.study_run import wanted_stages

    data_of_file = read_yaml(study_file, "study")
    variables = (data_of_file.get("variables") or {}) if isinstance(data_of_file, dict) else {}
    check_overrides([o for o in overrides if o.partition("=")[0].strip() not in variables])
    study = load_study(study_file, profile=profile, overrides=overrides)
    wanted_stages(study, only)
    for releases in dict.fromkeys(tuple(s.data.releases or ()) for s in study.stages.values()):
        read_catalog(data, releases=list(releases) or None)  # each stage's `data.releases`
    return study


def _run_local(
    study: Any,
    data: Path,
    out: Path,
    only: list[str] | None,
    slots: int,
    gpus_per_stage: int | None,
    log: Any,
    warm: list[Any],
) -> dict:
    import torch

    from chextrain.training.executors import run_local
    from chextrain.training.slots import WarmSlot

    visible = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return run_local(
        study,
        data,
        out,
        slots=slots,
        only=only,
        gpus_per_stage=gpus_per_stage,
        visible_gpus=visible,
        log=log,
        make_executor=lambda folder: warm.pop(0) if warm else WarmSlot(folder),  # taken: run_local closes it
    )


def _start_slots(slots: int, out: Path) -> list[Any]:
    """The local executor's slot processes, started before the study is read (training/slots.py)."""
    from chextrain.training.slots import JOBS_DIR, start_slots

    return start_slots(slots, out / JOBS_DIR)


def _submit(
    study: Any, data: Path, out: Path, only: list[str] | None, dry_run: bool, log: Any, console: Console
) -> None:
    from chextrain.training.executors import submit_slurm

    try:
        jobs = submit_slurm(study, data, out, only=only, dry_run=dry_run, log=log)
    except (OSError, RuntimeError) as err:  # no sbatch here, or the scheduler refused the job
        print_error(f"could not submit to SLURM: {err}")
        raise typer.Exit(1) from err
    if dry_run:
        console.print(f"{len(jobs)} job(s) would be submitted (dry run: nothing was)")
    else:
        console.print(f"{len(jobs)} job(s) submitted; follow them with `chextrain study status {out}`")


def status(out: Path = typer.Argument(..., help="Study output folder.")) -> None:
    """Show each stage's state (pending / queued / running / stopped / done / failed / blocked) and metrics.

    Stages submitted to SLURM show what the scheduler says of their jobs; a stage whose process on
    this machine is gone (killed, interrupted) shows as stopped until `study run` resumes it.
    """
    from rich.console import Console

    with checks.reported():
        checks.file_exists(out / "study.json", f"{out}: no study.json (not a study output folder?)")
        checks.json_file(out / "study.json", "study state")
    from chextrain.training.executors import scheduler_status
    from chextrain.training.study_run import study_status

    print_status(scheduler_status(study_status(out), out), Console())


def report(
    out: Path = typer.Argument(..., help="Study output folder."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples for the confidence intervals."),
) -> None:
    """Write report.md, report.html and tables/*.csv from the saved predictions (never retrains)."""
    from rich.console import Console

    _report(out, Console(), n_boot=n_boot)


def _report(out: Path, console: Console, n_boot: int = 1000) -> None:
    with checks.reported():
        checks.file_exists(
            out / "study.json", f"{out}: no study.json (expected a folder written by `chextrain study run`)"
        )
        checks.json_file(out / "study.json", "study state")
    from chextrain.evaluation.report import headline_table, write_report

    paths = write_report(out, n_boot=n_boot)
    console.print(headline_table(out))
    console.print(f"report: {paths.html}")
    console.print(f"        {paths.md}")


def _headline(metrics: dict[str, Any]) -> str:
    """`test/Standard/auc 0.61` -> `Standard AUC 0.610`, the first three, for an 80-column table."""
    out = []
    for key, value in list(metrics.items())[:3]:
        parts = key.split("/")
        name = " ".join([*parts[1:-1], parts[-1].upper()]) if len(parts) > 2 else key
        out.append(f"{name} {value:.3f}")
    return ", ".join(out)


def print_status(stages: list[dict], console: Console) -> None:
    """A rich table of the stages; long names wrap (never cut) so that every row stays distinct."""
    from rich import box
    from rich.table import Table

    table = Table(title="Stages", box=box.SIMPLE_HEAD, pad_edge=False)
    jobs = any(s.get("job_id") for s in stages)
    for column in ("stage", "strategy", "state", *(["job"] if jobs else []), "time", "headline", "reason"):
        table.add_column(column, overflow="fold", no_wrap=column in ("state", "time"))
    for s in stages:
        style = STATE_STYLE.get(s["state"], "white")
        seconds = f"{s['seconds']:.0f} s" if s.get("seconds") else ""
        table.add_row(
            s["name"],
            s.get("label", ""),
            f"[{style}]{s['state']}[/{style}]",
            *(
                [str(s.get("job_id") or "") + (f" {s['scheduler']}" if s.get("scheduler") else "")]
                if jobs
                else []
            ),
            seconds,
            _headline(s.get("metrics", {})),
            s.get("reason", ""),
        )
    console.print(table)
