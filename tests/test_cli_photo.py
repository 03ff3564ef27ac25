"""Tests for `chextrain photo-sim`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from chextrain.cli import build_app

runner = CliRunner()


def _xray(path: Path, seed: int = 0, size: tuple[int, int] = (40, 32)) -> Path:
    """A small grey JPEG (H x W = size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[0], 0 : size[1]]
    a = np.clip(80 + 3 * x + 30 * np.sin(y / 4) + rng.normal(0, 5, size), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(path, "JPEG", quality=95)
    return path


def _run(*args: str):
    return runner.invoke(build_app(), ["photo-sim", *args])


def test_help():
    result = _run("--help")
    assert result.exit_code == 0
    assert "--recipe" in result.output and "--level" in result.output and "--seed" in result.output


@pytest.mark.parametrize("recipe, mode", [("phone", "RGB"), ("photographic", "RGB"), ("digital", "L")])
def test_writes_one_jpeg_per_input_with_the_same_stem(tmp_path, recipe, mode):
    a, b = _xray(tmp_path / "a.jpg", 0), _xray(tmp_path / "b.png.jpg", 1)
    out = tmp_path / "out"
    result = _run(str(a), str(b), "--out", str(out), "--recipe", recipe, "--level", "2", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg", "b.png.jpg"]
    with Image.open(out / "a.jpg") as im:
        assert im.format == "JPEG" and im.mode == mode and im.size == (32, 40)
    assert "wrote 2 of 2" in result.output


def test_deterministic_and_independent_of_other_files(tmp_path):
    a, b = _xray(tmp_path / "a.jpg", 0), _xray(tmp_path / "b.jpg", 1)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r1 = _run(str(a), str(b), "--out", str(tmp_path / "o1"), "--seed", "9")
    r2 = _run(str(a), str(bad), "--out", str(tmp_path / "o2"), "--seed", "9")
    assert r2.exit_code == 1
    r3 = _run(str(a), str(b), "--out", str(tmp_path / "o3"), "--seed", "10")
    assert r1.exit_code == 0 and r3.exit_code == 0
    first = (tmp_path / "o1" / "a.jpg").read_bytes()
    assert (tmp_path / "o2" / "a.jpg").read_bytes() == first  # b failing changes nothing for a
    assert (tmp_path / "o3" / "a.jpg").read_bytes() != first  # the seed matters
    assert (tmp_path / "o1" / "b.jpg").read_bytes() != first  # each input has its own generator


def test_bad_files_reported_rest_proceed_exit_1(tmp_path):
    good = _xray(tmp_path / "good.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    out = tmp_path / "out"
    result = _run(str(empty), str(missing), str(good), "--out", str(out))
    assert result.exit_code == 1
    assert "empty.png: empty file" in result.output
    assert "missing.jpg: file not found" in result.output
    assert [p.name for p in out.iterdir()] == ["good.jpg"]
    assert "wrote 1 of 3" in result.output


def test_repeated_stems_do_not_overwrite(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    a = _xray(tmp_path / "s1" / "view1_frontal.jpg", 0)
    b = _xray(tmp_path / "s2" / "view1_frontal.jpg", 1)
    out = tmp_path / "out"
    result = _run(str(a), str(b), "--out", str(out), "--recipe", "digital")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["view1_frontal-2.jpg", "view1_frontal.jpg"]


def test_refuses_to_overwrite_an_input(tmp_path):
    a = _xray(tmp_path / "a.jpg")
    before = a.read_bytes()
    result = _run(str(a), "--out", str(tmp_path))
    assert result.exit_code == 1 and "would overwrite an input" in result.output
    assert a.read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "film"], "--recipe 'film' is not one of digital, photographic, phone"),
        (["--level", "5"], "--level"),
        (["--level", "0"], "--level"),
    ],
)
def test_bad_options_exit_2(tmp_path, args, message):
    a = _xray(tmp_path / "a.jpg")
    result = _run(str(a), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_corners_writes_labelme_beside_the_photo_and_the_same_photo(tmp_path):
    from chextrain.data.corners import read_labelme

    a = _xray(tmp_path / "a.jpg", 0, size=(80, 64))
    plain, labelled = tmp_path / "plain", tmp_path / "labelled"
    assert _run(str(a), "--out", str(plain), "--seed", "2").exit_code == 0
    result = _run(str(a), "--out", str(labelled), "--seed", "2", "--corners")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in labelled.iterdir()) == ["a.jpg", "a.json"]
    assert (labelled / "a.jpg").read_bytes() == (plain / "a.jpg").read_bytes()
    got = read_labelme(labelled / "a.json")
    assert (got.width, got.height) == (64, 80)
    area = 0.5 * abs(np.cross(got.corners[2] - got.corners[0], got.corners[3] - got.corners[1]))
    assert 0.3 * 64 * 80 < area < 64 * 80  # the monitor shows the x-ray smaller than the frame
