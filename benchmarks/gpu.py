"""GPU training throughput of DenseNet-121 at 320 px, and what feeding it from the store costs.

    python benchmarks/gpu.py [--size 320] [--batches 16 64 128] [--steps 30] [--images 4096]

(a) img/s of a training step (forward, masked BCE, backward, Adam) on in-memory batches, at each
    batch size, for fp32, bf16 autocast, bf16 + channels_last and bf16 + channels_last +
    torch.compile; peak GPU memory of each (torch.cuda.max_memory_allocated).
(b) end to end from the prepared image store: a store of --images generated 320 px x-rays, the
    stage's loader (uint8 batches, workers, pinned memory), `to_network_input` on the device and
    the same step, against the step alone in alternating rounds: the ratio says what the data
    path costs (target >= 0.9).
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def train_step(model, opt, precision: str, channels_last: bool) -> Callable:  # noqa: ANN001
    """One optimiser step on (x float B x 3 x S x S on the device, target B x 5)."""
    import torch

    from chextrain.training.objectives.supervised import masked_bce

    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(x, target) -> None:  # noqa: ANN001
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model.forward_all(x)["logits"][:, 0]
        loss = masked_bce(logits, target, torch.ones_like(target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def rate(step: Callable, make_batch: Callable, batch: int, steps: int) -> float:
    """img/s over `steps` steps after 5 warm-up steps (synchronised)."""
    import torch

    for _ in range(5):
        step(*make_batch())
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step(*make_batch())
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def model_and_opt(channels_last: bool, compiled: bool):  # noqa: ANN201
    import torch

    from chextrain.models.net import CXRNet

    torch.manual_seed(0)
    model = CXRNet("densenet121").cuda().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if compiled:
        model.forward_all = torch.compile(model.forward_all)
    return model, opt


def throughput(size: int, batches: list[int], steps: int) -> None:
    import torch

    configs = [
        ("fp32", "fp32", False, False),
        ("bf16", "bf16", False, False),
        ("bf16 + channels_last", "bf16", True, False),
        ("bf16 + channels_last + compile", "bf16", True, True),
    ]
    print(f"(a) DenseNet-121 training step at {size} px, img/s (peak GPU memory)")
    print("    " + f"{'config':<32}" + "".join(f"{f'batch {b}':>22}" for b in batches))
    for name, precision, cl, compiled in configs:
        cells = []
        for b in batches:
            model, opt = model_and_opt(cl, compiled)
            step = train_step(model, opt, precision, cl)
            x = torch.randn(b, 3, size, size, device="cuda")
            target = (torch.rand(b, 5, device="cuda") > 0.5).float()
            torch.cuda.reset_peak_memory_stats()
            try:
                r = rate(step, lambda x=x, target=target: (x, target), b, steps)
                peak = torch.cuda.max_memory_allocated() / 2**30
                cells.append(f"{r:8.0f} ({peak:5.1f} GiB)")
            except torch.cuda.OutOfMemoryError:
                cells.append(f"{'out of memory':>20}")
            del model, opt, step, x
            torch.cuda.empty_cache()
        print("    " + f"{name:<32}" + "".join(f"{c:>22}" for c in cells))


def end_to_end(size: int, batch: int, steps: int, n_images: int, workers: int) -> None:
    import torch

    from chextrain.data.dataset import CatalogDataset
    from chextrain.data.loader import make_loader
    from chextrain.data.store import ImageStore
    from chextrain.data.transforms import Decoding, to_network_input
    from imagepool import SMALL, catalog_rows, write_jpegs

    print(
        f"\n(b) end to end from the store: {n_images} images at {size} px, batch {batch}, {workers} workers"
    )
    with tempfile.TemporaryDirectory() as tmp:
        pool = write_jpegs(Path(tmp) / "pool", 64, SMALL)  # hard links: n_images files, 64 pictures
        files = []
        for i in range(n_images):
            files.append(Path(tmp) / "data" / "train" / f"patient{i:05d}" / "study1" / "view1_frontal.jpg")
            files[-1].parent.mkdir(parents=True)
            os.link(pool[i % len(pool)], files[-1])
        rows = catalog_rows(files)
        store = ImageStore(Path(tmp) / "store", Decoding(size), progress=False)
        t = time.perf_counter()
        images = store.prepare(rows["path"].tolist())
        print(
            f"    store build: {n_images / (time.perf_counter() - t):.0f} img/s on {store.workers} processes"
        )
        dataset = CatalogDataset(rows, image_size=size, images=images)
        loader = make_loader(dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=True)
        model, opt = model_and_opt(True, False)
        step = train_step(model, opt, "bf16", True)
        spec = dataset.spec
        fixed = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device="cuda")
        target = torch.zeros(batch, 5, device="cuda")
        batches = iter(())

        def from_loader() -> tuple:
            nonlocal batches
            try:
                b = next(batches)
            except StopIteration:
                batches = iter(loader)
                b = next(batches)
            x = to_network_input(b["image"].cuda(non_blocking=True), spec)
            return x, b["target"].cuda(non_blocking=True)

        raw, e2e = [], []
        for _ in range(3):
            raw.append(rate(step, lambda: (to_network_input(fixed, spec), target), batch, steps))
            e2e.append(rate(step, from_loader, batch, steps))
        ratio = np.median(e2e) / np.median(raw)
        print(
            f"    step alone {np.median(raw):8.0f} img/s, from the store {np.median(e2e):8.0f} img/s, "
            f"ratio {ratio:.2f} (target >= 0.9)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per figure")
    parser.add_argument("--images", type=int, default=4096, help="images in the end-to-end store")
    parser.add_argument("--e2e-batch", type=int, default=64)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py skipped: no CUDA device here (torch.cuda.is_available() is False).")
        return 0
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    throughput(args.size, args.batches, args.steps)
    cpus = len(os.sched_getaffinity(0))
    end_to_end(args.size, args.e2e_batch, args.steps, args.images, max(1, min(8, cpus - 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
