"""Hostile input for every command: bad paths, unreadable or truncated files, wrong types, pickles
where weights belong.

Each case runs one command in-process (typer's CliRunner, cwd = the test's folder) and asserts
what a user should see: a non-zero exit, a message that names the culprit, no traceback (no
exception escapes the command line's error boundary), and nothing written outside the output
folder (every file under the test's folder, the shared bundle and the demo tree is the same
before and after, except inside the case's output folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chextrain.cli import build_app
from tests.conftest import demo_files
from tests.csvutil import row, write_csv

STAGE = """\
name: tiny
backbone: tiny
init: random
image_size: 32
batch_size: 8
max_steps: 2
split: {val_fraction: 0.25}
num_workers: 0
"""
STUDY = """\
name: tiny
defaults: {backbone: tiny, init: random, image_size: 32, batch_size: 8, num_workers: 0, max_steps: 2}
stages:
  - {name: a, data: {train: [chexpert]}}
  - {name: b, init: "stage:a", data: {train: [chexphoto]}}
"""
GOOD_ROW = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"


@dataclass
class Case:
    """A command line, the text its error must contain, its exit code, and the folder it may write."""

    args: list[str]
    culprit: str
    code: int = 2
    out: Path | None = None
    once: bool = False  # the culprit is named exactly once (a study reports a problem once)


@dataclass
class Env:
    """What a case builds its input from: its own folder, the session's demo tree and bundle."""

    tmp: Path
    demo: Path
    bundle: Path

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    def a_file(self) -> Path:
        """A regular file, to put an output folder below."""
        return self.file("plain.txt", "not a folder\n")

    def damaged_bundle(self, damage: Callable[[Path], object]) -> Path:
        folder = self.tmp / "bundle"
        shutil.copytree(self.bundle, folder)
        damage(folder)
        return folder

    def image(self) -> Path:
        return demo_files(self.demo, "digital", "valid")[0]


def _pickle(path: Path) -> None:
    """A torch file that holds a Python object beyond tensors (refused by weights_only=True)."""
    import torch

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(folder: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((folder / "model.json").read_text())
    change(meta)
    (folder / "model.json").write_text(json.dumps(meta))


def _release(env: Env, lines: list[str], encoding: str = "utf-8") -> Path:
    """A data root whose CheXpert train.csv holds `lines` (valid.csv: one good row)."""
    root = env.tmp / "data"
    write_csv(root / "CheXpert-v1.0-small" / "train.csv", lines, encoding=encoding)
    write_csv(root / "CheXpert-v1.0-small" / "valid.csv", [row(GOOD_ROW.replace("train", "valid"))])
    return root


def _train(env: Env, stage: Path | None = None, data: Path | None = None, *extra: str) -> list[str]:
    stage = stage if stage is not None else env.file("stage.yaml", STAGE)
    return ["train", str(stage), "--data", str(data or env.demo), "--out", str(env.tmp / "out"), *extra]


def _resumable_with_a_pickle(env: Env) -> list[str]:
    """A run folder of this very stage whose last.ckpt holds Python objects."""
    import yaml

    from chextrain.training.stage import load_stage, resolved_config

    stage = env.file("stage.yaml", STAGE)
    out = env.tmp / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(resolved_config(load_stage(stage))))
    _pickle(out / "checkpoints" / "last.ckpt")
    return _train(env, stage)


def _truncated_csv(env: Env) -> Path:
    """A data root whose train.csv was cut short in the middle of its second row."""
    root = _release(env, [row(GOOD_ROW), row(GOOD_ROW.replace("view1", "view2"))])
    csv = root / "CheXpert-v1.0-small" / "train.csv"
    csv.write_bytes(csv.read_bytes()[:-40])
    return root


def _pickled_init(env: Env) -> list[str]:
    """A stage whose init is a torch file holding Python objects."""
    _pickle(env.tmp / "evil.pt")
    return _train(env, env.file("s.yaml", STAGE.replace("init: random", f"init: {env.tmp / 'evil.pt'}")))


def _study(env: Env, *extra: str, data: Path | None = None, text: str = STUDY) -> list[str]:
    study = env.file("study.yaml", text)
    return [
        "study",
        "run",
        str(study),
        "--data",
        str(data or env.demo),
        "--out",
        str(env.tmp / "out"),
        *extra,
    ]


def _two_bad_csvs(env: Env) -> list[str]:
    root = _release(env, [row(GOOD_ROW), row(GOOD_ROW.replace("view1", "view2"), {"Edema": "7"})])
    (root / "CheXpert-v1.0-small" / "valid.csv").write_bytes(b"")
    return ["data", "check", str(root), "--no-files"]


CASES: dict[str, Callable[[Env], Case]] = {
    # train
    "train: no stage file": lambda e: Case(_train(e, e.tmp / "nope.yaml"), "nope.yaml"),
    "train: stage is a folder": lambda e: Case(_train(e, e.tmp), str(e.tmp)),
    "train: stage not YAML": lambda e: Case(_train(e, e.file("s.yaml", "name: [tiny\n")), "s.yaml"),
    "train: wrong type": lambda e: Case(
        _train(e, e.file("s.yaml", STAGE + "batch_size: many\n")), "batch_size"
    ),
    "train: stage is a list": lambda e: Case(_train(e, e.file("s.yaml", "- name: tiny\n")), "s.yaml"),
    "train: truncated CSV": lambda e: Case(_train(e, None, _truncated_csv(e)), "line 3"),
    "train: no data root": lambda e: Case(_train(e, None, e.tmp / "nowhere"), "nowhere"),
    "train: path escapes": lambda e: Case(
        _train(e, None, _release(e, [row(GOOD_ROW), row("CheXpert-v1.0-small/../../etc/passwd")])), "line 3"
    ),
    "train: latin-1 CSV": lambda e: Case(
        _train(
            e, None, _release(e, [row(GOOD_ROW), row(GOOD_ROW.replace("1_", "2_"), sex="Fémale")], "latin-1")
        ),
        "line 3",
    ),
    "train: out below a file": lambda e: Case(_train(e)[:-1] + [str(e.a_file() / "run")], "plain.txt"),
    "train: bad --set": lambda e: Case(
        _train(e, None, None, "--set", "optimiser.lr=1"), "--set optimiser.lr=1"
    ),
    "train: pickled last.ckpt": lambda e: Case(_resumable_with_a_pickle(e), "last.ckpt", out=e.tmp / "out"),
    "train: pickled init": lambda e: Case(_pickled_init(e), "evil.pt"),
    # evaluate
    "evaluate: no run": lambda e: Case(["evaluate", str(e.tmp / "norun"), "--data", str(e.demo)], "norun"),
    "evaluate: truncated weights": lambda e: Case(
        [
            "evaluate",
            str(e.damaged_bundle(lambda b: _truncate(b / "model.safetensors"))),
            "--data",
            str(e.demo),
        ],
        "model.safetensors",
        out=e.tmp / "bundle",
    ),
    "evaluate: model.json lacks keys": lambda e: Case(
        [
            "evaluate",
            str(e.damaged_bundle(lambda b: _edit_meta(b, lambda m: m.pop("thresholds")))),
            "--data",
            str(e.demo),
        ],
        "thresholds",
        out=e.tmp / "bundle",
    ),
    "evaluate: pickle as weights": lambda e: Case(
        [
            "evaluate",
            str(e.damaged_bundle(lambda b: _pickle(b / "model.safetensors"))),
            "--data",
            str(e.demo),
        ],
        "model.safetensors",
        out=e.tmp / "bundle",
    ),
    "evaluate: no data root": lambda e: Case(
        ["evaluate", str(e.bundle), "--data", str(e.tmp / "nodata")], "nodata"
    ),
    # study
    "study run: no data root": lambda e: Case(_study(e, data=e.tmp / "nodata"), "nodata"),
    "study run: bad --set once": lambda e: Case(_study(e, "--set", "epoch=1"), "--set epoch=1", once=True),
    "study run: study not YAML": lambda e: Case(_study(e, text="stages: [\n"), "study.yaml"),
    "study run: stages of a wrong type": lambda e: Case(_study(e, text="name: x\nstages: 5\n"), "stages"),
    "study run: unknown --only": lambda e: Case(_study(e, "--only", "zzz"), "zzz"),
    "study run: out below a file": lambda e: Case(_study(e)[:-1] + [str(e.a_file() / "o")], "plain.txt"),
    "study run: bad CSV once": lambda e: Case(
        _study(e, data=_release(e, [row(GOOD_ROW), row("/etc/passwd")])), "line 3", once=True
    ),
    "study report: no study.json": lambda e: Case(["study", "report", str(e.tmp)], "study.json"),
    "study report: study.json not JSON": lambda e: Case(
        ["study", "report", str(e.file("s/study.json", "{oops").parent)], "study.json", out=e.tmp / "s"
    ),
    "study status: study.json not JSON": lambda e: Case(
        ["study", "status", str(e.file("s/study.json", "[1, 2").parent)], "study.json"
    ),
    # predict / explain / export / serve / info
    "predict: truncated weights": lambda e: Case(
        ["predict", str(e.damaged_bundle(lambda b: _truncate(b / "model.safetensors"))), str(e.image())],
        "model.safetensors",
    ),
    "predict: pickle as weights": lambda e: Case(
        ["predict", str(e.damaged_bundle(lambda b: _pickle(b / "model.safetensors"))), str(e.image())],
        "model.safetensors",
    ),
    "predict: model.json wrong type": lambda e: Case(
        [
            "predict",
            str(e.damaged_bundle(lambda b: _edit_meta(b, lambda m: m.update(image_size="big")))),
            str(e.image()),
        ],
        "image_size",
    ),
    "predict: out below a file": lambda e: Case(
        ["predict", str(e.bundle), str(e.image()), "--out", str(e.a_file() / "p.json")], "plain.txt"
    ),
    "predict: truncated image": lambda e: Case(
        ["predict", str(e.bundle), str(e.file("cut.jpg", e.image().read_bytes()[:300]))], "cut.jpg", code=1
    ),
    "explain: truncated image": lambda e: Case(
        [
            "explain",
            str(e.bundle),
            str(e.file("cut.jpg", e.image().read_bytes()[:300])),
            "--out",
            str(e.tmp / "x"),
        ],
        "cut.jpg",
        code=1,
    ),
    "explain: out below a file": lambda e: Case(
        ["explain", str(e.bundle), str(e.image()), "--out", str(e.a_file() / "x")], "plain.txt"
    ),
    "export: onnx below a file": lambda e: Case(
        ["export", str(e.bundle), "--onnx", str(e.a_file() / "m.onnx")], "plain.txt"
    ),
    "export: model.json not JSON": lambda e: Case(
        [
            "export",
            str(e.damaged_bundle(lambda b: (b / "model.json").write_text("{"))),
            "--onnx",
            str(e.tmp / "m.onnx"),
        ],
        "model.json",
    ),
    "serve: bad bundle": lambda e: Case(
        ["serve", str(e.damaged_bundle(lambda b: _truncate(b / "model.safetensors")))], "model.safetensors"
    ),
    "info: no bundle": lambda e: Case(["info", str(e.tmp / "nob")], "nob"),
    "info: truncated weights": lambda e: Case(
        ["info", str(e.damaged_bundle(lambda b: _truncate(b / "model.safetensors")))], "model.safetensors"
    ),
    "info: pickle as weights": lambda e: Case(
        ["info", str(e.damaged_bundle(lambda b: _pickle(b / "model.safetensors")))], "model.safetensors"
    ),
    "info: latin-1 model.json": lambda e: Case(
        ["info", str(e.damaged_bundle(lambda b: (b / "model.json").write_bytes(b'{"f\xe9": 1}')))],
        "model.json",
    ),
    # data check, probe, photo-sim
    "data check: no root": lambda e: Case(["data", "check", str(e.tmp / "noroot")], "noroot"),
    "data check: root is a file": lambda e: Case(["data", "check", str(e.a_file())], "plain.txt"),
    "data check: every file reported": lambda e: Case(_two_bad_csvs(e), "valid.csv", code=1),
    "probe: no run": lambda e: Case(["probe", str(e.tmp / "norun"), "--data", str(e.demo)], "norun"),
    "probe: data is a file": lambda e: Case(["probe", str(e.bundle), "--data", str(e.a_file())], "plain.txt"),
    "probe: bad k": lambda e: Case(["probe", str(e.bundle), "--data", str(e.demo), "--k", "0"], "k=0"),
    "photo-sim: not an image": lambda e: Case(
        ["photo-sim", str(e.file("notes.png", "hello")), "--out", str(e.tmp / "o")],
        "notes.png",
        1,
        e.tmp / "o",
    ),
    "photo-sim: out below a file": lambda e: Case(
        ["photo-sim", str(e.image()), "--out", str(e.a_file() / "o")], "plain.txt"
    ),
    "demo: no study file": lambda e: Case(
        ["demo", "--out", str(e.tmp / "d"), "--study", str(e.tmp / "no.yaml")], "no.yaml"
    ),
}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under roots: (size, mtime in ns)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for root in roots
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(
    name: str, tmp_path: Path, demo_root: Path, plain_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name](Env(tmp_path, demo_root, plain_bundle))
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, demo_root, plain_bundle)
    result = CliRunner().invoke(build_app(), case.args, env={"COLUMNS": "80"})
    text = result.output
    assert not (result.exception and not isinstance(result.exception, SystemExit)), (
        f"exception escaped: {result.exception!r}\n{text}"
    )
    assert "Traceback" not in text, text
    assert result.exit_code == case.code, f"exit {result.exit_code}, expected {case.code}:\n{text}"
    flat = " ".join(text.split())
    assert case.culprit in flat, f"{case.culprit!r} not named in:\n{text}"
    if case.once:
        assert flat.count(case.culprit) == 1, text
    after = snapshot(tmp_path, demo_root, plain_bundle)
    out = str(case.out) if case.out else None
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p for p in changed if not (out and p.startswith(out))} == set(), (
        "written outside the output folder"
    )
    if case.out is None:
        assert not (tmp_path / "out").exists(), "an output folder was created for bad input"


def test_serve_refuses_a_port_in_use_before_saying_it_serves(plain_bundle: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        result = CliRunner().invoke(build_app(), ["serve", str(plain_bundle), "--port", str(port)])
    finally:
        sock.close()
    assert result.exit_code == 2 and str(port) in result.output and "in use" in result.output
    assert "serving" not in result.output and "Traceback" not in result.output


def test_debug_lets_the_exception_through(tmp_path: Path, plain_bundle: Path) -> None:
    """One line by default; CHEXTRAIN_DEBUG=1 or --debug let the exception (and its traceback) through."""
    bundle = tmp_path / "bundle"
    shutil.copytree(plain_bundle, bundle)
    (bundle / "model.json").write_text("{")
    quiet = CliRunner().invoke(build_app(), ["info", str(bundle)])
    assert quiet.exit_code == 2 and isinstance(quiet.exception, SystemExit)
    assert quiet.output.count("\n") == 1 and "model.json" in quiet.output
    for args, env in (
        (["--debug", "info", str(bundle)], {}),
        (["info", str(bundle)], {"CHEXTRAIN_DEBUG": "1"}),
    ):
        loud = CliRunner().invoke(build_app(), args, env=env)
        assert type(loud.exception).__name__ == "WeightsError", loud.output


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(build_app(), ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"chextrain {version('chextrain')}"
