"""The study through the CLI: a tiny two-stage study end to end, and a runner killed mid-stage."""

from __future__ import annotations

import json
import multiprocessing
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

STUDY = """
name: tiny
defaults:
  backbone: tiny
  init: random
  image_size: 32
  batch_size: 8
  num_workers: 0
  optimizer: {name: adam, lr: 1.0e-3}
stages:
  - name: base
    label: Baseline
    data: {train: [chexpert]}
    max_steps: 3
  - name: tuned
    label: Baseline Fine-tuned on CheXphoto
    init: stage:base
    data: {train: [chexphoto]}
    optimizer: {name: adam, lr: 1.0e-4}
    max_steps: 2
profiles:
  long:
    stages:
      base: {max_steps: 12, checkpoint_every_n_steps: 1}
"""


def write_study(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(STUDY)
    return path


@pytest.mark.slow
def test_tiny_study_runs_reports_and_caches(tmp_path: Path, demo_root: Path) -> None:
    study, out = write_study(tmp_path), tmp_path / "out"
    runner = CliRunner()
    args = ["study", "run", str(study), "--data", str(demo_root), "--out", str(out), "--no-progress"]
    result = runner.invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "study.json").read_text())
    assert [(s["name"], s["state"]) for s in state["stages"]] == [("base", "done"), ("tuned", "done")]
    assert (out / "report.html").exists() and (out / "report.md").exists()
    table = pd.read_csv(out / "tables" / "table2_test.csv")
    assert list(table.columns) == [
        "strategy",
        "comparison",
        "pathology",
        "metric",
        "value",
        "ci_low",
        "ci_high",
    ]
    assert set(table["strategy"]) == {"Baseline", "Baseline Fine-tuned on CheXphoto"}
    assert set(table["comparison"]) == {"Standard", "Photos", "Standard - Photos"}
    # the fine-tuned stage started from the baseline's weights at its own learning rate
    done = json.loads((out / "stages" / "tuned" / "done.json").read_text())
    assert done["lr"] == [1.0e-4]
    status = runner.invoke(build_app(), ["study", "status", str(out)])
    assert status.exit_code == 0 and "done" in status.output and "Baseline" in status.output
    again = runner.invoke(build_app(), args + ["--no-report"])
    assert again.exit_code == 0 and again.output.count("done (cached)") == 2


@pytest.mark.slow
def test_tiny_study_runs_in_local_slots_through_the_cli(tmp_path: Path, demo_root: Path) -> None:
    study, out = write_study(tmp_path), tmp_path / "out"
    study.write_text(STUDY.replace("init: stage:base", "init: random"))  # two independent stages
    cmd = [sys.executable, "-m", "chextrain.cli", "study", "run", str(study), "--data", str(demo_root)]
    cmd += ["--out", str(out), "--no-report", "--executor", "local", "--slots", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    records = {s["name"]: s for s in json.loads((out / "study.json").read_text())["stages"]}
    assert {n: (r["state"], r["executor"]) for n, r in records.items()} == {
        "base": ("done", "local"),
        "tuned": ("done", "local"),
    }
    assert records["base"]["pid"] != records["tuned"]["pid"]  # one slot process each
    assert {p.name for p in (out / "jobs").glob("*.log")} == {"base.log", "tuned.log"}


def test_bad_study_file_is_a_clear_error(tmp_path: Path, demo_root: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(STUDY.replace("max_steps: 3", "max_steps: -1\n    freeze: half"))
    result = CliRunner().invoke(
        build_app(), ["study", "run", str(bad), "--data", str(demo_root), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "max_steps" in result.output and "freeze" in result.output
    args = ["study", "run", str(bad), "--data", str(demo_root), "--out", str(tmp_path / "o")]
    local = CliRunner().invoke(build_app(), args + ["--executor", "local", "--slots", "2"])
    assert local.exit_code == 2 and "max_steps" in local.output
    slots = [p for p in multiprocessing.active_children() if p.name == "chextrain-slot"]
    assert slots == []  # the slots started before the study was read are gone
    missing = CliRunner().invoke(build_app(), ["study", "status", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no study.json" in missing.output


@pytest.mark.slow
def test_runner_killed_mid_stage_resumes_on_rerun(tmp_path: Path, demo_root: Path) -> None:
    study, out = write_study(tmp_path), tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "chextrain.cli",
        "study",
        "run",
        str(study),
        "--data",
        str(demo_root),
        "--out",
        str(out),
        "--profile",
        "long",
        "--no-progress",
        "--no-report",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "stages" / "base" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists():
        assert proc.poll() is None and time.time() < deadline, "the study ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "base" / "done.json").exists()
    state = json.loads((out / "study.json").read_text())
    assert {s["name"]: s["state"] for s in state["stages"]}["base"] == "running"
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads((out / "stages" / "base" / "done.json").read_text())["resumed"] is True
    assert [s["state"] for s in json.loads((out / "study.json").read_text())["stages"]] == ["done", "done"]
    assert not list((out / "stages").glob("*.stale-*"))  # resumed in place, not restarted


def _wrapped_interrupt() -> BaseException:
    """What pydantic makes of a Ctrl-C that lands in a model's own serializer (no traceback chain)."""
    from pydantic import BaseModel, model_serializer

    class Hashed(BaseModel):
        x: int = 1

        @model_serializer(mode="wrap")
        def serialise(self, handler):  # noqa: ANN001, ANN202
            raise KeyboardInterrupt

    try:
        Hashed().model_dump()
    except Exception as err:  # PydanticSerializationError
        return err
    raise AssertionError("pydantic no longer wraps a KeyboardInterrupt: drop the special case")


@pytest.mark.parametrize("kind", ["plain", "wrapped by pydantic"])
def test_ctrl_c_while_the_study_is_read_is_one_line_and_exit_130(
    tmp_path: Path, demo_root: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from chextrain.training import study

    interrupt = KeyboardInterrupt() if kind == "plain" else _wrapped_interrupt()

    def hashing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise interrupt

    monkeypatch.setattr(study, "config_hash", hashing)
    args = ["study", "run", str(write_study(tmp_path)), "--data", str(demo_root)]
    result = CliRunner().invoke(build_app(), [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 130, result.output
    assert "interrupted (Ctrl-C)" in result.output
    assert "Serialization" not in result.output and "Traceback" not in result.output
