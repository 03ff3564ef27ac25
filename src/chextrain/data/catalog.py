"""Read CheXpert / CheXphoto releases (and generic CSVs) into one catalog table.

The catalog is a pandas DataFrame, one row per image, with the columns in CATALOG_COLUMNS
(documented in docs/architecture.md). Readers keep the raw label values (1, 0, -1, NaN);
uncertainty policies are applied later (chextrain.labels.apply_policy).

The schema (CATALOG_COLUMNS), the errors and the reader of one CSV live in data/catalog_csv.py;
this module finds the releases, reads each official CSV and joins them.

Paths in the official CSVs start with the release folder's name (``CheXpert-v1.0-small/...``);
that first component is stripped and the rest joined to the folder the CSV was found in, so a
copy with another prefix reads the same. Paths written from the split folder (``test/...``, as
in CheXpert's test_labels.csv) are joined as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from chextrain.data.catalog_csv import CatalogError, CatalogIssue, empty_catalog, read_csv_file
from chextrain.data.layout import (
    dataset_of_folder,
    official_csvs,
)


def find_releases(root: Path) -> list[Path]:
    """Release folders (CheXpert*/CheXphoto*) at `root` itself or directly below it, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"{root}: data root is not a directory")
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    return [p for p in candidates if dataset_of_folder(p.name) and official_csvs(p)]


def read_catalog(
    root: Path,
    *,
    on_error: str = "raise",
    check_files: bool = False,
    releases: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Read every release under `root` into one catalog, in release and file order.

    Args:
        root: a folder holding CheXpert-*/CheXphoto-* release folders, or one such folder.
        on_error: "raise" stops at the first bad row; "skip" drops bad rows and lists them in
            ``catalog.attrs["issues"]`` (the `data check` command reports them).
        check_files: also report rows whose image file is missing.
        releases: release folder names to read (e.g. ["CheXpert-v1.0-small"]): for each dataset they
            name a release of, those; the other datasets as found. Required when one dataset has two
            releases under `root` (reading both duplicates rows); a stage's `data.releases`.
    """
    found = find_releases(Path(root))
    if not found:
        raise CatalogError(
            f"{root}: no CheXpert or CheXphoto release found (expected e.g. {root}/CheXpert-v1.0-small/"
            f"train.csv or {root}/CheXphoto-v1.0/valid.csv)"
        )
    releases = choose_releases(found, releases, Path(root))
    parts: list[pd.DataFrame] = []
    issues: list[CatalogIssue] = []
    for release in releases:
        dataset = dataset_of_folder(release.name)
        for file_key, csv_path in official_csvs(release).items():
            try:
                part = read_csv_file(
                    csv_path,
                    release,
                    dataset=dataset,
                    file=file_key,
                    on_error=on_error,
                    check_files=check_files,
                )
            except CatalogError as err:  # a whole file unreadable: skip mode reports it and reads on
                if on_error == "raise":
                    raise
                message = (
                    str(err).removeprefix(f"{csv_path}, line {err.line}: ").removeprefix(f"{csv_path}: ")
                )
                issues.append(CatalogIssue(str(csv_path), err.line, None, message))
                continue
            issues.extend(part.attrs.get("issues", []))
            parts.append(part)
    catalog = concat_catalogs(parts)
    catalog.attrs["issues"] = issues
    return catalog


def choose_releases(found: list[Path], wanted: Iterable[str] | None, root: Path) -> list[Path]:
    """The releases to read, in `found` order: for each dataset `wanted` names a release of, the named
    ones (even two of it, when named); every other dataset as found, unless it has two releases.

    Reading CheXpert-v1.0-small with CheXpert-v1.0, or CheXphoto-v1.0 with CheXphoto-v1.1, would
    put every image in the catalog twice (the same patients in train and test files alike).
    """
    names = list(dict.fromkeys(wanted or ()))
    by_name = {p.name: p for p in found}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CatalogError(f"{root}: release(s) {missing} not found; releases present: {sorted(by_name)}")
    named = {dataset_of_folder(n) for n in names}
    chosen = [p for p in found if p.name in names or dataset_of_folder(p.name) not in named]
    per_dataset: dict[str, list[str]] = {}
    for p in chosen:
        if p.name not in names:
            per_dataset.setdefault(str(dataset_of_folder(p.name)), []).append(p.name)
    for dataset, both in per_dataset.items():
        if len(both) > 1:
            raise CatalogError(
                f"{root}: {len(both)} releases of {dataset} found ({' and '.join(both)}); reading both "
                "would duplicate their images. Say which one to use with the stage key "
                f"`data: {{releases: [{both[0]}]}}` (a study: `defaults: {{data: {{releases: [...]}}}}`; "
                "in Python: read_catalog(..., releases=[...]))"
            )
    return chosen


def select_releases(catalog: pd.DataFrame, releases: Iterable[str]) -> pd.DataFrame:
    """The rows of an already-read catalog that read_catalog(..., releases=releases) would keep:
    the named releases of the datasets they name, every row of the other datasets."""
    names = list(releases)
    named = {dataset_of_folder(n) for n in names}
    keep = catalog["release"].isin(names) | ~catalog["dataset"].isin(named)
    return catalog.loc[keep.to_numpy()].reset_index(drop=True)


def concat_catalogs(parts: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate catalog parts keeping the schema (and an empty table with the schema)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_catalog()
    out = pd.concat(parts, ignore_index=True)
    out.attrs = {}
    return out


def pair_keys(catalog: pd.DataFrame) -> pd.Series:
    """patient/study/image: the key a CheXphoto photo shares with its CheXpert source x-ray."""
    return catalog["patient"] + "/" + catalog["study"] + "/" + catalog["image"]
