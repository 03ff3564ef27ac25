"""Calibration: do the probabilities mean what they say? Pure functions of arrays.

- `ece`: expected calibration error over N_BINS equal-width bins of the predicted probability:
  sum over bins of (bin share) x |observed positive rate - mean predicted probability|. The bins
  are sklearn.calibration.calibration_curve's (`strategy="uniform"`): (k/n, (k+1)/n], the first
  also holding 0. N_BINS = 15, as in Guo et al. (2017), "On Calibration of Modern Neural Networks".
- `brier`: mean squared difference between probability and outcome (sklearn's brier_score_loss).
- `reliability_bins`: the points of a reliability diagram.
- Temperature scaling (Guo et al.): one scalar T per head, p' = sigmoid(logit(p) / T), fitted on
  validation by minimising the binary cross-entropy (NLL) of every unmasked (image, pathology) entry
  the head scored. T > 1 softens over-confident probabilities; the ranking (AUC) never changes, and
  a threshold t maps to sigmoid(logit(t) / T), so decisions stay the same.

`ece` and `brier` take optional bootstrap weights (B x N, bootstrap.Bootstrap.weights) and then
return B values, one per resample. This module imports numpy (scipy and pandas inside the
functions that need them), so inference can use it without the evaluation stack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from chextrain.errors import ChextrainError
from chextrain.labels import SLUGS

N_BINS = 15
EPS = 1e-7  # probabilities are clipped to [EPS, 1 - EPS] before the logit when fitting
T_BOUNDS: tuple[float, float] = (0.05, 20.0)  # the fitted temperature lies in here
MIN_ENTRIES = 10  # fewer unmasked entries (or a single class): no fit, T = 1


class CalibrationError(ChextrainError):
    """Arrays or temperatures that calibration cannot use; the message names the value."""


@dataclass(frozen=True)
class Bins:
    """A reliability diagram's bins (all N_BINS; empty bins have count 0 and NaN means)."""

    edges: np.ndarray  # n_bins + 1
    mean_prob: np.ndarray  # n_bins: mean predicted probability in the bin
    frac_pos: np.ndarray  # n_bins: observed share of positives in the bin
    count: np.ndarray  # n_bins: entries (weighted) in the bin


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y, dtype=np.float64).reshape(-1), np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise CalibrationError(f"targets and probabilities differ in length: {y.shape} vs {p.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise CalibrationError(f"targets must be 0/1; got {np.unique(y)[:10]}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise CalibrationError("probabilities must be finite and within [0, 1]")
    return y, p


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    """Weights as B x N (None: one row of ones)."""
    w = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[1] != n:
        raise CalibrationError(f"weights must be N or B x N with N = {n}; got shape {w.shape}")
    return w


def bin_index(p: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin of each probability: (k/n, (k+1)/n] -> k, and 0 -> 0 (calibration_curve's rule)."""
    if n_bins < 1:
        raise CalibrationError(f"n_bins must be >= 1; got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], np.asarray(p, dtype=np.float64), side="left")


def ece(
    y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS, weights: np.ndarray | None = None
) -> float | np.ndarray:
    """Expected calibration error of 0/1 targets `y` and probabilities `p` (N each).

    weights: None (a float), N or B x N (B values, e.g. one per bootstrap resample). NaN when
    there is nothing to score.
    """
    y, p = _check(y, p)
    w = _weights(weights, len(y))  # B x N
    onehot = np.zeros((len(y), n_bins))
    onehot[np.arange(len(y)), bin_index(p, n_bins)] = 1.0  # N x K
    gap = w @ (onehot * (y - p)[:, None])  # B x K: weighted sum of (outcome - probability) per bin
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, np.abs(gap).sum(axis=1) / total, np.nan)
    return float(out[0]) if weights is None else (out if np.ndim(weights) == 2 else float(out[0]))


def brier(y: np.ndarray, p: np.ndarray, weights: np.ndarray | None = None) -> float | np.ndarray:
    """Brier score: weighted mean of (p - y)^2; weights as in `ece`."""
    y, p = _check(y, p)
    w = _weights(weights, len(y))
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(total > 0, (w @ (p - y) ** 2) / total, np.nan)
    return float(out[0]) if weights is None else (out if np.ndim(weights) == 2 else float(out[0]))


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> Bins:
    """Mean probability, share of positives and count per equal-width bin (for a reliability diagram)."""
    y, p = _check(y, p)
    k = bin_index(p, n_bins)
    count = np.bincount(k, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob = np.bincount(k, weights=p, minlength=n_bins) / count
        frac_pos = np.bincount(k, weights=y, minlength=n_bins) / count
    return Bins(np.linspace(0.0, 1.0, n_bins + 1), mean_prob, frac_pos, count)


def logit(p: np.ndarray, eps: float = EPS) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [eps, 1 - eps] (finite for saturated sigmoids)."""
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(q) - np.log1p(-q)


def nll(y: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    """Mean binary cross-entropy of sigmoid(logits / temperature) against 0/1 targets."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    # log(1 + e^z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(y, dtype=np.float64) * z))


def fit_temperature(y: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T in T_BOUNDS minimising nll(y, logits, T) (scipy's bounded scalar search on log T).

    Fewer than MIN_ENTRIES entries, or a single class, gives T = 1 (nothing to learn from).
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if y.shape != z.shape:
        raise CalibrationError(f"targets and logits differ in length: {y.shape} vs {z.shape}")
    if not np.isfinite(z).all():
        raise CalibrationError("logits must be finite to fit a temperature")
    if len(y) < MIN_ENTRIES or len(np.unique(y)) < 2:
        return 1.0
    from scipy.optimize import minimize_scalar

    low, high = (math.log(b) for b in T_BOUNDS)
    found = minimize_scalar(
        lambda s: nll(y, z, math.exp(s)), bounds=(low, high), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(found.x))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """sigmoid(logit(probs) / T), same shape and dtype; T = 1 returns `probs` unchanged.

    Saturated probabilities (0 or 1) stay saturated: the logit is taken without clipping.
    """
    t = check_temperature(temperature, "temperature")
    p = np.asarray(probs)
    if t == 1.0:
        return p
    q = p.astype(np.float64)
    with np.errstate(divide="ignore"):
        z = (np.log(q) - np.log1p(-q)) / t
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(p.dtype if p.dtype.kind == "f" else np.float64)


def check_temperature(value: Any, where: str) -> float:
    """A temperature as a float; a CalibrationError naming `where` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise CalibrationError(f"{where}: expected a number > 0, got {value!r}")
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise CalibrationError(f"{where}: expected a finite number > 0, got {value!r}")
    return float(value)


def head_temperatures(table: Any) -> dict[str, float]:
    """{head: T} fitted on a predictions table (validation): every unmasked entry each head scored.

    table: a predictions table (columns head, prob_<slug>, target_<slug>, mask_<slug>).
    """
    out = {}
    for head, part in table.groupby("head", sort=True):
        probs = part[[f"prob_{s}" for s in SLUGS]].to_numpy(dtype=np.float64)  # n x 5
        targets = part[[f"target_{s}" for s in SLUGS]].to_numpy(dtype=np.float64)
        keep = part[[f"mask_{s}" for s in SLUGS]].to_numpy(dtype=np.float64) > 0
        try:
            out[str(head)] = fit_temperature(targets[keep], logit(probs[keep]))
        except CalibrationError as err:
            raise CalibrationError(
                f"head {head!r}: {err} (non-finite probabilities in its predictions?)"
            ) from None
    return out


def scale_rows(probs: np.ndarray, heads: np.ndarray, temperatures: Mapping[str, float]) -> np.ndarray:
    """N x C probabilities with each row scaled by its head's temperature (heads absent: T = 1)."""
    out = np.array(probs, dtype=np.float64, copy=True)
    heads = np.asarray(heads).astype(str)
    for head, t in temperatures.items():
        rows = heads == str(head)
        if rows.any():
            out[rows] = apply_temperature(out[rows], t)
    return out
