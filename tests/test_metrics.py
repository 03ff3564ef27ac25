"""Metrics equal scikit-learn's; thresholds; patient bootstrap; paired differences."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from chextrain.evaluation.metrics import (
    METRICS,
    MetricsError,
    UndefinedAUCWarning,
    binary_metrics,
    bootstrap_ci,
    paired_difference,
    pathology_metrics,
    tune_thresholds,
    weighted_metrics,
)
from chextrain.labels import PATHOLOGIES, SLUGS


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _sklearn(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray | None = None) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    weight = np.ones(len(y)) if w is None else w
    both = 0 < np.sum(y * weight) < np.sum(weight)
    with warnings.catch_warnings():  # scikit-learn's own "single label" notice
        warnings.simplefilter("ignore", UserWarning)
        mcc = matthews_corrcoef(y, pred, sample_weight=w)
    return {
        "mcc": mcc,
        "auc": roc_auc_score(y, p, sample_weight=w) if both else float("nan"),
        "precision": precision_score(y, pred, zero_division=0, sample_weight=w),
        "recall": recall_score(y, pred, zero_division=0, sample_weight=w),
        "f1": f1_score(y, pred, zero_division=0, sample_weight=w),
        "accuracy": accuracy_score(y, pred, sample_weight=w),
    }


# Few distinct probabilities, so ties (and ties at the threshold) are common.
_probs = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5000001, 0.75, 0.9, 1.0]) | st.floats(0, 1)
_samples = st.lists(st.tuples(st.integers(0, 1), _probs, st.integers(0, 3)), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(samples=_samples, threshold=st.sampled_from([0.5, 0.25, 0.9]) | st.floats(0, 1))
def test_binary_metrics_equal_sklearn(samples: list, threshold: float) -> None:
    y = np.array([s[0] for s in samples])
    p = np.array([s[1] for s in samples])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = binary_metrics(y, p, threshold)
    assert all(w.category is UndefinedAUCWarning for w in caught)  # no scikit-learn noise
    expected = _sklearn(y, p, threshold)
    for name, value in expected.items():
        assert _same(ours[name], value), name
    assert ours["support"] == len(y) and ours["positives"] == y.sum()


@settings(max_examples=150, deadline=None)
@given(samples=_samples, threshold=st.sampled_from([0.5, 0.25]) | st.floats(0, 1))
def test_weighted_metrics_equal_sklearn_with_sample_weight(samples: list, threshold: float) -> None:
    y = np.array([s[0] for s in samples])
    p = np.array([s[1] for s in samples])
    w = np.array([s[2] for s in samples], dtype=float)
    ours = weighted_metrics(y, p, np.stack([w, np.ones_like(w)]), threshold)  # two weightings at once
    if w.sum() > 0:
        for name, value in _sklearn(y, p, threshold, w).items():
            assert _same(float(ours[name][0]), value), name
        assert ours["support"][0] == w.sum() and ours["positives"][0] == (w * y).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedAUCWarning)
        plain = binary_metrics(y, p, threshold)
    for name in METRICS:
        assert _same(float(ours[name][1]), plain[name]), name


def test_hand_worked_cases() -> None:
    m = binary_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert m == {"mcc": 0.0, "auc": 0.75, "precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5,
                 "support": 4.0, "positives": 2.0}
    tie = binary_metrics(np.array([1, 0]), np.array([0.5, 0.5]))  # 0.5 counts as positive
    assert tie["auc"] == 0.5 and tie["recall"] == 1.0 and tie["precision"] == 0.5
    assert math.isclose(tie["f1"], 2 / 3)
    strong = binary_metrics(np.array([1, 1, 1, 0, 0]), np.array([0.8, 0.7, 0.2, 0.3, 0.1]))
    assert math.isclose(strong["mcc"], 4 / 6) and math.isclose(strong["auc"], 5 / 6)


def test_one_class_gives_nan_auc_with_a_warning_naming_the_pathology() -> None:
    targets = np.zeros((6, 5))
    targets[:3, 1:] = 1  # pleural effusion: negatives only
    probs = np.linspace(0.1, 0.9, 30).reshape(6, 5)
    with pytest.warns(UndefinedAUCWarning, match="pleural_effusion.*one class"):
        out = pathology_metrics(targets, probs)
    assert math.isnan(out["pleural_effusion"]["auc"]) and out["pleural_effusion"]["accuracy"] == 0.5
    assert not math.isnan(out["edema"]["auc"])
    aucs = [out[s]["auc"] for s in SLUGS[1:]]
    assert math.isclose(out["average"]["auc"], float(np.mean(aucs)))  # nanmean skips the NaN


def test_masking_excludes_entries_and_accepts_names_for_thresholds() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 5)) < 0.4).astype(float)
    probs = rng.random((40, 5))
    mask = (rng.random((40, 5)) < 0.7).astype(float)
    targets[mask == 0] = -1  # masked cells may hold anything, even non-labels and NaN
    probs[mask == 0] = np.nan
    thresholds = {name: 0.3 + 0.1 * j for j, name in enumerate(PATHOLOGIES)}
    out = pathology_metrics(targets, probs, mask, thresholds)
    for j, slug in enumerate(SLUGS):
        keep = mask[:, j] > 0
        assert out[slug] == binary_metrics(targets[keep, j], probs[keep, j], 0.3 + 0.1 * j)
    for name in METRICS:
        assert math.isclose(out["average"][name], float(np.mean([out[s][name] for s in SLUGS])))
    mask[:, 2] = 0  # a pathology with no labels at all
    with pytest.warns(UndefinedAUCWarning, match="atelectasis: no labelled samples"):
        empty = pathology_metrics(targets, probs, mask)
    assert math.isnan(empty["atelectasis"]["mcc"]) and empty["atelectasis"]["support"] == 0


def test_bad_inputs_are_refused() -> None:
    t, p = np.zeros((4, 5)), np.full((4, 5), 0.5)
    with pytest.raises(MetricsError, match="N x 5"):
        pathology_metrics(t[:, :4], p[:, :4])
    with pytest.raises(MetricsError, match="edema must be 0/1"):
        pathology_metrics(np.where(np.arange(5) == 1, 2.0, t), p)
    with pytest.raises(MetricsError, match="probs for cardiomegaly"):
        pathology_metrics(t, np.where(np.arange(5) == 4, np.nan, p))
    with pytest.raises(MetricsError, match="missing.*cardiomegaly"):
        pathology_metrics(t, p, None, {s: 0.5 for s in SLUGS[:4]})
    with pytest.raises(MetricsError, match="unknown.*flu"):
        pathology_metrics(t, p, None, {**{s: 0.5 for s in SLUGS}, "flu": 0.5})
    with pytest.raises(MetricsError, match="1-D"):
        binary_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(MetricsError, match="0/1"):
        binary_metrics(np.array([0, 2]), np.zeros(2))
    with pytest.raises(MetricsError, match="unknown metrics.*'kappa'"):
        bootstrap_ci(t, p, None, np.arange(4), ["auc", "kappa"])
    with pytest.raises(MetricsError, match="groups"):
        bootstrap_ci(t, p, None, np.arange(3))
    with pytest.raises(MetricsError, match="alpha"):
        bootstrap_ci(t, p, None, np.arange(4), alpha=1.5)


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(st.tuples(st.integers(0, 1), _probs), min_size=1, max_size=30))
def test_tuned_threshold_maximises_mcc(samples: list) -> None:
    y = np.array([s[0] for s in samples], dtype=float)
    p = np.array([s[1] for s in samples])
    targets, probs = np.repeat(y[:, None], 5, 1), np.repeat(p[:, None], 5, 1)
    t = tune_thresholds(targets, probs)["edema"]

    def mcc(cut: float) -> float:
        with warnings.catch_warnings():  # scikit-learn's own "single label" notice
            warnings.simplefilter("ignore", UserWarning)
            return matthews_corrcoef(y, (p >= cut).astype(int))

    brute = max(mcc(c) for c in [*np.unique(p), np.inf])
    tuned = mcc(t)
    assert tuned >= mcc(0.5) - 1e-12
    assert math.isclose(tuned, brute, abs_tol=1e-12)


def test_tuned_thresholds_beat_half_on_validation() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 5)) < 0.3).astype(float)
    probs = 0.2 * targets + 0.35 * rng.random((200, 5))  # all below 0.55: 0.5 is far too high
    tuned = tune_thresholds(targets, probs)
    at_half, at_tuned = pathology_metrics(targets, probs), pathology_metrics(targets, probs, None, tuned)
    assert all(at_tuned[s]["mcc"] >= at_half[s]["mcc"] for s in SLUGS)
    assert at_tuned["average"]["mcc"] > at_half["average"]["mcc"] + 0.1
    assert all(0 < t < 0.5 for t in tuned.values())


def _demo(n: int = 700, patients: int = 300, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 5)) < 0.35).astype(float)
    probs = np.clip(0.35 * targets + 0.65 * rng.random((n, 5)), 0, 1)
    mask = (rng.random((n, 5)) < 0.9).astype(float)
    return targets, probs, mask, rng.integers(0, patients, n).astype(str)


def test_bootstrap_is_reproducible_fast_and_contains_the_estimate() -> None:
    targets, probs, mask, groups = _demo()
    start = time.perf_counter()
    ci = bootstrap_ci(targets, probs, mask, groups, n_boot=1000, seed=7)
    elapsed = time.perf_counter() - start
    assert elapsed < 4.0, f"1000 resamples x 5 pathologies x 700 images took {elapsed:.2f} s"
    assert ci == bootstrap_ci(targets, probs, mask, groups, n_boot=1000, seed=7)
    assert ci != bootstrap_ci(targets, probs, mask, groups, n_boot=1000, seed=8)
    point = pathology_metrics(targets, probs, mask)
    for key in (*SLUGS, "average"):
        for name, (low, high) in ci[key].items():
            assert low <= point[key][name] <= high, (key, name)
            assert low < high


def test_bootstrap_resamples_patients_not_images() -> None:
    targets, probs, mask, _ = _demo(n=60)
    one_patient = np.zeros(60, dtype=int)  # a single cluster: every resample is the whole set
    ci = bootstrap_ci(targets, probs, mask, one_patient, ["auc", "mcc"], n_boot=20)
    point = pathology_metrics(targets, probs, mask)
    assert all(math.isclose(ci[s]["auc"][0], point[s]["auc"]) and ci[s]["auc"][0] == ci[s]["auc"][1]
               for s in SLUGS)
    pairs = np.arange(60) // 3  # patients of 3 images: resample sizes are multiples of 3
    sizes = bootstrap_ci(np.ones((60, 5)), probs, None, pairs, {"size": lambda y, p: float(len(y))},
                         n_boot=40, alpha=0.5)
    assert all(v % 3 == 0 for v in sizes["edema"]["size"])


def test_custom_metric_matches_the_vectorised_one() -> None:
    targets, probs, mask, groups = _demo(n=120, patients=50)
    built_in = bootstrap_ci(targets, probs, mask, groups, "auc", n_boot=30, seed=1)
    custom = bootstrap_ci(targets, probs, mask, groups, {"auc": roc_auc_score}, n_boot=30, seed=1)
    for key in (*SLUGS, "average"):
        assert np.allclose(built_in[key]["auc"], custom[key]["auc"], rtol=1e-9)


def test_paired_difference_matches_keys_and_shares_resamples() -> None:
    targets, probs, mask, groups = _demo(n=300, patients=120)
    keys = np.array([f"x{i}" for i in range(300)])
    rng = np.random.default_rng(1)
    worse = np.clip(probs + rng.normal(0, 0.25, probs.shape), 0, 1)
    order = rng.permutation(300)[:250]  # photos: a shuffled subset, plus x-rays of their own
    extra = 5
    b = (np.r_[targets[order], np.zeros((extra, 5))], np.r_[worse[order], np.full((extra, 5), 0.5)],
         np.r_[mask[order], np.ones((extra, 5))], np.r_[keys[order], [f"y{i}" for i in range(extra)]],
         np.r_[groups[order], ["other"] * extra])
    out = paired_difference((targets, probs, mask, keys, groups), b, ["auc", "mcc"], n_boot=300)
    keep = np.isin(keys, keys[order])
    a_only = pathology_metrics(targets[keep], probs[keep], mask[keep])
    for s in SLUGS:
        assert math.isclose(out[s]["auc"]["a"], a_only[s]["auc"]) and out[s]["auc"]["n"] == 250
        assert out[s]["auc"]["low"] <= out[s]["auc"]["difference"] <= out[s]["auc"]["high"]
    assert out["average"]["auc"]["low"] > 0  # the noisy "photos" are clearly worse
    same = paired_difference((targets, probs, mask, keys, groups), (targets, probs, mask, keys, groups),
                             "auc", n_boot=50)
    assert all(same[k]["auc"]["difference"] == same[k]["auc"]["low"] == same[k]["auc"]["high"] == 0
               for k in (*SLUGS, "average"))


def test_paired_difference_refuses_bad_pairs() -> None:
    targets, probs, mask, groups = _demo(n=10, patients=4)
    keys = np.array([f"x{i}" for i in range(10)])
    side = (targets, probs, mask, keys, groups)
    with pytest.raises(MetricsError, match="not unique"):
        paired_difference(side, (targets, probs, mask, np.r_[keys[:9], keys[:1]], groups))
    with pytest.raises(MetricsError, match="no key"):
        paired_difference(side, (targets, probs, mask, np.char.add(keys, "z"), groups))
    with pytest.raises(MetricsError, match="different patients"):
        paired_difference(side, (targets, probs, mask, keys, np.roll(groups, 1)))
