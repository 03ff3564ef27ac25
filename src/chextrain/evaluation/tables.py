"""The report's numbers: long-format metric rows with patient-bootstrap CIs, from predictions tables.

Every row is `strategy, comparison, pathology, metric, value, ci_low, ci_high` (plus a few
documented extra columns in some tables). Standard = CheXpert rows; Photos = CheXphoto photos of
the v1.0 kinds (natural, synthetic digital, synthetic photographic), as in the paper; Film = the
v1.1 photos of physical films, a comparison of their own unless `pool_film` puts them in Photos.
"Standard - Photos" = the Standard value minus the Photos value shown above it; its CI is the
percentile interval of that difference over the shared patient resamples (paired by patient:
a resample draws a patient's x-rays and the photos of them together).

Each predictions table gets one bootstrap.Bootstrap: one set of patient-level resamples shared by
every group (Standard, Photos, Film, photo kinds), metric and pathology. Nothing here trains or
scores a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chextrain.errors import ChextrainError
from chextrain.evaluation.bootstrap import Bootstrap, Estimates, difference, estimates, pair_rows
from chextrain.evaluation.metrics import AVERAGE
from chextrain.evaluation.predict import GROUPS, ID_COLUMNS, arrays
from chextrain.labels import SLUGS

COLUMNS: tuple[str, ...] = ("strategy", "comparison", "pathology", "metric", "value", "ci_low", "ci_high")
STANDARD, PHOTOS, DIFFERENCE, FILM = "Standard", "Photos", "Standard - Photos", "Film"
COMPARISONS: tuple[str, ...] = (STANDARD, PHOTOS, DIFFERENCE, FILM)
SIDES: tuple[str, ...] = (STANDARD, PHOTOS, FILM)
NO_POSITIVE = "no positives at 0.5"
ORACLE_ROUTING = (
    " (oracle routing)"  # strategy suffix of a routed model scored with each image's known domain
)
ROUTER_COLUMNS: tuple[str, ...] = ("split", "strategy", "kind", "n", "accuracy")
AT_THRESHOLD: tuple[str, ...] = ("mcc", "precision", "recall", "f1")  # undefined-looking without positives
MAIN_METRICS: tuple[str, ...] = ("mcc", "auc")
APPENDIX_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")
REPORTED: tuple[str, ...] = MAIN_METRICS + APPENDIX_METRICS
PHOTO_KINDS: tuple[str, ...] = ("natural", "synthetic-digital", "synthetic-photographic", "film")
PREDICTION_COLUMNS: tuple[str, ...] = (
    *ID_COLUMNS,
    "head",
    *(f"{p}_{s}" for s in SLUGS for p in ("prob", "target", "mask")),
)


class ReportError(ChextrainError):
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


def side_rows(table: pd.DataFrame, comparison: str, pool_film: bool = False) -> np.ndarray:
    """Row indices of one side: Standard (chexpert), Photos (chexphoto but film), Film (film photos).

    pool_film: count film photos in Photos (and leave Film empty), as some studies choose to.
    """
    if comparison not in SIDES:
        raise ReportError(f"comparison {comparison!r}; expected one of {list(SIDES)}")
    column, value = GROUPS[PHOTOS if comparison == FILM else comparison]
    chosen = (table[column] == value).to_numpy().copy()
    film = (table["kind"].astype(str) == "film").to_numpy()
    if comparison == PHOTOS and not pool_film:
        chosen = chosen & ~film
    if comparison == FILM:
        chosen = chosen & film & (not pool_film)
    return np.flatnonzero(chosen)


def no_positive(table: pd.DataFrame, rows: np.ndarray, threshold: float = 0.5) -> list[str]:
    """Slugs with no positive prediction (prob >= threshold) among the rows' unmasked entries."""
    part = table.iloc[rows]
    out = []
    for slug in SLUGS:
        keep = part[f"mask_{slug}"].to_numpy() > 0
        if keep.any() and not (part[f"prob_{slug}"].to_numpy()[keep] >= threshold).any():
            out.append(slug)
    return out


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
    pairs: int  # (x-ray, photo of it) pairs among the rows (bootstrap.pair_rows)
    no_positive: list[tuple[str, str, str]]  # (strategy, comparison, slug): no prediction >= 0.5


def evaluate_table(
    table: pd.DataFrame,
    strategy: str,
    *,
    n_boot: int,
    seed: int,
    kinds: bool = True,
    thresholds: Mapping[str, Mapping[str, float]] | None = None,
    pool_film: bool = False,
) -> TableRows:
    """Every number the report shows for one stage's predictions table (threshold 0.5 unless tuned).

    thresholds: {head: {slug: t}} tuned on the stage's validation predictions
    (predict.tune_head_thresholds); when given, MCC at those (tuned) thresholds is reported next
    to MCC at 0.5 for each side whose heads all have them (each image at its own head's).
    pool_film: film photos count as Photos (default: their own comparison, Film).
    """
    boot = Bootstrap(arrays(table), table["patient"].to_numpy(), n_boot, seed)  # arrays: N x 5 each
    out = TableRows([], [], [], [], 0, [])
    sides = {name: side_rows(table, name, pool_film) for name in SIDES}
    values = {name: boot.values(rows, metrics=REPORTED) for name, rows in sides.items() if len(rows)}
    for name in (STANDARD, PHOTOS):
        if name in values:
            out.main += long_rows(estimates(values[name]), strategy=strategy, comparison=name)
    if STANDARD in values and PHOTOS in values:
        out.pairs = len(pair_rows(table.iloc[sides[STANDARD]], table.iloc[sides[PHOTOS]])[0])
        found = difference(values[STANDARD], values[PHOTOS])  # same resamples: paired by patient
        out.main += long_rows(found, strategy=strategy, comparison=DIFFERENCE)
    if FILM in values:
        out.main += long_rows(estimates(values[FILM]), strategy=strategy, comparison=FILM)
    for name, rows in sides.items():
        out.no_positive += [(strategy, name, slug) for slug in no_positive(table, rows)] if len(rows) else []
    photos = np.union1d(sides[PHOTOS], sides[FILM])
    if kinds and len(photos):
        photo_kinds = table["kind"].astype(str).to_numpy()[photos]
        names = [k for k in PHOTO_KINDS if k in photo_kinds] + sorted(set(photo_kinds) - set(PHOTO_KINDS))
        for kind in names:
            rows = photos[photo_kinds == kind]
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
        head_of = table["head"].astype(str).to_numpy()
        heads = sorted(set(head_of[rows]))
        if any(h not in thresholds for h in heads):
            out.notes.append(
                f"{strategy}, {name}: no tuned thresholds (scored by heads {heads}; "
                f"validation tuned thresholds for {sorted(thresholds)})"
            )
            continue
        if len(heads) == 1:
            tuned: Mapping[str, float] | np.ndarray = {s: float(thresholds[heads[0]][s]) for s in SLUGS}
        else:  # a router sent this side's images to several heads: each at its own head's thresholds
            tuned = np.zeros((len(table), len(SLUGS)))  # N x 5
            for h in heads:
                tuned[head_of == h] = [float(thresholds[h][s]) for s in SLUGS]
            out.notes.append(f"{strategy}, {name}: each image at the tuned thresholds of its head ({heads})")
        found = estimates(boot.values(rows, tuned, metrics=("mcc",)))
        for r in long_rows(found, strategy=strategy, comparison=name):
            cutoff = tuned.get(r["pathology"], float("nan")) if isinstance(tuned, dict) else float("nan")
            out.thresholds.append({**r, "threshold": "tuned", "cutoff": cutoff})


def router_rows(table: pd.DataFrame, strategy: str, split: str) -> list[dict[str, Any]]:
    """The router's accuracy (P(photo) > 0.5 iff a photo) on all rows and per kind (ROUTER_COLUMNS).

    Empty when the table has no router (no `router_prob` column). Kinds: digital, the photo kinds
    in PHOTO_KINDS order, then any other.
    """
    if "router_prob" not in table.columns or table.empty:
        return []
    right = (table["router_prob"].to_numpy() > 0.5) == (table["domain"].astype(str).to_numpy() == "photo")
    kinds = table["kind"].astype(str).to_numpy()
    order = [k for k in ("digital", *PHOTO_KINDS) if k in kinds] + sorted(
        set(kinds) - {"digital", *PHOTO_KINDS}
    )
    out = [
        {
            "split": split,
            "strategy": strategy,
            "kind": "all",
            "n": len(right),
            "accuracy": float(right.mean()),
        }
    ]
    for kind in order:
        mine = right[kinds == kind]
        out.append(
            {
                "split": split,
                "strategy": strategy,
                "kind": kind,
                "n": len(mine),
                "accuracy": float(mine.mean()),
            }
        )
    return out


def roc_inputs(
    table: pd.DataFrame, comparison: str, slug: str, pool_film: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_prob) of one side and pathology, masked entries left out (for ROC plots)."""
    part = table.iloc[side_rows(table, comparison, pool_film)]
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


def card_evaluation(out_dir: Path, label: str, n_boot: int = 1000) -> list[dict[str, Any]] | None:
    """AUC and MCC (averages) with patient-bootstrap 95% CIs per comparison and photo kind, from
    out_dir's test predictions (the report's engine and seed), for the model card; None without them."""
    path = out_dir / "predictions_test.parquet"
    if not path.exists():
        return None
    table = read_predictions(path)
    found = evaluate_table(table, label, n_boot=n_boot, seed=0)
    rows = []
    for r in found.main + found.kinds:
        if r["pathology"] != "average" or r["metric"] not in ("auc", "mcc"):
            continue
        if "kind" in r:  # a photo kind: its rows counted by the engine
            group, n = f"photos: {r['kind']}", r["n"]
        else:  # Standard, Photos (their rows), Standard - Photos (the x-ray/photo pairs)
            group = r["comparison"]
            n = found.pairs if group == DIFFERENCE else len(side_rows(table, group))
        rows.append(
            {
                "split": "test",
                "group": group,
                "n": n,
                **{k: r[k] for k in ("metric", "value", "ci_low", "ci_high")},
            }
        )
    return rows
