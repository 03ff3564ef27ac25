"""A non-finite loss or probability stops a stage at once with one clear error (issue 12, item 6).

The error names the stage, the step and a hint (the init weights, an input file, the learning
rate); the stage is left unfinished: no bundle, no done.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from chextrain.data.catalog import read_catalog
from chextrain.errors import FAILED_RUN
from chextrain.labels import SLUGS
from chextrain.models.net import CXRNet
from chextrain.training.lifecycle import train_stage
from chextrain.training.objectives.supervised import SupervisedModule, check_finite_predictions
from chextrain.training.specs import OptimizerSpec
from chextrain.training.stage_errors import NonFiniteError
from tests.test_runner import tiny


@pytest.fixture(scope="module")
def catalog(demo_root: Path) -> pd.DataFrame:
    return read_catalog(demo_root)


def poisoned_weights(path: Path) -> Path:
    """A tiny CXRNet's weights with NaN in the first convolution."""
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in CXRNet("tiny").state_dict().items()}
    first = next(k for k, v in state.items() if k.startswith("encoder.") and v.ndim == 4)
    state[first][0, 0, 0, 0] = float("nan")
    save_file(state, str(path))
    return path


def unfinished(out: Path) -> bool:
    return not (out / "done.json").exists() and not (out / "model.json").exists()


def test_a_poisoned_init_stops_at_the_first_step_naming_the_init(
    demo_root: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    init = poisoned_weights(tmp_path / "poisoned.safetensors")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as err:
        train_stage(tiny("poisoned", init=str(init)), demo_root, out, catalog=catalog, progress=False)
    text = str(err.value)
    assert "stage 'poisoned'" in text and "at training step 1 (epoch 0)" in text
    assert "init weights" in text and "poisoned.safetensors" in text
    assert unfinished(out) and err.value.exit_code == FAILED_RUN


def test_a_huge_learning_rate_stops_at_the_step_it_diverges(
    demo_root: Path, catalog: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    stage = tiny("diverges", optimizer={"name": "sgd", "lr": 1e30}, max_steps=6, val_every_n_steps=6)
    with pytest.raises(NonFiniteError) as err:
        train_stage(stage, demo_root, out, catalog=catalog, progress=False)
    text = str(err.value)
    assert "stage 'diverges'" in text and "the training loss is nan at training step 2" in text
    assert "lower the learning rate (optimizer.lr = 1e+30)" in text
    assert unfinished(out)


def test_the_command_line_prints_one_line(demo_root: Path, tmp_path: Path) -> None:
    from chextrain.cli import build_app

    init = poisoned_weights(tmp_path / "poisoned.safetensors")
    stage = tiny("poisoned", init=str(init)).model_dump(mode="json", exclude_unset=True)
    file = tmp_path / "stage.yaml"
    file.write_text(yaml.safe_dump(stage))
    result = CliRunner().invoke(
        build_app(),
        ["train", str(file), "--data", str(demo_root), "--out", str(tmp_path / "run"), "--no-progress"],
    )
    assert result.exit_code == FAILED_RUN, result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "stage 'poisoned'" in errors[0] and "init weights" in errors[0]
    assert "Traceback" not in result.output and "MetricsError" not in result.output


def test_non_finite_validation_probabilities_stop_the_stage() -> None:
    module = SupervisedModule(CXRNet("tiny"), optimizer=OptimizerSpec(lr=0.5), name="val_nan", init="random")
    probs = torch.full((4, len(SLUGS)), 0.5)
    probs[2, 1] = float("nan")
    ones = torch.ones(4, len(SLUGS))
    module._val.append((torch.arange(4), probs, ones, ones, torch.zeros(4), torch.zeros(4)))
    with pytest.raises(NonFiniteError, match=r"stage 'val_nan': 1 validation image\(s\) got NaN"):
        module.on_validation_epoch_end()


def test_input_files_are_named_when_the_network_input_is_not_finite() -> None:
    module = SupervisedModule(CXRNet("tiny"), optimizer=OptimizerSpec(), name="bad_input")
    batch = {
        "image": torch.full((2, 3, 32, 32), float("nan")),
        "target": torch.ones(2, len(SLUGS)),
        "mask": torch.ones(2, len(SLUGS)),
        "head": torch.zeros(2, dtype=torch.int64),
        "domain": torch.zeros(2, dtype=torch.int64),
        "index": torch.tensor([4, 7]),
    }
    with pytest.raises(NonFiniteError, match=r"check the input file\(s\) training row 4, training row 7"):
        module.training_step(batch, 0)


def test_predictions_with_nan_after_training_name_the_files() -> None:
    table = pd.DataFrame({"path": ["a.jpg", "b.jpg"], **{f"prob_{s}": [0.2, 0.3] for s in SLUGS}})
    check_finite_predictions(table, "s", "test", 3)  # finite: nothing raised
    table.loc[1, "prob_edema"] = np.inf
    with pytest.raises(NonFiniteError, match=r"stage 's': 1 test image\(s\) .*b\.jpg.*step 3"):
        check_finite_predictions(table, "s", "test", 3)


@pytest.mark.slow
def test_two_ddp_processes_stop_together_at_the_same_step(demo_root: Path, tmp_path: Path) -> None:
    """Under DDP (two gloo processes) both ranks stop with the one-line error at the same step; none
    is left waiting in a collective (the stage's non-finite check is all-reduced across ranks)."""
    import os
    import subprocess
    import sys

    stage = tiny("ddp_nan", optimizer={"name": "sgd", "lr": 1e30}, max_steps=None, epochs=1)
    file = tmp_path / "stage.yaml"
    file.write_text(yaml.safe_dump(stage.model_dump(mode="json", exclude_unset=True)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chextrain.cli", "train", str(file), "--data", str(demo_root)]
    cmd += ["--out", str(out), "--devices", "2", "--no-progress"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == FAILED_RUN, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and errors[0] == errors[1]  # one line per process, the same step on both
    assert "stage 'ddp_nan': the training loss is nan at training step" in errors[0]
    assert unfinished(out)
