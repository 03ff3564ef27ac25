"""`chextrain demo`: the main job on generated data — demo tree, the paper's study, the report."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from chextrain.cli import checks

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "studies"
DEMO_SIZES = {"digital": 1000, "photos": 1000, "valid": 100, "size": 128}
KEEP = "none"  # a finished demo stage keeps its bundle only: no checkpoint (keep_checkpoints)


def register(app: typer.Typer) -> None:
    """Add the `demo` command."""
    app.command("demo")(demo)


def demo(
    out: Path = typer.Option(
        Path("demo"), "--out", help="Folder for the demo data, the study and its report."
    ),
    study_file: Path = typer.Option(CONFIGS / "chextraining.yaml", "--study", help="Study YAML to run."),
    budget: bool = typer.Option(
        False, "--budget/--no-budget", help="Also run the fixed-budget study (reduced grid)."
    ),
    digital: int = typer.Option(DEMO_SIZES["digital"], help="CheXpert train x-rays to generate."),
    photos: int = typer.Option(DEMO_SIZES["photos"], help="CheXphoto train photos to generate."),
    valid: int = typer.Option(
        DEMO_SIZES["valid"], help="CheXpert valid x-rays (each also photographed 3 ways)."
    ),
    size: int = typer.Option(DEMO_SIZES["size"], help="Demo image side in pixels."),
    seed: int = typer.Option(0, help="Seed of the demo data."),
) -> None:
    """Generate the demo dataset, run the study with its demo profile, write and print the report."""
    from rich.console import Console

    with checks.reported():
        checks.readable(study_file, "study")
        checks.out_dir(out)
    from chextrain.cli.study import print_status
    from chextrain.data.demo import write_demo
    from chextrain.evaluation.report import headline_table, write_report
    from chextrain.training.study import load_study
    from chextrain.training.study_run import run_study

    console = Console()
    t0 = time.time()
    data = out / "data"
    if not (data / "CheXpert-v1.0-small" / "train.csv").exists():
        console.print(f"generating the demo dataset in {data} ...")
        write_demo(data, digital=digital, photos=photos, valid=valid, size=size, seed=seed)
    else:
        console.print(f"demo dataset already in {data}")
    studies = [study_file] + ([CONFIGS / "fixed_budget.yaml"] if budget else [])
    for path in studies:
        study = load_study(path, profile="demo", overrides=[f"keep_checkpoints={KEEP}"])
        folder = out / study.name
        state = run_study(
            study, data, folder, log=lambda line: console.print(line, markup=False, highlight=False)
        )
        print_status(state["stages"], console)
        paths = write_report(folder)
        console.print(headline_table(folder))
        console.print(f"[bold]report:[/bold] {paths.html.resolve()}")
        console.print(f"        {paths.md.resolve()}")
    console.print(
        f"demo finished in {(time.time() - t0) / 60:.1f} min; its stages keep their bundles and no "
        "checkpoints (keep_checkpoints: none)"
    )
