"""`chextrain train` / `chextrain evaluate`: CliRunner for the commands; subprocesses for SIGKILL and DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.training.lifecycle import train_stage
from chextrain.training.stage import load_stage

STAGE = """\
name: tiny
backbone: tiny
init: random
image_size: 32
batch_size: 8
split: {val_fraction: 0.25}
num_workers: 0
"""


def _stage(tmp_path: Path, text: str = STAGE + "max_steps: 2\n") -> Path:
    path = tmp_path / "stage.yaml"
    path.write_text(text)
    return path


def test_help_texts() -> None:
    runner = CliRunner()
    for args in (["train", "--help"], ["evaluate", "--help"]):
        result = runner.invoke(build_app(), args)
        assert result.exit_code == 0 and "--data" in result.output


def test_train_then_evaluate(tmp_path: Path, demo_root: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    args = [
        "train",
        str(_stage(tmp_path)),
        "--data",
        str(demo_root),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "optimizer.lr=3e-4",
        "--set",
        "evaluate=[test]",
    ]
    result = runner.invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    assert "stage tiny finished" in result.output and "test/Standard" in result.output
    done = json.loads((out / "done.json").read_text())
    assert done["lr"] == [3e-4] and not (out / "metrics_val.json").exists()
    again = runner.invoke(build_app(), args)
    assert again.exit_code == 0 and "already finished" in again.output

    result = runner.invoke(
        build_app(),
        ["evaluate", str(out), "--data", str(demo_root), "--split", "val"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "Photos" in result.output and "mcc tuned" in result.output
    assert (out / "predictions_val.parquet").exists() and (out / "metrics_val.json").exists()
    # the temperature per head in model.json is fitted on those validation predictions
    from chextrain.evaluation.calibration import head_temperatures

    fitted = head_temperatures(pd.read_parquet(out / "predictions_val.parquet"))
    assert json.loads((out / "model.json").read_text())["temperature"] == pytest.approx(fitted, rel=1e-4)


def test_training_prints_a_line_per_epoch_and_no_lightning_chatter(tmp_path: Path, demo_root: Path) -> None:
    """With progress (not a terminal): what trains and on what, one line per epoch with the real step
    count, and none of Lightning's device lines, tips, empty FLOPs or logger version."""
    stage = _stage(tmp_path, STAGE + "max_steps: 4\n")
    args = ["train", str(stage), "--data", str(demo_root), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "tiny: 19.3 K parameters" in text and "1 process on cpu" in text and ", 4 steps" in text
    epochs = [line for line in text.splitlines() if line.startswith("tiny: epoch ")]
    assert epochs and epochs[-1].startswith("tiny: epoch") and "step 4/4" in epochs[-1]
    for chatter in ("GPU available", "TPU available", "Tip", "FLOPs", "v_num", "litlogger", "configured so"):
        assert chatter not in text, chatter


def test_bad_stage_lists_every_problem(tmp_path: Path, demo_root: Path) -> None:
    path = _stage(tmp_path, STAGE + "optimizer: {name: rmsprop, lr: 0}\nfreeze: all\n")
    result = CliRunner().invoke(
        build_app(),
        [
            "train",
            str(path),
            "--data",
            str(demo_root),
            "--out",
            str(tmp_path / "r"),
            "--set",
            "batch_size=-1",
        ],
    )
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    for field in ("optimizer.name", "optimizer.lr", "freeze", "batch_size"):
        assert f"{field}:" in text
    assert "4 invalid field(s)" in text and not (tmp_path / "r" / "done.json").exists()


def test_evaluate_refuses_a_folder_without_bundle(tmp_path: Path, demo_root: Path) -> None:
    result = CliRunner().invoke(build_app(), ["evaluate", str(tmp_path), "--data", str(demo_root)])
    assert result.exit_code == 2 and "model.json" in " ".join(result.output.split())


def _train_cmd(stage: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "chextrain.cli",
        "train",
        str(stage),
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path: Path, demo_root: Path) -> None:
    stage = _stage(
        tmp_path,
        STAGE + "epochs: 2\naugment: standard\ncheckpoint_every_n_steps: 2\n"
        "val_every_n_steps: 3\nevaluate: [val]\n",
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    straight = train_stage(load_stage(stage), demo_root, tmp_path / "straight", progress=False).out_dir

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(stage, demo_root, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "last.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "done.json").exists()  # it really died mid-run
    result = subprocess.run(
        _train_cmd(stage, demo_root, killed), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed and finished" in result.stdout
    assert json.loads((killed / "done.json").read_text())["resumed"] is True
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path: Path, demo_root: Path) -> None:
    stage = _stage(tmp_path, STAGE + "epochs: 1\nevaluate: [test]\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        _train_cmd(stage, demo_root, out, "--devices", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr  # two processes joined the (gloo) process group
    done = json.loads((out / "done.json").read_text())
    single = train_stage(load_stage(stage, ["evaluate=[]"]), demo_root, tmp_path / "single", progress=False)
    single = json.loads((single.out_dir / "done.json").read_text())
    assert done["world_size"] == 2 and len(done["samples_seen_per_rank"]) == 2
    # Each rank trained on its own half of the rows (padded by at most one), so an epoch has half the steps.
    per_rank = math.ceil(done["train_rows"] / 2)
    assert done["samples_seen_per_rank"] == [per_rank, per_rank]
    assert done["global_step"] == math.ceil(per_rank / 8) < single["global_step"]
    assert (out / "model.safetensors").exists() and (out / "metrics_test.json").exists()
