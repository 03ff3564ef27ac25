"""External weights bring their input size and preprocessing (issue 12, item 3), and the report says so.

A checkpoint in CovidPrognosis' MoCo layout was pre-trained on 224 px histogram-equalised images:
a stage initialised from it trains, is scored and is bundled at that input unless it sets its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from chextrain.data.catalog import read_catalog
from chextrain.evaluation.report import write_report
from chextrain.models.net import CXRNet
from chextrain.training.lifecycle import apply_expected_input, train_stage
from chextrain.training.stage import parse_stage
from chextrain.training.study import load_study

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "studies"


def covidprognosis_file(path: Path, backbone: str = "tiny") -> Path:
    """A checkpoint laid out as CovidPrognosis' MoCo saves it: model.encoder_q / encoder_k and a queue."""
    torch.manual_seed(0)
    encoder = CXRNet(backbone).encoder.state_dict()
    state = {f"model.encoder_q.{k}": v for k, v in encoder.items()}
    state |= {f"model.encoder_k.{k}": torch.zeros_like(v) for k, v in encoder.items()}
    state["model.queue"] = torch.randn(128, 16)
    torch.save({"epoch": 3, "state_dict": state}, path)
    return path


def test_set_moco_init_to_a_covidprognosis_file_brings_224_px_and_histeq(tmp_path: Path) -> None:
    """`--set moco_init=FILE` on the paper's study: the MoCo rows take the file's input, no monkeypatch."""
    file = covidprognosis_file(tmp_path / "covid.pt", "densenet121")
    for profile, size in ((None, 224), ("demo", 64)):  # the demo profile sets 64 px for every stage
        study = load_study(CONFIGS / "chextraining.yaml", profile=profile, overrides=[f"moco_init={file}"])
        for name in ("moco_ft_chexphoto", "moco_chexpert", "moco_mixed"):
            stage = study.stages[name]
            assert stage.init == str(file), name
            fitted = apply_expected_input(stage, stage.init)
            assert (fitted.image_size, fitted.preprocessing.name) == (size, "histeq"), (profile, name)
        baseline = study.stages["baseline"]
        assert apply_expected_input(baseline, str(file)).preprocessing.name == "histeq"


@pytest.fixture(scope="module")
def trained(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny stages from the same CovidPrognosis-layout file: one sets nothing, one sets 32 px."""
    root = tmp_path_factory.mktemp("external")
    file = covidprognosis_file(root / "covid.pt")
    catalog = read_catalog(demo_root)
    base = {
        "backbone": "tiny",
        "init": str(file),
        "batch_size": 8,
        "max_steps": 1,
        "split": {"val_fraction": 0.25},
        "num_workers": 0,
    }
    out = {}
    for name, extra in (("brought", {}), ("own_size", {"image_size": 32})):
        stage = parse_stage({"name": name, **base, **extra})
        out[name] = train_stage(stage, demo_root, root / name, catalog=catalog, progress=False).out_dir
    return out


def test_a_stage_trains_and_is_bundled_at_the_input_its_init_brought(trained: dict[str, Path]) -> None:
    meta = json.loads((trained["brought"] / "model.json").read_text())
    assert meta["image_size"] == 224 and meta["preprocessing"]["name"] == "histeq"
    assert meta["training"]["input_from"] == {"image_size": "init weights", "preprocessing": "init weights"}
    assert meta["config"]["image_size"] == 224  # what was trained, in the resolved config too
    own = json.loads((trained["own_size"] / "model.json").read_text())
    assert own["image_size"] == 32 and own["preprocessing"]["name"] == "histeq"
    assert own["training"]["input_from"] == {"image_size": "stage", "preprocessing": "init weights"}


def test_the_report_says_which_input_each_stage_used(trained: dict[str, Path], tmp_path: Path) -> None:
    stages = [
        {"name": name, "label": name, "state": "done", "dir": str(folder), "kind": "supervised"}
        for name, folder in trained.items()
    ]
    (tmp_path / "study.json").write_text(json.dumps({"name": "external", "stages": stages}))
    md = write_report(tmp_path, n_boot=0).md.read_text()
    rows = {
        name: next(x for x in md.splitlines() if x.startswith(f"| {name} | {name} | done |"))
        for name in trained
    }
    assert "| 224 px, histeq (from the init weights) |" in rows["brought"]
    assert "| 32 px, histeq (preprocessing from the init weights) |" in rows["own_size"]
    assert len(pd.read_csv(tmp_path / "tables" / "table2_test.csv"))  # both scored at their inputs
