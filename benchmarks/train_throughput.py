"""Training throughput: JPEG files on disk -> loader -> model step, against the model step alone.

Both run in one process, same model, batch and image size: the end-to-end loop uses the loader
`train_stage` builds (data.loader.make_loader with the stage's default workers), the raw loop
feeds the same batch of in-memory tensors again and again. Their ratio says how much the data
path costs; peak RSS (this process and its loader workers) is printed with them.

    python benchmarks/train_throughput.py                    # 64 and 128 px, densenet121, batch 16
    python benchmarks/train_throughput.py --sizes 320 --batch 16 64 --precision bf16   # on a GPU

With no --data it writes a demo tree (CheXpert-small-like 320 px images) into a temp folder.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset
from chextrain.data.demo import write_demo
from chextrain.data.loader import make_loader
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, to_network_input
from chextrain.models.net import CXRNet
from chextrain.training.objectives.supervised import masked_bce
from chextrain.training.trainer import auto_workers


def peak_rss_mib() -> tuple[float, float]:
    """(this process, largest loader worker) peak resident set size in MiB (Linux ru_maxrss is KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def step_fn(
    model: CXRNet,
    opt: torch.optim.Optimizer,
    device: torch.device,
    channels_last: bool,
    dtype: torch.dtype | None,
):
    """One optimiser step on a batch dict, as SupervisedModule.training_step does."""

    def step(batch: dict[str, torch.Tensor]) -> None:
        x = batch["image"].to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # loaders hand over uint8; the step normalises on the device
            x = to_network_input(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model.forward_all(x)
            logits = out["logits"][torch.arange(len(x), device=device), batch["head"].to(device)]
        loss = masked_bce(logits, batch["target"].to(device), batch["mask"].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(
    step,
    sources: dict[str, Iterator[dict[str, torch.Tensor]]],
    warmup: int,
    steps: int,
    rounds: int,
    batch: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """img/s per source and round. Sources alternate in rounds of `steps` steps, so load from other
    programs on the machine hits each about equally; `warmup` untimed steps first (workers start)."""
    for batches in sources.values():
        for _ in range(warmup):
            step(next(batches))
    speeds: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(rounds):
        for name, batches in sources.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(next(batches))
            if device.type == "cuda":
                torch.cuda.synchronize()
            speeds[name].append(steps * batch / (time.perf_counter() - t0))
    return speeds


def summary(speeds: dict[str, list[float]], name: str) -> tuple[float, float]:
    """(overall img/s of `name`, median over rounds of its speed / raw's speed in the same round)."""
    overall = len(speeds[name]) / sum(1 / v for v in speeds[name])
    return overall, float(np.median(np.array(speeds[name]) / np.array(speeds["raw"])))


def repeat(batch: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield batch


def endless(loader) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        loader.epoch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    channels_last = device.type == "cuda" and not args.no_channels_last
    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="chextrain-bench-")
        root = Path(tmp.name)
        n = max(args.batch) * (args.warmup + args.steps * args.rounds)
        t0 = time.perf_counter()
        write_demo(root, digital=n, photos=0, valid=0, size=320, seed=0, workers=None, progress=False)
        print(f"demo tree: {n} x-rays of 320 px wide in {time.perf_counter() - t0:.1f} s ({root})")
    rows = read_catalog(root)
    rows = rows.loc[rows["file"] == "train"].reset_index(drop=True)
    workers = auto_workers("auto") if args.workers is None else args.workers
    cache_dir = tempfile.TemporaryDirectory(prefix="chextrain-cache-")
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, loader workers {workers}, "
        f"{args.backbone}, precision {args.precision}, channels_last {channels_last}"
    )
    print(
        "ratio = median over rounds of end-to-end / raw speed in the same round; the cache columns "
        "(pre-resized uint8 images) are measured when the ratio is < 0.9 or with --cache"
    )
    print(
        f"{'size':>5} {'batch':>5} {'raw img/s':>10} {'e2e img/s':>10} {'ratio':>6} "
        f"{'cache img/s':>11} {'ratio':>6} {'peak RSS MiB (main/worker)':>27}"
    )
    for size in args.sizes:
        for batch in args.batch:
            torch.manual_seed(0)
            model = CXRNet(args.backbone).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            model.train()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            step = step_fn(model, opt, device, channels_last, dtype)
            ds = CatalogDataset(rows, image_size=size)
            pin = device.type == "cuda"
            fixed = next(iter(make_loader(ds, batch_size=batch, shuffle=True)))
            e2e_loader = make_loader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin)
            speed = timed(
                step,
                {"raw": repeat(fixed), "e2e": endless(e2e_loader)},
                args.warmup,
                args.steps,
                args.rounds,
                batch,
                device,
            )
            (raw, _), (e2e, ratio) = summary(speed, "raw"), summary(speed, "e2e")
            cached, cache_ratio = float("nan"), float("nan")
            del e2e_loader
            if args.cache or ratio < 0.9:  # decoding competes with compute: offer the cache
                store = ImageStore(Path(cache_dir.name), Decoding(size), progress=False)
                cds = CatalogDataset(rows, image_size=size, images=store.prepare(rows["path"].tolist()))
                cache_loader = make_loader(
                    cds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=pin
                )
                speed = timed(
                    step,
                    {"raw": repeat(fixed), "cache": endless(cache_loader)},
                    args.warmup,
                    args.steps,
                    args.rounds,
                    batch,
                    device,
                )
                cached, cache_ratio = summary(speed, "cache")
                del cache_loader
            own, child = peak_rss_mib()
            print(
                f"{size:>5} {batch:>5} {raw:>10.1f} {e2e:>10.1f} {ratio:>6.2f} {cached:>11.1f} "
                f"{cache_ratio:>6.2f} {own:>19.0f} / {child:.0f}",
                flush=True,
            )
    cache_dir.cleanup()
    if tmp is not None:
        tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="data root (default: a temporary demo tree)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, nargs="+", default=[16])
    p.add_argument("--steps", type=int, default=1, help="timed steps per round and source")
    p.add_argument("--rounds", type=int, default=6, help="rounds alternating the sources")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (loader workers start)")
    p.add_argument("--backbone", default="densenet121")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: train_stage's auto)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--cache", action="store_true", help="also measure the pre-resized uint8 cache")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
