"""The OOD check (chextrain.ood): run_batch, ScoringNet, the Mahalanobis score and its calibration."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy import stats

from chextrain.models.net import CXRNet
from chextrain.ood import (
    OOD_METHOD,
    OODError,
    ScoringNet,
    calibrate_ood,
    check_calibration,
    combined_scores,
    feature_groups,
    fit_ppca,
    ood_features,
    ood_scores,
    run_batch,
)


@pytest.fixture(scope="module")
def model() -> CXRNet:
    torch.manual_seed(0)
    return CXRNet("tiny", heads=["digital", "photo"], router=True).eval()


def _batch(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- running a batch


def test_run_batch_on_the_cpu_is_a_plain_call(model: CXRNet) -> None:
    x = _batch()
    out = run_batch(ScoringNet(model), x)
    with torch.inference_mode():
        ref = ScoringNet(model)(x)
    assert len(out) == 3 and all(isinstance(o, np.ndarray) and o.dtype == np.float32 for o in out)
    for got, want in zip(out, ref, strict=True):
        assert np.array_equal(got, want.numpy())  # bit for bit: no autocast, no copy through another dtype
    (features,) = run_batch(model.encoder, x)
    assert np.array_equal(features, out[-1][:, -model.num_features :])


def test_run_batch_takes_the_dtype_from_the_model(model: CXRNet) -> None:
    double = copy.deepcopy(model).double()
    x = _batch()  # float32: a float64 model cannot take it as is
    probs, p_photo, features = run_batch(ScoringNet(double), x)
    ref = run_batch(ScoringNet(model), x)
    assert probs.dtype == np.float32 and features.dtype == np.float32
    assert np.allclose(probs, ref[0], atol=1e-5) and np.allclose(features, ref[2], rtol=1e-4, atol=1e-5)
    assert ood_features(double, x).dtype == np.float64
    assert [s for _, s in feature_groups(double)] == [s for _, s in feature_groups(model)]


def test_scoring_net_logits_are_the_probabilities_before_the_sigmoid(model: CXRNet) -> None:
    x = _batch()
    probs, p_photo, features = run_batch(ScoringNet(model), x)
    logits, router, same = run_batch(ScoringNet(model, logits=True), x)
    assert logits.shape == (6, 2, 5) and router.shape == (6,)
    assert np.allclose(1 / (1 + np.exp(-logits)), probs, atol=1e-6)
    assert np.allclose(1 / (1 + np.exp(-router)), p_photo, atol=1e-6)
    assert np.array_equal(features, same)
    widths = [s for _, s in feature_groups(model)]
    assert features.shape == (6, sum(widths))
    # The first group holds block1's channel means then spreads over space.
    acts = []
    hook = model.encoder.get_submodule("features.block1").register_forward_hook(
        lambda m, i, o: acts.append(o)
    )
    try:
        with torch.inference_mode():
            model.features(x)
    finally:
        hook.remove()
    half = widths[0] // 2
    assert np.allclose(features[:, :half], acts[0].mean(dim=(2, 3)).numpy(), atol=1e-6)
    assert np.allclose(
        features[:, half : widths[0]], acts[0].std(dim=(2, 3), correction=0).numpy(), atol=1e-5
    )


def test_model_without_router_has_no_p_photo() -> None:
    out = run_batch(ScoringNet(CXRNet("tiny").eval()), _batch(2))
    assert [o.shape for o in out] == [(2, 1, 5), (2, 144)]


# ---------------------------------------------------------------- the score and its calibration


def test_ood_score_is_a_normalised_mahalanobis_distance() -> None:
    """Gaussian features: fresh scores average 1 and their 99th percentile is chi2(F) / F."""
    dim, scale = 12, np.linspace(0.5, 3, 12)
    fit = fit_ppca(np.random.default_rng(0).normal(size=(4000, dim)) * scale, components=dim)
    scores = ood_scores(np.random.default_rng(1).normal(size=(4000, dim)) * scale, fit)
    assert scores.mean() == pytest.approx(1.0, abs=0.05)
    assert np.quantile(scores, 0.99) == pytest.approx(stats.chi2.ppf(0.99, dim) / dim, rel=0.1)
    shifted = ood_scores(np.full((1, dim), 4.0) * scale, fit)  # 4 sigma on every axis: 16 per axis
    assert shifted[0] == pytest.approx(16.0, rel=0.1)
    with pytest.raises(OODError, match="N x 12"):
        ood_scores(np.zeros((3, 5)), fit)


def test_calibration_threshold_is_an_out_of_fold_quantile() -> None:
    model = CXRNet("tiny")
    width = sum(size for _, size in feature_groups(model))
    feats = np.random.default_rng(0).normal(size=(400, width)) * np.linspace(0.1, 2, width)
    cal = calibrate_ood(model, feats, components=8)
    assert cal["method"] == OOD_METHOD and cal["n"] == 400
    assert [g["name"] for g in cal["groups"]] == ["features.block1", "features.block2", "features"]
    fresh = np.random.default_rng(1).normal(size=(4000, width)) * np.linspace(0.1, 2, width)
    flagged = (combined_scores(fresh, cal["groups"]) > cal["threshold"]).mean()
    assert 0.002 <= flagged <= 0.03  # about 1 % of new in-distribution images
    inside = combined_scores(feats, cal["groups"])
    assert (inside > cal["threshold"]).mean() < flagged  # fitted rows score lower: why OOF is used
    with pytest.raises(OODError, match=f"N x {width}"):
        combined_scores(fresh[:, :10], cal["groups"])


def test_calibrate_ood_rejects_bad_features() -> None:
    model = CXRNet("tiny")
    with pytest.raises(OODError, match="N x 144"):
        calibrate_ood(model, np.zeros((20, 10)))
    with pytest.raises(OODError, match=">= 10 images"):
        calibrate_ood(model, np.zeros((5, 144)))
    bad = np.ones((20, 144))
    bad[3, 4] = np.nan
    with pytest.raises(OODError, match="NaN"):
        calibrate_ood(model, bad)
    with pytest.raises(OODError, match="quantile"):
        calibrate_ood(model, np.random.default_rng(0).normal(size=(20, 144)), quantile=1.0)


def test_check_calibration_matches_the_model() -> None:
    tiny = CXRNet("tiny")
    cal = calibrate_ood(tiny, np.random.default_rng(0).normal(size=(20, 144)))
    assert check_calibration(None, tiny) is None
    assert check_calibration(cal, tiny) == cal
    with pytest.raises(OODError, match="ppca-mahalanobis"):
        check_calibration({"method": "knn"}, tiny)
    with pytest.raises(OODError, match="calibrated on feature groups"):
        check_calibration(cal, CXRNet("resnet18"))
