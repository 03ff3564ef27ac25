"""The report's numbers: long-format metric rows with patient-bootstrap CIs, from predictions tables.

Every row is `strategy, comparison, pathology, metric, value, ci_low, ci_high` (plus a few
documented extra columns in some tables). Standard = CheXpert rows, Photos = CheXphoto rows
(every kind pooled), "Standard - Photos" = the paired difference over (x-ray, photo of that
x-ray) pairs (bootstrap.pair_rows: matched by patient/study/image).

Each predictions table gets one bootstrap.Bootstrap: one set of patient-level resamples shared by
every group (Standard, Photos, pairs, photo kinds), metric and pathology, so the paired difference
is exactly (Standard - Photos) on identical resamples. Nothing here trains or scores a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chextrain.evaluation.bootstrap import Bootstrap, Estimates, difference, estimates, pair_rows
from chextrain.evaluation.metrics import AVERAGE
from chextrain.evaluation.predict import GROUPS, ID_COLUMNS, arrays
from chextrain.labels import SLUGS

COLUMNS: tuple[str, ...] = ("strategy", "comparison", "pathology", "metric", "value", "ci_low", "ci_high")
STANDARD, PHOTOS, DIFFERENCE = "Standard", "Photos", "Standard - Photos"
COMPARISONS: tuple[str, ...] = (STANDARD, PHOTOS, DIFFERENCE)
MAIN_METRICS: tuple[str, ...] = ("mcc", "auc")
APPENDIX_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")
REPORTED: tuple[str, ...] = MAIN_METRICS + APPENDIX_METRICS
PHOTO_KINDS: tuple[str, ...] = ("natural", "synthetic-digital", "synthetic-photographic", "film")
PREDICTION_COLUMNS: tuple[str, ...] = (
    *ID_COLUMNS,
    "head",
    *(f"{p}_{s}" for s in SLUGS for p in ("prob", "target", "mask")),
)


class ReportError(ValueError):
    """A study folder, predictions table or argument the report cannot use; names the file or value."""


def read_predictions(path: Path) -> pd.DataFrame:
    """Read a predictions table (predict.write_evaluation's parquet) and check its columns."""
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read the predictions table ({err})") from err
    missing = [c for c in PREDICTION_COLUMNS if c not in table.columns]
    if missing:
        raise ReportError(
            f"{path}: predictions table lacks columns {missing}; expected those of "
            "chextrain.evaluation.predict (path, dataset, ..., prob_/target_/mask_<slug>)"
        )
    return table.reset_index(drop=True)


def side_rows(table: pd.DataFrame, comparison: str) -> np.ndarray:
    """Row indices of one side: Standard (dataset chexpert) or Photos (dataset chexphoto)."""
    column, value = GROUPS[comparison]
    return np.flatnonzero((table[column] == value).to_numpy())


def long_rows(found: Estimates, **fixed: Any) -> list[dict[str, Any]]:
    """Flatten {pathology: {metric: (value, low, high)}} into long rows carrying the `fixed` columns."""
    return [
        {**fixed, "pathology": key, "metric": m, "value": v, "ci_low": lo, "ci_high": hi}
        for key, per in found.items()
        for m, (v, lo, hi) in per.items()
    ]


@dataclass
class TableRows:
    """The long rows of one predictions table."""

    main: list[dict[str, Any]]  # COLUMNS; Standard, Photos, Standard - Photos; REPORTED metrics
    kinds: list[dict[str, Any]]  # + kind, n: Photos by kind, MAIN_METRICS
    thresholds: list[dict[str, Any]]  # + threshold (0.5 | tuned), cutoff: MCC
    notes: list[str]
    pairs: int


def evaluate_table(
    table: pd.DataFrame,
    strategy: str,
    *,
    n_boot: int,
    seed: int,
    kinds: bool = True,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
) -> TableRows:
    """Every number the report shows for one stage's predictions table (threshold 0.5 unless tuned).

    thresholds: model.json's {head: {slug: t}}; when given, MCC at those (tuned) thresholds is
    reported next to MCC at 0.5 for each side scored by a single head.
    """
    boot = Bootstrap(arrays(table), table["patient"].to_numpy(), n_boot, seed)  # arrays: N x 5 each
    out = TableRows([], [], [], [], 0)
    sides = {name: side_rows(table, name) for name in (STANDARD, PHOTOS)}
    values = {name: boot.values(rows, metrics=REPORTED) for name, rows in sides.items() if len(rows)}
    for name, v in values.items():
        out.main += long_rows(estimates(v), strategy=strategy, comparison=name)
    if len(values) == 2:
        i_std, i_photo = pair_rows(table.iloc[sides[STANDARD]], table.iloc[sides[PHOTOS]])
        out.pairs = len(i_std)
        if len(i_std):
            a = boot.paired(sides[STANDARD], i_std, values[STANDARD])
            b = boot.paired(sides[PHOTOS], i_photo, values[PHOTOS])
            out.main += long_rows(difference(a, b), strategy=strategy, comparison=DIFFERENCE)
    if kinds and len(sides[PHOTOS]):
        photo_kinds = table["kind"].astype(str).to_numpy()[sides[PHOTOS]]
        names = [k for k in PHOTO_KINDS if k in photo_kinds] + sorted(set(photo_kinds) - set(PHOTO_KINDS))
        for kind in names:
            rows = sides[PHOTOS][photo_kinds == kind]
            found = estimates(boot.values(rows, metrics=MAIN_METRICS))
            out.kinds += long_rows(found, strategy=strategy, kind=kind, n=len(rows))
    if thresholds is not None:
        _threshold_rows(table, strategy, thresholds, sides, boot, out)
    return out


def _threshold_rows(
    table: pd.DataFrame,
    strategy: str,
    thresholds: Mapping[str, Mapping[str, float]],
    sides: Mapping[str, np.ndarray],
    boot: Bootstrap,
    out: TableRows,
) -> None:
    """MCC at 0.5 (from out.main) next to MCC at the thresholds tuned on validation, per side."""
    for name, rows in sides.items():
        if not len(rows):
            continue
        for r in out.main:
            if r["comparison"] == name and r["metric"] == "mcc":
                cutoff = 0.5 if r["pathology"] != AVERAGE else float("nan")
                out.thresholds.append({**r, "threshold": "0.5", "cutoff": cutoff})
        heads = sorted(set(table["head"].astype(str).to_numpy()[rows]))
        if len(heads) != 1 or heads[0] not in thresholds:
            out.notes.append(
                f"{strategy}, {name}: no tuned thresholds (scored by heads {heads}; "
                f"model.json has thresholds for {sorted(thresholds)})"
            )
            continue
        tuned = {s: float(thresholds[heads[0]][s]) for s in SLUGS}
        found = estimates(boot.values(rows, tuned, metrics=("mcc",)))
        for r in long_rows(found, strategy=strategy, comparison=name):
            cutoff = tuned.get(r["pathology"], float("nan"))
            out.thresholds.append({**r, "threshold": "tuned", "cutoff": cutoff})


def roc_inputs(table: pd.DataFrame, comparison: str, slug: str) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_prob) of one side and pathology, masked entries left out (for ROC plots)."""
    part = table.iloc[side_rows(table, comparison)]
    keep = part[f"mask_{slug}"].to_numpy() > 0
    return part[f"target_{slug}"].to_numpy()[keep].astype(np.int64), part[f"prob_{slug}"].to_numpy()[keep]


def frame(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame of `rows` with exactly `columns`, in that order (empty rows -> empty frame)."""
    return pd.DataFrame(list(rows), columns=list(columns))


def pick(rows: pd.DataFrame, **where: Any) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) of the single row matching `where`; NaNs when absent."""
    sel = np.ones(len(rows), dtype=bool)
    for column, value in where.items():
        sel &= (rows[column] == value).to_numpy()
    if not sel.any():
        return float("nan"), float("nan"), float("nan")
    row = rows.loc[sel].iloc[0]
    return float(row["value"]), float(row["ci_low"]), float(row["ci_high"])
