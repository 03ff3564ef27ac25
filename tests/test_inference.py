"""Predictor: routing by the router, forced domains, OOD flags, thresholds, TTA, batching.

The fixtures here (`use_demo`, `routed_bundle`, `plain_bundle`) are imported by the other
test files of the "use" commands (CLI, serve, export, browser).
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from chextrain.data.demo import write_demo
from chextrain.data.images import load_image
from chextrain.data.transforms import preprocess
from chextrain.inference import (
    TTA_VIEWS,
    Predictor,
    PredictorError,
    calibrate_ood,
    combined_scores,
    feature_groups,
    fit_ppca,
    image_features,
    jitter,
    ood_scores,
)
from chextrain.labels import SLUGS
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet

SIZE = 64
KINDS = {  # kind -> glob under the demo root
    "digital": "CheXpert-v1.0-small/{split}/**/*.jpg",
    "natural": "CheXphoto-v1.0/{split}/natural/**/*.jpg",
    "synthetic-digital": "CheXphoto-v1.0/{split}/synthetic/digital/**/*.jpg",
    "synthetic-photographic": "CheXphoto-v1.0/{split}/synthetic/photographic/**/*.jpg",
}
ROUTED = ("digital", "natural", "synthetic-photographic")  # what the router must tell apart


def demo_files(root: Path, kind: str, split: str) -> list[Path]:
    """Sorted image files of one kind ('digital', 'natural', ...) and split ('train', 'valid')."""
    return sorted(map(Path, glob.glob(str(root / KINDS[kind].format(split=split)), recursive=True)))


def non_xrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Images that are not chest x-rays: a blank page, noise, a text document."""
    rng = np.random.default_rng(seed)
    blank = np.full((90, 70), 250, np.uint8)
    noise = rng.integers(0, 256, (90, 70)).astype(np.uint8)
    doc = np.full((90, 70), 240, np.uint8)
    for row in range(8, 84, 7):
        doc[row:row + 2, 6:int(rng.integers(35, 64))] = 25
    return {"blank": blank, "noise": noise, "document": doc}


def train_router(model: CXRNet, x: torch.Tensor, y: torch.Tensor, steps: int = 150, seed: int = 0) -> None:
    """A short training of the encoder + router on the router's loss alone (heads untouched)."""
    params = list(model.encoder.parameters()) + list(model.router.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared: one thread is fastest
    try:
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (16,), generator=gen)
            loss = F.binary_cross_entropy_with_logits(model.forward_all(x[idx])["router"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def calibration_files(root: Path) -> list[Path]:
    """The OOD calibration set: the valid images and every third train image of each kind.

    Like a real validation split it holds lateral views and every phone, which valid lacks.
    """
    return [f for k in KINDS for f in demo_files(root, k, "valid") + demo_files(root, k, "train")[::3]]


def write_routed_bundle(out: Path, demo: Path) -> Path:
    """A tiny two-head bundle whose router was trained on demo train images; OOD calibrated."""
    train = [(f, 0.0) for f in demo_files(demo, "digital", "train")]
    for kind in ("natural", "synthetic-photographic"):
        train += [(f, 1.0) for f in demo_files(demo, kind, "train")]
    x = torch.stack([preprocess(load_image(f), SIZE) for f, _ in train])  # N x 3 x S x S
    y = torch.tensor([label for _, label in train])
    torch.manual_seed(0)
    model = CXRNet("tiny", heads=["digital", "photo"], router=True)
    train_router(model, x, y)
    calibration = [load_image(f) for f in calibration_files(demo)]
    ood = calibrate_ood(model, image_features(model, calibration, SIZE))
    meta = {"image_size": SIZE, "ood": ood, "thresholds": {"photo": {"edema": 0.4}}}
    return save_bundle(model, out, meta)


def _once(request: pytest.FixtureRequest, key: pytest.StashKey[Path], make) -> Path:
    """make() once per test session, shared by every module that imports these fixtures."""
    stash = request.config.stash
    if key not in stash:
        stash[key] = make()
    return stash[key]


_DEMO, _ROUTED, _PLAIN = pytest.StashKey[Path](), pytest.StashKey[Path](), pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def use_demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo tree: 120 x-rays, 120 photos, 20 valid x-rays (x 3 photos), 64 px wide. Read-only."""
    def make() -> Path:
        root = tmp_path_factory.mktemp("use_demo")
        write_demo(root, digital=120, photos=120, valid=20, size=SIZE, seed=0, workers=1, progress=False)
        return root

    return _once(request, _DEMO, make)


@pytest.fixture(scope="session")
def routed_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  use_demo: Path) -> Path:
    """`write_routed_bundle` on the session's demo tree. Read-only."""
    return _once(request, _ROUTED,
                 lambda: write_routed_bundle(tmp_path_factory.mktemp("routed") / "bundle", use_demo))


@pytest.fixture(scope="session")
def plain_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny two-head bundle with a router and no OOD calibration."""
    def make() -> Path:
        torch.manual_seed(1)
        model = CXRNet("tiny", heads=["digital", "photo"], router=True)
        return save_bundle(model, tmp_path_factory.mktemp("plain") / "bundle", {"image_size": SIZE})

    return _once(request, _PLAIN, make)


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
    (forced,) = predictor.predict_images([non_xrays()["noise"]], domain="photo")
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


def test_ood_score_is_a_normalised_mahalanobis_distance() -> None:
    """Gaussian features: fresh scores average 1 and their 99th percentile is chi2(F) / F."""
    dim, scale = 12, np.linspace(0.5, 3, 12)
    fit = fit_ppca(np.random.default_rng(0).normal(size=(4000, dim)) * scale, components=dim)
    scores = ood_scores(np.random.default_rng(1).normal(size=(4000, dim)) * scale, fit)
    assert scores.mean() == pytest.approx(1.0, abs=0.05)
    assert np.quantile(scores, 0.99) == pytest.approx(stats.chi2.ppf(0.99, dim) / dim, rel=0.1)
    shifted = ood_scores(np.full((1, dim), 4.0) * scale, fit)  # 4 sigma on every axis: 16 per axis
    assert shifted[0] == pytest.approx(16.0, rel=0.1)


def test_calibration_threshold_is_an_out_of_fold_quantile() -> None:
    model = CXRNet("tiny")
    width = sum(size for _, size in feature_groups(model))
    feats = np.random.default_rng(0).normal(size=(400, width)) * np.linspace(0.1, 2, width)
    cal = calibrate_ood(model, feats, components=8)
    assert [g["name"] for g in cal["groups"]] == ["features.block1", "features.block2", "features"]
    fresh = np.random.default_rng(1).normal(size=(4000, width)) * np.linspace(0.1, 2, width)
    flagged = (combined_scores(fresh, cal["groups"]) > cal["threshold"]).mean()
    assert 0.002 <= flagged <= 0.03  # about 1 % of new in-distribution images
    inside = combined_scores(feats, cal["groups"])
    assert (inside > cal["threshold"]).mean() < flagged  # fitted rows score lower: why OOF is used


def test_calibrate_ood_rejects_bad_features() -> None:
    model = CXRNet("tiny")
    with pytest.raises(PredictorError, match="N x 144"):
        calibrate_ood(model, np.zeros((20, 10)))
    with pytest.raises(PredictorError, match=">= 10 images"):
        calibrate_ood(model, np.zeros((5, 144)))
    bad = np.ones((20, 144))
    bad[3, 4] = np.nan
    with pytest.raises(PredictorError, match="NaN"):
        calibrate_ood(model, bad)
    with pytest.raises(PredictorError, match="quantile"):
        calibrate_ood(model, np.random.default_rng(0).normal(size=(20, 144)), quantile=1.0)


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
    assert all(p["positive"] for p in predictor.predict_images([load_image(
        demo_files(use_demo, "natural", "valid")[0])])[0]["pathologies"].values())


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
    one = predictor.predict_images(images, batch_size=1)
    many = predictor.predict_images(images, batch_size=16)
    for a, b in zip(one, many, strict=True):
        assert a["head"] == b["head"]
        for s in SLUGS:
            assert a["pathologies"][s]["prob"] == pytest.approx(b["pathologies"][s]["prob"], abs=1e-5)
    assert [r["name"] for r in one] == [f"image{i}" for i in range(5)]


def test_bad_arguments_are_refused(plain_bundle: Path) -> None:
    with pytest.raises(PredictorError, match="domain 'xray'"):
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
