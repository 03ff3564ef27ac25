"""What the official folder layouts say about an image, from its path.

CheXpert:  <split>/<patient>/<study>/<view>.jpg
CheXphoto: <split>/natural/<device>/..., <split>/synthetic/{digital,photographic}/...,
           <split>/film/<patient>/... (v1.1)
kind and device come from the folders between the split and the patient; patient, study and
image (the file stem) from the last three components.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pandas as pd

KINDS: tuple[str, ...] = ("digital", "natural", "synthetic-digital", "synthetic-photographic", "film")
DOMAIN_OF_KIND: dict[str, str] = {
    "digital": "digital",
    "natural": "photo",
    "synthetic-digital": "photo",
    "synthetic-photographic": "photo",
    "film": "photo",
}
SPLIT_DIRS: frozenset[str] = frozenset({"train", "valid", "test"})
OFFICIAL_FILES: tuple[tuple[str, str], ...] = (
    # (file key, CSV path relative to the release folder), first found wins per key
    ("train", "train.csv"),
    ("valid", "valid.csv"),
    ("valid", "valid/valid.csv"),
    ("test", "test_labels.csv"),
    ("test", "test.csv"),
)


def dataset_of_folder(name: str) -> str | None:
    """`chexpert` / `chexphoto` from a release folder name (any version suffix), else None."""
    low = name.lower()
    if low.startswith("chexphoto"):
        return "chexphoto"
    if low.startswith("chexpert"):
        return "chexpert"
    return None


def official_csvs(release: Path) -> dict[str, Path]:
    """{file key: CSV path} for the official CSVs present in a release folder."""
    found: dict[str, Path] = {}
    for key, rel in OFFICIAL_FILES:
        path = release / rel
        if key not in found and path.is_file():
            found[key] = path
    return found


def relative_name(csv_path: Path, base_dir: Path) -> str:
    """The CSV's path below the release folder (`valid.csv`, `valid/valid.csv`), else its name."""
    try:
        return csv_path.relative_to(base_dir).as_posix()
    except ValueError:
        return csv_path.name


def inner_paths(rel: pd.Series, dataset: str | None, strip_prefix: bool | None) -> list[str]:
    """Paths relative to the release folder: the first component stripped where it is a prefix."""
    out = []
    for path in rel.tolist():
        first, sep, rest = path.partition("/")
        strip = (
            (bool(dataset) and bool(first) and first not in SPLIT_DIRS)
            if strip_prefix is None
            else strip_prefix
        )
        out.append(rest if strip and sep else path)
    return out


def normalise(paths: list[str]) -> list[str]:
    """posixpath.normpath, only where a path has something to normalise (fast on clean paths)."""
    return [
        posixpath.normpath(p) if p and ("//" in p or "/." in p or p.startswith(".")) else p for p in paths
    ]


def kind_of(middle: str, dataset: str | None) -> tuple[str, str, str]:
    """(kind, device, error) from the folders between the split folder and the patient."""
    parts = middle.split("/") if middle else []
    if not parts:
        if dataset == "chexphoto":
            return "", "", "CheXphoto path lacks the natural/<device>, synthetic/<kind> or film folder"
        return "digital", "", ""
    if parts[0] == "natural" and len(parts) == 2:
        return "natural", parts[1].lower(), ""
    if parts[0] == "synthetic" and len(parts) == 2 and parts[1] in ("digital", "photographic"):
        return f"synthetic-{parts[1]}", "", ""
    if parts == ["film"]:
        return "film", "", ""
    return (
        "",
        "",
        (
            f"unknown image kind folder {middle!r}; expected natural/<device>, "
            "synthetic/digital, synthetic/photographic or film"
        ),
    )


def path_fields(inner: list[str], dataset: str | None) -> pd.DataFrame:
    """kind, device, patient, study, image (file stem) and error text from release-relative paths."""
    kinds: dict[str, tuple[str, str, str]] = {}
    rows = []
    for path in inner:
        pieces = path.rsplit("/", 3)
        stem = pieces[-1].rsplit(".", 1)[0] if "." in pieces[-1] else pieces[-1]
        if len(pieces) < 4:  # no <split>/<patient>/<study>/<file> structure
            error = "path has fewer than <split>/<patient>/<study>/<file>" if dataset and path else ""
            rows.append(("digital" if not dataset else "", "", stem, "", stem, error))
            continue
        middle = pieces[0].partition("/")[2]
        if middle not in kinds:
            kinds[middle] = kind_of(middle, dataset)
        kind, device, error = kinds[middle]
        if not dataset and error:  # generic CSVs: any layout, digital unless a kind column says so
            kind, error = "digital", ""
        rows.append((kind, device, pieces[1], pieces[2], stem, error))
    return pd.DataFrame(rows, columns=["kind", "device", "patient", "study", "image", "error"])
