"""`chextrain photo-sim`: turn x-ray images into simulated photos of them."""

from __future__ import annotations

from pathlib import Path

import typer

from chextrain.cli import checks

RECIPE_HELP = (
    "digital (CheXphoto's random digital, grey), photographic (glare, moire, tilt), phone (monitor in a room)"
)


def register(app: typer.Typer) -> None:
    """Add the `photo-sim` command."""
    app.command("photo-sim")(photo_sim)


def photo_sim(
    inputs: list[Path] = typer.Argument(..., help="X-ray images (JPEG, PNG, DICOM, ...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the simulated photos (created if needed)."),
    recipe: str = typer.Option("phone", "--recipe", "-r", help=RECIPE_HELP),
    level: int = typer.Option(1, "--level", "-l", min=1, max=4, help="Strength, 1 (CheXphoto's) to 4."),
    seed: int = typer.Option(0, "--seed", help="Seed; input number i uses the generator of (seed, i)."),
    corners: bool = typer.Option(
        False,
        "--corners",
        help="Also write STEM.json: the x-ray's corners in the photo (labelme, CheXphoto v1.1's layout).",
    ),
) -> None:
    """Simulate a photo of each input and write it to OUT as STEM.jpg (JPEG quality 95).

    Files that cannot be read or written are reported and skipped; the exit code is then 1.

    Input number i uses the random generator of (seed, i): its photo does not depend on the others.
    With --corners, STEM.json beside each photo holds where the x-ray lies in it (a labelme
    polygon, points TR, BR, BL, TL as CheXphoto v1.1 stores them); the photos are the same.
    """
    with checks.reported():
        checks.out_dir(out)
    import numpy as np
    from PIL import Image
    from rich.console import Console

    from chextrain.data.corners import write_labelme
    from chextrain.data.images import ImageLoadError, load_image
    from chextrain.data.photo import RECIPES, simulate_photo_with_corners

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    with checks.reported():
        if recipe not in RECIPES:
            raise checks.ArgumentError(f"--recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    out.mkdir(parents=True, exist_ok=True)
    sources = {p.resolve() for p in inputs}
    targets = _targets(inputs, out)
    failed = 0
    for index, (path, target) in enumerate(zip(inputs, targets, strict=True)):
        try:
            if target.resolve() in sources:
                raise ValueError(f"{path}: writing {target} would overwrite an input")
            image = load_image(path)
            rng = np.random.default_rng([seed, index])
            photo, quad = simulate_photo_with_corners(image, recipe, level, rng)
            Image.fromarray(photo).save(target, "JPEG", quality=95)
            if corners:
                h, w = photo.shape[:2]
                write_labelme(target.with_suffix(".json"), quad, w, h, target.name)
        except (ImageLoadError, ValueError) as e:
            failed += 1
            err.print(f"[red]error:[/red] {e}")
        except OSError as e:
            failed += 1
            err.print(f"[red]error:[/red] {path}: cannot write {target}: {e.strerror or e}")
    done = len(inputs) - failed
    summary = f"wrote {done} of {len(inputs)} simulated photos ({recipe}, level {level}) to {out}"
    Console(soft_wrap=True, highlight=False).print(summary)
    if failed:
        raise typer.Exit(1)


def _targets(inputs: list[Path], out: Path) -> list[Path]:
    """OUT/STEM.jpg per input; a repeated stem (view1_frontal is everywhere) gets -2, -3, ..."""
    used: set[str] = set()
    targets = []
    for path in inputs:
        name, n = f"{path.stem}.jpg", 1
        while name in used:
            n += 1
            name = f"{path.stem}-{n}.jpg"
        used.add(name)
        targets.append(out / name)
    return targets
