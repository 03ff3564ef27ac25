"""Classification metrics as pure functions of arrays, equal to scikit-learn's.

Point estimates call scikit-learn. `weighted_metrics` scores many weightings of the same samples
at once (vectorised; equal to scikit-learn with `sample_weight`): the bootstrap engine
(evaluation/bootstrap.py) turns each patient resample into integer weights per image and calls it.
Nothing here draws random numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from chextrain.errors import ChextrainError
from chextrain.labels import SLUG_OF, SLUGS

METRICS: tuple[str, ...] = ("mcc", "auc", "precision", "recall", "f1", "accuracy", "support", "positives")
AVERAGE = "average"


class MetricsError(ChextrainError):
    """Bad metric inputs; the message names the array, pathology or value."""


class UndefinedAUCWarning(UserWarning):
    """AUC is undefined (NaN) because the labels hold one class only."""


def _check_binary(y_true: np.ndarray, y_prob: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise MetricsError(
            f"{name or 'labels'}: y_true and y_prob must be 1-D of one length; got {y.shape} and {p.shape}"
        )
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricsError(f"{name or 'labels'}: y_true must hold 0/1 only; got {np.unique(y)[:10]}")
    if not np.isfinite(p).all():
        raise MetricsError(f"{name or 'labels'}: y_prob holds NaN or infinite values")
    return y.astype(np.int64), p


def binary_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = 0.5, *, name: str = ""
) -> dict[str, float]:
    """MCC, AUC, precision, recall, F1, accuracy (scikit-learn), support and positives.

    A prediction is positive when y_prob >= threshold. Precision/recall/F1 are 0 when undefined
    (zero_division=0); AUC is NaN with an UndefinedAUCWarning when y_true holds one class only.
    """
    y, p = _check_binary(y_true, y_prob, name)
    out = dict.fromkeys(METRICS, float("nan"))
    out["support"], out["positives"] = float(len(y)), float(y.sum())
    if len(y) == 0:
        warnings.warn(
            f"{name or 'labels'}: no labelled samples; every metric is NaN", UndefinedAUCWarning, stacklevel=2
        )
        return out
    pred = (p >= threshold).astype(np.int64)
    # One class in both y and pred: MCC is 0 (scikit-learn's value), without its confusion-matrix warning.
    out["mcc"] = float(matthews_corrcoef(y, pred)) if len(np.unique(np.r_[y, pred])) > 1 else 0.0
    out["precision"] = float(precision_score(y, pred, zero_division=0))
    out["recall"] = float(recall_score(y, pred, zero_division=0))
    out["f1"] = float(f1_score(y, pred, zero_division=0))
    out["accuracy"] = float(accuracy_score(y, pred))
    if 0 < y.sum() < len(y):
        out["auc"] = float(roc_auc_score(y, p))
    else:
        warnings.warn(
            f"{name or 'labels'}: only one class ({int(y[0])}) in {len(y)} labels; AUC is NaN",
            UndefinedAUCWarning,
            stacklevel=2,
        )
    return out


def weighted_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Every metric of METRICS for B weightings of the same n samples at once.

    weights: B x n non-negative (a bootstrap resample = how often each sample was drawn).
    Returns {metric: B values}; equal to scikit-learn with sample_weight=weights[b].
    """
    y = np.asarray(y_true) > 0.5  # n
    p = np.asarray(y_prob, dtype=np.float64)  # n
    W = np.atleast_2d(np.asarray(weights, dtype=np.float64))  # B x n
    pred = p >= threshold
    tp, fp = W @ (y & pred), W @ (~y & pred)  # B
    fn, tn = W @ (y & ~pred), W @ (~y & ~pred)
    n = tp + fp + fn + tn
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
            "f1": np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "accuracy": np.where(n > 0, (tp + tn) / n, np.nan),
        }
        out["mcc"] = np.where(n > 0, _mcc(tp, fp, fn, tn), np.nan)
    out["auc"] = _weighted_auc(y, p, W)
    out["support"], out["positives"] = n, tp + fn
    return out


def _mcc(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray) -> np.ndarray:
    """MCC from confusion counts, written as scikit-learn writes it; 0 when undefined."""
    n = tp + fp + fn + tn
    t0, t1, p0, p1 = tn + fp, fn + tp, tn + fn, fp + tp  # true / predicted class totals
    cov_ytyp = (tp + tn) * n - (t0 * p0 + t1 * p1)
    denom = (n**2 - (p0**2 + p1**2)) * (n**2 - (t0**2 + t1**2))
    return np.where(denom > 0, cov_ytyp / np.sqrt(np.where(denom > 0, denom, 1.0)), 0.0)


def _weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row of W (ties count 1/2): P(score_pos > score_neg); NaN if one class."""
    if len(y) == 0:
        return np.full(weights.shape[0], np.nan)
    order = np.argsort(p, kind="stable")
    ps, ys, Ws = p[order], y[order], weights[:, order]  # ascending scores
    starts = np.r_[0, np.flatnonzero(np.diff(ps)) + 1]  # first index of each distinct score
    wpos = np.add.reduceat(Ws * ys, starts, axis=1)  # B x G: positive weight per distinct score
    wneg = np.add.reduceat(Ws * ~ys, starts, axis=1)
    below = np.cumsum(wneg, axis=1) - wneg  # negative weight strictly below each score
    pairs = wpos.sum(1) * wneg.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, (wpos * (below + 0.5 * wneg)).sum(1) / pairs, np.nan)


def check_arrays(
    targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, probs float64, mask bool), each N x 5, checked: 0/1 targets and finite probs where unmasked.

    mask None = every entry labelled. Masked entries may hold anything (e.g. NaN).
    """
    t = np.asarray(targets, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    m = np.ones_like(t) if mask is None else np.asarray(mask, dtype=np.float64)
    k = len(SLUGS)
    if t.ndim != 2 or t.shape[1] != k or p.shape != t.shape or m.shape != t.shape:
        raise MetricsError(
            f"targets, probs and mask must all be N x {k}; got {t.shape}, {p.shape}, {m.shape}"
        )
    m = m > 0
    for j, slug in enumerate(SLUGS):
        if not np.isin(t[m[:, j], j], (0.0, 1.0)).all():
            found = np.unique(t[m[:, j], j])[:10]
            raise MetricsError(f"targets for {slug} must be 0/1 where unmasked; got {found}")
        if not np.isfinite(p[m[:, j], j]).all():
            raise MetricsError(f"probs for {slug} hold NaN or infinite values where unmasked")
    return t, p, m


def per_pathology(value: Mapping[str, float] | float, what: str) -> list[float]:
    """[value per slug] from a float or a mapping keyed by slug or pathology name."""
    if isinstance(value, Mapping):
        by_slug = {SLUG_OF.get(k, k): float(v) for k, v in value.items()}
        unknown = set(by_slug) - set(SLUGS)
        missing = [s for s in SLUGS if s not in by_slug]
        if unknown or missing:
            raise MetricsError(
                f"{what} must give every pathology of {list(SLUGS)}; "
                f"unknown {sorted(unknown)}, missing {missing}"
            )
        return [by_slug[s] for s in SLUGS]
    return [float(value)] * len(SLUGS)


def nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """nanmean without the 'Mean of empty slice' warning (all-NaN -> NaN)."""
    count = (~np.isnan(values)).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(values, axis) / np.maximum(count, 1), np.nan)


def pathology_metrics(
    targets: np.ndarray,
    probs: np.ndarray,
    mask: np.ndarray | None = None,
    thresholds: Mapping[str, float] | float = 0.5,
) -> dict[str, dict[str, float]]:
    """{slug: binary_metrics, ..., "average": nanmean over pathologies} on N x 5 arrays.

    Entries with mask 0 are left out of that pathology's metrics.
    """
    t, p, m = check_arrays(targets, probs, mask)
    thr = per_pathology(thresholds, "thresholds")
    out = {s: binary_metrics(t[m[:, j], j], p[m[:, j], j], thr[j], name=s) for j, s in enumerate(SLUGS)}
    table = np.array([[out[s][k] for k in METRICS] for s in SLUGS])  # 5 x metrics
    out[AVERAGE] = dict(zip(METRICS, (float(v) for v in nanmean(table, 0)), strict=True))
    return out


def _best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising MCC on (y, p); ties go to the threshold nearest 0.5."""
    if len(y) == 0:
        return 0.5
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]  # descending scores
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each distinct score
    lower = np.r_[ps[last[:-1] + 1], -np.inf]  # the next lower distinct score
    # Candidate k predicts positive for p >= ps[last[k]]; a midpoint threshold does the same.
    cut = np.where(np.isfinite(lower), (ps[last] + lower) / 2, ps[last])
    cut = np.where((cut > lower) & (cut <= ps[last]), cut, ps[last])
    top = ps[0] + (1 - ps[0]) / 2 if ps[0] < 1 else np.nextafter(ps[0], np.inf)
    tp = np.r_[0.0, np.cumsum(ys)[last]]  # first candidate: nothing positive
    fp = np.r_[0.0, last + 1] - tp
    cuts = np.r_[top, cut]
    mcc = _mcc(tp, fp, ys.sum() - tp, len(ys) - ys.sum() - fp)
    best = np.flatnonzero(mcc >= mcc.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def tune_thresholds(
    targets: np.ndarray, probs: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """{slug: threshold} maximising each pathology's MCC on (validation) predictions.

    Searches every distinct classification (midpoints between sorted distinct probabilities),
    so the tuned MCC is >= the MCC at 0.5 on the same data.
    """
    t, p, m = check_arrays(targets, probs, mask)
    return {s: _best_threshold(t[m[:, j], j], p[m[:, j], j]) for j, s in enumerate(SLUGS)}
