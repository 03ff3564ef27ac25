"""`chextrain probe`: how good is a run's encoder? Linear probe, kNN and photo/x-ray feature closeness.

Arguments are checked first; the probe code (torch, scikit-learn) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from chextrain.cli import checks

if TYPE_CHECKING:
    from rich.table import Table


def register(app: typer.Typer) -> None:
    """Add `probe` to the app."""
    app.command("probe")(probe)


def probe(
    run: Path = typer.Argument(..., help="A run folder with model.json + model.safetensors (any objective)."),
    data: Path = typer.Option(..., "--data", help="Folder holding the CheXpert-*/CheXphoto-* releases."),
    split: str = typer.Option("test", "--split", help="Split scored: test (official valid sets) or val."),
    k: int = typer.Option(10, "--k", help="Neighbours of the kNN classifier."),
    c: float = typer.Option(1.0, "--c", help="Inverse L2 strength of the logistic regression (sklearn's C)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per feature batch."),
    num_workers: int = typer.Option(0, "--num-workers", help="Loader worker processes."),
) -> None:
    """Freeze RUN's encoder; fit a linear probe and a kNN classifier on the train split's features.

    Prints the AUC per pathology on SPLIT (all images, x-rays, photos) and the mean cosine
    similarity of the features of an x-ray and a photo of it vs of another x-ray; writes RUN/probe.json.
    """
    from rich.console import Console
    from rich.table import Table

    with checks.reported():  # in probe_run's order: bundle, data root, k and c
        checks.bundle(run)
        checks.data_root(data)
        if k < 1 or c <= 0:
            raise checks.ArgumentError(f"k must be >= 1 and c (inverse L2 strength) > 0; got k={k}, c={c}")
    from chextrain.evaluation.probe import METHODS, PROBE_FILE, probe_run
    from chextrain.labels import SLUGS

    document = probe_run(run, data, split=split, k=k, c=c, batch_size=batch_size, num_workers=num_workers)
    console = Console()
    for method in METHODS:
        per_group = document["auc"][method]
        title = (
            f"{run.name}: {method} probe AUC on {split} (trained on {document['n_train']} "
            f"{document['train_split']} images, {document['num_features']} features)"
        )
        table = Table(title=title)
        table.add_column("pathology")
        for group in per_group:
            table.add_column(group, justify="right")
        for slug in [*SLUGS, "mean"]:
            table.add_row(slug, *(_fmt(per_group[g][slug]) for g in per_group))
        console.print(table)
    console.print(_pairs_table(document["pairs"], split))
    console.print(f"wrote {(run if run.is_dir() else run.parent) / PROBE_FILE}")


def _pairs_table(pairs: dict[str, Any], split: str) -> Table:
    from rich.table import Table

    table = Table(title=f"feature cosine similarity (centred) of x-ray/photo pairs on {split}")
    for column in ("photos", "same x-ray", "other x-ray", "gap", "pairs"):
        table.add_column(column, justify="left" if column == "photos" else "right")
    for name, entry in [("all", pairs), *pairs["by_kind"].items()]:
        table.add_row(
            name, _fmt(entry["pair"]), _fmt(entry["non_pair"]), _fmt(entry["gap"]), str(entry["n_pairs"])
        )
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
