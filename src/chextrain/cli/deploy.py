"""`chextrain serve | export`: put a trained bundle behind the web page and API, or into ONNX.

Arguments are checked (cli/checks.py, cli/use.py's bundle options) before torch, uvicorn or the
serving code is imported, as for predict and explain.
"""

from __future__ import annotations

from pathlib import Path

import typer

from chextrain.cli import checks
from chextrain.cli.use import (
    BUNDLE_ARG,
    DOMAIN_OPT,
    ONNX_OPT,
    RUNTIME_OPT,
    check_bundle_options,
    fail,
    load_predictor,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(app: typer.Typer) -> None:
    """Add serve and export to the app."""
    app.command("serve")(serve)
    app.command("export")(export)


def serve(
    bundle: Path = BUNDLE_ARG,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    runtime: str = RUNTIME_OPT,
    onnx: Path | None = ONNX_OPT,
    domain: str = DOMAIN_OPT,
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest upload accepted (413 above)."),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", help="Largest image accepted, w x h."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    corners: Path | None = typer.Option(
        None,
        "--corners",
        help="A corner model's bundle (`objective: corners`) that finds the radiograph's outline in "
        "photos; default: BUNDLE/corners when it exists, else OpenCV's classical finder.",
    ),
) -> None:
    """Serve the web page and the JSON API (/api/predict, /api/explain, /api/health, /docs)."""
    from rich.console import Console
    from rich.markup import escape

    with checks.reported():
        check_bundle_options(bundle, runtime, domain)
        if corners is not None:
            checks.bundle(corners)
        checks.port_free(host, port)  # before "serving ... on": a port in use is said first
    import torch
    import uvicorn

    from chextrain.serve.app import create_app

    if threads:
        torch.set_num_threads(threads)
    from chextrain.rectify import CornerModel

    predictor = load_predictor(bundle, runtime, domain, onnx)
    beside = (bundle if bundle.is_dir() else bundle.parent) / "corners"
    if corners is None and (beside / "model.json").is_file():
        corners = beside
    corner_model = None if corners is None else CornerModel.load(corners)
    app = create_app(
        predictor,
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        corner_model=corner_model,
    )
    console = Console(stderr=True)
    if host not in LOOPBACK:
        console.print(
            f"[yellow]warning[/yellow]: binding {host}: the service is reachable from other "
            "machines and has no authentication"
        )
    outline = "classical outline finder" if corners is None else f"corner model {escape(str(corners))}"
    console.print(
        f"serving {escape(str(bundle))} ({predictor.runtime.name}, {outline}) on http://{host}:{port}/"
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


def export(
    bundle: Path = BUNDLE_ARG,
    onnx: Path = typer.Option(
        ...,
        "--onnx",
        help="The ONNX file to write (BUNDLE/model.onnx is found by predict/serve --runtime onnx).",
    ),
    opset: int = typer.Option(17, "--opset", min=17, help="ONNX opset."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare with PyTorch on random inputs."),
) -> None:
    """Export all heads, the router and the features to ONNX (dynamic batch axis), meta included."""
    from rich.console import Console
    from rich.markup import escape

    with checks.reported():
        checks.bundle(bundle)
        checks.out_file(onnx, "--onnx")
    import torch

    from chextrain.export import OnnxRuntime, export_onnx, max_prob_difference, weights_sha256
    from chextrain.models.bundle import load_bundle

    model, meta = load_bundle(bundle)
    export_onnx(model, meta, onnx, opset=opset, sha256=weights_sha256(bundle))
    console = Console()
    console.print(f"wrote {escape(str(onnx))} ({onnx.stat().st_size / 1e6:.1f} MB, opset {opset})")
    if check:
        size = int(meta["image_size"])
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        diff = max_prob_difference(model, OnnxRuntime(onnx), x)
        console.print(f"max |probability difference| vs PyTorch on 2 random inputs: {diff:.2e}")
        if diff > 1e-4:
            raise fail(f"ONNX output differs from PyTorch by {diff:.2e} > 1e-4", 1)
