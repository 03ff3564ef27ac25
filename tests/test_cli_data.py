"""`chextrain data check` on a generated demo tree, on broken copies of it, and as JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chextrain.cli import build_app


@pytest.fixture()
def tree(tmp_path: Path, demo_root: Path) -> Path:
    """A private copy of the session's demo tree that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


def check(*args: str):
    return CliRunner().invoke(build_app(), ["data", "check", *args])


def test_demo_tree_is_clean(demo_root: Path) -> None:
    result = check(str(demo_root), "--verify-images")
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "chexphoto" in result.output
    report = json.loads(check(str(demo_root), "--json").output)
    groups = {(g["dataset"], g["file"]): g for g in report["datasets"]}
    assert groups[("chexpert", "valid")]["rows"] == 12
    assert groups[("chexphoto", "valid")]["kinds"] == {
        "natural": 12,
        "synthetic-digital": 12,
        "synthetic-photographic": 12,
    }
    states = groups[("chexpert", "valid")]["labels"]["edema"]
    assert states["uncertain"] == 0 and states["blank"] == 0  # valid labels are 0/1 only
    assert report["ok"] is True


def test_problems_are_reported_and_exit_non_zero(tree: Path) -> None:
    csv = tree / "CheXpert-v1.0-small" / "train.csv"
    lines = csv.read_text().splitlines()
    cells = lines[1].split(",")
    cells[10] = "2.0"  # Edema
    lines[1] = ",".join(cells)
    lines.append(lines[2])  # a duplicate row
    csv.write_text("\n".join(lines) + "\n")
    victim = sorted((tree / "CheXpert-v1.0-small" / "valid").rglob("*.jpg"))[0]
    victim.unlink()
    broken = sorted((tree / "CheXpert-v1.0-small" / "valid").rglob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:200])
    result = check(str(tree), "--json", "--verify-images")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert any("line 2" in i and "'2.0'" in i for i in report["issues"])
    assert any("duplicate of line 3" in i for i in report["issues"])
    assert any(str(victim) in m for m in report["missing_files"])
    assert any(str(broken) in u for u in report["unreadable_images"])
    assert not check(str(tree), "--no-files", "--json").output.count("image file not found")


def test_no_release_is_exit_2(tmp_path: Path) -> None:
    result = check(str(tmp_path))
    assert result.exit_code == 2 and "no CheXpert or CheXphoto release found" in result.output
