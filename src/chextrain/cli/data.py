"""`chextrain data ...`: check a data root, generate the demo dataset.

The catalog code (pandas) is imported inside the command, after the root is known to be a folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from chextrain.cli import checks, print_error

if TYPE_CHECKING:
    from rich.console import Console


SHOWN_PROBLEMS = 20


def register(app: typer.Typer) -> None:
    """Add the `data` group to the app."""
    data_app = typer.Typer(help="Read, check and generate datasets.", no_args_is_help=True)
    data_app.command("check")(check)
    from chextrain.cli import synth

    synth.register(data_app)
    app.add_typer(data_app, name="data")


def check(
    root: Path = typer.Argument(..., help="Folder holding CheXpert-*/CheXphoto-* release folders."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    no_files: bool = typer.Option(False, "--no-files", help="Do not check that image files exist."),
    verify_images: bool = typer.Option(
        False, "--verify-images", help="Open every image and report unreadable ones."
    ),
) -> None:
    """Summarise every official CSV under ROOT and report problems (exit code 1 if any)."""
    from rich.console import Console

    def show(exc: object) -> None:
        if as_json:
            typer.echo(json.dumps({"root": str(root), "ok": False, "error": str(exc)}))
        else:
            print_error(exc)

    with checks.reported(show=show):
        checks.data_root(root)
    from chextrain.data.catalog import CatalogError
    from chextrain.data.check import check_root

    try:
        report = check_root(root, check_files=not no_files, verify_images=verify_images)
    except CatalogError as exc:
        show(exc)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report, Console())
    if not report["ok"]:
        raise typer.Exit(1)


def print_report(report: dict, console: Console) -> None:
    """Rich tables that fit 80 columns: one row per dataset file, label states per file and
    pathology, then the problems found."""
    from rich import box
    from rich.table import Table

    from chextrain.labels import SLUGS

    table = Table(title=f"Data under {report['root']}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("dataset/file", "rows", "patients/\nstudies", "kinds", "views"):
        table.add_column(
            column, justify="right" if column in ("rows", "patients/\nstudies") else "left", no_wrap=True
        )
    for g in report["datasets"]:
        kinds = "\n".join(f"{k} {n}" for k, n in g["kinds"].items())
        views = "\n".join(f"{k} {n}" for k, n in g["views"].items())
        table.add_row(
            f"{g['dataset']}/{g['file']}", str(g["rows"]), f"{g['patients']}/{g['studies']}", kinds, views
        )
    console.print(table)
    labels = Table(title="Labels", box=box.SIMPLE_HEAD, pad_edge=False)
    labels.add_column("dataset/file", no_wrap=True)
    labels.add_column("pathology", no_wrap=True)
    for state in ("positive", "negative", "uncertain", "blank"):
        labels.add_column(state, justify="right", no_wrap=True)
    for g in report["datasets"]:
        for i, slug in enumerate(SLUGS):
            counts = g["labels"][slug]
            name = f"{g['dataset']}/{g['file']}" if i == 0 else ""
            labels.add_row(
                name, slug, *(str(counts[s]) for s in ("positive", "negative", "uncertain", "blank"))
            )
        labels.add_section()
    console.print(labels)
    for key, title in (
        ("issues", "bad rows (skipped)"),
        ("missing_files", "missing files"),
        ("unreadable_images", "unreadable images"),
    ):
        items = report[key]
        if items:
            console.print(f"[red]{len(items)} {title}:[/red]")
            for item in items[:SHOWN_PROBLEMS]:
                console.print(f"  {item}", markup=False, highlight=False)
            if len(items) > SHOWN_PROBLEMS:
                console.print(f"  ... and {len(items) - SHOWN_PROBLEMS} more (use --json for all)")
    console.print("[green]OK[/green]" if report["ok"] else "[red]problems found[/red]")
