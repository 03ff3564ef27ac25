"""Catalog benchmark: chextrain's reader vs a row-by-row reader like the paper's code.

Usage: python benchmarks/catalog.py [CSV]   (default ../shared/data/chexpert_train.csv.gz)

Both readers get the same CheXpert train.csv placed in a temporary release folder. Timed for
chextrain: read_catalog + U-Ones policy + patient-level split. Timed for the baseline: pandas
iterrows, a file-existence check per row and a Python loop per label, as in the paper's code.
Prints both times and the ratio (target: >= 50x, and <= 2 s for the whole CSV on 2 cores).
"""

from __future__ import annotations

import argparse
import gzip
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from chextrain.data.catalog import read_catalog
from chextrain.data.splits import assign_splits
from chextrain.labels import PATHOLOGIES, apply_policy

DEFAULT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert_train.csv.gz"


def ours(root: Path) -> int:
    catalog = read_catalog(root)
    targets, mask = apply_policy(catalog, "ones")
    split = assign_splits(catalog, by="patient", val_fraction=0.1, seed=0)
    return int(targets.sum() + mask.sum() + (split["split"] == "val").sum())


def row_by_row(csv: Path, folder: Path) -> int:
    """The paper-style loader: one Python iteration, file check and label loop per row."""
    frame = pd.read_csv(csv)
    images, labels, present = [], [], 0
    for _, record in frame.iterrows():
        path = folder / "/".join(str(record["Path"]).split("/")[1:])
        present += os.path.exists(path)
        row = []
        for name in PATHOLOGIES:
            value = record[name]
            if pd.isna(value):
                row.append(0.0)
            elif value == -1:
                row.append(1.0)  # U-Ones
            else:
                row.append(float(value))
        images.append(str(path))
        labels.append(row)
    patients = sorted({p.split("/")[-3] for p in images})
    rng = np.random.default_rng(0)
    val = set(rng.choice(patients, size=len(patients) // 10, replace=False))
    return int(np.sum(labels)) + sum(p.split("/")[-3] in val for p in images) + present


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", nargs="?", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args()
    if not args.csv.exists():
        raise SystemExit(f"{args.csv} not found: pass a CheXpert train.csv (or .csv.gz)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "CheXpert-v1.0-small"
        folder.mkdir()
        data = args.csv.read_bytes()
        (folder / "train.csv").write_bytes(gzip.decompress(data) if args.csv.suffix == ".gz" else data)
        ours(Path(tmp))  # warm-up: imports and page cache
        t0 = time.perf_counter()
        ours(Path(tmp))
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        row_by_row(folder / "train.csv", folder)
        t_base = time.perf_counter() - t0
    rows = len(pd.read_csv(args.csv, usecols=["Path"]))
    print(f"rows: {rows}")
    print(f"chextrain catalog + policy + patient split: {t_ours:8.2f} s")
    print(f"row-by-row reader (iterrows, exists, loops): {t_base:8.2f} s")
    print(f"speed-up: {t_base / t_ours:.1f}x (target >= 50x; target time <= 2 s)")


if __name__ == "__main__":
    main()
