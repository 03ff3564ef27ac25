"""Summarise and check a data root: what `chextrain data check` prints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chextrain.data.catalog import read_catalog
from chextrain.data.layout import KINDS
from chextrain.labels import SLUGS

STATES: dict[str, float] = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0}


def label_states(values: pd.Series) -> dict[str, int]:
    """Counts of positive / negative / uncertain / blank for one pathology's raw labels."""
    v = values.to_numpy(np.float32)
    counts = {state: int((v == code).sum()) for state, code in STATES.items()}
    counts["blank"] = int(np.isnan(v).sum())
    return counts


def summarise(catalog: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per (dataset, official file): rows, patients, studies, kinds, label states."""
    groups = []
    for (dataset, file), part in catalog.groupby(["dataset", "file"], sort=True):
        groups.append(
            {
                "dataset": dataset,
                "file": file,
                "rows": len(part),
                "patients": int(part["patient"].nunique()),
                "studies": int((part["patient"] + "/" + part["study"]).nunique()),
                "kinds": {k: int(n) for k, n in part["kind"].value_counts().items() if k in KINDS},
                "views": {k: int(n) for k, n in part["view"].value_counts().items()},
                "labels": {slug: label_states(part[slug]) for slug in SLUGS},
            }
        )
    return groups


def check_root(
    root: Path,
    *,
    check_files: bool = True,
    verify_images: bool = False,
    verify: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Read every release under root and report everything that is wrong, in every file.

    Bad rows are skipped and a CSV that cannot be read at all (empty, not UTF-8, missing columns)
    is one issue naming it, so one broken file never hides the problems of the others.

    Returns {"root", "datasets": summarise(...), "issues": [...], "missing_files": [...],
    "unreadable_images": [...], "ok": bool}.
    """
    catalog = read_catalog(root, on_error="skip", check_files=check_files)
    issues = [str(i) for i in catalog.attrs.get("issues", []) if "image file not found" not in i.message]
    missing = [str(i) for i in catalog.attrs.get("issues", []) if "image file not found" in i.message]
    unreadable: list[str] = []
    if verify_images:
        if verify is None:
            from chextrain.data.images import verify_image as verify
        missing_paths = {m.rsplit("image file not found: ", 1)[-1] for m in missing}
        for path in catalog["path"]:
            if path in missing_paths:
                continue
            reason = verify(path)
            if reason:
                unreadable.append(f"{path}: {reason}")
    return {
        "root": str(root),
        "datasets": summarise(catalog),
        "issues": issues,
        "missing_files": missing,
        "unreadable_images": unreadable,
        "ok": not (issues or missing or unreadable),
    }
