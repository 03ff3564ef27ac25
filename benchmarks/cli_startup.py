"""CLI start-up benchmark: `chextrain --help` and `chextrain predict` against the imports they cannot avoid.

Usage: python benchmarks/cli_startup.py [--rounds 7]

Five commands run as fresh subprocesses, side by side in alternating rounds (one warm-up round
first; the order rotates every round so that no command always follows another):

    help       chextrain --help
    typer      python -c "import typer"
    renderer   python -c "import typer, typer.rich_utils"   (typer + its rich help renderer)
    predict    chextrain predict BUNDLE IMAGE --format json
    reference  python -c "import torch; load_bundle(BUNDLE)"   (torch + reading the bundle)

BUNDLE is a random-init "tiny" two-head bundle with a router, IMAGE one demo x-ray, both written
to a temporary folder (nothing is downloaded). Prints the median wall time of each, the ratios
help / typer (target <= 1.5) and predict / reference (target <= 1.3), whether each target is
met, and whether `predict` imported Lightning or torchvision.ops (it must not; read from
`python -X importtime`). `renderer` is the floor of any Typer app's --help when rich is installed
(Typer then formats help with typer.rich_utils, which imports rich and markdown-it); help / renderer
is printed for that reason.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELP_TARGET = 1.5
PREDICT_TARGET = 1.3
FORBIDDEN = ("lightning", "torchvision.ops")  # modules `chextrain predict` must never import


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """A seeded tiny bundle and one demo x-ray (JPEG) in `folder`."""
    import torch

    from chextrain.data.demo import write_demo
    from chextrain.models.bundle import save_bundle
    from chextrain.models.net import CXRNet

    torch.manual_seed(0)
    bundle = save_bundle(
        CXRNet("tiny", heads=["digital", "photo"], router=True), folder / "bundle", {"image_size": 64}
    )
    write_demo(folder / "demo", digital=4, photos=0, valid=1, size=64, seed=0, workers=1, progress=False)
    image = sorted((folder / "demo").glob("CheXpert-v1.0-small/valid/*/*/*.jpg"))[0]
    return bundle, image


def chextrain_command() -> list[str]:
    """The installed console script next to this Python, else `python -m chextrain.cli`."""
    script = Path(sys.executable).with_name("chextrain")
    return [str(script)] if script.exists() else [sys.executable, "-m", "chextrain.cli"]


def run(command: list[str]) -> float:
    """Wall seconds of one subprocess run (output discarded; a failure stops the benchmark)."""
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_times(commands: dict[str, list[str]], rounds: int) -> dict[str, float]:
    """Median seconds per command over `rounds` alternating rounds (after one warm-up round)."""
    names = list(commands)
    for name in names:
        run(commands[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(run(commands[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def imported_modules(command: list[str]) -> set[str]:
    """Names of the modules `command` imports, from `python -X importtime` (command = python + args)."""
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, check=True
    )
    return {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median taken)")
    args = parser.parse_args()
    cli = chextrain_command()
    with tempfile.TemporaryDirectory() as tmp:
        bundle, image = make_inputs(Path(tmp))
        commands = {
            "help": [*cli, "--help"],
            "typer": [sys.executable, "-c", "import typer"],
            "renderer": [sys.executable, "-c", "import typer, typer.rich_utils"],
            "predict": [*cli, "predict", str(bundle), str(image), "--format", "json"],
            "reference": [
                sys.executable,
                "-c",
                "import sys, torch; from chextrain.models.bundle import "
                "load_bundle; load_bundle(sys.argv[1])",
                str(bundle),
            ],
        }
        medians = median_times(commands, args.rounds)
        modules = imported_modules([sys.executable, "-m", "chextrain.cli", *commands["predict"][len(cli) :]])
    print(f"CLI start-up: median of {args.rounds} alternating rounds, Python {sys.version.split()[0]}")
    for name, command in commands.items():
        shown = " ".join(Path(c).name if c in (sys.executable, cli[0]) else c for c in command)
        print(f"  {name:<10} {1000 * medians[name]:8.0f} ms   {shown[:90]}")
    ratios = [
        ("chextrain --help / import typer", medians["help"] / medians["typer"], HELP_TARGET),
        ("chextrain --help / import typer + help renderer", medians["help"] / medians["renderer"], None),
        (
            "chextrain predict / (import torch + bundle)",
            medians["predict"] / medians["reference"],
            PREDICT_TARGET,
        ),
    ]
    for label, ratio, target in ratios:
        verdict = (
            "for reference"
            if target is None
            else f"target <= {target}: " + ("met" if ratio <= target else "NOT met")
        )
        print(f"{label + ':':<50} {ratio:5.2f}  ({verdict})")
    for name in FORBIDDEN:
        label = f"chextrain predict imports {name}:"
        print(f"{label:<50} {'YES (it must not)' if name in modules else 'no'}")


if __name__ == "__main__":
    main()
