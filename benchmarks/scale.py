"""The real CheXpert row count end to end on the CPU side: catalog, split, store, loader start-up.

    python benchmarks/scale.py [CSV] [--size 64] [--pool 256] [--workers 2] [--keep DIR]

CSV defaults to ../shared/data/chexpert_train.csv.gz (223,414 rows; skipped with a message when
absent). Every row's image is a hard link to one of --pool generated 390 x 320 JPEGs, laid out as
the release (`CheXpert-v1.0-small/train/patientNNNNN/studyK/viewJ_*.jpg`), so the file system
holds 223,414 distinct paths at the cost of --pool images. Reports the time and this process's
peak memory of: the tree set-up, `read_catalog`, `assign_splits`, building the prepared image
store at --size px on every core (and rebuilding it when nothing changed: the stat pass only),
and a training loader's start-up (dataset over the train rows, then the first batch from
--workers workers), plus the dataset's own memory and the store's size on disk.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset
from chextrain.data.loader import make_loader
from chextrain.data.splits import assign_splits
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding
from imagepool import SMALL, write_jpegs

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert_train.csv.gz"
RELEASE = "CheXpert-v1.0-small"


def peak_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(step: str, seconds: float, extra: str = "") -> None:
    print(f"    {step:<44}{seconds:8.2f} s   peak RSS {peak_mib():7.0f} MiB   {extra}")


def make_tree(csv: Path, root: Path, pool_size: int) -> int:
    """The release folder with the real train.csv and a hard link per row; returns the rows."""
    release = root / RELEASE
    release.mkdir(parents=True)
    with gzip.open(csv, "rb") as src, open(release / "train.csv", "wb") as dst:
        shutil.copyfileobj(src, dst)
    paths = pd.read_csv(release / "train.csv", usecols=["Path"])["Path"].tolist()
    pool = write_jpegs(root / "pool", pool_size, SMALL)
    made: set[str] = set()
    for i, rel in enumerate(paths):
        target = release / rel.split("/", 1)[1]
        folder = str(target.parent)
        if folder not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        os.link(pool[i % len(pool)], target)
    return len(paths)


def run(csv: Path, work: Path, args: argparse.Namespace) -> None:
    t = time.perf_counter()
    n = make_tree(csv, work / "data", args.pool)
    report(f"tree: {n:,} hard links to {args.pool} JPEGs", time.perf_counter() - t)
    t = time.perf_counter()
    catalog = read_catalog(work / "data")
    report(f"read_catalog ({len(catalog):,} rows)", time.perf_counter() - t)
    t = time.perf_counter()
    catalog = assign_splits(catalog, by="patient", val_fraction=0.1, seed=0)
    train = catalog.loc[catalog["split"] == "train"].reset_index(drop=True)
    report(f"assign_splits (train {len(train):,})", time.perf_counter() - t)
    store = ImageStore(work / "store", Decoding(args.size), progress=args.progress)
    t = time.perf_counter()
    built = store.build(catalog["path"].tolist())
    seconds = time.perf_counter() - t
    rate = built.decoded / seconds if seconds else 0.0
    report(
        f"store build at {args.size} px ({store.workers} processes)",
        seconds,
        f"{built.decoded:,} decoded, {rate:,.0f} img/s, {len(built.failed)} unreadable",
    )
    t = time.perf_counter()
    again = store.build(catalog["path"].tolist())
    report("store re-build, nothing changed", time.perf_counter() - t, f"{again.reused:,} reused")
    disk = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
    t = time.perf_counter()
    images = store.images(train["path"].tolist())
    dataset = CatalogDataset(train, image_size=args.size, images=images)
    held = dataset.paths.nbytes + images.part.nbytes + images.row.nbytes + dataset.csv_rows.nbytes
    report(
        "dataset over the train rows", time.perf_counter() - t, f"paths + rows held: {held / 2**20:.1f} MiB"
    )
    t = time.perf_counter()
    loader = make_loader(dataset, batch_size=16, shuffle=True, num_workers=args.workers)
    first = next(iter(loader))
    report(
        f"loader start-up: first batch, {args.workers} workers",
        time.perf_counter() - t,
        f"batch {tuple(first['image'].shape)} {first['image'].dtype}",
    )
    print(f"    store on disk: {disk / 2**30:.2f} GiB ({disk / len(catalog) / 1024:.1f} KiB per image)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--size", type=int, default=64, help="store image size (320: about 23 GB of disk)")
    parser.add_argument("--pool", type=int, default=256, help="distinct JPEGs the rows link to")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--keep", type=Path, default=None, help="work here and keep the files")
    parser.add_argument("--progress", action="store_true", help="show the store's progress bar")
    args = parser.parse_args()
    if not args.csv.exists():
        print(f"benchmarks/scale.py skipped: {args.csv} is not here (the real CheXpert train.csv)")
        return 0
    print(f"scale: {args.csv.name}, store at {args.size} px")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args.csv, args.keep, args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run(args.csv, Path(tmp), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
