"""Predictor: routing by the router, forced domains, OOD flags, thresholds, TTA, batching.

The demo tree and bundles (`use_demo`, `routed_bundle`, `plain_bundle`) come from tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chextrain.data.images import load_image
from chextrain.decisions import PredictorError, withhold
from chextrain.inference import Predictor
from chextrain.labels import SLUGS
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.ood import calibrate_ood
from chextrain.tta import TTA_VIEWS, jitter
from tests.conftest import KINDS, SIZE, calibration_files, demo_files

ROUTED = ("digital", "natural", "synthetic-photographic")  # what the router must tell apart


def non_xrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are not chest x-rays: a blank page, noise, a text document."""
    rng = np.random.default_rng(seed)
    blank = np.full((90, 70), 250, np.uint8)
    noise = rng.integers(0, 256, (90, 70)).astype(np.uint8)
    doc = np.full((90, 70), 240, np.uint8)
    for row in range(8, 84, 7):
        doc[row : row + 2, 6 : int(rng.integers(35, 64))] = 25
    return {"blank": blank, "noise": noise, "document": doc}


# ---------------------------------------------------------------- routing


def test_router_routes_demo_photos_and_xrays(routed_bundle: Path, use_demo: Path) -> None:
    predictor = Predictor.from_bundle(routed_bundle)
    right, total = 0, 0
    for kind in ROUTED:
        files = demo_files(use_demo, kind, "valid")
        results = predictor.predict_images([load_image(f) for f in files], [str(f) for f in files])
        want = "digital" if kind == "digital" else "photo"
        right += sum(r["domain"] == want for r in results)
        total += len(results)
        for r in results:
            assert r["domain_source"] == "router"
            assert r["head"] == r["domain"]  # the bundle maps digital/photo to heads of those names
            assert (r["p_photo"] >= 0.5) == (r["domain"] == "photo")
    assert total == 60
    assert right / total >= 0.95


def test_forced_domain_overrides_the_router(routed_bundle: Path, use_demo: Path) -> None:
    photos = [load_image(f) for f in demo_files(use_demo, "natural", "valid")[:3]]
    for domain in ("digital", "photo"):
        predictor = Predictor.from_bundle(routed_bundle, domain=domain)
        for r in predictor.predict_images(photos):
            assert (r["head"], r["domain"], r["domain_source"]) == (domain, domain, "forced")
            assert r["p_photo"] is not None  # still reported
            assert not r["router_uncertain"]
    auto = Predictor.from_bundle(routed_bundle)
    forced = auto.predict_images(photos, domain="digital")
    assert [r["head"] for r in forced] == ["digital"] * 3


def test_uncertain_router_is_flagged(plain_bundle: Path) -> None:
    predictor = Predictor.from_bundle(plain_bundle)
    with torch.no_grad():  # P(photo) = 0.5 exactly for every image
        predictor.model.router.weight.zero_()
        predictor.model.router.bias.zero_()
    (r,) = predictor.predict_images([non_xrays()["noise"]])
    assert r["p_photo"] == pytest.approx(0.5)
    assert r["router_uncertain"] and r["flagged"]
    assert any("router" in w for w in r["warnings"])
    (forced,) = predictor.predict_images([non_xrays()["noise"]], domain="digital")
    assert not forced["router_uncertain"] and not forced["flagged"]


def test_two_heads_without_router_need_a_domain(tmp_path: Path) -> None:
    model = CXRNet("tiny", heads=["digital", "photo"], router=False)
    bundle = save_bundle(model, tmp_path / "b", {"image_size": 32})
    with pytest.raises(PredictorError, match="no router"):
        Predictor.from_bundle(bundle)
    (r,) = Predictor.from_bundle(bundle, domain="photo").predict_images([np.zeros((40, 40), np.uint8)])
    assert r["head"] == "photo" and r["p_photo"] is None


def test_single_head_bundle_uses_its_head(tmp_path: Path) -> None:
    bundle = save_bundle(CXRNet("tiny", heads=["shared"]), tmp_path / "b", {"image_size": 32})
    (r,) = Predictor.from_bundle(bundle).predict_images([np.zeros((40, 40), np.uint8)])
    assert (r["head"], r["domain"], r["domain_source"], r["p_photo"]) == ("shared", None, "single-head", None)


# ---------------------------------------------------------------- OOD


def test_non_xrays_are_flagged_and_demo_images_are_not(routed_bundle: Path, use_demo: Path) -> None:
    predictor = Predictor.from_bundle(routed_bundle)
    odd = non_xrays()
    results = predictor.predict_images(list(odd.values()), list(odd))
    for r in results:
        assert r["ood"]["status"] == "out-of-distribution", r["name"]
        assert r["ood"]["flag"] and r["flagged"] and r["ood"]["score"] > r["ood"]["threshold"]
    calibrated = set(calibration_files(use_demo))
    held_out = [f for k in KINDS for f in demo_files(use_demo, k, "train") if f not in calibrated]
    flags = [r["ood"]["flag"] for r in predictor.predict_images([load_image(f) for f in held_out])]
    assert sum(flags) / len(flags) <= 0.1


def test_uncalibrated_bundle_reports_it(plain_bundle: Path) -> None:
    (r,) = Predictor.from_bundle(plain_bundle).predict_images([non_xrays()["blank"]])
    assert r["ood"] == {"status": "uncalibrated", "flag": None, "score": None, "threshold": None}


def test_bad_ood_meta_is_refused(tmp_path: Path) -> None:
    bundle = save_bundle(CXRNet("tiny"), tmp_path / "b", {"image_size": 32, "ood": {"method": "knn"}})
    with pytest.raises(PredictorError, match="ppca-mahalanobis"):
        Predictor.from_bundle(bundle)
    tiny = CXRNet("tiny")
    ood = calibrate_ood(tiny, np.random.default_rng(0).normal(size=(20, 144)))
    other = CXRNet("resnet18")
    bundle = save_bundle(other, tmp_path / "c", {"image_size": 32, "ood": ood})
    with pytest.raises(PredictorError, match="calibrated on feature groups"):
        Predictor.from_bundle(bundle)


# ---------------------------------------------------------------- decisions, TTA, batching


def test_thresholds_decide_per_head(routed_bundle: Path, use_demo: Path) -> None:
    predictor = Predictor.from_bundle(routed_bundle, domain="photo")
    (r,) = predictor.predict_images([load_image(demo_files(use_demo, "natural", "valid")[0])])
    assert r["pathologies"]["edema"]["threshold"] == 0.4  # the bundle's photo threshold
    assert r["pathologies"]["cardiomegaly"]["threshold"] == 0.5  # the default
    for slug in SLUGS:
        p = r["pathologies"][slug]
        assert p["positive"] == (p["prob"] >= p["threshold"])
    predictor.thresholds = {h: dict.fromkeys(SLUGS, 0.0) for h in ("digital", "photo")}
    assert all(
        p["positive"]
        for p in predictor.predict_images([load_image(demo_files(use_demo, "natural", "valid")[0])])[0][
            "pathologies"
        ].values()
    )


def test_tta_averages_jittered_views(plain_bundle: Path, use_demo: Path) -> None:
    predictor = Predictor.from_bundle(plain_bundle, domain="digital")
    image = load_image(demo_files(use_demo, "digital", "valid")[0])
    assert predictor.inputs(image, tta=True).shape == (len(TTA_VIEWS), 3, SIZE, SIZE)
    plain = predictor.predict_images([image])[0]["pathologies"]
    tta = predictor.predict_images([image], tta=True)
    again = predictor.predict_images([image], tta=True)
    assert tta == again  # deterministic
    probs = np.array([tta[0]["pathologies"][s]["prob"] for s in SLUGS])
    ref = np.array([plain[s]["prob"] for s in SLUGS])
    assert not np.allclose(probs, ref, atol=1e-7) and np.allclose(probs, ref, atol=0.2)


def test_jitter_zooms_and_shifts_without_flipping() -> None:
    image = np.zeros((40, 40), np.uint8)
    image[10:20, 5:15] = 200  # a block in the upper left
    assert jitter(image, 1.0, 0.0, 0.0) is image
    shifted = jitter(image, 1.0, 0.1, 0.0)  # 4 px right
    assert shifted[15, 17] == 200 and shifted[15, 7] == 0
    zoomed = jitter(image, 1.5, 0.0, 0.0)
    assert (zoomed > 100).sum() > (image > 100).sum()
    assert zoomed[:, :20].sum() > zoomed[:, 20:].sum()  # still on the left: no flip


def test_batches_give_the_same_answers(plain_bundle: Path, use_demo: Path) -> None:
    predictor = Predictor.from_bundle(plain_bundle)
    images = [load_image(f) for f in demo_files(use_demo, "natural", "valid")[:5]]
    one = predictor.predict_images(images, batch_size=1, score_anyway=True)  # a random router is unsure
    many = predictor.predict_images(images, batch_size=16, score_anyway=True)
    for a, b in zip(one, many, strict=True):
        assert a["head"] == b["head"]
        for s in SLUGS:
            assert a["pathologies"][s]["prob"] == pytest.approx(b["pathologies"][s]["prob"], abs=1e-5)
    assert [r["name"] for r in one] == [f"image{i}" for i in range(5)]


def test_bad_arguments_are_refused(plain_bundle: Path) -> None:
    with pytest.raises(PredictorError, match="domain 'xray' is not one of \\['auto', 'digital', 'photo'\\]"):
        Predictor.from_bundle(plain_bundle, domain="xray")
    with pytest.raises(PredictorError, match="runtime 'tf'"):
        Predictor.from_bundle(plain_bundle, runtime="tf")
    predictor = Predictor.from_bundle(plain_bundle)
    image = np.zeros((30, 30), np.uint8)
    with pytest.raises(PredictorError, match="2 names"):
        predictor.predict_images([image], ["a", "b"])
    with pytest.raises(PredictorError, match="batch_size"):
        predictor.predict_images([image], batch_size=0)
    with pytest.raises(PredictorError, match="domain 'both'"):
        predictor.predict_images([image], domain="both")


# ---------------------------------------------------------------- calibration (temperature per head)


def tempered_bundle(source: Path, out: Path, temperature: dict) -> Path:
    """A copy of a bundle's weights and meta with model.json's temperature set."""
    from chextrain.models.bundle import load_bundle

    model, meta = load_bundle(source)
    return save_bundle(model, out, {**meta, "temperature": temperature})


def test_temperature_scales_probabilities_and_thresholds_not_decisions(
    routed_bundle: Path, use_demo: Path, tmp_path: Path
) -> None:
    from chextrain.evaluation.calibration import apply_temperature

    folder = tempered_bundle(routed_bundle, tmp_path / "t", {"photo": 3.0, "digital": 0.5})
    images = [load_image(f) for f in demo_files(use_demo, "natural", "valid")[:3]]
    images += [load_image(f) for f in demo_files(use_demo, "digital", "valid")[:3]]
    raw = Predictor.from_bundle(routed_bundle).predict_images(images)
    off = Predictor.from_bundle(folder, calibrated=False).predict_images(images)
    on = Predictor.from_bundle(folder).predict_images(images)
    assert off == raw  # switched off: exactly the bundle without temperatures
    assert {r["head"] for r in on} == {"digital", "photo"}
    for a, b in zip(raw, on, strict=True):
        t = {"photo": 3.0, "digital": 0.5}[b["head"]]
        assert a["temperature"] == 1.0 and b["temperature"] == t
        for s in SLUGS:
            pa, pb = a["pathologies"][s], b["pathologies"][s]
            assert pb["prob"] == pytest.approx(float(apply_temperature(np.float64(pa["prob"]), t)), abs=1e-6)
            assert pb["prob"] != pytest.approx(pa["prob"], abs=1e-6)
            assert pb["threshold"] == pytest.approx(float(apply_temperature(np.float64(pa["threshold"]), t)))
            assert pb["positive"] == pa["positive"]  # a threshold maps with its probabilities
    assert on[0]["pathologies"]["cardiomegaly"]["threshold"] == 0.5  # logit 0 stays 0


def test_bad_temperatures_are_refused(plain_bundle: Path, tmp_path: Path) -> None:
    from chextrain.models.bundle import WeightsError, load_bundle

    model, meta = load_bundle(plain_bundle)
    for bad, says in (({"other": 2.0}, "names head 'other'"), ({"photo": -1.0}, "finite number > 0")):
        with pytest.raises(WeightsError, match=says):
            save_bundle(model, tmp_path / "b", {**meta, "temperature": bad})
    with pytest.raises(PredictorError, match="temperature names heads \\['x'\\]"):
        Predictor(model, {**meta, "temperature": {"x": 2.0}})
    with pytest.raises(PredictorError, match="temperature\\['photo'\\]"):
        Predictor(model, {**meta, "temperature": {"photo": 0}})


# ---------------------------------------------------------------- withholding


def test_flagged_images_have_their_findings_withheld(routed_bundle: Path) -> None:
    predictor = Predictor.from_bundle(routed_bundle)
    odd = non_xrays()
    for r in predictor.predict_images(list(odd.values()), list(odd)):
        assert r["flagged"] and r["withheld"] and "pathologies" not in r, r["name"]
        assert r["withheld_reason"].startswith("out-of-distribution") and not r["scored_anyway"]
        assert list(r["withheld_pathologies"]) == list(SLUGS)  # kept for research use
    anyway = predictor.predict_images(list(odd.values()), list(odd), score_anyway=True)
    for r in anyway:
        assert r["flagged"] and not r["withheld"] and r["scored_anyway"] and r["withheld_reason"] is None
        assert "withheld_pathologies" not in r and list(r["pathologies"]) == list(SLUGS)
    withheld = predictor.predict_images([odd["noise"]])[0]["withheld_pathologies"]
    assert withheld == anyway[1]["pathologies"]  # the same numbers, only moved


def test_an_unsure_router_withholds_and_a_clean_result_is_untouched(plain_bundle: Path) -> None:
    predictor = Predictor.from_bundle(plain_bundle)
    with torch.no_grad():  # P(photo) = 0.5 exactly for every image
        predictor.model.router.weight.zero_()
        predictor.model.router.bias.zero_()
    (r,) = predictor.predict_images([non_xrays()["noise"]])
    assert r["withheld"] and r["withheld_reason"].startswith("router unsure")
    (forced,) = predictor.predict_images([non_xrays()["noise"]], domain="digital")
    assert not forced["withheld"] and forced["withheld_reason"] is None and "pathologies" in forced
    clean = {"ood": {"flag": False}, "router_uncertain": False, "pathologies": {"edema": {}}}
    assert withhold(dict(clean)) == {
        **clean,
        "withheld": False,
        "withheld_reason": None,
        "scored_anyway": False,
    }
    both = withhold({**clean, "ood": {"flag": True}, "router_uncertain": True})
    assert both["withheld_reason"] == "out-of-distribution; router unsure (digital x-ray or photo?)"
