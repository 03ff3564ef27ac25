"""Inference benchmark: eager PyTorch vs onnxruntime on the CPU, in one run, on the same inputs.

Usage: python benchmarks/inference.py [--backbone densenet121] [--threads N] [--repeats 10]

Both runtimes run what `Predictor` runs (inference.ScoringNet: all heads, the router and the
OOD features) on a random-init two-head model (nothing is downloaded). Measured: median
latency at batch 1 for 224 and 320 px, and throughput (images/s) at batch 16 for 320 px, with
the same number of threads for both. Prints each figure and the ratio onnxruntime / eager
(target: latency ratio <= 0.7).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from chextrain.export import OnnxRuntime, export_onnx
from chextrain.inference import TorchRuntime
from chextrain.models.net import CXRNet


def timed(run: Callable[[np.ndarray], object], x: np.ndarray, warmup: int, repeats: int) -> float:
    """Median seconds of run(x) over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="densenet121")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for both runtimes")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls at batch 1 (batch 16: a third)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CXRNet(args.backbone, heads=["digital", "photo"], router=True).eval()
    eager = TorchRuntime(model)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, batch in ((224, 1), (320, 1), (320, 16)):
            path = Path(tmp) / f"m{size}.onnx"
            if not path.exists():
                export_onnx(model, {"image_size": size}, path)
            ort = OnnxRuntime(path, threads=args.threads)
            x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
            diff = float(np.abs(ort(x)["probs"] - eager(x)["probs"]).max())
            repeats = args.repeats if batch == 1 else max(2, args.repeats // 3)
            t_eager = timed(eager, x, 2 if batch == 1 else 1, repeats)
            t_ort = timed(ort, x, 2 if batch == 1 else 1, repeats)
            rows.append((size, batch, t_eager, t_ort, diff))
    print(
        f"inference benchmark: {args.backbone} (random init, 2 heads + router + OOD features), "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    print(f"{'size':>5} {'batch':>5} {'eager':>12} {'onnxruntime':>12} {'ratio':>6}  max|dprob|")
    for size, batch, t_eager, t_ort, diff in rows:
        if batch == 1:
            cells = f"{1000 * t_eager:9.1f} ms {1000 * t_ort:9.1f} ms"
        else:
            cells = f"{batch / t_eager:7.1f} img/s {batch / t_ort:7.1f} img/s"
        print(f"{size:>5} {batch:>5} {cells} {t_ort / t_eager:6.2f}  {diff:.1e}")
    worst = max(t_ort / t_eager for _, batch, t_eager, t_ort, _ in rows if batch == 1)
    print(f"latency ratio onnxruntime / eager (batch 1, worst size): {worst:.2f} (target <= 0.70)")


if __name__ == "__main__":
    main()
