"""`chextrain data synth`: write a demo CheXpert + CheXphoto tree in the official layouts."""

from __future__ import annotations

from pathlib import Path

import typer

from chextrain.cli import print_error


def register(data_app: typer.Typer) -> None:
    """Add the `synth` command to the `data` group."""
    data_app.command("synth")(synth)


def synth(
    out: Path = typer.Argument(..., help="Folder to write CheXpert-v1.0-small/ and CheXphoto-v1.0/ into."),
    digital: int = typer.Option(1200, "--digital", min=1, help="CheXpert train x-rays to generate."),
    photos: int = typer.Option(1200, "--photos", min=0, help="CheXphoto train photos (natural + synthetic)."),
    valid: int = typer.Option(100, "--valid", min=0, help="CheXpert valid x-rays (CheXphoto valid has 3x)."),
    size: int = typer.Option(128, "--size", min=32, max=2048, help="Image width in px (height about 1.2x)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed: the same seed writes identical files."),
    workers: int = typer.Option(None, "--workers", min=1, help="Processes (default: all CPU cores)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate synthetic x-rays and photos of them, laid out exactly like the real releases."""
    from rich.console import Console
    from rich.table import Table

    from chextrain.data.demo import DemoError, write_demo

    try:
        summary = write_demo(
            out,
            digital=digital,
            photos=photos,
            valid=valid,
            size=size,
            seed=seed,
            workers=workers,
            progress=progress,
        )
    except DemoError as exc:
        print_error(exc)
        raise typer.Exit(2) from exc
    table = Table(title=f"Demo data in {summary.root}")
    for column in ("csv", "rows", "patients", "kinds"):
        table.add_column(column, justify="right" if column in ("rows", "patients") else "left")
    for key, path in summary.csvs.items():
        prefix = key + "/"
        kinds = ", ".join(f"{k[len(prefix) :]} {n}" for k, n in summary.kinds.items() if k.startswith(prefix))
        table.add_row(
            str(path.relative_to(summary.root)), str(summary.rows[key]), str(summary.patients[key]), kinds
        )
    console = Console()
    console.print(table)
    console.print(f"{summary.images} images in {summary.seconds:.1f} s with {summary.workers} worker(s)")
