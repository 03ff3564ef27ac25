"""`preprocessing: {rectify: ...}`: photos flattened before the resize, in datasets, the store and predict."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from chextrain.data.dataset import CatalogDataset, DatasetError, collate
from chextrain.data.phantom import render_xray
from chextrain.data.photo import simulate_photo_with_corners
from chextrain.data.rectified import RectifiedDecoding, make_decoding, photo_path
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, Preprocessing, resize
from chextrain.labels import SLUGS
from chextrain.rectify import find_quad, warp

S = 64
PHOTO = "CheXphoto-v1.0/train/natural/iphone/patient00001/study1/view1_frontal.png"
XRAY = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.png"


def _xray() -> np.ndarray:
    return render_xray({}, "frontal", np.random.default_rng(1), 256)[0]  # 256 x 256 grey


def _tilted(xray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A tilted phone photo of the x-ray (RGB) and the x-ray's true corners in it."""
    return simulate_photo_with_corners(xray, "phone", 3, np.random.default_rng(3))


def _files(tmp_path: Path) -> tuple[str, str, np.ndarray]:
    """A photo in a CheXphoto layout and the x-ray in a CheXpert one (PNG: lossless); the x-ray."""
    xray = _xray()
    photo, _ = _tilted(xray)
    paths = []
    for rel, pixels in ((PHOTO, photo), (XRAY, xray)):
        path = tmp_path / rel
        path.parent.mkdir(parents=True)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths[0], paths[1], xray


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images' pixels (the photo's lighting shifts grey levels, not shapes)."""
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_the_spec_is_data_and_absent_it_leaves_dumps_and_hashes_alone() -> None:
    from chextrain.training.stage import config_hash, parse_stage

    assert "rectify" not in Preprocessing().model_dump()  # older bundles and config.yaml unchanged
    on = Preprocessing.model_validate({"rectify": True})
    assert on.rectify is not None and on.rectify.model == "classical"
    assert on.model_dump(mode="json")["rectify"] == {"model": "classical", "min_confidence": None}
    assert Preprocessing.model_validate(on.model_dump(mode="json")) == on  # a bundle reads it back
    plain = parse_stage({"name": "a"})
    assert config_hash(parse_stage({"name": "a", "preprocessing": {"rectify": False}})) == config_hash(plain)
    assert config_hash(parse_stage({"name": "a", "preprocessing": {"rectify": True}})) != config_hash(plain)
    with pytest.raises(ValueError, match="min_confidence"):
        Preprocessing.model_validate({"rectify": {"min_confidence": 2}})
    with pytest.raises(ValueError, match="stage reference"):
        Preprocessing.model_validate({"rectify": {"model": "stage:corners"}})
    assert isinstance(make_decoding(S, on), RectifiedDecoding)
    assert type(make_decoding(S, "imagenet")) is Decoding


def test_a_tilted_photo_decodes_close_to_the_flat_xray(tmp_path: Path) -> None:
    photo, xray_path, xray = _files(tmp_path)
    flat = resize(xray, S)  # what the x-ray itself gives at S px
    rectified = make_decoding(S, {"rectify": True}).load(photo)
    plain = Decoding(S).load(photo)
    assert rectified.shape == (S, S) and rectified.dtype == np.uint8
    assert _corr(rectified, flat) > 0.85 > 0.5 > _corr(plain, flat)  # the frame and the tilt are gone
    # a digital image (by its path, or a row's domain) is untouched, byte for byte
    decoding = make_decoding(S, {"rectify": True})
    assert np.array_equal(decoding.load(xray_path), Decoding(S).load(xray_path))
    assert np.array_equal(decoding.load(photo, photo=False), plain)
    assert photo_path(photo) and not photo_path(xray_path)


def test_the_store_holds_rectified_rows_apart_from_plain_ones(tmp_path: Path) -> None:
    photo, xray_path, _ = _files(tmp_path)
    decoding = make_decoding(S, {"rectify": True})
    store = ImageStore(tmp_path / "store", decoding, workers=1, progress=False)
    rows = store.prepare([photo, xray_path])
    plain_rows = ImageStore(tmp_path / "store", Decoding(S), workers=1, progress=False).prepare([photo])
    assert np.array_equal(rows[0], decoding.load(photo))
    assert np.array_equal(rows[1], Decoding(S).load(xray_path))
    assert not np.array_equal(rows[0], plain_rows[0])
    assert decoding.tag == f"{Decoding(S).tag}-rectify-classical"
    assert (tmp_path / "store" / "CheXphoto-v1.0" / decoding.tag / "images.u8").exists()
    other = make_decoding(S, {"rectify": {"min_confidence": 0.9}})
    assert other.tag not in (decoding.tag, Decoding(S).tag)


def test_datasets_rectify_photo_rows_with_workers_and_from_the_store(tmp_path: Path) -> None:
    photo, xray_path, _ = _files(tmp_path)
    unlabelled = {slug: [np.nan, np.nan] for slug in SLUGS}
    rows = pd.DataFrame(
        {"path": [photo, xray_path], "domain": ["photo", "digital"], "row": [2, 2], **unlabelled}
    )
    spec = {"rectify": True}
    decoding = make_decoding(S, spec)
    want = np.stack([decoding.load(photo), Decoding(S).load(xray_path)])  # 2 x S x S
    from_files = CatalogDataset(rows, image_size=S, preprocessing=spec)
    assert pickle.loads(pickle.dumps(from_files.decoding)) == from_files.decoding
    loader = DataLoader(from_files, batch_size=2, num_workers=1, collate_fn=collate)
    assert np.array_equal(next(iter(loader))["image"][:, 0].numpy(), want)  # in a worker
    assert np.array_equal(from_files[0]["image"][0].numpy(), want[0])
    store = ImageStore(tmp_path / "store", decoding, workers=1, progress=False)
    stored = CatalogDataset(rows, image_size=S, preprocessing=spec, images=store.prepare(rows["path"]))
    assert np.array_equal(stored[0]["image"][0].numpy(), want[0])
    # a photo row the store cannot tell from its path is refused, not silently left plain
    wrong = rows.assign(domain=["photo", "photo"])
    with pytest.raises(DatasetError, match="rectified image store"):
        CatalogDataset(wrong, image_size=S, preprocessing=spec, images=store.prepare(rows["path"]))


def test_a_bundle_trained_with_rectify_predicts_as_a_manual_warp(demo_root: Path, tmp_path: Path) -> None:
    from chextrain.inference import Predictor
    from chextrain.models.bundle import load_bundle
    from chextrain.training.lifecycle import train_stage
    from chextrain.training.stage import parse_stage

    stage = {
        "name": "rectified",
        "backbone": "tiny",
        "init": "random",
        "image_size": 32,
        "batch_size": 8,
        "max_steps": 2,
        "num_workers": 0,
        "evaluate": ["test"],
        "preprocessing": {"rectify": True},
        "data": {"train": ["chexpert", "chexphoto"], "store": str(tmp_path / "store")},
    }
    result = train_stage(parse_stage(stage), demo_root, tmp_path / "run", progress=False)
    bundle = result.out_dir
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["preprocessing"]["rectify"] == {"model": "classical", "min_confidence": None}
    assert any(p.name.endswith("-rectify-classical") for p in (tmp_path / "store").glob("*/*"))
    photo, corners = _tilted(_xray())
    predictor = Predictor.from_bundle(bundle)
    got = predictor.predict_images([photo], domain="photo", score_anyway=True)[0]
    assert got["rectify"]["applied"] and got["rectify"]["method"] == "classical"
    model, meta = load_bundle(bundle)
    plain_meta = {**meta, "preprocessing": {k: v for k, v in meta["preprocessing"].items() if k != "rectify"}}
    plain = Predictor(model, plain_meta)
    flat = warp(photo, find_quad(photo).corners)
    want = plain.predict_images([flat], domain="photo", score_anyway=True)[0]
    unwarped = plain.predict_images([photo], domain="photo", score_anyway=True)[0]
    probs = [got["pathologies"][s]["prob"] for s in got["pathologies"]]
    assert probs == [want["pathologies"][s]["prob"] for s in want["pathologies"]]
    assert probs != [unwarped["pathologies"][s]["prob"] for s in unwarped["pathologies"]]
    assert np.allclose(got["rectify"]["corners"], corners, atol=0.05 * photo.shape[0])
    digital = predictor.predict_images([photo], domain="digital", score_anyway=True)[0]
    assert "rectify" not in digital or not digital["rectify"]["applied"]
    assert [digital["pathologies"][s]["prob"] for s in digital["pathologies"]] == [
        unwarped["pathologies"][s]["prob"] for s in unwarped["pathologies"]
    ]
    assert "rectify" not in plain.predict_images([photo], domain="photo")[0]  # plain bundles: as before


def test_predict_rectifies_the_images_the_router_takes_for_photos(
    routed_bundle: Path, tmp_path: Path
) -> None:
    from chextrain.inference import Predictor

    copy = tmp_path / "bundle"
    shutil.copytree(routed_bundle, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["preprocessing"] = {**meta.get("preprocessing", {"name": "imagenet"}), "rectify": True}
    (copy / "model.json").write_text(json.dumps(meta))
    xray = _xray()
    photo, _ = _tilted(xray)
    results = Predictor.from_bundle(copy).predict_images([photo, xray], score_anyway=True)
    plain = Predictor.from_bundle(routed_bundle).predict_images([photo, xray], score_anyway=True)
    for got, before in zip(results, plain, strict=True):
        assert got["domain"] == before["domain"] and got["p_photo"] == before["p_photo"]
        assert got["rectify"]["applied"] == (
            before["domain"] == "photo" and got["rectify"]["method"] != "none"
        )
        if before["domain"] != "photo":
            assert got["pathologies"] == before["pathologies"]
    assert torch.is_tensor(Predictor.from_bundle(copy).inputs(xray))
