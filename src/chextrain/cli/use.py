"""`chextrain predict | explain | quality calibrate`: use a trained bundle (serve and export: cli/deploy.py).

Each command checks its arguments (cli/checks.py) before it imports torch or the inference code,
so a wrong path or option is reported at once; `predict`, `explain` and `serve` never import
Lightning, and with a model that needs no torchvision backbone not torchvision either.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from chextrain.cli import checks, print_error
from chextrain.cli.results import csv_text, print_table

if TYPE_CHECKING:
    from chextrain.inference import Predictor

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm", ".dicom", ".heic", ".heif"}
)
FORMATS: tuple[str, ...] = ("table", "json", "csv")
# The library's choices (inference.DOMAINS, inference.RUNTIMES, evaluation.saliency.METHODS), here so
# that a wrong one is refused before torch is imported; tests/test_cli_checks.py keeps them equal.
DOMAINS: tuple[str, ...] = ("auto", "digital", "photo")
RUNTIMES: tuple[str, ...] = ("torch", "onnx")
METHODS: tuple[str, ...] = ("gradient", "gradcam")
PROGRESS_MIN_FILES = 32  # fewer files: no progress bar

BUNDLE_ARG = typer.Argument(..., help="A bundle: the folder holding model.json + model.safetensors.")
DOMAIN_OPT = typer.Option("auto", "--domain", help="auto (the router picks the head), digital or photo.")
RUNTIME_OPT = typer.Option("torch", "--runtime", help="torch (eager PyTorch) or onnx (onnxruntime).")
ONNX_OPT = typer.Option(
    None,
    "--onnx",
    help="ONNX file for --runtime onnx (default: BUNDLE/model.onnx, else an export made in memory).",
)


def register(app: typer.Typer) -> None:
    """Add predict, explain and `quality calibrate` to the app."""
    app.command("predict")(predict)
    app.command("explain")(explain)
    quality = typer.Typer(help="The photo quality gate: its thresholds.", no_args_is_help=True)
    quality.command("calibrate")(quality_calibrate)
    app.add_typer(quality, name="quality")


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `message` as the error line; the Exit (code 2: bad input, 1: failed run) to raise."""
    print_error(message)
    return typer.Exit(code)


def check_bundle_options(bundle: Path, runtime: str, domain: str) -> None:
    """What Predictor.from_bundle refuses first, in its order, checked without importing it."""
    checks.choice(runtime, RUNTIMES, "runtime")
    checks.bundle(bundle)
    checks.choice(domain, DOMAINS, "domain")


def load_predictor(
    bundle: Path, runtime: str, domain: str, onnx: Path | None = None, calibrated: bool = True
) -> Predictor:
    """The bundle's Predictor (inference imported here, once the arguments are checked)."""
    from chextrain.inference import Predictor

    return Predictor.from_bundle(
        bundle, runtime=runtime, domain=domain, onnx_path=onnx, calibrated=calibrated
    )


def collect_inputs(args: Sequence[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named, found under folders (recursively, by image suffix) or matched by globs.

    Returns (files in order without repeats, [{"name", "error"}] for arguments matching nothing).
    """
    files: list[Path] = []
    problems: list[dict[str, str]] = []

    def add_folder(folder: Path) -> None:
        found = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            problems.append({"name": str(folder), "error": "folder holds no image files"})
        files.extend(found)

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            add_folder(path)
        elif path.exists():
            files.append(path)  # named explicitly: any suffix, the content is sniffed
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                problems.append({"name": arg, "error": "no file matches this pattern"})
            for m in map(Path, matches):
                add_folder(m) if m.is_dir() else files.append(m)
        else:
            problems.append({"name": arg, "error": "no such file or folder"})
    return list(dict.fromkeys(files)), problems


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_predictions(
    predictor: Predictor,
    files: list[Path],
    *,
    batch_size: int,
    tta: bool,
    show_progress: bool,
    score_anyway: bool = False,
) -> list[dict[str, Any]]:
    """Load and predict `files` in batches; a file that cannot be read gets {"name", "error"}.

    Flagged images have their findings withheld unless `score_anyway` (decisions.withhold).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from chextrain.data.images import ImageLoadError, load_image

    out: list[dict[str, Any]] = []
    columns = (TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True, disable=not show_progress) as bar:
        task = bar.add_task("predict", total=len(files))
        for chunk in _chunks(files, batch_size):
            slots: list[dict[str, Any] | None] = []
            images, names = [], []
            for f in chunk:
                try:
                    images.append(load_image(f, truncated="error"))
                    names.append(str(f))
                    slots.append(None)
                except ImageLoadError as err:
                    slots.append({"name": str(f), "error": err.reason})
            results = iter(
                predictor.predict_images(
                    images, names, tta=tta, batch_size=batch_size, score_anyway=score_anyway
                )
            )
            out.extend(slot if slot is not None else next(results) for slot in slots)
            bar.advance(task, len(chunk))
    return out


def predict(
    bundle: Path = BUNDLE_ARG,
    paths: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or globs."),
    domain: str = DOMAIN_OPT,
    output_format: str = typer.Option("table", "--format", help="table, json or csv."),
    tta: bool = typer.Option(False, "--tta", help="Average over small zooms and shifts (no flips)."),
    runtime: str = RUNTIME_OPT,
    onnx: Path | None = ONNX_OPT,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    out: Path | None = typer.Option(None, "--out", help="Write the json/csv/table here instead of stdout."),
    calibration: bool = typer.Option(
        True,
        "--calibration/--no-calibration",
        help="Apply the bundle's temperature per head (--no-calibration: the raw probabilities).",
    ),
    score_anyway: bool = typer.Option(
        False,
        "--score-anyway",
        help="Show the findings of flagged images (OOD, unsure router, poor photo), withheld otherwise.",
    ),
) -> None:
    """Predict the five findings for images; the router picks the head (exit code 1 if any file failed)."""
    from rich.console import Console
    from rich.markup import escape

    with checks.reported():
        checks.choice(output_format, FORMATS, "--format")
        check_bundle_options(bundle, runtime, domain)
        if out is not None:
            checks.out_file(out)
    from chextrain.fileio import atomic_write_text

    files, problems = collect_inputs(paths)
    predictor = load_predictor(bundle, runtime, domain, onnx, calibration)
    show = len(files) >= PROGRESS_MIN_FILES
    results = problems + run_predictions(
        predictor, files, batch_size=batch_size, tta=tta, show_progress=show, score_anyway=score_anyway
    )
    if output_format == "json":
        text = json.dumps(results, indent=2) + "\n"
    elif output_format == "csv":
        text = csv_text(results)
    else:
        console = Console(file=io.StringIO(), width=200) if out else Console()
        print_table(results, console, score_options(tta, domain, score_anyway, calibration, predictor.meta))
        text = console.file.getvalue() if out else ""
    err = Console(stderr=True, highlight=False)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        err.print(f"wrote {len(results)} results ({output_format}) to {escape(str(out))}")
    elif text:
        typer.echo(text, nl=False)
    failed = [r for r in results if "error" in r]
    if failed:
        err.print(f"[red]{len(failed)} of {len(results)} inputs failed[/red]")
        raise typer.Exit(1)


def score_options(
    tta: bool,
    domain: str,
    score_anyway: bool = False,
    calibration: bool = True,
    meta: dict[str, Any] | None = None,
) -> list[str]:
    """The options that changed the scores, said under the table."""
    from chextrain.tta import TTA_VIEWS

    found = [f"--tta (the mean of {len(TTA_VIEWS)} zoomed and shifted views)"] if tta else []
    if domain != "auto":
        found.append(f"--domain {domain} (every image scored by the {domain} head; the router was not asked)")
    if not calibration and (meta or {}).get("temperature"):
        found.append("--no-calibration (raw probabilities; the bundle's temperatures were not applied)")
    if score_anyway:
        found.append("--score-anyway (flagged images scored; their findings are not to be trusted)")
    return found


def explain(
    bundle: Path = BUNDLE_ARG,
    image: Path = typer.Argument(..., help="The image to explain."),
    out: Path = typer.Option(..., "--out", help="Folder for the overlays, the grid and the prediction JSON."),
    method: str = typer.Option(
        "gradcam", "--method", help="gradcam (last block) or gradient (vanilla, the paper's)."
    ),
    domain: str = DOMAIN_OPT,
    score_anyway: bool = typer.Option(
        False, "--score-anyway", help="Title the maps of a flagged image with its probabilities anyway."
    ),
) -> None:
    """Write a saliency overlay per pathology and a grid of all five, titled with the probabilities."""
    from rich.console import Console
    from rich.markup import escape

    with checks.reported():
        checks.choice(method, METHODS, "--method")
        check_bundle_options(bundle, "torch", domain)
        checks.out_dir(out)
    from chextrain.data.images import ImageLoadError, load_image

    try:
        pixels = load_image(image, truncated="error")
    except ImageLoadError as err:
        raise fail(str(err), 1) from None
    import torch

    from chextrain.evaluation.saliency import blank_notes, explain_maps, save_explanation
    from chextrain.fileio import write_json
    from chextrain.labels import SLUGS

    predictor = load_predictor(bundle, "torch", domain)
    result = predictor.predict_images([pixels], [str(image)], score_anyway=score_anyway)[0]
    with torch.enable_grad():
        x = predictor.inputs(pixels)  # 1 x 3 x S x S
        maps, how = explain_maps(predictor.model, x, result["head"], method)
    maps = maps[0]  # 5 x S x S
    notes = blank_notes(maps, str(how["method"]))
    # a withheld image's maps carry no probabilities: nothing on them reads as a finding
    probs = None if result["withheld"] else [p["prob"] for p in result["pathologies"].values()]
    thresholds = None if result["withheld"] else [p["threshold"] for p in result["pathologies"].values()]
    title = f"{image.name}: head {result['head']}, {how['method']}" + (
        f" on {how['layer']}" if how["layer"] else ""
    )
    if result["withheld"]:
        title += f" (not scored: {result['withheld_reason']})"
    elif result["flagged"]:
        title += " (FLAGGED, scored anyway)"
    paths = save_explanation(
        pixels,
        maps,
        probs,
        out,
        image.stem,
        resize=predictor.preprocessing.resize,
        title=title,
        thresholds=thresholds,
        notes=notes,
    )
    saliency = {**how, "notes": dict(zip(SLUGS, notes, strict=True))}
    write_json(
        out / f"{image.stem}.json", {**result, "method": how["method"], "saliency": saliency}, newline=True
    )
    console = Console()
    for w in result["warnings"]:
        console.print(f"[yellow]warning[/yellow]: {escape(w)}")
    if result["withheld"]:
        console.print(f"[yellow]not scored[/yellow]: {escape(result['withheld_reason'])}")
    if how["note"]:
        console.print(f"note: {escape(str(how['note']))}")
    console.print(f"wrote {len(paths) + 1} files to {escape(str(out))} (grid: {escape(paths[-1].name)})")


def quality_calibrate(
    bundle: Path | None = typer.Option(
        None, "--bundle", help="Write the thresholds into this bundle's model.json (key quality)."
    ),
    images: int = typer.Option(24, "--images", min=2, help="Synthetic radiographs to degrade."),
    seed: int = typer.Option(0, "--seed", help="Seed of the radiographs and the photo effects."),
) -> None:
    """Choose the photo quality thresholds on simulated photos of increasing severity; print the table."""
    from rich.console import Console
    from rich.markup import escape

    with checks.reported():
        if bundle is not None:
            checks.bundle(bundle)
    from chextrain.quality_calibration import (
        calibrate,
        calibration_images,
        calibration_text,
        write_thresholds,
    )

    cal = calibrate(calibration_images(images, seed), seed)
    typer.echo(calibration_text(cal), nl=False)
    if bundle is not None:
        path = write_thresholds(bundle, cal)
        Console(stderr=True).print(f"wrote the quality thresholds into {escape(str(path))}")
