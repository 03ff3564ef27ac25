"""Read CheXpert / CheXphoto releases (and generic CSVs) into one catalog table.

The catalog is a pandas DataFrame, one row per image, with the columns in CATALOG_COLUMNS
(documented in docs/architecture.md). Readers keep the raw label values (1, 0, -1, NaN);
uncertainty policies are applied later (chextrain.labels.apply_policy).

Paths in the official CSVs start with the release folder's name (``CheXpert-v1.0-small/...``);
that first component is stripped and the rest joined to the folder the CSV was found in, so a
copy with another prefix reads the same. Paths written from the split folder (``test/...``, as
in CheXpert's test_labels.csv) are joined as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chextrain.data.layout import (
    DOMAIN_OF_KIND,
    dataset_of_folder,
    inner_paths,
    normalise,
    official_csvs,
    path_fields,
    relative_name,
)
from chextrain.errors import ChextrainError
from chextrain.labels import CHEXPERT_COLUMNS, PATHOLOGIES, SLUGS

CATALOG_COLUMNS: tuple[str, ...] = (
    "path",
    "rel_path",
    "dataset",
    "domain",
    "kind",
    "device",
    "file",
    "split",
    "patient",
    "study",
    "image",
    "view",
    "sex",
    "age",
    "ap_pa",
    *SLUGS,
    "row",
    "release",
    "source",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *PATHOLOGIES)
ON_ERROR: tuple[str, ...] = ("raise", "skip")
SPLIT_OF_FILE: dict[str, str] = {"train": "train", "valid": "test", "test": "holdout"}  # paper's test = valid


class CatalogError(ChextrainError):
    """A CSV or path that cannot be read into the catalog; the message names file, line, column."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line  # the CSV line at fault, when one is


@dataclass(frozen=True)
class CatalogIssue:
    """One problem found while reading; rows with issues are skipped in on_error='skip' mode."""

    file: str
    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file + (f", line {self.line}" if self.line is not None else "")
        where += f", column {self.column!r}" if self.column else ""
        return f"{where}: {self.message}"


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


def empty_catalog() -> pd.DataFrame:
    """A catalog with no rows and the right columns and dtypes."""
    df = pd.DataFrame({c: pd.Series(dtype=object) for c in CATALOG_COLUMNS})
    for slug in SLUGS:
        df[slug] = df[slug].astype(np.float32)
    df["age"] = df["age"].astype(float)
    df["row"] = df["row"].astype(np.int64)
    return df


def read_csv_file(
    csv_path: Path,
    base_dir: Path | None = None,
    *,
    dataset: str | None = None,
    file: str = "train",
    strip_prefix: bool | None = None,
    on_error: str = "raise",
    check_files: bool = False,
) -> pd.DataFrame:
    """Read one CSV with the CheXpert columns into catalog rows.

    Args:
        csv_path: the CSV.
        base_dir: the folder image paths are relative to (the release folder for official CSVs;
            default the CSV's own folder).
        dataset: "chexpert", "chexphoto" or None for a generic CSV ("other").
        file: the official file the rows come from ("train", "valid", "test").
        strip_prefix: drop the first path component (the release folder name). Default: True for
            official datasets unless the path starts with a split folder (train/valid/test).
        on_error, check_files: see read_catalog.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error={on_error!r}; expected one of {list(ON_ERROR)}")
    csv_path = Path(csv_path)
    base_dir = Path(base_dir) if base_dir is not None else csv_path.parent
    name = str(csv_path)
    base = str(base_dir) + "/"
    issues: list[CatalogIssue] = []
    raw = _read_raw_csv(csv_path, on_error, issues)
    lines = raw.pop("__line__").to_numpy(np.int64)

    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise CatalogError(
            f"{name}: missing column(s) {missing}; expected the CheXpert header {list(CHEXPERT_COLUMNS)}"
        )
    bad = np.zeros(len(raw), dtype=bool)

    def flag(rows: np.ndarray, column: str | None, message: str | list[str]) -> None:
        idx = np.flatnonzero(rows)
        if not len(idx):
            return
        msgs = [message] * len(idx) if isinstance(message, str) else message
        found = [CatalogIssue(name, int(lines[i]), column, m) for i, m in zip(idx, msgs, strict=True)]
        if on_error == "raise":
            more = f" (and {len(found) - 1} more rows)" if len(found) > 1 else ""
            raise CatalogError(str(found[0]) + more)
        issues.extend(found)
        bad[idx] = True

    rel = raw["Path"].str.strip().str.replace("\\", "/", regex=False)
    flag((rel == "").to_numpy(), "Path", "blank Path")
    normed = pd.Series(normalise(inner_paths(rel, dataset, strip_prefix)), index=rel.index, dtype=object)
    escapes = normed.str.startswith("/") | normed.str.startswith("..") | rel.str.startswith("/")
    escapes |= rel.str.match(r"^[A-Za-z]:") | rel.str.contains(r"(?:^|/)\.\.(?:/|$)", regex=True)
    flag(
        (escapes & (rel != "")).to_numpy(),
        "Path",
        [f"path {p!r} escapes the dataset folder {str(base_dir)!r}" for p in rel[escapes & (rel != "")]],
    )

    labels = {}
    for pathology, slug in zip(PATHOLOGIES, SLUGS, strict=True):
        values, invalid = _parse_labels(raw[pathology])
        flag(
            invalid,
            pathology,
            [f"label {v!r} is not one of 1.0, 0.0, -1.0 or blank" for v in raw[pathology][invalid]],
        )
        labels[slug] = values
    age = pd.to_numeric(raw["Age"].str.strip().replace("", np.nan), errors="coerce")
    bad_age = age.isna().to_numpy() & (raw["Age"].str.strip() != "").to_numpy()
    flag(bad_age, "Age", [f"age {v!r} is not a number" for v in raw["Age"][bad_age]])

    fields = path_fields(normed.where(~bad, "").tolist(), dataset)
    flag(fields["error"].to_numpy() != "", "Path", list(fields["error"][fields["error"] != ""]))

    dup = rel.duplicated(keep="first").to_numpy() & ~bad
    if dup.any():
        first_line = pd.Series(lines, index=rel.index).groupby(rel).transform("first").to_numpy()
        flag(dup, "Path", [f"duplicate of line {first_line[i]} (same Path)" for i in np.flatnonzero(dup)])

    view = raw["Frontal/Lateral"].str.strip().str.lower()
    view = view.where(
        view != "", fields["image"].str.extract(r"_(frontal|lateral)$", expand=False).fillna("")
    )
    out = pd.DataFrame(
        {
            "path": [base + p if p else "" for p in normed.tolist()],
            "rel_path": rel,
            "dataset": dataset or "other",
            "domain": fields["kind"].map(DOMAIN_OF_KIND).fillna(""),
            "kind": fields["kind"],
            "device": fields["device"],
            "file": file,
            "split": SPLIT_OF_FILE.get(file, "test"),
            "patient": fields["patient"],
            "study": fields["study"],
            "image": fields["image"],
            "view": view,
            "sex": raw["Sex"].str.strip(),
            "age": age.astype(float),
            "ap_pa": raw["AP/PA"].str.strip(),
            **{slug: labels[slug] for slug in SLUGS},
            "row": lines,
            "release": base_dir.name,
            "source": relative_name(csv_path, base_dir),
        }
    )
    for column in ("domain", "kind"):  # generic CSVs may say what the images are
        if dataset is None and column in raw.columns:
            given = raw[column].str.strip()
            out[column] = given.where(given != "", out[column])
    out = out.loc[~bad].reset_index(drop=True)
    if check_files and len(out):
        exists = np.fromiter((Path(p).is_file() for p in out["path"]), dtype=bool, count=len(out))
        for i in np.flatnonzero(~exists):
            issues.append(
                CatalogIssue(
                    name, int(out["row"].iat[i]), "Path", f"image file not found: {out['path'].iat[i]}"
                )
            )
    out.attrs["issues"] = issues
    return out


def _read_raw_csv(csv_path: Path, on_error: str, issues: list[CatalogIssue]) -> pd.DataFrame:
    """The CSV as strings (blank cells ''), with a __line__ column; clear errors for bad files."""
    name = str(csv_path)
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{name}: cannot read CSV ({exc.strerror or exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CatalogError(
            f"{name}, line {line}: not UTF-8 text (byte {data[exc.start : exc.start + 1]!r} at column "
            f"{column}); re-save the CSV as UTF-8",
            line,
        ) from exc
    if not text.strip():
        raise CatalogError(f"{name}: empty CSV (expected the header {','.join(CHEXPERT_COLUMNS)})")
    wanted = {*REQUIRED_COLUMNS, "domain", "kind"}  # the other label columns are never used
    options = dict(
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        skip_blank_lines=True,
        usecols=lambda c: str(c).strip() in wanted,
    )
    lines = [s for s in text.splitlines() if s.strip()]
    ragged = '"' in text or any(s.count(",") != lines[0].count(",") for s in lines)
    if ragged:  # quoted cells or rows with the wrong number of fields: parse exactly, row by row
        df, numbers = _read_tolerant(text, name, issues)
        if issues and on_error == "raise":
            raise CatalogError(f"malformed CSV: {issues[0]}")
    else:
        df = pd.read_csv(io.StringIO(text), **options)
        numbers = np.flatnonzero([bool(s.strip()) for s in text.splitlines()])[1:] + 1
    if df.empty:
        raise CatalogError(f"{name}: the CSV has a header but no rows")
    df.columns = [str(c).strip() for c in df.columns]
    df["__line__"] = numbers
    return df


def _read_tolerant(text: str, name: str, issues: list[CatalogIssue]) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse with the csv module, skipping (and reporting) rows with the wrong number of fields."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows, lines = [], []
    for record in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            issues.append(CatalogIssue(name, line, None, f"expected {len(header)} fields, saw {len(record)}"))
            continue
        rows.append(record)
        lines.append(line)
    return pd.DataFrame(rows, columns=header, dtype=str), np.asarray(lines, dtype=np.int64)


def _parse_labels(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Raw label cells -> (float32 values with NaN for blank, invalid-cell mask)."""
    text = cells.str.strip()
    values = pd.to_numeric(text.replace("", np.nan), errors="coerce").to_numpy(np.float64)
    invalid = (text != "").to_numpy() & ~np.isin(values, (1.0, 0.0, -1.0))
    return np.where(invalid, np.nan, values).astype(np.float32), invalid


def pair_keys(catalog: pd.DataFrame) -> pd.Series:
    """patient/study/image: the key a CheXphoto photo shares with its CheXpert source x-ray."""
    return catalog["patient"] + "/" + catalog["study"] + "/" + catalog["image"]
