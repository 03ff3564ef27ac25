"""`make gpu-check`: every GPU code path end to end, in one command; exit 1 on the first failure.

    python scripts/gpu_check.py [--keep DIR]

Without CUDA it prints why it skips and exits 0. With CUDA it writes a small demo tree, runs the
two-stage study configs/studies/gpu_check.yaml (DenseNet-121, bf16, both stages reading one
prepared image store), then on the routed stage's bundle: `chextrain evaluate`, `chextrain
predict` (torch), `chextrain export` and `chextrain predict --runtime onnx`, and checks what each
wrote: metrics, OOD calibration, one decision per image, and ONNX probabilities within 1e-3 of
PyTorch's. Every step is a subprocess of the installed `chextrain` command, as a user runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "studies" / "gpu_check.yaml"
STAGES = ("base", "routed")
ONNX_TOLERANCE = 1e-3


class CheckFailedError(RuntimeError):
    """A step of the check failed; the message says which and why."""


def chextrain(*args: str) -> str:
    """Run `python -m chextrain.cli ARGS` (the `chextrain` command): its stdout, or CheckFailedError."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "chextrain.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    verdict = "ok" if done.returncode == 0 else "FAILED"
    print(f"  {verdict} ({time.time() - t0:5.1f} s)  chextrain {' '.join(args)}")
    if done.returncode != 0:
        raise CheckFailedError(
            f"`chextrain {' '.join(args)}` exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


def require(condition: bool, what: str) -> None:
    """Raise CheckFailedError(what) unless condition holds."""
    if not condition:
        raise CheckFailedError(what)


def probabilities(results: list[dict]) -> dict[str, list[float]]:
    """name -> the five probabilities of a `predict --format json` answer."""
    return {r["name"]: [p["prob"] for p in r["pathologies"].values()] for r in results if "error" not in r}


def run_checks(work: Path) -> None:
    """The whole check in `work` (demo data, store, study, exports)."""
    data, out, store = work / "data", work / "study", work / "store"
    chextrain(
        "data", "synth", str(data), "--digital", "96", "--photos", "96", "--valid", "12", "--size", "160"
    )
    chextrain(
        "study",
        "run",
        str(STUDY),
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        f"store={store}",
        "--no-progress",
    )
    for name in STAGES:
        done = out / "stages" / name / "done.json"
        require(done.exists(), f"stage {name} did not finish ({done} missing)")
    builds = [b for f in store.rglob("builds.json") for b in json.loads(f.read_text())]
    decoded = sum(b["decoded"] for b in builds)
    images = len([p for p in data.rglob("*.jpg")])
    require(decoded <= images, f"the store decoded {decoded} images for {images} files: some twice")
    print(f"  ok  store: {decoded} decodes for {images} image files over {len(builds)} builds")
    bundle = out / "stages" / "routed"
    meta = json.loads((bundle / "model.json").read_text())
    require(meta.get("ood") is not None, "the routed bundle has no OOD calibration")
    require(bool(meta.get("thresholds")), "the routed bundle has no tuned thresholds")
    chextrain("evaluate", str(bundle), "--data", str(data), "--split", "test")
    metrics = json.loads((bundle / "metrics_test.json").read_text())
    require(metrics["n"] > 0 and "Standard" in metrics["groups"], "evaluate wrote no Standard group metrics")
    images_dir = data / "CheXphoto-v1.0" / "valid"
    torch_out = json.loads(chextrain("predict", str(bundle), str(images_dir), "--format", "json"))
    require(len(torch_out) > 0 and all("error" not in r for r in torch_out), "predict failed on some images")
    onnx_file = work / "model.onnx"
    chextrain("export", str(bundle), "--onnx", str(onnx_file))
    onnx_out = json.loads(
        chextrain(
            "predict",
            str(bundle),
            str(images_dir),
            "--format",
            "json",
            "--runtime",
            "onnx",
            "--onnx",
            str(onnx_file),
        )
    )
    a, b = probabilities(torch_out), probabilities(onnx_out)
    require(a.keys() == b.keys(), "torch and onnx predicted different sets of images")
    worst = max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))
    require(worst <= ONNX_TOLERANCE, f"onnx and torch probabilities differ by {worst:.2e} > {ONNX_TOLERANCE}")
    print(f"  ok  onnx vs torch: max |prob difference| {worst:.1e} over {len(a)} images")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keep", type=Path, default=None, help="work here and keep the files (default: a temp dir)"
    )
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check skipped: no CUDA device here (torch.cuda.is_available() is False); "
            "run `make gpu-check` on a machine with an NVIDIA GPU."
        )
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    t0 = time.time()
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            run_checks(args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
                run_checks(Path(tmp))
    except CheckFailedError as err:
        print(f"gpu-check FAILED after {time.time() - t0:.0f} s: {err}")
        return 1
    print(f"gpu-check passed in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
