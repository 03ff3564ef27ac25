"""Metrics equal scikit-learn's; thresholds; the patient bootstrap engine; pairing; paired differences."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
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

from chextrain.evaluation.bootstrap import Bootstrap, difference, estimates, pair_rows
from chextrain.evaluation.metrics import (
    METRICS,
    MetricsError,
    UndefinedAUCWarning,
    binary_metrics,
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
    assert m == {
        "mcc": 0.0,
        "auc": 0.75,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "accuracy": 0.5,
        "support": 4.0,
        "positives": 2.0,
    }
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
        Bootstrap((t, p, None), np.arange(4), 10, 0).values(metrics=["auc", "kappa"])
    with pytest.raises(MetricsError, match=r"patients must hold one id per row \(4\)"):
        Bootstrap((t, p, None), np.arange(3), 10, 0)
    with pytest.raises(MetricsError, match="n_boot must be an integer >= 0; got -1"):
        Bootstrap((t, p, None), np.arange(4), -1, 0)
    with pytest.raises(MetricsError, match="probs for edema"):
        Bootstrap((t, np.where(np.arange(5) == 1, np.inf, p), None), np.arange(4), 10, 0)
    with pytest.raises(MetricsError, match="missing.*cardiomegaly"):
        Bootstrap((t, p, None), np.arange(4), 10, 0).values(thresholds={s: 0.5 for s in SLUGS[:4]})


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


def test_bootstrap_is_reproducible_and_contains_the_estimate() -> None:
    targets, probs, mask, patients = _demo()
    arrs = (targets, probs, mask)
    ci = estimates(Bootstrap(arrs, patients, 1000, seed=7).values())
    assert ci == estimates(Bootstrap(arrs, patients, 1000, seed=7).values())
    assert ci != estimates(Bootstrap(arrs, patients, 1000, seed=8).values())
    point = pathology_metrics(targets, probs, mask)
    for key in (*SLUGS, "average"):
        for name, (value, low, high) in ci[key].items():
            assert math.isclose(value, point[key][name], rel_tol=1e-9, abs_tol=1e-12), (key, name)
            assert low <= value <= high and low < high, (key, name)
    none = estimates(Bootstrap(arrs, patients, 0, seed=7).values())  # n_boot 0: point estimates only
    assert none["edema"]["auc"][0] == ci["edema"]["auc"][0] and math.isnan(none["edema"]["auc"][1])


def test_one_resample_equals_scikit_learn_with_patient_weights() -> None:
    targets, probs, mask, patients = _demo(n=150, patients=40)
    boot = Bootstrap((targets, probs, mask), patients, 120, seed=7)
    values = boot.values(metrics=["mcc", "auc", "f1"])
    assert boot.counts.shape == (120, 40) and (boot.counts.sum(1) == 40).all()  # 40 patients per resample
    weights = boot.counts[5][boot.inv].astype(float)  # resample 5, rebuilt row by row
    j = SLUGS.index("edema")
    keep = mask[:, j] > 0
    expected = _sklearn(targets[keep, j], probs[keep, j], 0.5, weights[keep])
    for name in ("mcc", "auc", "f1"):
        assert values.boot[name][5, j] == pytest.approx(expected[name], abs=1e-12), name
    rows = np.arange(0, 150, 2)
    assert np.array_equal(np.concatenate(list(boot.weights(rows))), boot.counts[:, boot.inv[rows]])


def test_bootstrap_resamples_patients_not_images() -> None:
    targets, probs, mask, _ = _demo(n=60)
    arrs = (targets, probs, mask)
    one_patient = estimates(Bootstrap(arrs, np.zeros(60, dtype=int), 50, seed=0).values())
    for key in (*SLUGS, "average"):  # one cluster: every resample is the whole set
        value, low, high = one_patient[key]["auc"]
        assert math.isclose(low, value, rel_tol=1e-12) and math.isclose(high, value, rel_tol=1e-12)
    # 30 patients, each with 4 copies of one image: by patient, the CI is that of the 30 images
    # alone; resampling the 120 images independently would make it about half as wide.
    small_t, small_p, small_m, _ = _demo(n=30, seed=4)
    ids = np.array([f"p{i:02d}" for i in range(30)])
    copies = tuple(np.repeat(a, 4, axis=0) for a in (small_t, small_p, small_m))

    def width(arrays: tuple[np.ndarray, ...], patients: np.ndarray) -> float:
        _, low, high = estimates(Bootstrap(arrays, patients, 400, seed=2).values())["average"]["auc"]
        return high - low

    by_patient = width(copies, np.repeat(ids, 4))
    assert math.isclose(by_patient, width((small_t, small_p, small_m), ids), rel_tol=1e-9)
    assert width(copies, np.arange(120)) < 0.75 * by_patient


def test_pair_rows_match_by_patient_study_image() -> None:
    std = pd.DataFrame(
        {"patient": ["a", "a", "b", "a"], "study": ["study1"] * 4, "image": ["v1", "v2", "v1", "v2"]}
    )
    photos = pd.DataFrame(
        {
            "patient": ["b", "a", "VBSF1", "a", "b"],
            "study": ["study1"] * 5,
            "image": ["v1", "v2", "v1", "v2", "v9"],
        }
    )
    i_std, i_photo = pair_rows(std, photos)
    assert i_photo.tolist() == [0, 1, 3]  # film VBSF1 and the unknown b/v9 stay unpaired
    assert i_std.tolist() == [2, 1, 1]  # a/study1/v2 twice in std: its first row; two photos of it
    with pytest.raises(MetricsError, match=r"missing \['study'\]"):
        pair_rows(std.drop(columns="study"), photos)


def _two_sides(noise: float, seed: int = 1) -> tuple[pd.DataFrame, tuple, np.ndarray, np.ndarray, np.ndarray]:
    """One table: 240 x-rays (2 per patient), then photos of 180 of them (20 photographed twice,
    probabilities + noise), then 6 film photos without a source x-ray."""
    rng = np.random.default_rng(seed)
    n, film = 240, 6
    patient = np.array([f"p{i // 2:03d}" for i in range(n)])
    image = np.array([f"view{i % 2 + 1}_frontal" for i in range(n)])
    targets = (rng.random((n, 5)) < 0.35).astype(float)
    probs = np.clip(0.35 * targets + 0.65 * rng.random((n, 5)), 0, 1)
    shown = np.r_[rng.permutation(n)[:180], np.arange(20)]  # the x-ray each photo shows
    photo_probs = np.clip(probs[shown] + rng.normal(0, noise, (len(shown), 5)), 0, 1)
    ids = pd.DataFrame(
        {
            "patient": [*patient, *patient[shown], *(f"VBSF{i}" for i in range(film))],
            "study": "study1",
            "image": [*image, *image[shown], *["view1_frontal"] * film],
        }
    )
    arrs = (
        np.r_[targets, targets[shown], np.zeros((film, 5))],
        np.r_[probs, photo_probs, np.full((film, 5), 0.5)],
        None,
    )
    return ids, arrs, np.arange(n), np.arange(n, len(ids)), shown


def test_paired_difference_pairs_by_key_and_shares_resamples() -> None:
    ids, arrs, xrays, photos, shown = _two_sides(noise=0.25)
    boot = Bootstrap(arrs, ids["patient"].to_numpy(), 400, seed=0)
    i_x, i_p = pair_rows(ids.iloc[xrays], ids.iloc[photos])
    assert i_p.tolist() == list(range(len(shown))) and i_x.tolist() == shown.tolist()  # film unpaired
    weights = boot.counts[:, boot.inv]  # B x N: a photo is always drawn with its x-ray
    assert np.array_equal(weights[:, xrays[i_x]], weights[:, photos[i_p]])
    a = boot.paired(xrays, i_x, boot.values(xrays))
    b = boot.paired(photos, i_p, boot.values(photos))
    assert a.n == b.n == 200
    targets, probs, _ = arrs
    rows = xrays[i_x]  # x-rays photographed twice count twice; those never photographed not at all
    expected = pathology_metrics(targets[rows], probs[rows])
    diff = difference(a, b)
    for s in SLUGS:
        assert math.isclose(a.point["auc"][SLUGS.index(s)], expected[s]["auc"], rel_tol=1e-9)
        value, low, high = diff[s]["auc"]
        assert low <= value <= high
    assert diff["average"]["auc"][1] > 0  # the noisy photos are clearly worse
    ids, arrs, xrays, photos, _ = _two_sides(noise=0.0)  # photos identical to their x-rays
    boot = Bootstrap(arrs, ids["patient"].to_numpy(), 100, seed=0)
    i_x, i_p = pair_rows(ids.iloc[xrays], ids.iloc[photos])
    same = difference(boot.paired(xrays, i_x), boot.paired(photos, i_p))
    assert all(same[k][m] == (0.0, 0.0, 0.0) for k in (*SLUGS, "average") for m in ("auc", "mcc"))


def test_paired_reuses_a_side_whose_rows_are_paired_equally_often() -> None:
    ids, arrs, xrays, _, _ = _two_sides(noise=0.1)
    boot = Bootstrap(arrs, ids["patient"].to_numpy(), 50, seed=0)
    whole = boot.values(xrays)
    assert boot.paired(xrays, np.repeat(np.arange(len(xrays)), 3), whole) is whole  # 3 photos of each
    again = boot.paired(xrays, np.arange(len(xrays) - 1), whole)  # one x-ray without a photo
    assert again is not whole and again.n == len(xrays) - 1
