"""`chextrain info BUNDLE`: what a bundle says about itself, read from its files without torch.

Architecture, heads, router, pathologies, preprocessing, thresholds, OOD calibration, training
data and metrics per kind come from model.json; the weights file is checked from its header
(complete, tensors and values), never loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from chextrain.cli import checks


def register(app: typer.Typer) -> None:
    """Add `info` to the app."""
    app.command("info")(info)


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def info(
    bundle: Path = typer.Argument(..., help="A bundle: the folder holding model.json + model.safetensors."),
    as_json: bool = typer.Option(False, "--json", help="Print model.json's summary as JSON (no OOD arrays)."),
) -> None:
    """Describe a bundle: architecture, heads, router, preprocessing, thresholds, OOD, training, metrics."""
    with checks.reported():
        checks.bundle(bundle)
    from chextrain.models.card import info_text
    from chextrain.models.meta import (
        CARD_FILE,
        WEIGHTS_FILE,
        meta_path_of,
        read_bundle_meta,
        read_safetensors_header,
        tensor_summary,
    )

    meta_path = meta_path_of(bundle)
    meta = read_bundle_meta(meta_path)
    weights = meta_path.parent / WEIGHTS_FILE
    tensors = tensor_summary(read_safetensors_header(weights))
    if as_json:
        summary = {k: v for k, v in meta.items() if k not in ("ood", "config")}
        summary["ood"] = {k: v for k, v in (meta.get("ood") or {}).items() if k != "groups"} or None
        typer.echo(json.dumps({"bundle": str(meta_path.parent), "weights": tensors, **summary}, indent=2))
        return
    files = {p.name: _size(p) for p in (meta_path, weights, meta_path.parent / CARD_FILE) if p.is_file()}
    typer.echo(info_text(meta, str(meta_path.parent), files, tensors))
