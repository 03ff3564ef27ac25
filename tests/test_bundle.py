"""Bundles: OOD arrays in the safetensors file (model.json stays small), the model card, `chextrain info`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.labels import PATHOLOGIES
from chextrain.models.bundle import load_bundle, save_bundle
from chextrain.models.meta import OOD_PREFIX, WeightsError, read_safetensors_header
from chextrain.models.net import CXRNet
from chextrain.ood import calibrate_ood, feature_groups

METRICS = {  # the shape of a supervised stage's metrics: split/group -> slug|average -> metric
    f"{split}/{group}": {
        slug: {
            "auc": 0.71,
            "mcc": 0.2,
            "f1": 0.4,
            "precision": 0.5,
            "recall": 0.3,
            "accuracy": 0.8,
            "support": 30.0,
        }
        for slug in ("pleural_effusion", "edema", "atelectasis", "consolidation", "cardiomegaly", "average")
    }
    for split in ("val", "test")
    for group in ("Standard", "Photos", "kind:digital", "kind:natural", "kind:synthetic-digital")
}


def calibrated(model: CXRNet, n: int = 40) -> dict:
    width = sum(size for _, size in feature_groups(model))
    features = np.random.default_rng(0).normal(size=(n, width))
    return calibrate_ood(model, features, components=8)


def meta_for(model: CXRNet, **extra: object) -> dict:
    return {
        "image_size": 64,
        "stage": "mixed",
        "label": "Mixed Training",
        "metrics": METRICS,
        "ood": calibrated(model),
        "config": {
            "objective": "supervised",
            "init": "imagenet",
            "data": {"train": ["chexpert", "chexphoto"]},
        },
        "training": {"train_rows": 900, "val_rows": 100, "global_step": 170, "epochs": 3},
        **extra,
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A DenseNet-121 bundle with a router and an OOD calibration: the size of a real one."""
    torch.manual_seed(0)
    model = CXRNet("densenet121", heads=["digital", "photo"], router=True)
    meta = meta_for(model)
    return save_bundle(model, tmp_path_factory.mktemp("dense") / "bundle", meta), meta


def test_ood_arrays_travel_in_the_safetensors_file(dense: tuple[Path, dict]) -> None:
    folder, meta = dense
    size = (folder / "model.json").stat().st_size
    assert size < 50_000, f"model.json is {size} bytes"
    stored = json.loads((folder / "model.json").read_text())["ood"]
    assert all(not {"mean", "axes", "variances"} & set(g) for g in stored["groups"])
    header = read_safetensors_header(folder / "model.safetensors")
    ood_keys = sorted(k for k in header if k.startswith(OOD_PREFIX))
    assert len(ood_keys) == 3 * len(stored["groups"]) and header[ood_keys[0]]["dtype"] == "F64"
    model, loaded = load_bundle(folder)
    assert loaded["ood"] == meta["ood"]  # exactly the calibration's numbers, as lists
    assert not any(k.startswith(OOD_PREFIX) for k in model.state_dict())


def test_a_bundle_with_arrays_in_model_json_still_loads(tmp_path: Path) -> None:
    model = CXRNet("tiny", heads=["shared"])
    meta = meta_for(model)
    folder = save_bundle(model, tmp_path / "b", {**meta, "ood": None})
    document = json.loads((folder / "model.json").read_text())
    document["ood"] = meta["ood"]  # the old layout: every array inline
    (folder / "model.json").write_text(json.dumps(document))
    assert load_bundle(folder)[1]["ood"] == meta["ood"]


def test_missing_ood_tensors_name_the_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = CXRNet("tiny", heads=["shared"])
    folder = save_bundle(model, tmp_path / "b", meta_for(model))
    weights = folder / "model.safetensors"
    state = {k: v for k, v in load_file(weights).items() if not k.endswith(".axes")}
    save_file(state, weights)
    with pytest.raises(WeightsError, match=r"model\.safetensors.*ood\.groups\.0\.axes"):
        load_bundle(folder)


def test_every_bundle_has_a_model_card(dense: tuple[Path, dict]) -> None:
    card = (dense[0] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: chextrain\n")
    for heading in (
        "## Model details",
        "## Intended use",
        "## Training data",
        "## Evaluation",
        "## Limitations",
    ):
        assert heading in card
    assert "Not a medical device" in card and "CheXphoto" in card and "arXiv:2007.06199" in card
    assert "| test/kind:natural | 30 | 0.710 | 0.200 | 0.400 |" in card
    assert "densenet121" in card and "digital -> digital" in card


def test_card_with_confidence_intervals() -> None:
    from chextrain.models.card import model_card

    meta = json.loads(
        json.dumps({"architecture": {"backbone": "tiny", "heads": ["shared"], "router": False}})
    )
    meta |= {
        "image_size": 32,
        "preprocessing": {"name": "imagenet"},
        "domain_heads": {"digital": "shared", "photo": "shared"},
    }
    rows = [
        {
            "split": "test",
            "group": "Photos",
            "n": 36,
            "metric": "auc",
            "value": 0.6,
            "ci_low": 0.5,
            "ci_high": 0.7,
        },
        {
            "split": "test",
            "group": "Photos",
            "n": 36,
            "metric": "mcc",
            "value": 0.1,
            "ci_low": -0.1,
            "ci_high": 0.3,
        },
    ]
    card = model_card(meta, rows)
    assert "| test | Photos | 36 | 0.600 (0.500 to 0.700) | 0.100 (-0.100 to 0.300) |" in card
    assert "bootstrap" in card
    assert "Probability calibration: none" in card
    fitted = model_card({**meta, "temperature": {"digital": 1.0, "photo": 2.25}}, rows)
    assert "photo T=2.25" in fitted and "--no-calibration" in fitted


def test_info_describes_the_bundle_in_80_columns(dense: tuple[Path, dict]) -> None:
    result = CliRunner().invoke(build_app(), ["info", str(dense[0])])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in (
        "densenet121",
        "heads digital, photo, router yes",
        "digital -> digital",
        ", ".join(PATHOLOGIES),
        "preprocessing imagenet",
        "thresholds",
        "ppca-mahalanobis",
        "probability calibration: none",
        "data: chexpert, chexphoto",
        "test/kind:natural",
        "README.md",
    ):
        assert needle in text, needle
    assert max(len(line) for line in text.splitlines()) <= 80
    as_json = json.loads(CliRunner().invoke(build_app(), ["info", str(dense[0]), "--json"]).output)
    assert as_json["weights"]["ood_tensors"] > 0 and "groups" not in as_json["ood"]


def test_info_imports_no_torch(dense: tuple[Path, dict]) -> None:
    code = (
        "import json, sys\nfrom chextrain.cli import build_app\n"
        "try:\n    build_app()(['info', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(dense[0])], capture_output=True, text=True, timeout=120
    )
    modules = {m.split(".")[0] for m in json.loads(done.stdout.strip().splitlines()[-1])}
    assert "densenet121" in done.stdout and not {"torch", "safetensors", "lightning"} & modules


def test_temperatures_are_saved_and_checked(tmp_path: Path) -> None:
    from chextrain.models.meta import read_bundle_meta

    model = CXRNet("tiny", heads=["digital", "photo"], router=True)
    folder = save_bundle(model, tmp_path / "b", {"image_size": 32, "temperature": {"photo": np.float64(1.7)}})
    assert load_bundle(folder)[1]["temperature"] == {"photo": 1.7}
    assert "temperature" not in load_bundle(save_bundle(model, tmp_path / "old", {"image_size": 32}))[1]
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "temperature": {"photo": -2}}))
    with pytest.raises(WeightsError, match="temperature: expected"):
        read_bundle_meta(folder / "model.json")
