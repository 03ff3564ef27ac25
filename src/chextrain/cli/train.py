"""`chextrain train` (one stage, resumable) and `chextrain evaluate` (a finished run on a split).

The arguments are checked first (cli/checks.py); training and evaluation code, and torch with
them, are imported inside the commands only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from chextrain.cli import checks

if TYPE_CHECKING:
    from rich.console import Console


DATA_HELP = "Folder holding the CheXpert-*/CheXphoto-* release folders."


def register(app: typer.Typer) -> None:
    """Add `train` and `evaluate` to the app."""
    app.command("train")(train)
    app.command("evaluate")(evaluate)


def train(
    stage_file: Path = typer.Argument(..., help="Stage YAML (commented examples: configs/stages/)."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", help="Run folder (a checkpoint there resumes)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a stage key: --set optimizer.lr=1e-5"),
    devices: str | None = typer.Option(None, "--devices", help="Devices per node (a number or 'auto')."),
    num_nodes: int | None = typer.Option(None, "--num-nodes", help="Number of nodes (DDP)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar or model summary."),
) -> None:
    """Train one stage into OUT: checkpoints, logs, model.safetensors + model.json, predictions, metrics.

    Stage files: see the commented examples in configs/stages/ (baseline, fine-tune, heads, MoCo).
    """
    from rich.console import Console

    extra = [
        *overrides,
        *([f"devices={devices}"] if devices else []),
        *([f"num_nodes={num_nodes}"] if num_nodes else []),
    ]
    with checks.reported():
        checks.readable(stage_file, "stage")
        checks.overrides(extra)
        checks.data_root(data)
        checks.out_dir(out)
    from chextrain.training.lifecycle import train_stage
    from chextrain.training.stage import load_stage

    stage = load_stage(stage_file, extra)
    result = train_stage(stage, data, out, progress=not no_progress)
    if result.rank != 0:
        return
    console = Console()
    state = (
        "already finished (nothing redone)"
        if result.cached
        else ("resumed and finished" if result.resumed else "finished")
    )
    console.print(f"stage [bold]{stage.name}[/bold] {state} in {result.duration:.0f} s: {result.out_dir}")
    print_metrics(console, result.metrics, f"{stage.title}: average over the 5 pathologies (threshold 0.5)")


def evaluate(
    run: Path = typer.Argument(..., help="A finished run folder (holds model.json + model.safetensors)."),
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    split: str = typer.Option("test", "--split", help="val (the run's own validation split) or test."),
    head: str | None = typer.Option(None, "--head", help="One head for every image (router: it picks)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per inference batch."),
    num_workers: int = typer.Option(0, "--num-workers", help="Loader worker processes."),
) -> None:
    """Score RUN on a split: writes predictions_<split>.parquet and metrics_<split>.json, prints a table."""
    from rich.console import Console
    from rich.table import Table

    with checks.reported():
        if split not in ("val", "test"):
            raise checks.ArgumentError(f"split {split!r}: expected 'val' or 'test'")
        checks.bundle(run)
        checks.data_root(data)
    from chextrain.evaluation.predict import evaluate_run
    from chextrain.labels import SLUGS

    document = evaluate_run(run, data, split, head, batch_size=batch_size, num_workers=num_workers)
    console = Console()
    for name, group in document["groups"].items():
        heads = ", ".join(group["heads"])
        table = Table(title=f"{run.name} / {split} / {name} (n={group['n']}, heads {heads})")
        table.add_column("pathology")
        for key in ("auc", "mcc", "mcc tuned", "precision", "recall", "f1", "accuracy", "positives"):
            table.add_column(key, justify="right")
        for slug in [*SLUGS, "average"]:
            m, tuned = group["at_0.5"][slug], (group.get("tuned") or {}).get(slug, {})
            table.add_row(
                slug,
                _fmt(m["auc"]),
                _fmt(m["mcc"]),
                _fmt(tuned.get("mcc")),
                _fmt(m["precision"]),
                _fmt(m["recall"]),
                _fmt(m["f1"]),
                _fmt(m["accuracy"]),
                _fmt(m["positives"], 0),
            )
        console.print(table)
    suffix = f"{split}_{head}" if head else split
    console.print(f"wrote {run / f'predictions_{suffix}.parquet'} and {run / f'metrics_{suffix}.json'}")


def print_metrics(console: Console, metrics: dict, title: str) -> None:
    """One row per evaluated group: average AUC, MCC, F1."""
    from rich.table import Table

    if not metrics:
        return
    table = Table(title=title)
    for column in ("split/group", "AUC", "MCC", "F1", "n"):
        table.add_column(column, justify="left" if column == "split/group" else "right")
    for name, per in metrics.items():
        avg = per.get("average", {})
        table.add_row(
            name, _fmt(avg.get("auc")), _fmt(avg.get("mcc")), _fmt(avg.get("f1")), _fmt(avg.get("support"), 0)
        )
    console.print(table)


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"
