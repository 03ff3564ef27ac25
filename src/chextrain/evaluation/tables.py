"""The report's numbers: long-format metric rows with patient-bootstrap CIs, from predictions tables.

Every row is `strategy, comparison, pathology, metric, value, ci_low, ci_high` (plus a few
documented extra columns in some tables). Standard = CheXpert rows, Photos = CheXphoto rows
(every kind pooled), "Standard - Photos" = the paired difference over (x-ray, photo of that
x-ray) pairs matched by patient/study/image.

One set of patient-level resamples is drawn per predictions table and shared by every group
(Standard, Photos, pairs, photo kinds), metric and pathology: the paired difference is then
exactly (Standard - Photos) on identical resamples, and the work is one pass of
metrics.weighted_metrics (the metric math, equal to scikit-learn) per group and pathology,
run in cache-sized chunks. The resamples are drawn as metrics.bootstrap_ci draws them (patients
with replacement from `numpy.random.default_rng(seed)`), so a table holding one group gives
bootstrap_ci's intervals. Nothing here trains or scores a model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chextrain.evaluation.metrics import AVERAGE, weighted_metrics
from chextrain.evaluation.predict import GROUPS, ID_COLUMNS, arrays
from chextrain.labels import SLUGS

COLUMNS: tuple[str, ...] = ("strategy", "comparison", "pathology", "metric", "value", "ci_low", "ci_high")
STANDARD, PHOTOS, DIFFERENCE = "Standard", "Photos", "Standard - Photos"
COMPARISONS: tuple[str, ...] = (STANDARD, PHOTOS, DIFFERENCE)
MAIN_METRICS: tuple[str, ...] = ("mcc", "auc")
APPENDIX_METRICS: tuple[str, ...] = ("precision", "recall", "f1", "accuracy")
REPORTED: tuple[str, ...] = MAIN_METRICS + APPENDIX_METRICS
PATHOLOGY_KEYS: tuple[str, ...] = (*SLUGS, AVERAGE)
PHOTO_KINDS: tuple[str, ...] = ("natural", "synthetic-digital", "synthetic-photographic", "film")
PREDICTION_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "head",
                                       *(f"{p}_{s}" for s in SLUGS for p in ("prob", "target", "mask")))
PAIR_KEY: tuple[str, ...] = ("patient", "study", "image")
CHUNK_CELLS = 250_000  # resamples x rows per weighted_metrics call: fits in cache (~5x faster than 4M)
ALPHA = 0.05

# {pathology key: {metric: (value, ci_low, ci_high)}}
Estimates = dict[str, dict[str, tuple[float, float, float]]]


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
        raise ReportError(f"{path}: predictions table lacks columns {missing}; expected those of "
                          "chextrain.evaluation.predict (path, dataset, ..., prob_/target_/mask_<slug>)")
    return table.reset_index(drop=True)


def side_rows(table: pd.DataFrame, comparison: str) -> np.ndarray:
    """Row indices of one side: Standard (dataset chexpert) or Photos (dataset chexphoto)."""
    column, value = GROUPS[comparison]
    return np.flatnonzero((table[column] == value).to_numpy())


def pair_indices(standard: pd.DataFrame, photos: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (into standard, into photos) of every photo whose source x-ray is in standard.

    A photo pairs with the x-ray of the same patient/study/image; one x-ray may have several
    photos (CheXphoto valid: natural + two synthetic kinds), each making its own pair. Film photos
    have no CheXpert source and stay unpaired.
    """
    def keys(frame: pd.DataFrame) -> pd.Index:
        cols = [frame[c].astype(str).to_numpy(dtype=object) for c in PAIR_KEY]
        return pd.Index(cols[0] + "/" + cols[1] + "/" + cols[2])

    std_keys = keys(standard)
    first = ~std_keys.duplicated(keep="first")
    where = std_keys[first].get_indexer(keys(photos))  # -1: no source x-ray
    in_photos = np.flatnonzero(where >= 0).astype(np.int64)
    in_standard = np.flatnonzero(first)[where[in_photos]].astype(np.int64)
    return in_standard, in_photos


@dataclass(frozen=True)
class Values:
    """A group's metrics: `point` {metric: 6} and `boot` {metric: B x 6} (5 pathologies + average)."""

    point: dict[str, np.ndarray]
    boot: dict[str, np.ndarray]
    n: int


class Resamples:
    """Patient-level bootstrap resamples of one predictions table (B x patients draw counts)."""

    def __init__(self, patients: np.ndarray, n_boot: int, seed: int) -> None:
        _, self.inv = np.unique(np.asarray(patients).astype(str), return_inverse=True)  # row -> patient
        n_groups = int(self.inv.max()) + 1 if len(self.inv) else 0
        draws = np.random.default_rng(seed).integers(0, max(n_groups, 1), size=(n_boot, n_groups))  # B x G
        offsets = (draws + n_groups * np.arange(n_boot)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=n_boot * n_groups).reshape(n_boot, n_groups)
        self.counts = counts.astype(np.int32)  # B x G: how often each patient was drawn

    def weights(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Chunks of b x len(rows) float weights (how often each row's patient was drawn)."""
        cols = self.inv[rows]
        step = max(1, CHUNK_CELLS // max(len(rows), 1))
        for start in range(0, self.counts.shape[0], step):
            yield self.counts[start:start + step][:, cols].astype(np.float64)

    def values(self, arrs: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray,
               thresholds: Mapping[str, float] | float = 0.5, metrics: Sequence[str] = REPORTED) -> Values:
        """Point estimate and per-resample values of `metrics` on the table rows `rows`."""
        t, p, m = (a[rows] for a in arrs)  # n x 5 each
        per = thresholds if isinstance(thresholds, Mapping) else dict.fromkeys(SLUGS, thresholds)
        thr = [float(per[s]) for s in SLUGS]
        point = _weighted(t, p, m, np.ones((1, len(rows))), thr, metrics)
        parts = [_weighted(t, p, m, w, thr, metrics) for w in self.weights(rows)]
        empty = np.zeros((0, len(PATHOLOGY_KEYS)))
        boot = {k: np.concatenate([part[k] for part in parts]) if parts else empty for k in metrics}
        return Values({k: v[0] for k, v in point.items()}, boot, len(rows))


def _weighted(t: np.ndarray, p: np.ndarray, m: np.ndarray, weights: np.ndarray, thr: Sequence[float],
              metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """{metric: B x 6}: each pathology over its unmasked rows, then the nanmean over pathologies."""
    out = {k: np.full((weights.shape[0], len(PATHOLOGY_KEYS)), np.nan) for k in metrics}  # B x 6
    for j in range(len(SLUGS)):
        keep = m[:, j] > 0
        found = weighted_metrics(t[keep, j], p[keep, j], weights[:, keep], thr[j])
        for k in metrics:
            out[k][:, j] = found[k]
    for v in out.values():
        finite = np.isfinite(v[:, :-1])
        total = np.where(finite, v[:, :-1], 0.0).sum(1)
        v[:, -1] = np.where(finite.any(1), total / np.maximum(finite.sum(1), 1), np.nan)
    return out


def _interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite resample values (NaN when none)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def estimates(v: Values) -> Estimates:
    """{pathology key: {metric: (value, ci_low, ci_high)}} of one group."""
    return {key: {k: (float(v.point[k][j]), *_interval(v.boot[k][:, j])) for k in v.point}
            for j, key in enumerate(PATHOLOGY_KEYS)}


def difference(a: Values, b: Values) -> Estimates:
    """a - b with the percentile interval of the per-resample differences (same resamples)."""
    return {key: {k: (float(a.point[k][j] - b.point[k][j]), *_interval(a.boot[k][:, j] - b.boot[k][:, j]))
                  for k in a.point} for j, key in enumerate(PATHOLOGY_KEYS)}


def long_rows(found: Estimates, **fixed: Any) -> list[dict[str, Any]]:
    """Flatten {pathology: {metric: (value, low, high)}} into long rows carrying the `fixed` columns."""
    return [{**fixed, "pathology": key, "metric": m, "value": v, "ci_low": lo, "ci_high": hi}
            for key, per in found.items() for m, (v, lo, hi) in per.items()]


@dataclass
class TableRows:
    """The long rows of one predictions table."""

    main: list[dict[str, Any]]  # COLUMNS; Standard, Photos, Standard - Photos; REPORTED metrics
    kinds: list[dict[str, Any]]  # + kind, n: Photos by kind, MAIN_METRICS
    thresholds: list[dict[str, Any]]  # + threshold (0.5 | tuned), cutoff: MCC
    notes: list[str]
    pairs: int


def evaluate_table(table: pd.DataFrame, strategy: str, *, n_boot: int, seed: int, kinds: bool = True,
                   thresholds: Mapping[str, Mapping[str, float]] | None = None) -> TableRows:
    """Every number the report shows for one stage's predictions table (threshold 0.5 unless tuned).

    thresholds: model.json's {head: {slug: t}}; when given, MCC at those (tuned) thresholds is
    reported next to MCC at 0.5 for each side scored by a single head.
    """
    arrs = arrays(table)  # targets, probs, mask: N x 5 each
    boot = Resamples(table["patient"].to_numpy(), n_boot, seed)
    out = TableRows([], [], [], [], 0)
    sides = {name: side_rows(table, name) for name in (STANDARD, PHOTOS)}
    values = {name: boot.values(arrs, rows) for name, rows in sides.items() if len(rows)}
    for name, v in values.items():
        out.main += long_rows(estimates(v), strategy=strategy, comparison=name)
    if len(values) == 2:
        i_std, i_photo = pair_indices(table.iloc[sides[STANDARD]], table.iloc[sides[PHOTOS]])
        out.pairs = len(i_std)
        if len(i_std):
            a = _paired_side(boot, arrs, sides[STANDARD], i_std, values[STANDARD])
            b = _paired_side(boot, arrs, sides[PHOTOS], i_photo, values[PHOTOS])
            out.main += long_rows(difference(a, b), strategy=strategy, comparison=DIFFERENCE)
    if kinds and len(sides[PHOTOS]):
        photo_kinds = table["kind"].astype(str).to_numpy()[sides[PHOTOS]]
        names = [k for k in PHOTO_KINDS if k in photo_kinds] + sorted(set(photo_kinds) - set(PHOTO_KINDS))
        for kind in names:
            rows = sides[PHOTOS][photo_kinds == kind]
            found = estimates(boot.values(arrs, rows, metrics=MAIN_METRICS))
            out.kinds += long_rows(found, strategy=strategy, kind=kind, n=len(rows))
    if thresholds is not None:
        _threshold_rows(table, strategy, thresholds, sides, boot, arrs, out)
    return out


def _paired_side(boot: Resamples, arrs: tuple[np.ndarray, np.ndarray, np.ndarray], side: np.ndarray,
                 index: np.ndarray, whole: Values) -> Values:
    """Values on the paired rows `side[index]`; `whole` when they are every row of the side, each
    repeated equally often (every metric is unchanged by a uniform weight)."""
    times = np.bincount(index, minlength=len(side))
    if times.min() > 0 and times.min() == times.max():
        return whole
    return boot.values(arrs, side[index])


def _threshold_rows(table: pd.DataFrame, strategy: str, thresholds: Mapping[str, Mapping[str, float]],
                    sides: Mapping[str, np.ndarray], boot: Resamples,
                    arrs: tuple[np.ndarray, np.ndarray, np.ndarray], out: TableRows) -> None:
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
            out.notes.append(f"{strategy}, {name}: no tuned thresholds (scored by heads {heads}; "
                             f"model.json has thresholds for {sorted(thresholds)})")
            continue
        tuned = {s: float(thresholds[heads[0]][s]) for s in SLUGS}
        found = estimates(boot.values(arrs, rows, tuned, metrics=("mcc",)))
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
