"""`chextrain convert xrv NAME|FILE`: torchxrayvision weights -> a chextrain bundle, once and explicitly.

XRV's files are pickles; the command unpickles one only with `--trust-pickle` and otherwise says
what the file holds and why the flag is needed (models/xrv.py). The library code, torch and
torchxrayvision with it, is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the `convert` group (its command: `xrv`) to the app."""
    group = typer.Typer(help="Convert foreign weights into chextrain bundles.", no_args_is_help=True)
    group.command("xrv")(xrv)
    app.add_typer(group, name="convert")


def xrv(
    source: str = typer.Argument(
        ...,
        help="XRV weights name (e.g. densenet121-res224-all, read from XRV's cache) or a weights file.",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Bundle folder to write (default for a named weights: where `init: xrv:NAME` looks).",
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow unpickling the file (XRV's files are pickles: trust the source)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="XRV's weights folder (default ~/.torchxrayvision/models_data)."
    ),
) -> None:
    """Write a bundle from torchxrayvision weights: encoder, 5-pathology head, XRV's input."""
    from rich.console import Console

    from chextrain.models.xrv import convert_xrv

    folder, meta = convert_xrv(
        source, out, trust_pickle=trust_pickle, cache_dir=cache_dir
    )  # errors: one line
    info = meta["xrv"]
    rows = ", ".join(
        f"{slug} <- {row['label']} (row {row['row']})" if row else f"{slug} <- none (starts at 0)"
        for slug, row in info["head_rows"].items()
    )
    console = Console(soft_wrap=True, highlight=False)
    console.print(f"wrote {folder}: XRV {info['weights'] or info['source']} ({info['class']})", markup=False)
    console.print(f"  head rows: {rows}", markup=False)
    thresholds = meta["thresholds"]["shared"]
    console.print(
        f"  thresholds: XRV's operating points for {sorted(thresholds)}"
        if thresholds
        else "  thresholds: 0.5 (the weights carry no operating points)",
        markup=False,
    )
    console.print(
        f"  input: XRV's (grey in [-1024, 1024], centre crop) at {meta['image_size']} px", markup=False
    )
    use = f"init: xrv:{info['weights']}" if info["weights"] and out is None else f"init: {folder}"
    console.print(f"  start a stage from it with `{use}`", markup=False)
