"""Tests for chextrain.rectify (find and flatten the radiograph) and the `corners` objective."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from chextrain.rectify import (
    CornerModel,
    Quad,
    RectifyError,
    classical_quad,
    corner_error,
    decode_outputs,
    find_quad,
    full_frame,
    quad_iou,
    warp,
)

QUAD = np.array([[14, 10], [70, 16], [66, 90], [10, 84]], dtype=np.float32)  # TL, TR, BR, BL


def _pattern(h: int = 60, w: int = 48) -> np.ndarray:
    """A bright radiograph-like pattern: stripes and a blob, never dark."""
    y, x = np.mgrid[0:h, 0:w]
    return (150 + 60 * np.sin(x / 4.0) * np.cos(y / 6.0) + 40 * (np.hypot(x - 30, y - 20) < 8)).astype(
        np.uint8
    )


def _photo(pattern: np.ndarray, quad: np.ndarray, shape: tuple[int, int] = (100, 80)) -> np.ndarray:
    """`pattern` drawn inside `quad` of a dark, slightly noisy frame (a film seen at an angle)."""
    h, w = pattern.shape
    m = cv2.getPerspectiveTransform(full_frame(w, h), quad)
    photo = cv2.warpPerspective(pattern, m, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderValue=20)
    noise = np.random.default_rng(0).normal(0, 3, photo.shape)
    return np.clip(photo + noise, 0, 255).astype(np.uint8)


def test_measures_by_hand() -> None:
    square = full_frame(2, 2)
    assert corner_error(square, square, 3, 4) == 0.0 and quad_iou(square, square) == pytest.approx(1.0)
    assert corner_error(square + [3, 4], square, 30, 40) == pytest.approx(5 / 50)  # 5 px of a 50 px diagonal
    assert quad_iou(square, square + [1, 0]) == pytest.approx(2 / 6)  # overlap 2, union 6
    assert quad_iou(square, square + [5, 5]) == 0.0


def test_warp_flattens_a_tilted_radiograph() -> None:
    pattern = _pattern()
    flat = warp(_photo(pattern, QUAD), QUAD)
    assert flat.ndim == 2 and flat.shape == (74, 56)  # the longer opposite sides
    back = cv2.resize(flat, pattern.shape[::-1], interpolation=cv2.INTER_AREA).astype(float)
    assert np.corrcoef(back.ravel(), pattern.astype(float).ravel())[0, 1] > 0.9
    rgb = warp(np.repeat(_photo(pattern, QUAD)[..., None], 3, axis=2), QUAD, size=40)
    assert rgb.shape[2] == 3 and max(rgb.shape[:2]) == 40
    with pytest.raises(RectifyError, match="4 x 2"):
        warp(pattern, QUAD[:3])
    with pytest.raises(RectifyError, match="no area"):
        warp(pattern, np.zeros((4, 2), np.float32))


def test_classical_finds_a_bright_quadrilateral_on_a_dark_frame() -> None:
    found = classical_quad(_photo(_pattern(), QUAD))
    assert isinstance(found, Quad) and found.method == "classical"
    assert found.corners.shape == (4, 2) and found.corners.dtype == np.float32
    assert corner_error(found.corners, QUAD, 80, 100) < 0.02 and found.confidence > 0.6
    assert find_quad(_photo(_pattern(), QUAD)).method == "classical"


def test_nothing_found_uses_the_photo_as_it_is() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (90, 70), dtype=np.uint8)
    found = find_quad(noise)
    assert found.method == "none"
    assert np.array_equal(found.corners, full_frame(70, 90)) and 0.0 <= found.confidence < 0.6
    with pytest.raises(RectifyError, match="uint8"):
        find_quad(noise.astype(np.float32))


def test_decode_outputs_spreads_corners_over_the_range() -> None:
    out = torch.zeros(2, 9)
    out[1, :8] = 50.0  # sigmoid 1: the top of the range
    corners, confidence = decode_outputs(out)
    assert corners.shape == (2, 4, 2) and torch.allclose(corners[0], torch.full((4, 2), 0.5))
    assert torch.allclose(corners[1], torch.full((4, 2), 1.2)) and torch.allclose(
        confidence, torch.full((2,), 0.5)
    )
    np_corners, _ = decode_outputs(out.numpy())
    assert np.allclose(np_corners, corners.numpy())


def test_corner_losses_teach_the_confidence_whether_corners_are_right() -> None:
    from chextrain.training.objectives.corners import corner_losses

    target = torch.tensor([[0.1, 0.1, 0.9, 0.1, 0.9, 0.9, 0.1, 0.9]])
    logits = torch.logit((target + 0.2) / 1.4)  # decodes to the target exactly
    right = corner_losses(torch.cat([logits, torch.tensor([[5.0]])], 1), target, 0.03)
    wrong = corner_losses(torch.cat([logits + 1.0, torch.tensor([[5.0]])], 1), target, 0.03)
    assert float(right["l1"]) < 1e-5 and float(right["error"]) < 1e-5
    assert float(right["bce"]) < 0.01 < float(wrong["bce"])  # sure and right vs sure and wrong
    assert float(wrong["l1"]) > 0.05
    blank = torch.cat([target, torch.full((1, 8), float("nan"))])  # the second photo shows no radiograph
    outputs = torch.cat([torch.cat([logits, torch.tensor([[5.0]])], 1)] * 2)
    mixed = corner_losses(outputs, blank, 0.03)
    assert torch.isfinite(mixed["loss"]) and float(mixed["l1"]) < 1e-5  # no corner loss for it
    assert float(mixed["bce"]) > 2.0  # sure of corners where there are none: penalised


def test_choose_threshold_minimises_find_quads_error() -> None:
    from chextrain.training.objectives.corners import choose_threshold

    # per photo: learned error, its confidence, classical error, its confidence, whole-frame error
    sure_and_right = [0.01, 0.9, 0.05, 0.9, 0.2]
    unsure_and_wrong = [0.30, 0.1, 0.05, 0.9, 0.2]  # the classical finder does better here
    unsure_but_right = [0.02, 0.3, 0.05, 0.1, 0.2]  # and here nothing else does
    threshold, error = choose_threshold(np.array([sure_and_right, unsure_and_wrong, unsure_but_right]))
    assert threshold == pytest.approx(0.3) and error == pytest.approx((0.01 + 0.05 + 0.02) / 3)
    threshold, error = choose_threshold(np.array([sure_and_right, unsure_and_wrong]))
    assert threshold == pytest.approx(0.9) and error == pytest.approx(0.03)  # the highest of equals


def test_corner_photos_read_labels_and_photograph_xrays(tmp_path: Path) -> None:
    from PIL import Image

    from chextrain.data.corners import write_labelme
    from chextrain.training.objectives.corners import CornerPhotos
    from chextrain.training.specs import CornersSpec

    xray, photo = tmp_path / "xray.png", tmp_path / "photo.png"
    Image.fromarray(_pattern(64, 48)).save(xray)
    Image.fromarray(_photo(_pattern(), QUAD)).save(photo)
    labelled = {str(photo): _read(write_labelme(tmp_path / "photo.json", QUAD, 80, 100, "photo.png"))}
    data = CornerPhotos([str(xray), str(photo)], labelled, CornersSpec(plain=0.0), image_size=32, seed=3)
    sample = data[(1, 0)]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.uint8
    assert np.allclose(sample["corners"].numpy().reshape(4, 2), QUAD / [80, 100])
    a, b, c = data[(0, 0)], data[(0, 0)], data[(0, 1)]
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])  # per epoch
    inside = a["corners"].reshape(4, 2)
    assert (inside[1, 0] - inside[0, 0]) < 0.97  # the x-ray was photographed: smaller than the frame


def _read(path: Path):
    from chextrain.data.corners import read_labelme

    return read_labelme(path)


@pytest.mark.slow
def test_corners_stage_trains_a_bundle_find_quad_loads(
    tmp_path: Path, use_demo: Path, plain_bundle: Path
) -> None:
    from chextrain.training.lifecycle import train_stage
    from chextrain.training.stage import parse_stage

    stage = parse_stage(
        {
            "name": "corners",
            "objective": "corners",
            "max_steps": 4,
            "image_size": 32,
            "batch_size": 8,
            "num_workers": 0,
            "data": {"train": ["chexpert", "chexphoto"]},
            "corners": {"eval_photos": 4},  # min_confidence: chosen on those 4 photos
        }
    )
    result = train_stage(stage, use_demo, tmp_path / "run", progress=False)
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["objective"] == "corners" and done["global_step"] == 4
    assert done["labelled_photos"] > 0 and done["left_out"] > 0  # natural photos in; other photos out
    side_by_side = {"learned_error", "learned_iou", "classical_error", "classical_iou", "n"}
    assert set(result.metrics["test/labelled"]) == side_by_side
    assert set(result.metrics["val/simulated"]) == side_by_side | {"find_quad_error", "blank_screens_doubted"}
    model = CornerModel.load(tmp_path / "run")
    assert model.image_size == 32 and 0.0 <= model.min_confidence <= 0.95
    assert model.min_confidence in np.round(np.arange(0.0, 0.96, 0.05), 2)  # choose_threshold's grid
    photo = _photo(_pattern(), QUAD)
    corners, confidence = model.predict(photo)
    assert corners.shape == (4, 2) and 0.0 <= confidence <= 1.0
    assert find_quad(photo, model, min_confidence=0.0).method == "learned"
    assert find_quad(photo, model, min_confidence=1.01).method == "classical"  # the fallback
    assert find_quad(photo, model, min_confidence=1.01, fallback=False).method == "none"
    assert find_quad(photo, tmp_path / "run", min_confidence=0.0).method == "learned"  # a path loads
    with pytest.raises(RectifyError, match="not a corner model"):
        CornerModel.load(plain_bundle)
