"""Feeding a GPU: img/s per core at 320 px from each kind of source, and worker memory over an epoch.

    python benchmarks/feed.py [--size 320] [--n 96] [--rounds 5] [--rows 223414]

(a) One core (torch limited to one thread, CPU time of this process), median of rounds in which
    the two take turns batch by batch: the project's worker path (`CatalogDataset.__getitems__` +
    `collate`, what a DataLoader worker runs: decode at the needed scale with `draft`, grey,
    resize, into one uint8 batch) against a plain-Pillow anchor doing the least that gives the
    same batch (open, draft, grey, resize, numpy, stack), for a small CheXpert JPEG (390 x 320),
    a full-size one (2828 x 2320) and a 12 MP phone photo (4000 x 3000 RGB); then the prepared
    store, per item and per collated batch of 64. Targets: project >= anchor for every file
    source; the store >= 20,000 img/s per core; <= 0.2 cores per 1,600 img/s from it.
(b) A mixed stage's items with photo simulation (PhotoSim p = 0.5, phone) from small JPEGs and from
    the store. Target >= 300 img/s per core.
(c) Private memory growth of a DataLoader worker over a full epoch of --rows rows (the real
    CheXpert row count) read from a small store, the worker started as make_loader starts it
    (loader.worker_init: the garbage collector never walks what the worker inherited): the
    dataset as shipped (numpy arrays) against the same dataset holding its paths as a Python
    list, which every read copies page by page. Printed: the worker's start-up (its first 5% of
    the epoch: libraries' first use, the same for any row count) and the growth over the rest of
    the epoch. Target <= 5 MB over the epoch.
The last line says whether every target was met in this run, or names the ones missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from chextrain.data.dataset import CatalogDataset, collate
from chextrain.data.loader import worker_init
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, PhotoSim
from imagepool import FULL, PHONE, SMALL, catalog_rows, write_jpegs

TARGET_GPU = 1600  # img/s a GPU trains DenseNet-121 at 320 px
BATCH = 16  # images per batch in (a) (the paper's batch): a worker reads a batch (__getitems__)
MISSED: list[str] = []  # the targets this run did not meet, for the last line


def verdict(met: bool, target: str, miss: str) -> str:
    """'ok', or `miss` with the target noted as missed for the summary."""
    if not met:
        MISSED.append(target)
    return "ok" if met else miss


def anchor(size: int) -> Callable[[Path], np.ndarray]:
    """Plain Pillow: open, draft to the needed scale, grey, resize, numpy."""

    def load(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im.draft("L", (size, size))  # colour JPEGs decode straight to grey
            grey = im if im.mode == "L" else im.convert("L")
            return np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR))

    return load


def duel(fns: dict[str, Callable[[int], Any]], n: int, rounds: int) -> dict[str, float]:
    """Calls per CPU second of each fn over fn(0..n-1), median of `rounds` rounds.

    The fns take turns call by call (each call timed alone), so load from other programs hits
    them alike; with two fns, also `ratio`: the median over rounds of the second's rate / the first's.
    """
    for fn in fns.values():
        fn(0)  # warm up
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        spent = dict.fromkeys(fns, 0.0)
        for i in range(n):
            for name, fn in fns.items():
                t = time.process_time()
                fn(i)
                spent[name] += time.process_time() - t
        for name in fns:
            rates[name].append(n / max(spent[name], 1e-9))
    out = {k: statistics.median(v) for k, v in rates.items()}
    if len(fns) == 2:
        a, b = rates.values()
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        out["ratio"], out["ratio_low"], out["ratio_high"] = (
            statistics.median(ratios),
            min(ratios),
            max(ratios),
        )
    return out


def sources(args: argparse.Namespace, tmp: Path) -> None:
    size = args.size
    pools = {
        "small JPEG 390x320": write_jpegs(tmp / "small", args.n, SMALL),
        "full JPEG 2320x2828": write_jpegs(tmp / "full", max(4, args.n // 8), FULL),
        "phone JPEG 4000x3000": write_jpegs(tmp / "phone", max(4, args.n // 16), PHONE, rgb=True, quality=90),
    }
    print(f"(a) img/s per core at {size} px, batches of {BATCH} (CPU time, median of {args.rounds} rounds,")
    print("    the two taking turns batch by batch; ratio: the median of the per-round ratios)")
    print(f"    {'source':<24}{'anchor':>10}{'project':>10}{'ratio':>8}{'cores/1600':>12}")
    plain = anchor(size)
    for name, files in pools.items():
        ds = CatalogDataset(catalog_rows(files), image_size=size)
        n = max(len(files), 4 * BATCH)  # the small pools are read several times over
        keys = [[(k % len(files), 0) for k in range(b, b + BATCH)] for b in range(0, n, BATCH)]
        r = duel(
            {
                "anchor": lambda i, f=files, ks=keys: np.stack([plain(f[k]) for k, _ in ks[i % len(ks)]]),
                "project": lambda i, d=ds, ks=keys: collate(d.__getitems__(ks[i % len(ks)])),
            },
            len(keys),
            args.rounds,
        )
        miss = "at parity: the rounds straddle 1" if r["ratio_high"] >= 1.0 else "BELOW ANCHOR"
        said = verdict(r["ratio"] >= 1.0, f"{name}: project >= anchor", miss)
        print(
            f"    {name:<24}{r['anchor'] * BATCH:>10.0f}{r['project'] * BATCH:>10.0f}{r['ratio']:>8.3f}"
            f"{TARGET_GPU / r['project'] / BATCH:>12.1f}  {said} "
            f"(rounds {r['ratio_low']:.3f}-{r['ratio_high']:.3f})"
        )
    small = pools["small JPEG 390x320"]
    store = ImageStore(tmp / "store", Decoding(size), progress=False)
    rows = catalog_rows(small)
    ds = CatalogDataset(rows, image_size=size, images=store.prepare(rows["path"].tolist()))
    batch = 64
    loader = DataLoader(ds, batch_size=batch, num_workers=0, collate_fn=collate)  # what make_loader uses
    loops = max(1, 4096 // len(ds))

    def batches(_: int) -> None:
        for _b in loader:
            pass

    r = duel({"item": lambda i: ds[i % len(ds)]}, 4096, args.rounds)
    rb = duel({"batches": batches}, loops, args.rounds)["batches"] * len(ds)
    for name, value in (("store: items", r["item"]), (f"store: batches of {batch}", rb)):
        met = value >= 20_000 and TARGET_GPU / value <= 0.2
        said = verdict(met, f"{name} >= 20,000 img/s and <= 0.2 cores", "BELOW TARGET")
        print(f"    {name:<24}{'':>10}{value:>10.0f}{'':>8}{TARGET_GPU / value:>12.2f}  {said} (>= 20,000)")
    decoded = np.stack([Decoding(size).load(p) for p in small[:16]])
    stored = np.stack([ds.load(i) for i in range(16)])
    same = bool(np.array_equal(decoded, stored))
    print(f"    the store holds exactly the decoded pixels: {verdict(same, 'the store = the files', 'NO')}")

    print("\n(b) mixed stage with photo simulation (PhotoSim p=0.5, phone), img/s per core")
    sim = [PhotoSim(p=0.5, recipe="phone")]
    from_files = CatalogDataset(rows, image_size=size, augment=sim)
    from_store = CatalogDataset(rows, image_size=size, augment=sim, images=ds.images)
    plain_files = CatalogDataset(rows, image_size=size)
    r = duel(
        {
            "files": lambda i: from_files[(i % len(rows), i // len(rows))],
            "store": lambda i: from_store[(i % len(rows), i // len(rows))],
            "files, no photo-sim": lambda i: plain_files[i % len(rows)],
        },
        2 * len(rows),
        args.rounds,
    )
    for name, value in r.items():
        said = "" if "no photo" in name else verdict(value >= 300, f"photo-sim {name} >= 300", "BELOW TARGET")
        print(f"    {name:<24}{value:>10.0f} img/s   {said}")


class ListPaths(CatalogDataset):
    """The anchor of (c): the same dataset with its paths held as a Python list of str."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path_list = self.paths.tolist()

    def path(self, index: int) -> str:
        return self.path_list[index]


class Probe:
    """Wraps a dataset: every `every` items the worker reports its private dirty memory (kB)."""

    def __init__(self, dataset: CatalogDataset, every: int) -> None:
        self.dataset, self.every = dataset, every

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        path = self.dataset.path(index)  # what a worker reads besides the image: the row's path
        item["private_kb"] = private_kb() if index % self.every == 0 or index == len(self) - 1 else -1
        item["path_len"] = len(path)
        return item


def private_kb() -> int:
    """This process's Private_Dirty memory in kB (anonymous and copied-on-write pages)."""
    with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def memory(args: argparse.Namespace, tmp: Path) -> None:
    print(f"\n(c) worker private memory over one epoch of {args.rows:,} rows (1 worker, 16 px store)")
    pool = write_jpegs(tmp / "mem", 64, (40, 32))
    links = tmp / "links" / "train"
    files = []
    for i in range(args.rows):  # one file per row (hard links): the store keys rows by path
        f = links / f"patient{i // 3:05d}" / f"study{i % 3 + 1}" / "view1_frontal.jpg"
        if i % 3 == 0:
            f.parent.parent.mkdir(parents=True, exist_ok=True)
        f.parent.mkdir(exist_ok=True)
        os.link(pool[i % len(pool)], f)
        files.append(f)
    rows = catalog_rows(files)
    store = ImageStore(tmp / "memstore", Decoding(16), progress=False)
    images = store.prepare(rows["path"].tolist())
    for name, cls in (("numpy arrays (shipped)", CatalogDataset), ("Python list of paths", ListPaths)):
        ds = cls(rows, image_size=16, images=images)
        loader = DataLoader(
            Probe(ds, every=len(ds) // 20), batch_size=256, num_workers=1, worker_init_fn=worker_init
        )
        seen = []
        for batch in loader:
            seen += [v for v in batch["private_kb"].tolist() if v >= 0]
        start, warm, end = (v / 1024 for v in (seen[0], seen[1], seen[-1]))
        if cls is CatalogDataset:
            said = verdict(end - warm <= 5, "worker memory <= 5 MB over the epoch", "above 5 MB")
        else:  # the anchor: shows what the numpy arrays save, no target
            said = "(anchor)"
        print(
            f"    {name:<26} start-up (first 5%) {start:5.1f} -> {warm:5.1f} MB; "
            f"the rest of the epoch {warm:5.1f} -> {end:5.1f} MB: +{end - warm:.1f} MB  {said}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--n", type=int, default=96, help="small JPEGs (full size: n / 8, phone: n / 16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rows", type=int, default=223_414, help="rows of the memory epoch")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-core figures (OpenCV too, as in a loader worker)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sources(args, Path(tmp))
        if not args.skip_memory:
            memory(args, Path(tmp))
    skipped = " (worker memory skipped)" if args.skip_memory else ""
    if MISSED:
        print(f"\nmissed in this run{skipped}: " + "; ".join(MISSED))
    else:
        print(f"\nevery target met in this run{skipped}")


if __name__ == "__main__":
    main()
