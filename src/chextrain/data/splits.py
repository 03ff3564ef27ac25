"""Patient-level train/val splits and fixed-budget sampling.

The official valid files are the test set (as in the paper); CheXpert's later test_labels.csv is
the separate `holdout` split, scored only when a stage asks for it (`evaluate: [..., holdout]`).
Rows of the official train files are split into train/val. By default the split is by PATIENT and
the assignment is a stable hash of (seed, patient): a CheXphoto photo keeps the CheXpert patient
name of the x-ray it shows, so it always lands in the same split as that x-ray, and adding rows
never moves a patient.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

SPLIT_BY: tuple[str, ...] = ("patient", "image")


def unit_hash(keys: pd.Series, seed: int) -> np.ndarray:
    """A stable pseudo-uniform number in [0, 1) per key, the same on every machine and run."""
    uniques, codes = np.unique(keys.to_numpy(dtype=str), return_inverse=True)
    salt = str(int(seed)).encode() + b"\x00"
    draws = np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + k.encode(), digest_size=8).digest(), "big") for k in uniques),
        dtype=np.uint64,
        count=len(uniques),
    )
    return (draws >> np.uint64(11)).astype(np.float64)[codes] / float(1 << 53)


def assign_splits(
    catalog: pd.DataFrame,
    *,
    by: str = "patient",
    val_fraction: float = 0.1,
    seed: int = 0,
    frontal_only: bool = False,
) -> pd.DataFrame:
    """Return a copy of the catalog with `split` set to train / val / test.

    Args:
        catalog: the catalog table (chextrain.data.catalog).
        by: "patient" (default; no patient in two splits, across datasets) or "image" (the paper's
            leaky split: 10% of each dataset's train images, drawn independently).
        val_fraction: share of train patients (or images) that become validation, in [0, 1).
        seed: changes the assignment; the same seed always gives the same split.
        frontal_only: drop lateral views.
    """
    if by not in SPLIT_BY:
        raise ValueError(f"split by={by!r}; expected one of {list(SPLIT_BY)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r}; expected a number in [0, 1)")
    out = catalog.copy()
    if frontal_only:
        out = out.loc[out["view"] != "lateral"].reset_index(drop=True)
    is_train = (out["file"] == "train").to_numpy()
    keys = out["patient"] if by == "patient" else out["dataset"] + "/" + out["rel_path"]
    u = np.ones(len(out))
    if is_train.any():
        u[is_train] = unit_hash(keys[is_train], seed)
    held = np.where((out["file"] == "test").to_numpy(), "holdout", "test")
    out["split"] = np.where(~is_train, held, np.where(u < val_fraction, "val", "train"))
    return out


def sample_budget(catalog: pd.DataFrame, total: int, digital: int, seed: int = 0) -> pd.DataFrame:
    """The fixed-budget study's training set: `digital` x-rays + `total - digital` photos.

    Draws without replacement from the catalog's train split (both domains), reproducibly for a
    seed. Raises when the catalog holds too few images of either domain.
    """
    if not 0 <= digital <= total:
        raise ValueError(f"budget digital={digital} must be between 0 and total={total}")
    train = catalog.loc[catalog["split"] == "train"]
    rng = np.random.default_rng(seed)
    picks = []
    for domain, n in (("digital", digital), ("photo", total - digital)):
        pool = np.flatnonzero((train["domain"] == domain).to_numpy())
        if n > len(pool):
            raise ValueError(
                f"budget asks for {n} {domain} training images but the train split has {len(pool)}"
            )
        picks.append(np.sort(rng.choice(pool, size=n, replace=False)))
    return train.iloc[np.concatenate(picks)].reset_index(drop=True)


def check_no_leak(catalog: pd.DataFrame) -> None:
    """Raise if a patient appears in more than one split (train/val/test)."""
    splits = catalog.groupby("patient")["split"].nunique()
    leaked = splits[splits > 1]
    if len(leaked):
        raise ValueError(f"{len(leaked)} patient(s) appear in several splits, e.g. {list(leaked.index[:3])}")
