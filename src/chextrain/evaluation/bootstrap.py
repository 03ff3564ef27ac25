"""The one bootstrap engine: patient-level resamples of one table, shared by every group of its rows.

A confidence interval is the percentile interval of a metric over `n_boot` resamples that draw
PATIENTS with replacement and keep all their rows (a cluster bootstrap: the images of one patient,
and a photo and the x-ray it shows, are not independent). `Bootstrap` holds one table's arrays
and draws its resamples once, as B x patients draw counts; every group of rows (Standard, Photos,
a photo kind, the paired rows) is scored on those same draws, so a paired difference is exactly
(a - b) resample by resample. A resample is integer weights per row, scored by
metrics.weighted_metrics (equal to scikit-learn with `sample_weight`) in cache-sized chunks.

Pairing has one rule, `pair_rows`: a photo pairs with the x-ray of the same patient/study/image
(data.catalog.pair_keys); one x-ray may have several photos (CheXphoto valid: natural + two
synthetic kinds), each making its own pair; a photo without a source x-ray (film) stays unpaired.
Because the key holds the patient, both rows of a pair are always drawn together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from chextrain.data.catalog import pair_keys
from chextrain.evaluation.metrics import (
    AVERAGE,
    METRICS,
    MetricsError,
    check_arrays,
    nanmean,
    per_pathology,
    weighted_metrics,
)
from chextrain.labels import SLUGS

PATHOLOGY_KEYS: tuple[str, ...] = (*SLUGS, AVERAGE)
PAIR_KEY: tuple[str, ...] = ("patient", "study", "image")
SCORED: tuple[str, ...] = METRICS[:6]  # mcc, auc, precision, recall, f1, accuracy
CHUNK_CELLS = 250_000  # resamples x rows per weighted_metrics call: fits in cache (~5x faster than 4M)
ALPHA = 0.05

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]  # targets, probs, mask: N x 5 each
Estimates = dict[str, dict[str, tuple[float, float, float]]]  # {pathology key: {metric: (value, low, high)}}


@dataclass(frozen=True)
class Values:
    """A group's metrics: `point` {metric: 6} and `boot` {metric: B x 6} (5 pathologies + average)."""

    point: dict[str, np.ndarray]
    boot: dict[str, np.ndarray]
    n: int  # rows scored


class Bootstrap:
    """Patient-level bootstrap resamples of one table, drawn once and shared by every group of rows.

    Args:
        arrays: (targets, probs, mask), N x 5 each (e.g. predict.arrays of a predictions table).
        patients: N patient ids.
        n_boot: number of resamples; 0 gives point estimates only.
        seed: seeds numpy.random.default_rng; the same patients and seed give the same resamples.
    """

    def __init__(self, arrays: Arrays, patients: Sequence[str] | np.ndarray, n_boot: int, seed: int) -> None:
        self.arrays: Arrays = check_arrays(*arrays)
        ids, n = np.asarray(patients), len(self.arrays[0])
        if ids.shape != (n,):
            raise MetricsError(f"patients must hold one id per row ({n}); got shape {ids.shape}")
        if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 0:
            raise MetricsError(f"n_boot must be an integer >= 0; got {n_boot!r}")
        _, inv = np.unique(ids.astype(str), return_inverse=True)
        self.inv: np.ndarray = inv.reshape(-1)  # row -> patient index
        n_groups = int(self.inv.max()) + 1 if len(self.inv) else 0
        draws = np.random.default_rng(seed).integers(0, max(n_groups, 1), size=(n_boot, n_groups))  # B x G
        offsets = (draws + n_groups * np.arange(n_boot)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=n_boot * n_groups).reshape(n_boot, n_groups)
        self.counts: np.ndarray = counts.astype(np.int32)  # B x G: how often each patient was drawn

    def weights(self, rows: np.ndarray) -> Iterator[np.ndarray]:
        """Chunks of b x len(rows) float weights: how often each row's patient was drawn."""
        cols = self.inv[rows]
        step = max(1, CHUNK_CELLS // max(len(rows), 1))
        for start in range(0, self.counts.shape[0], step):
            yield self.counts[start : start + step][:, cols].astype(np.float64)

    def values(
        self,
        rows: np.ndarray | None = None,
        thresholds: Mapping[str, float] | float | np.ndarray = 0.5,
        metrics: Sequence[str] = SCORED,
    ) -> Values:
        """Point estimate and per-resample values of `metrics` on the rows `rows` (None: every row).

        A row may be listed more than once (it then counts that often). thresholds: one value,
        {slug or pathology name: value}, or an N x 5 array with a threshold per row of the table
        (e.g. the tuned thresholds of the head that scored each image); a prediction is positive
        when prob >= threshold.
        """
        names = list(metrics)
        bad = [k for k in names if k not in METRICS]
        if bad or not names:
            raise MetricsError(f"unknown metrics {bad or names}; expected names from {list(METRICS)}")
        rows = np.arange(len(self.arrays[0])) if rows is None else np.asarray(rows, dtype=np.int64)
        t, p, m = (a[rows] for a in self.arrays)  # n x 5 each
        if isinstance(thresholds, np.ndarray):
            if thresholds.shape != self.arrays[0].shape:
                raise MetricsError(
                    f"per-row thresholds must be N x 5 {self.arrays[0].shape}; got {thresholds.shape}"
                )
            thr: Sequence[float] | np.ndarray = np.asarray(thresholds, dtype=np.float64)[rows]  # n x 5
        else:
            thr = per_pathology(thresholds, "thresholds")
        point = _weighted(t, p, m, np.ones((1, len(rows))), thr, names)
        parts = [_weighted(t, p, m, w, thr, names) for w in self.weights(rows)]
        empty = np.zeros((0, len(PATHOLOGY_KEYS)))
        boot = {k: np.concatenate([part[k] for part in parts]) if parts else empty for k in names}
        return Values({k: v[0] for k, v in point.items()}, boot, len(rows))

    def paired(self, rows: np.ndarray, index: np.ndarray, whole: Values | None = None) -> Values:
        """Values of one side of the pairs: the rows `rows[index]` (index from pair_rows).

        whole: that side's values on every row of `rows`, returned as they are when the pairs use
        each row equally often (every metric is unchanged by a uniform weight).
        """
        times = np.bincount(index, minlength=len(rows))
        if whole is not None and len(times) and times.min() > 0 and times.min() == times.max():
            return whole
        return self.values(np.asarray(rows)[index], metrics=list(whole.point) if whole else SCORED)


def _weighted(
    t: np.ndarray,
    p: np.ndarray,
    m: np.ndarray,
    weights: np.ndarray,
    thr: Sequence[float] | np.ndarray,
    metrics: Sequence[str],
) -> dict[str, np.ndarray]:
    """{metric: B x 6}: each pathology over its unmasked rows, then the nanmean over pathologies.

    thr: a threshold per pathology, or n x 5 (one per row and pathology).
    """
    out = {k: np.full((weights.shape[0], len(PATHOLOGY_KEYS)), np.nan) for k in metrics}  # B x 6
    for j in range(len(SLUGS)):
        keep = m[:, j]
        cut = thr[keep, j] if isinstance(thr, np.ndarray) else thr[j]  # n_kept or a scalar
        found = weighted_metrics(t[keep, j], p[keep, j], weights[:, keep], cut)
        for k in metrics:
            out[k][:, j] = found[k]
    for v in out.values():
        v[:, -1] = nanmean(v[:, :-1], 1)
    return out


def pair_rows(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (into a, into b) of every b row whose patient/study/image is among a's rows.

    a holds the x-rays, b the photos; the one pairing rule of the package. A key found twice in a
    pairs with its first row; every matching b row makes its own pair, in b's order.
    """
    missing = [c for c in PAIR_KEY if c not in a.columns or c not in b.columns]
    if missing:
        raise MetricsError(f"pairing needs columns {list(PAIR_KEY)}; missing {missing}")
    keys_a = pd.Index(pair_keys(a[list(PAIR_KEY)].astype(str)))
    keys_b = pd.Index(pair_keys(b[list(PAIR_KEY)].astype(str)))
    first = ~keys_a.duplicated(keep="first")
    where = keys_a[first].get_indexer(keys_b)  # -1: no source x-ray
    in_b = np.flatnonzero(where >= 0).astype(np.int64)
    in_a = np.flatnonzero(first)[where[in_b]].astype(np.int64)
    return in_a, in_b


def interval(values: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """(1 - alpha) percentile interval of the finite resample values (NaN when none, e.g. one-class AUC)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def estimates(v: Values, alpha: float = ALPHA) -> Estimates:
    """{pathology key: {metric: (value, ci_low, ci_high)}} of one group."""
    return {
        key: {k: (float(v.point[k][j]), *interval(v.boot[k][:, j], alpha)) for k in v.point}
        for j, key in enumerate(PATHOLOGY_KEYS)
    }


def difference(a: Values, b: Values, alpha: float = ALPHA) -> Estimates:
    """a - b with the percentile interval of the per-resample differences (a and b on the same resamples)."""
    return {
        key: {
            k: (float(a.point[k][j] - b.point[k][j]), *interval(a.boot[k][:, j] - b.boot[k][:, j], alpha))
            for k in a.point
        }
        for j, key in enumerate(PATHOLOGY_KEYS)
    }
