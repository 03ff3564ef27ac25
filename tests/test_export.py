"""ONNX export: all heads + router + features, dynamic batch, metadata, parity with PyTorch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from chextrain.data.images import load_image
from chextrain.export import (
    ExportError,
    OnnxRuntime,
    export_onnx,
    read_onnx_metadata,
    weights_sha256,
)
from chextrain.inference import Predictor, TorchRuntime
from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.bundle import load_bundle, save_bundle
from chextrain.models.net import CXRNet
from tests.conftest import KINDS, demo_files


@pytest.fixture()
def exported(routed_bundle: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A copy of the routed bundle with model.onnx next to model.json."""
    folder = shutil.copytree(routed_bundle, tmp_path / "bundle")
    model, meta = load_bundle(folder)
    export_onnx(model, meta, folder / "model.onnx", sha256=weights_sha256(folder))
    return folder


def test_graph_has_dynamic_batch_all_outputs_and_metadata(exported: Path) -> None:
    proto = onnx.load(str(exported / "model.onnx"))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image,) = proto.graph.input
    dims = image.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert [o.name for o in proto.graph.output] == ["probs", "p_photo", "features"]
    info = read_onnx_metadata(exported / "model.onnx")
    assert info["pathologies"] == list(PATHOLOGIES) and info["slugs"] == list(SLUGS)
    assert info["architecture"]["heads"] == ["digital", "photo"]
    assert info["thresholds"]["photo"]["edema"] == 0.4
    assert info["domain_heads"] == {"digital": "digital", "photo": "photo"}
    assert info["ood"]["threshold"] > 0 and info["weights_sha256"] == weights_sha256(exported)


def test_parity_with_pytorch_on_demo_images(exported: Path, use_demo: Path) -> None:  # noqa: F811
    files = [f for k in KINDS for f in demo_files(use_demo, k, "valid")[:4]]
    images = [load_image(f) for f in files]
    torch_p = Predictor.from_bundle(exported)
    onnx_p = Predictor.from_bundle(exported, runtime="onnx")
    assert onnx_p.runtime.name == "onnx"
    x = torch.cat([torch_p.inputs(im) for im in images]).numpy()  # 16 x 3 x S x S
    ref, got = TorchRuntime(torch_p.model)(x), onnx_p.runtime(x)
    assert got["probs"].shape == (16, 2, 5)
    assert np.abs(got["probs"] - ref["probs"]).max() <= 1e-4
    assert np.abs(got["p_photo"] - ref["p_photo"]).max() <= 1e-4
    assert np.abs(got["features"] - ref["features"]).max() <= 1e-3
    scored = [p.predict_images(images, score_anyway=True) for p in (torch_p, onnx_p)]  # flagged ones too
    for a, b in zip(*scored, strict=True):
        assert (a["head"], a["ood"]["flag"]) == (b["head"], b["ood"]["flag"])
        for s in SLUGS:
            assert abs(a["pathologies"][s]["prob"] - b["pathologies"][s]["prob"]) <= 1e-4
    one = onnx_p.runtime(x[:1])  # the batch axis is dynamic
    assert one["probs"].shape == (1, 2, 5)
    assert np.abs(one["probs"][0] - got["probs"][0]).max() <= 1e-5


def test_stale_or_missing_onnx_files_are_refused(exported: Path, tmp_path: Path) -> None:
    other = CXRNet("tiny", heads=["digital", "photo"], router=True)
    save_bundle(other, exported, {"image_size": 64})  # new weights, old model.onnx
    with pytest.raises(ExportError, match="other weights"):
        Predictor.from_bundle(exported, runtime="onnx")
    with pytest.raises(ExportError, match="does not exist"):
        Predictor.from_bundle(exported, runtime="onnx", onnx_path=tmp_path / "none.onnx")


def test_in_memory_export_when_the_bundle_has_no_onnx(plain_bundle: Path) -> None:  # noqa: F811
    before = sorted(p.name for p in plain_bundle.iterdir())
    predictor = Predictor.from_bundle(plain_bundle, runtime="onnx")
    image = np.random.default_rng(0).integers(0, 256, (70, 60)).astype(np.uint8)
    (a,) = predictor.predict_images([image])
    (b,) = Predictor.from_bundle(plain_bundle).predict_images([image])
    assert abs(a["p_photo"] - b["p_photo"]) <= 1e-4
    assert sorted(p.name for p in plain_bundle.iterdir()) == before  # nothing written


def test_model_without_router_has_no_p_photo(tmp_path: Path) -> None:
    model = CXRNet("tiny", heads=["shared"]).eval()
    data = export_onnx(model, {"image_size": 32}, tmp_path / "m.onnx")
    run = OnnxRuntime(data)
    out = run(np.zeros((2, 3, 32, 32), np.float32))
    assert out["p_photo"] is None and out["probs"].shape == (2, 1, 5) and out["features"].shape == (2, 144)


def test_bad_files_and_options(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        read_onnx_metadata(junk)
    with pytest.raises(ExportError, match="cannot load"):
        OnnxRuntime(junk)
    model = CXRNet("tiny").eval()
    bare = onnx.load_from_string(export_onnx(model, {"image_size": 32}))
    del bare.metadata_props[:]
    with pytest.raises(ExportError, match="no 'chextrain' metadata"):
        read_onnx_metadata(bare.SerializeToString())
    with pytest.raises(ExportError, match="opset 13"):
        export_onnx(model, {"image_size": 32}, opset=13)


def test_torch_and_onnx_agree_with_temperatures(routed_bundle: Path, use_demo: Path, tmp_path: Path) -> None:
    model, meta = load_bundle(routed_bundle)
    folder = save_bundle(model, tmp_path / "t", {**meta, "temperature": {"photo": 2.0, "digital": 1.5}})
    export_onnx(model, load_bundle(folder)[1], folder / "model.onnx", sha256=weights_sha256(folder))
    info = read_onnx_metadata(folder / "model.onnx")
    assert info["temperature"] == {"photo": 2.0, "digital": 1.5} and "runtime applies" in info["calibration"]
    images = [load_image(f) for k in KINDS for f in demo_files(use_demo, k, "valid")[:2]]
    raw = Predictor.from_bundle(folder, calibrated=False).predict_images(images)
    for a, b in zip(
        Predictor.from_bundle(folder).predict_images(images),
        Predictor.from_bundle(folder, runtime="onnx").predict_images(images),
        strict=True,
    ):
        assert a["head"] == b["head"] and a["temperature"] == b["temperature"] > 1
        for s in SLUGS:
            assert abs(a["pathologies"][s]["prob"] - b["pathologies"][s]["prob"]) <= 1e-4
    assert any(
        abs(a["pathologies"][s]["prob"] - r["pathologies"][s]["prob"]) > 1e-3
        for a, r in zip(Predictor.from_bundle(folder).predict_images(images), raw, strict=True)
        for s in SLUGS
    )
