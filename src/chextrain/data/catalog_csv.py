"""One CSV with the CheXpert columns -> catalog rows: the catalog's schema, its errors, and the
tolerant reader (a malformed row is a CatalogIssue naming file, line and column; on_error="skip"
drops it, "raise" stops at it). data/catalog.py finds the releases and their CSVs and calls
`read_csv_file` on each; callers import these names from there.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chextrain.data.layout import (
    DOMAIN_OF_KIND,
    inner_paths,
    normalise,
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
