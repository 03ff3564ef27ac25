"""Saliency: vanilla gradients (reset between pathologies), Grad-CAM on the last block, figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from chextrain.evaluation.saliency import (
    SaliencyError,
    blank_notes,
    explain_maps,
    grad_cam,
    gradcam_layer,
    grid_figure,
    map_to_image,
    overlay,
    panel_title,
    saliency_maps,
    save_explanation,
    vanilla_gradients,
)
from chextrain.labels import SLUGS
from chextrain.models.net import CXRNet


@pytest.fixture()
def model() -> CXRNet:
    torch.manual_seed(0)
    return CXRNet("tiny", heads=["digital", "photo"], router=True).eval()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(1, 1, 48, 48, generator=torch.Generator().manual_seed(3)).expand(1, 3, 48, 48)


@pytest.mark.parametrize("method", ["gradient", "gradcam"])
def test_maps_are_finite_nonnegative_and_differ_per_pathology(
    model: CXRNet, x: torch.Tensor, method: str
) -> None:
    maps = saliency_maps(model, x, "photo", method)
    assert maps.shape == (1, 5, 48, 48) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
    flat = maps[0].reshape(5, -1)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not np.allclose(flat[i], flat[j]), (i, j)
    other = saliency_maps(model, x, "digital", method)
    assert not np.allclose(maps, other)  # each head explains its own logits


def test_gradients_are_reset_between_pathologies(model: CXRNet, x: torch.Tensor) -> None:
    together = vanilla_gradients(model, x, "photo")
    for k in range(5):
        alone = vanilla_gradients(model, x, "photo", targets=[k])
        np.testing.assert_array_equal(together[:, k], alone[:, 0])
    # The paper's code: backward() per pathology into the same x.grad, which accumulates.
    xs = x.detach().clone().requires_grad_(True)
    logits = model(xs, "photo")  # 1 x 5
    accumulated = []
    for k in range(5):
        logits[:, k].sum().backward(retain_graph=True)
        accumulated.append(xs.grad.sum(dim=1).abs().numpy().copy())  # 1 x S x S
    np.testing.assert_allclose(together[:, 0], accumulated[0], rtol=1e-5, atol=1e-8)
    assert not np.allclose(together[:, 3], accumulated[3], rtol=1e-3)  # ours is not the running sum


def test_vanilla_gradient_is_the_grey_pixel_derivative(model: CXRNet) -> None:
    grey = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    logit = model(grey.expand(1, 3, 32, 32), "digital")[0, 2]
    (grad,) = torch.autograd.grad(logit, grey)
    got = vanilla_gradients(model, grey.detach().expand(1, 3, 32, 32), "digital", targets=[2])
    np.testing.assert_allclose(got[0, 0], grad[0, 0].abs().numpy(), rtol=1e-5, atol=1e-8)


def test_grad_cam_matches_a_hand_computation_on_the_last_block(model: CXRNet, x: torch.Tensor) -> None:
    acts = {}
    block = model.encoder.features.block3  # the tiny net's last block
    handle = block.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    try:
        logit = model(x, "photo")[0, 1]
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logit, acts["a"])  # 1 x C x h x w
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * acts["a"]).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(48, 48), mode="bilinear", align_corners=False)[0, 0]
    got = grad_cam(model, x, "photo", targets=[1], layer="features.block3")[0, 0]
    np.testing.assert_allclose(got, cam.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_grad_cam_picks_a_block_with_at_least_8_x_8_cells(model: CXRNet) -> None:
    # the tiny net halves the size in each of its three blocks
    assert gradcam_layer(model, 64) == ("features.block3", (8, 8))  # the last block is fine
    assert gradcam_layer(model, 48) == ("features.block2", (12, 12))  # block3 would be 6 x 6
    assert gradcam_layer(model, 20) == ("features.block1", (10, 10))
    assert gradcam_layer(model, 12) is None  # 6 x 6 at best
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    maps, how = explain_maps(model, x, "photo", "gradcam")
    assert how == {"method": "gradcam", "layer": "features.block2", "cells": [12, 12], "note": None}
    np.testing.assert_allclose(
        maps, grad_cam(model, x, "photo", layer="features.block2"), rtol=1e-5, atol=1e-7
    )
    assert not np.allclose(maps, grad_cam(model, x, "photo", layer="features.block3"))
    small = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    maps, how = explain_maps(model, small, "photo", "gradcam")  # 6 x 6 at best: gradients instead
    assert how["method"] == "gradient" and how["layer"] is None and "8 x 8" in how["note"]
    np.testing.assert_array_equal(maps, vanilla_gradients(model, small, "photo"))


def test_blank_maps_say_why_and_panels_say_positive_or_negative() -> None:
    maps = np.zeros((3, 8, 8), np.float32)
    maps[1, 2, 2] = 0.5
    maps[2] = np.nan
    notes = blank_notes(maps, "gradcam")
    assert notes[1] is None and notes[0] == notes[2] and "no region raised this score" in notes[0]
    assert "does not change" in blank_notes(maps[:1], "gradient")[0]
    assert panel_title("Edema", 0.62, 0.5) == "Edema\np = 0.62 >= 0.50: positive"
    assert panel_title("Edema", 0.12, 0.3) == "Edema\np = 0.12 < 0.30: negative"
    assert panel_title("Edema", None, 0.3) == "Edema\nnot scored"
    image = np.full((40, 40), 100, np.uint8)
    fig = grid_figure(
        image,
        np.zeros((5, 8, 8)),
        [0.9, 0.1, 0.2, 0.3, 0.4],
        thresholds=[0.5] * 5,
        notes=blank_notes(np.zeros((5, 8, 8)), "gradcam"),
    )
    titles = [ax.get_title() for ax in fig.axes[1:]]
    assert titles[0].endswith("positive") and titles[1].endswith("negative")
    texts = [t.get_text() for ax in fig.axes[1:] for t in ax.texts]
    assert len(texts) == 5 and all("blank" in t for t in texts)


def test_bad_arguments(model: CXRNet, x: torch.Tensor) -> None:
    with pytest.raises(SaliencyError, match="method 'lime'"):
        saliency_maps(model, x, "photo", "lime")
    with pytest.raises(SaliencyError, match=r"targets \[7\]"):
        vanilla_gradients(model, x, "photo", targets=[7])
    with pytest.raises(SaliencyError, match="B x 3 x S x S"):
        grad_cam(model, x[:, :1], "photo")
    with pytest.raises(ValueError, match="unknown head 'xray'"):
        grad_cam(model, x, "xray")


def test_map_to_image_undoes_padding() -> None:
    sal = np.zeros((40, 40), np.float32)
    sal[10:30, :] = 1.0  # a 2:1 wide image padded top and bottom into the square
    back = map_to_image(sal, (50, 100), "pad")
    assert back.shape == (50, 100) and back.min() > 0.99
    assert map_to_image(sal, (50, 100), "stretch").min() == 0.0


def test_overlay_colours_the_salient_region() -> None:
    image = np.full((60, 80), 100, np.uint8)
    sal = np.zeros((32, 32), np.float32)
    sal[:, 16:] = 1.0  # right half
    rgb = overlay(image, sal)
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    assert (rgb[:, :30] == 100).all()  # untouched where the map is 0
    assert np.abs(rgb[:, 50:].astype(int) - 100).max() > 30


def test_save_explanation_writes_overlays_and_a_grid(model: CXRNet, x: torch.Tensor, tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 256, (70, 60)).astype(np.uint8)
    maps = saliency_maps(model, x, "photo", "gradcam")[0]
    paths = save_explanation(image, maps, [0.1, 0.2, 0.3, 0.4, 0.5], tmp_path / "out", "img1", title="t")
    assert [p.name for p in paths] == [f"img1_{s}.png" for s in SLUGS] + ["img1_grid.png"]
    for p in paths[:-1]:
        with Image.open(p) as im:
            assert im.size == (60, 70) and im.mode == "RGB"
    with Image.open(paths[-1]) as grid:
        assert grid.size[0] > 4 * grid.size[1]  # one row: image + five maps
    with pytest.raises(SaliencyError, match="5 maps"):
        save_explanation(image, maps[:3], [0.1] * 3, tmp_path, "bad")
