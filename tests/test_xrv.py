"""torchxrayvision (XRV) weights -> a chextrain bundle, checked against the torchxrayvision package itself.

The weights are made with XRV (`xrv.models.DenseNet(weights=None)`, seeded, BatchNorm statistics
taken from the test images so the outputs spread) and saved as XRV's files are: a pickled module
named after the download URL in XRV's cache folder, which XRV's own loader then reads. The
probabilities `chextrain predict` gives for the converted bundle must equal sigmoid of XRV's forward
on the same images preprocessed by XRV's own functions. XRV's ResNet-50 is a state dict file.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.data.images import load_image
from chextrain.data.phantom import render_xray
from chextrain.data.transforms import Decoding, as_preprocessing, preprocess, to_network_input
from chextrain.labels import SLUGS
from chextrain.models.net import CXRNet
from chextrain.models.pickles import describe_pickle
from chextrain.models.pretrained import init_fallback
from chextrain.models.weights import WeightsError, expected_input, init_model
from chextrain.models.xrv import XrvError, convert_xrv, xrv_model
from chextrain.training.lifecycle import apply_expected_input, train_stage
from chextrain.training.stage import parse_stage
from chextrain.training.study import load_study
from tests.conftest import demo_files

with warnings.catch_warnings():  # XRV's import silences every warning of the process otherwise
    import torchxrayvision as xrv

DENSENET, RESNET = "densenet121-res224-all", "resnet50-res512-all"
ROWS = [7, 4, 0, 1, 10]  # Effusion, Edema, Atelectasis, Consolidation, Cardiomegaly in XRV's 18 outputs
STUDY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "chextraining.yaml"
runner = CliRunner()


def _run(*args: Any) -> tuple[int, str, str]:
    result = runner.invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "250"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _xrv_file(cache: Path, name: str) -> Path:
    return cache / os.path.basename(xrv.models.model_urls[name]["weights_url"])


def _xrv_inputs(files: list[Path], size: int) -> torch.Tensor:
    """XRV's preprocessing of chextrain's decoded (grey) images: B x 1 x S x S."""
    out = []
    for f in files:
        x = xrv.datasets.normalize(load_image(f), 255)[None]  # 1 x H x W in [-1024, 1024]
        x = xrv.datasets.XRayResizer(size)(xrv.datasets.XRayCenterCrop()(x))
        out.append(torch.from_numpy(x))
    return torch.stack(out)


def _seeded(model: nn.Module, classifier: nn.Linear, x: torch.Tensor, seed: int) -> nn.Module:
    """BatchNorm statistics from x and a spread-out classifier, so probabilities fill (0, 1)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batch
    model.train()
    with torch.no_grad():
        model(x)
        g = torch.Generator().manual_seed(seed)
        classifier.weight.mul_(20.0)
        classifier.bias.copy_(torch.rand(classifier.bias.shape, generator=g) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def images(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Demo x-rays and phone photos (48 px: XRV upsizes them) and two larger phantoms (downsized)."""
    folder = tmp_path_factory.mktemp("xrv_images")
    files = demo_files(demo_root, "digital", "valid")[:3] + demo_files(demo_root, "natural", "valid")[:2]
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(390, 320), (300, 420)]):
        pixels, _ = render_xray({"edema": 1.0, "cardiomegaly": float(i)}, "PA", rng, shape)
        Image.fromarray(pixels).save(folder / f"phantom{i}.png")
        files.append(folder / f"phantom{i}.png")
    return files


@pytest.fixture(scope="module")
def densenet(images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """(XRV's cache folder holding a seeded XRV DenseNet saved as XRV saves its weights, the model)."""
    cache = tmp_path_factory.mktemp("xrv_cache")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)
    _seeded(model, model.classifier, _xrv_inputs(images, 224), seed=1)
    torch.save(model, _xrv_file(cache, DENSENET))  # a pickled module, as XRV's release files
    return cache, model


@pytest.fixture(scope="module")
def converted(densenet: tuple[Path, nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xrv_bundles") / "densenet"
    code, stdout, stderr = _run(
        "convert", "xrv", DENSENET, "--cache-dir", densenet[0], "--out", out, "--trust-pickle"
    )
    assert code == 0, stderr
    assert "pleural_effusion <- Effusion (row 7)" in stdout and "XRV's operating points" in stdout
    return out


def _predict(bundle: Path, files: list[Path]) -> np.ndarray:
    code, stdout, stderr = _run("predict", bundle, *files, "--format", "json", "--score-anyway")
    assert code == 0, stderr
    results = {r["name"]: r for r in json.loads(stdout)}
    return np.array([[results[str(f)]["pathologies"][s]["prob"] for s in SLUGS] for f in files])


def test_a_pickled_xrv_file_is_described_and_refused_without_trust(
    densenet: tuple[Path, nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Any] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    code, _, stderr = _run("convert", "xrv", DENSENET, "--cache-dir", densenet[0], "--out", tmp_path / "b")
    assert code == 2 and not (tmp_path / "b").exists()
    for words in [
        "torch zip file",
        "pickled torchxrayvision.models.DenseNet",
        "run any code",
        "--trust-pickle",
    ]:
        assert words in stderr, words
    assert loads and all(w is True for w in loads)  # only ever the weights_only reader
    # A file that would run code when unpickled: refused, and the code never runs.
    marker = tmp_path / "ran"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(XrvError, match="--trust-pickle"):
        convert_xrv(tmp_path / "evil.pt", tmp_path / "c")
    assert not marker.exists() and not (tmp_path / "c").exists()
    assert all(w is True for w in loads)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (os.makedirs, (self.marker, 0o755))


def test_missing_weights_name_the_file_to_place(tmp_path: Path) -> None:
    code, _, stderr = _run("convert", "xrv", DENSENET, "--cache-dir", tmp_path, "--trust-pickle")
    assert code == 2 and str(_xrv_file(tmp_path, DENSENET)) in stderr and "never downloads" in stderr
    code, _, stderr = _run("convert", "xrv", "densenet121-res224-nope", "--trust-pickle")
    assert code == 2 and "neither a file nor one of XRV's weights names" in stderr


def test_the_bundle_holds_xrv_rows_input_and_operating_points(
    converted: Path, densenet: tuple[Path, nn.Module]
) -> None:
    meta = json.loads((converted / "model.json").read_text())
    assert meta["architecture"]["backbone"] == "densenet121" and meta["architecture"]["heads"] == ["shared"]
    assert meta["preprocessing"] == {"name": "xrv", "mean": None, "std": None, "resize": "crop"} or meta[
        "preprocessing"
    ] == {"name": "xrv", "resize": "crop"}
    assert meta["image_size"] == 224
    info = meta["xrv"]
    assert [info["head_rows"][s]["row"] for s in SLUGS] == ROWS and info["untrained"] == []
    assert info["weights"] == DENSENET and info["class"] == "torchxrayvision.models.DenseNet"
    op = xrv.models.model_urls[DENSENET]["op_threshs"]
    assert meta["thresholds"]["shared"] == pytest.approx({s: op[r] for s, r in zip(SLUGS, ROWS, strict=True)})
    assert info["op_threshs"]["Effusion"] == pytest.approx(op[7])
    weights = load_file(str(converted / "model.safetensors"))
    model = densenet[1]
    assert torch.equal(weights["heads.shared.weight"], model.classifier.weight[ROWS])
    assert torch.equal(weights["heads.shared.bias"], model.classifier.bias[ROWS])
    stem = weights["encoder.features.conv0.weight"]  # 3 identical grey channels share XRV's 1
    assert stem.shape == (64, 3, 7, 7) and torch.allclose(
        stem.sum(dim=1, keepdim=True), model.features.conv0.weight
    )


def test_predict_equals_xrvs_own_forward(
    converted: Path, densenet: tuple[Path, nn.Module], images: list[Path]
) -> None:
    ours = _predict(converted, images)  # N x 5
    reference = xrv.models.DenseNet(weights=DENSENET, cache_dir=str(densenet[0]))  # XRV reads our file
    reference.op_threshs = None  # logits out: the probabilities are their sigmoid
    with torch.no_grad():
        theirs = torch.sigmoid(reference(_xrv_inputs(images, 224)))[:, ROWS].numpy()
    assert np.abs(ours - theirs).max() <= 1e-5
    assert theirs.min() < 0.2 and theirs.max() > 0.8  # the check is not made on saturated outputs


@pytest.mark.slow
def test_xrv_resnet50_state_dict_converts_without_trust_and_matches(
    images: list[Path], tmp_path: Path
) -> None:
    import torchvision

    files = [images[0], images[-1]]  # a demo x-ray (upsized to 512 px) and a phantom
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # as xrv.models.ResNet
    _seeded(net, net.fc, _xrv_inputs(files, 512), seed=2)
    torch.save(net.state_dict(), _xrv_file(tmp_path, RESNET))  # XRV's ResNet file is a state dict
    code, stdout, stderr = _run("convert", "xrv", RESNET, "--cache-dir", tmp_path, "--out", tmp_path / "b")
    assert code == 0, stderr  # tensors only: read with weights_only, no --trust-pickle needed
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["architecture"]["backbone"] == "resnet50" and meta["image_size"] == 512
    ours = _predict(tmp_path / "b", files)
    reference = xrv.models.ResNet(weights=RESNET, cache_dir=str(tmp_path))
    reference.op_threshs = None
    with torch.no_grad():
        theirs = torch.sigmoid(reference(_xrv_inputs(files, 512)))[:, ROWS].numpy()
    assert np.abs(ours - theirs).max() <= 1e-5


def test_legacy_files_and_missing_pathologies(densenet: tuple[Path, nn.Module], tmp_path: Path) -> None:
    model = densenet[1]
    legacy = tmp_path / "old.pt"
    torch.save(model, legacy, _use_new_zipfile_serialization=False)  # how XRV's 2020 files were written
    info = describe_pickle(legacy)
    assert info.format == "torch legacy" and "torchxrayvision.models.DenseNet" in info.objects
    out, meta = convert_xrv(legacy, tmp_path / "b", trust_pickle=True)
    assert meta["xrv"]["weights"] is None and meta["xrv"]["labels"] == list(xrv.datasets.default_pathologies)
    assert torch.equal(
        load_file(str(out / "model.safetensors"))["heads.shared.weight"], model.classifier.weight[ROWS]
    )
    labels = [("" if label == "Edema" else label) for label in xrv.datasets.default_pathologies]
    net, rows = xrv_model(model.state_dict(), "densenet121", labels, legacy)
    assert rows["edema"] is None and rows["cardiomegaly"] == 10
    assert net.heads["shared"].weight[SLUGS.index("edema")].abs().sum() == 0
    with pytest.raises(XrvError, match="predicts none of"):
        xrv_model(model.state_dict(), "densenet121", ["Pneumonia"] + [""] * 17, legacy)


def test_xrv_preprocessing_spec_and_its_uint8_worker_step(images: list[Path]) -> None:
    spec = as_preprocessing("xrv")
    assert spec.resize == "crop" and spec.stats() == ((0.5,) * 3, (0.5 / 1024,) * 3)
    with pytest.raises(ValueError, match="xrv takes no mean/std"):
        as_preprocessing({"name": "xrv", "mean": 0.5, "std": 0.2})
    for f in images[-2:]:  # the phantoms, downsized
        pixels = load_image(f)
        exact = preprocess(pixels, 224, spec)  # what predict uses: XRV's own numbers
        assert torch.equal(exact[0], torch.from_numpy(_xrv_inputs([f], 224)[0, 0].numpy()))
        worker = to_network_input(torch.from_numpy(np.array(Decoding(224, "crop").fit(pixels)))[None], spec)[
            0
        ]
        assert (worker - exact).abs().mean() < 16  # training's uint8 step: about 1 grey level of 255 away


@pytest.mark.slow
def test_init_xrv_name_finds_the_bundle_and_a_stage_keeps_xrvs_input(
    densenet: tuple[Path, nn.Module], demo_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "converted"
    with pytest.raises(WeightsError, match=f"chextrain convert xrv {DENSENET} --trust-pickle"):
        init_model(CXRNet("densenet121"), f"xrv:{DENSENET}", xrv_root=root)
    assert init_fallback(f"xrv:{DENSENET}", "densenet121", {"xrv": "random"}, xrv_root=root)[0] == "random"
    folder, _ = convert_xrv(DENSENET, cache_dir=densenet[0], root=root, trust_pickle=True)
    assert folder == root / DENSENET
    assert init_fallback(f"xrv:{DENSENET}", "densenet121", {"xrv": "random"}, xrv_root=root) == (
        f"xrv:{DENSENET}",
        [],
    )
    model = CXRNet("densenet121")
    report = init_model(model, f"xrv:{DENSENET}", xrv_root=root, load_heads=True)
    assert report.heads_loaded == ["shared"] and not report.missing
    assert "expect xrv input at 224 px" in report.summary()
    assert torch.equal(model.heads["shared"].bias, densenet[1].classifier.bias[ROWS])
    assert expected_input(f"xrv:{DENSENET}", xrv_root=root) == {
        "preprocessing": json.loads((folder / "model.json").read_text())["preprocessing"],
        "image_size": 224,
    }
    base = {"name": "x", "init": str(folder), "backbone": "densenet121"}
    assert apply_expected_input(parse_stage(base), str(folder)).image_size == 224  # XRV's, unless overridden
    stage = parse_stage(
        {
            **base,
            "image_size": 32,
            "batch_size": 4,
            "max_steps": 2,
            "num_workers": 0,
            "split": {"val_fraction": 0.1},
            "evaluate": [],
            "val_every_n_steps": 2,
        }
    )
    result = train_stage(stage, demo_root, tmp_path / "run", progress=False)
    meta = json.loads(result.bundle.read_text())
    assert meta["preprocessing"]["name"] == "xrv" and meta["image_size"] == 32  # kept / overridden
    assert "xrv input at 224 px" in meta["training"]["init"]


def test_the_study_holds_the_xrv_strategy() -> None:
    full = load_study(STUDY)
    stage = full.stages["mixed_xrv"]
    assert stage.label == "Mixed from CXR-pretrained (XRV)" and stage.init == f"xrv:{DENSENET}"
    assert stage.backbone == "densenet121" and stage.data.train == ["chexpert", "chexphoto"]
    resnet = load_study(STUDY, overrides=[f"xrv_weights={RESNET}", "xrv_backbone=resnet50"]).stages[
        "mixed_xrv"
    ]
    assert (resnet.init, resnet.backbone) == (f"xrv:{RESNET}", "resnet50")
    assert load_study(STUDY, profile="demo").fallbacks["xrv"] == "random"
