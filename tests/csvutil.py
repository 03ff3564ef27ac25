"""Helpers that write CSVs in the official CheXpert header for reader tests."""

from __future__ import annotations

from pathlib import Path

from chextrain.labels import CHEXPERT_COLUMNS

HEADER = ",".join(CHEXPERT_COLUMNS)


def row(
    path: str,
    labels: dict[str, str] | None = None,
    sex: str = "Female",
    age: str = "60",
    view: str = "Frontal",
    ap_pa: str = "AP",
) -> str:
    """One CSV line with the given Path and pathology cells (by column name); others blank."""
    cells = {c: "" for c in CHEXPERT_COLUMNS}
    cells.update({"Path": path, "Sex": sex, "Age": age, "Frontal/Lateral": view, "AP/PA": ap_pa})
    cells.update(labels or {})
    return ",".join(cells[c] for c in CHEXPERT_COLUMNS)


def write_csv(path: Path, lines: list[str], header: str = HEADER, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join([header, *lines]) + "\n").encode(encoding))
    return path
