"""cli/checks.py: bad arguments are refused before any heavy import, with the library's own words."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from chextrain.cli import checks, use

HEAVY = (
    "torch",
    "torchvision",
    "lightning",
    "pandas",
    "sklearn",
    "scipy",
    "matplotlib",
    "captum",
    "fastapi",
    "onnx",
    "onnxruntime",
    "numpy",
    "PIL",
    "safetensors",
)


def fake_bundle(folder: Path) -> Path:
    """Files named like a bundle's: enough for the early checks, never loaded."""
    folder.mkdir()
    (folder / "model.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def same_message(library: Callable[[], object], cli: Callable[[], object]) -> str:
    """Both calls fail; the CLI's check with exactly the library's message (returned)."""
    with pytest.raises(ValueError) as lib:
        library()
    with pytest.raises(checks.ArgumentError) as early:
        cli()
    assert str(early.value) == str(lib.value)
    return str(early.value)


def test_bundle_and_choice_checks_say_what_predictor_says(plain_bundle: Path, tmp_path: Path) -> None:
    from chextrain.inference import Predictor

    half = tmp_path / "half"
    half.mkdir()
    (half / "model.json").write_text("{}")  # no weights next to it
    for path in (tmp_path / "none", tmp_path, half, half / "model.json"):
        assert str(path) in same_message(
            lambda p=path: Predictor.from_bundle(p),
            lambda p=path: use.check_bundle_options(p, "torch", "auto"),
        )
    same_message(
        lambda: Predictor.from_bundle(plain_bundle, domain="xray"),
        lambda: use.check_bundle_options(plain_bundle, "torch", "xray"),
    )
    same_message(
        lambda: Predictor.from_bundle(plain_bundle, runtime="tf"),
        lambda: use.check_bundle_options(plain_bundle, "tf", "auto"),
    )
    for domain in use.DOMAINS:  # every choice the CLI lets through works
        assert Predictor.from_bundle(plain_bundle, domain=domain).domain == domain


def test_explain_methods_are_the_saliency_methods() -> None:
    from chextrain.evaluation.saliency import METHODS

    assert use.METHODS == tuple(METHODS)


def test_stage_study_and_data_checks_say_what_the_library_says(tmp_path: Path) -> None:
    from chextrain.data.catalog import read_catalog
    from chextrain.training.stage import apply_overrides, load_stage
    from chextrain.training.study import load_study

    missing = tmp_path / "missing.yaml"
    same_message(lambda: load_stage(missing), lambda: checks.readable(missing, "stage"))
    same_message(lambda: load_study(missing), lambda: checks.readable(missing, "study"))
    same_message(lambda: load_stage(tmp_path), lambda: checks.readable(tmp_path, "stage"))  # a folder
    for item in ("lr", "=3", "a=[x", "b: {"):
        same_message(lambda i=item: apply_overrides({}, [i]), lambda i=item: checks.overrides([i]))
    checks.overrides(["optimizer.lr=1e-5", "evaluate=[val, test]", "name="])  # fine
    same_message(lambda: read_catalog(tmp_path / "nowhere"), lambda: checks.data_root(tmp_path / "nowhere"))
    checks.data_root(tmp_path)


EARLY_EXIT_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from chextrain.cli import build_app

results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(build_app(), args)
    results.append([r.exit_code, r.stderr + r.stdout])
print(json.dumps({"results": results, "modules": sorted(sys.modules)}))
"""


def test_bad_arguments_are_refused_before_any_heavy_import(tmp_path: Path) -> None:
    bundle, none, data = fake_bundle(tmp_path / "bundle"), str(tmp_path / "none"), str(tmp_path)
    stage = tmp_path / "stage.yaml"
    stage.write_text("name: s\n")
    image = str(tmp_path / "a.jpg")
    cases = [  # (arguments, what the error says)
        (["predict", none, image], f"bundle path {none} does not exist"),
        (["predict", str(bundle), image, "--format", "xml"], "--format 'xml'"),
        (["predict", str(bundle), image, "--domain", "xray"], "domain 'xray'"),
        (["predict", str(bundle), image, "--runtime", "tf"], "runtime 'tf'"),
        (["explain", str(bundle), image, "--out", data, "--method", "lime"], "--method 'lime'"),
        (["explain", str(tmp_path), image, "--out", data], "model.json is missing"),
        (["serve", none], "does not exist"),
        (["export", none, "--onnx", str(tmp_path / "m.onnx")], "does not exist"),
        (["train", str(tmp_path / "x.yaml"), "--data", data, "--out", data], "cannot read stage file"),
        (["train", str(stage), "--data", data, "--out", data, "--set", "lr"], "override 'lr'"),
        (["evaluate", str(bundle), "--data", data, "--split", "train"], "split 'train'"),
        (["evaluate", none, "--data", data], "does not exist"),
        (["study", "run", str(stage), "--data", data, "--out", data, "--set", "a=[x"], "not valid YAML"),
        (["study", "run", str(tmp_path / "x.yaml"), "--data", data, "--out", data], "cannot read study file"),
        (["study", "status", data], "no study.json"),
        (["study", "report", data], "no study.json"),
        (["data", "check", none], "data root is not a directory"),
        (["probe", str(bundle), "--data", none], "data root is not a directory"),
        (["probe", str(bundle), "--data", data, "--k", "0"], "k must be >= 1"),
        (["demo", "--study", str(tmp_path / "x.yaml")], "cannot read study file"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", EARLY_EXIT_SCRIPT, json.dumps([a for a, _ in cases])],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for (args, says), (code, output) in zip(cases, found["results"], strict=True):
        assert code == 2 and says in " ".join(output.split()), (args, output)
    imported = {m.split(".")[0] for m in found["modules"]}
    assert sorted(imported & set(HEAVY)) == []
