"""The phantom renderer: shapes, determinism, and pathology signs that follow the labels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chextrain.data.phantom import CTR_RANGES, PhantomError, PhantomInfo, render_xray
from chextrain.labels import SLUGS

SIZE = (78, 64)  # H x W
SEEDS = range(6)


def render(labels: dict, seed: int, view: str = "PA", size=SIZE) -> tuple[np.ndarray, PhantomInfo]:
    return render_xray(labels, view, np.random.default_rng(seed), size)


def column_ctr(info: PhantomInfo) -> float:
    """Cardiothoracic ratio measured the radiologist's way: widest column extents of the masks."""

    def width(mask: np.ndarray) -> int:
        cols = np.flatnonzero(mask.any(axis=0))
        return int(cols[-1] - cols[0] + 1)

    return width(info.masks["heart"]) / width(info.masks["thorax"])


@pytest.mark.parametrize("view", ["PA", "AP", "lateral"])
def test_shape_dtype_and_xray_convention(view: str) -> None:
    img, info = render({}, 0, view)
    assert img.shape == SIZE and img.dtype == np.uint8
    assert info.shape == SIZE and info.view == view
    assert all(m.shape == SIZE and m.dtype == bool for m in info.masks.values())
    lungs, body = info.masks["lungs"], info.masks["body"]
    assert lungs.any() and (~body).any()
    background = img[~body].mean()
    assert background < 60  # air outside the patient is dark
    assert img[lungs].mean() < img[body & ~info.masks["thorax"]].mean()  # lungs darker than soft tissue
    heart = info.masks["heart"] & ~info.masks["lungs"]
    assert img[heart].mean() > img[lungs].mean() + 20  # heart shadow brighter than lung


def test_square_int_size_and_large_size() -> None:
    assert render({}, 1, size=48)[0].shape == (48, 48)
    assert render({}, 1, size=(390, 320))[0].shape == (390, 320)


def test_deterministic_for_a_seed_and_patients_vary() -> None:
    a, _ = render({"edema": 1.0}, 7)
    b, _ = render({"edema": 1.0}, 7)
    c, _ = render({"edema": 1.0}, 8)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_anatomy_varies_between_patients() -> None:
    infos = [render({}, s)[1] for s in range(12)]
    scales = [i.params["scale"] for i in infos]
    rotations = [i.params["rotation_deg"] for i in infos]
    ctrs = [i.ctr for i in infos]
    assert max(scales) / min(scales) > 1.08
    assert max(rotations) - min(rotations) > 3
    assert max(ctrs) - min(ctrs) > 0.04


def test_blank_zero_and_missing_labels_render_the_same_normal_image() -> None:
    a, ia = render({}, 3)
    b, _ = render({s: 0.0 for s in SLUGS}, 3)
    c, _ = render({s: math.nan for s in SLUGS}, 3)
    d, _ = render({s: None for s in SLUGS}, 3)
    assert np.array_equal(a, b) and np.array_equal(a, c) and np.array_equal(a, d)
    assert not any(ia.drawn.values())
    assert all(not ia.masks[s].any() for s in SLUGS)


@pytest.mark.parametrize("view", ["PA", "AP"])
def test_cardiomegaly_iff_ctr_above_half(view: str) -> None:
    for seed in SEEDS:
        pos = render({"cardiomegaly": 1.0}, seed, view, (156, 128))[1]
        unc = render({"cardiomegaly": -1.0}, seed, view, (156, 128))[1]
        for value in (0.0, math.nan):
            neg = render({"cardiomegaly": value}, seed, view, (156, 128))[1]
            assert neg.ctr < 0.49 and column_ctr(neg) < 0.5
        assert pos.ctr > 0.54 and column_ctr(pos) > 0.52
        assert 0.48 < unc.ctr < 0.55
        assert pos.ctr > unc.ctr > neg.ctr
        assert abs(pos.ctr - pos.params["ctr_nominal"]) < 0.03  # the masks measure what was drawn
        assert pos.heart_width > unc.heart_width > neg.heart_width
        assert pos.masks["cardiomegaly"].any() and not neg.masks["cardiomegaly"].any()


def test_ctr_ranges_separate_normal_uncertain_and_enlarged() -> None:
    absent, uncertain, positive = CTR_RANGES["absent"], CTR_RANGES["uncertain"], CTR_RANGES["positive"]
    assert absent[1] < 0.49 < uncertain[0] < uncertain[1] < positive[0]
    assert 0.52 < positive[0] and absent[0] >= 0.38


def region_mean(img: np.ndarray, mask: np.ndarray) -> float:
    return float(img[mask].astype(float).mean())


@pytest.mark.parametrize("view", ["PA", "AP", "lateral"])
def test_effusion_brightens_the_costophrenic_region_iff_labelled(view: str) -> None:
    for seed in SEEDS:
        base, info = render({"pleural_effusion": 0.0}, seed, view)
        pos, ip = render({"pleural_effusion": 1.0}, seed, view)
        unc, iu = render({"pleural_effusion": -1.0}, seed, view)
        cp = info.masks["costophrenic"]
        b, p, u = region_mean(base, cp), region_mean(pos, cp), region_mean(unc, cp)
        assert p > u > b
        assert p - b > 8  # conspicuous at 64 px, even when only one side has fluid
        assert ip.masks["pleural_effusion"].sum() > iu.masks["pleural_effusion"].sum() > 0
        assert ip.strength["pleural_effusion"] == 1.0 > iu.strength["pleural_effusion"] > 0


@pytest.mark.parametrize("view", ["PA", "lateral"])
@pytest.mark.parametrize("slug", ["edema", "consolidation", "atelectasis", "pleural_effusion"])
def test_sign_shows_only_where_drawn_and_uncertain_is_weaker(slug: str, view: str) -> None:
    for seed in SEEDS:
        base, _ = render({}, seed, view)
        pos, ip = render({slug: 1.0}, seed, view)
        unc, iu = render({slug: -1.0}, seed, view)
        d_pos = pos.astype(float) - base
        d_unc = unc.astype(float) - base
        drawn = ip.masks[slug]
        assert drawn.any() and iu.masks[slug].any()
        assert d_pos[drawn].mean() > 8  # brighter where the sign is
        if slug != "atelectasis":  # volume loss moves the diaphragm: atelectasis changes more
            assert np.abs(d_pos[~drawn]).mean() < 1.0
        assert np.abs(d_pos).sum() > 1.5 * np.abs(d_unc).sum() > 0


def test_atelectasis_raises_a_hemidiaphragm() -> None:
    for seed in SEEDS:
        base = render({}, seed)[1].params
        pos = render({"atelectasis": 1.0}, seed)[1].params
        raised = max(base["cp_right"] - pos["cp_right"], base["cp_left"] - pos["cp_left"])
        assert raised > 0.1  # in units of half the thorax width
        lowered = min(base["cp_right"] - pos["cp_right"], base["cp_left"] - pos["cp_left"])
        assert lowered == 0.0


def test_edema_haze_is_bilateral_and_perihilar() -> None:
    base, info = render({}, 2, size=(156, 128))
    pos, _ = render({"edema": 1.0}, 2, size=(156, 128))
    diff = pos.astype(float) - base
    lungs = info.masks["lungs"]
    cols = np.flatnonzero(lungs.any(axis=0))
    mid = (cols[0] + cols[-1]) // 2
    left, right = lungs.copy(), lungs.copy()
    left[:, mid:] = False
    right[:, :mid] = False
    assert diff[left].mean() > 5 and diff[right].mean() > 5


def test_signs_co_occur() -> None:
    labels = {s: 1.0 for s in SLUGS}
    img, info = render(labels, 4, size=(156, 128))
    assert all(info.drawn.values())
    assert info.ctr > 0.54
    assert all(info.masks[s].any() for s in SLUGS)


def test_support_devices_are_drawn_when_labelled() -> None:
    a, _ = render({}, 5)
    b, _ = render({"support_devices": 1.0}, 5)
    assert (b.astype(int) - a).max() > 60  # bright line / electrodes


@pytest.mark.parametrize(
    "labels, match",
    [
        ({"pneumonia": 1.0}, "unknown label keys"),
        ({"edema": 2.0}, "edema"),
        ({"edema": "yes"}, "edema"),
        ({"edema": 0.5}, "expected 1.0, 0.0, -1.0 or NaN"),
    ],
)
def test_bad_labels_are_rejected(labels: dict, match: str) -> None:
    with pytest.raises(PhantomError, match=match):
        render(labels, 0)


@pytest.mark.parametrize("size", [8, (10, 64), (64,), (0, 64), 1.5, (64.5, 64), "64", (64, 64, 3), True])
def test_bad_sizes_are_rejected(size) -> None:
    with pytest.raises(PhantomError, match="size"):
        render({}, 0, size=size)


def test_bad_view_is_rejected_and_views_are_case_insensitive() -> None:
    with pytest.raises(PhantomError, match="view 'oblique'"):
        render({}, 0, "oblique")
    assert np.array_equal(render({}, 0, "pa")[0], render({}, 0, "frontal")[0])
    assert render({}, 0, "LL")[1].view == "lateral"
