"""Tests for chextrain.data.photo: every effect's shape, determinism, effect and strength."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from chextrain.data import photo
from chextrain.data.photo import RECIPES, simulate_photo
from chextrain.data.pixels import perspective_matrix, to_rgb

SEEDS = range(8)


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    """A textured grey test image (ramp + stripes + noise), so every effect has work to do."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(123).normal(0, 8, (h, w))
    return np.clip(60 + 120 * x / w + 40 * np.sin(y / 3.0) + noise, 0, 255).astype(np.uint8)


def _strength(out: np.ndarray, image: np.ndarray) -> float:
    """Mean absolute difference from the input, in grey levels (RGB outputs vs grey copies)."""
    ref = to_rgb(image) if out.ndim == 3 else image
    return float(np.abs(out.astype(np.float64) - ref).mean())


def _mean_strength(effect, image: np.ndarray, level: int) -> float:
    return float(np.mean([_strength(effect(image, np.random.default_rng(s), level), image) for s in SEEDS]))


# (effect, True if it always returns RGB)
EFFECTS = [
    (photo.random_digital, False),
    (photo.glare_matte, False),
    (photo.moire, False),
    (photo.tilt, False),
    (photo.screen_border, False),
    (photo.room_scene, True),
    (photo.projective_warp, False),
    (photo.colour_cast, True),
    (photo.brightness_contrast, False),
    (photo.uneven_lighting, False),
    (photo.vignette, False),
    (photo.sensor_noise, False),
    (photo.jpeg_recompress, False),
    (photo.phone, True),
]
BLURS = [photo.defocus_blur, photo.motion_blur]  # scale with size: tested on a larger image
IDS = [e.__name__ for e, _ in EFFECTS]


@pytest.mark.parametrize("effect, rgb_out", EFFECTS, ids=IDS)
def test_effect_shape_dtype_and_channels(effect, rgb_out):
    grey = _image()
    out = effect(grey, np.random.default_rng(0), 2)
    assert out.dtype == np.uint8 and out.flags.writeable
    assert out.shape == ((48, 64, 3) if rgb_out else (48, 64))
    colour = effect(to_rgb(grey), np.random.default_rng(0), 2)
    assert colour.shape == (48, 64, 3) and colour.dtype == np.uint8


@pytest.mark.parametrize("effect", [e for e, _ in EFFECTS] + BLURS, ids=IDS + [b.__name__ for b in BLURS])
def test_effect_deterministic_for_a_seed_and_leaves_input_alone(effect):
    image = _image(250, 250) if effect in BLURS else _image(96, 96)  # blurs are sub-pixel when tiny
    before = image.copy()
    a = effect(image, np.random.default_rng(7), 4)
    b = effect(image, np.random.default_rng(7), 4)
    assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(image, before)
    others = [effect(image, np.random.default_rng(s), 4).tobytes() for s in (8, 9, 10)]
    assert any(o != a.tobytes() for o in others)  # the seed matters


@pytest.mark.parametrize("effect", [e for e, _ in EFFECTS], ids=IDS)
def test_effect_changes_the_image_more_at_higher_levels(effect):
    image = _image()
    strengths = [_mean_strength(effect, image, level) for level in photo.LEVELS]
    assert strengths[0] > 0.1, strengths
    if effect is photo.phone:  # composite: the frame is mostly replaced from level 2 on
        assert strengths[0] < strengths[1] and strengths[0] < strengths[3], strengths
    else:
        assert all(a < b for a, b in zip(strengths, strengths[1:], strict=False)), strengths


@pytest.mark.parametrize("effect", BLURS, ids=[b.__name__ for b in BLURS])
def test_blur_strength_grows_with_level_and_scales_with_size(effect):
    image = _image(250, 250)
    strengths = [_mean_strength(effect, image, level) for level in photo.LEVELS]
    assert strengths[0] > 0.05, strengths
    assert all(a < b for a, b in zip(strengths, strengths[1:], strict=False)), strengths
    tiny = _image(24, 24)  # 1 % of the reference size: the blur is sub-pixel, almost nothing
    assert _mean_strength(effect, tiny, 4) < strengths[3]


# --- CheXphoto's recipes, checked against their published parameters ---------------------


@pytest.mark.parametrize("level, peak", [(1, 100), (2, 190), (3, 210), (4, 230)])
def test_glare_peak_alpha_is_100_level_capped(level, peak):
    out = photo.glare_matte(np.zeros((64, 64), np.uint8), np.random.default_rng(0), level)
    assert out.max() == peak  # white at alpha min(100 L, 150 + 20 L) / 255 over black


def test_glare_sigma_scales_with_image_size():
    small = photo.glare_matte(np.zeros((100, 100), np.uint8), np.random.default_rng(0), 1)
    big = photo.glare_matte(np.zeros((400, 400), np.uint8), np.random.default_rng(0), 1)
    # same relative footprint: the lit fraction of the frame is about the same
    assert abs((small > 10).mean() - (big > 10).mean()) < 0.01


@pytest.mark.parametrize("level", photo.LEVELS)
def test_moire_darkening_matches_line_alpha_and_density(level):
    gap, opacity = photo.MOIRE[level]
    out = photo.moire(np.full((256, 256), 200, np.uint8), np.random.default_rng(0), level)
    expected = 200 * (1 - opacity / (1 + gap)) ** 2  # two masks, lines cover 1 / (1 + gap)
    assert abs(out.mean() - expected) < 0.01 * 200


def test_tilt_black_border_and_centre_kept():
    out = photo.tilt(np.full((64, 64), 200, np.uint8), np.random.default_rng(3), 4)
    assert out[0, 0] == 0 and out[-1, -1] == 0
    assert abs(int(out[32, 32]) - 200) <= 1


def test_random_digital_factors_follow_the_recipe():
    # On a flat image contrast does nothing and brightness multiplies: 100 -> 100 * factor.
    flat = np.full((8, 8), 100, np.uint8)
    values = {int(photo.random_digital(flat, np.random.default_rng(s), 1)[0, 0]) for s in range(40)}
    up = set(range(109, 112))  # 1 + 0.1 + U(-0.01, 0.01)
    down = {82, 83, 84}  # 1 / (1 + 0.2 + U(-0.01, 0.01)); PIL's blend may truncate
    assert values <= up | down and values & up and values & down
    v4 = {int(photo.random_digital(flat, np.random.default_rng(s), 4)[0, 0]) for s in range(40)}
    assert v4 <= set(range(179, 182)) | {38, 39}  # 1 + 0.8 +- 0.01 ; 1 / (2.6 +- 0.01)


def test_jpeg_quality_explicit_and_validated():
    image = _image()
    q99 = photo.jpeg_recompress(image, np.random.default_rng(0), quality=99)
    q10 = photo.jpeg_recompress(image, np.random.default_rng(0), quality=10)
    assert _strength(q10, image) > _strength(q99, image)
    with pytest.raises(ValueError, match="quality 0"):
        photo.jpeg_recompress(image, np.random.default_rng(0), quality=0)


def test_perspective_matrix_maps_the_points():
    src = [(0, 0), (10, 0), (10, 10), (0, 10)]
    dst = [(1, 2), (9, 1), (11, 12), (0, 9)]
    m = perspective_matrix(src, dst)
    for (x, y), (u, v) in zip(src, dst, strict=True):
        p = m @ np.array([x, y, 1.0])
        assert np.allclose(p[:2] / p[2], (u, v))


# --- simulate_photo -----------------------------------------------------------------------


RECIPE_SHAPES = [("digital", (40, 56)), ("photographic", (40, 56, 3)), ("phone", (40, 56, 3))]


@pytest.mark.parametrize("recipe, shape", RECIPE_SHAPES)
@pytest.mark.parametrize("level", photo.LEVELS)
def test_recipes_keep_size_and_are_deterministic(recipe, shape, level):
    image = _image(40, 56)
    a = simulate_photo(image, recipe, level, np.random.default_rng(5))
    b = simulate_photo(image, recipe, level, np.random.default_rng(5))
    assert a.shape == shape and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert _strength(a, image) > 0.1


def test_digital_stays_grey_photographic_grey_in_rgb_phone_coloured():
    image = _image()
    assert simulate_photo(image, "digital", 2, np.random.default_rng(0)).ndim == 2
    ph = simulate_photo(image, "photographic", 2, np.random.default_rng(0))
    assert (ph[..., 0] == ph[..., 1]).all() and (ph[..., 1] == ph[..., 2]).all()
    phone = simulate_photo(image, "phone", 2, np.random.default_rng(0))
    assert np.abs(phone[..., 0].astype(int) - phone[..., 2]).mean() > 1


def test_photographic_is_glare_then_moire_then_tilt():
    image = _image()
    rng = np.random.default_rng(11)
    manual = photo.tilt(photo.moire(photo.glare_matte(image, rng, 3), rng, 3), rng, 3)
    out = simulate_photo(image, "photographic", 3, np.random.default_rng(11))
    np.testing.assert_array_equal(out, to_rgb(manual))


def test_phone_recipe_is_phone_modules_function():
    from chextrain.data import phone

    assert photo.phone is phone.phone  # one definition, re-exported
    image = _image()
    manual = phone.phone(image, np.random.default_rng(12), 2)
    np.testing.assert_array_equal(simulate_photo(image, "phone", 2, np.random.default_rng(12)), manual)


def test_rgb_input_and_default_rng():
    out = simulate_photo(to_rgb(_image()), "digital")
    assert out.shape == (48, 64, 3)


@pytest.mark.parametrize("recipe", ["film", "Digital", ""])
def test_unknown_recipe_names_it_and_the_choices(recipe):
    with pytest.raises(ValueError, match=rf"{recipe!r}.*'digital', 'photographic', 'phone'"):
        simulate_photo(_image(), recipe, 1, np.random.default_rng(0))
    assert RECIPES == ("digital", "photographic", "phone")


@pytest.mark.parametrize("level", [0, 5, -1, 2.0, "2", True, None])
def test_bad_level_names_it(level):
    with pytest.raises(ValueError, match=r"level .*\[1, 2, 3, 4\]"):
        simulate_photo(_image(), "digital", level, np.random.default_rng(0))
    with pytest.raises(ValueError, match="level"):
        photo.moire(_image(), np.random.default_rng(0), level)


def test_numpy_integer_level_accepted():
    out = simulate_photo(_image(), "digital", np.int64(2), np.random.default_rng(0))
    assert out.shape == (48, 64)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((8, 8), np.float32), "uint8"),
        ([[0, 1], [2, 3]], "uint8"),
        (np.zeros((8, 8, 4), np.uint8), "shape"),
        (np.zeros((8,), np.uint8), "shape"),
        (np.zeros((1, 8), np.uint8), "shape"),
    ],
)
def test_bad_image_rejected(image, match):
    with pytest.raises(ValueError, match=match):
        simulate_photo(image, "phone", 1, np.random.default_rng(0))


@pytest.mark.parametrize("shape", [(2, 2), (2, 300), (300, 2), (5, 7, 3)])
def test_tiny_and_elongated_images(shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0 / 0 or overflow on degenerate sizes
        for recipe in RECIPES:
            for seed in range(3):
                out = simulate_photo(image, recipe, 4, np.random.default_rng(seed))
                assert out.shape[:2] == shape[:2]


# --- the phone recipe on the luma (training augmentation at the training size) -----------------


def _luma(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).convert("L"))


def test_phone_grey_is_grey_deterministic_and_shows_the_rgb_recipes_scene():
    from chextrain.data.phone import phone
    from chextrain.data.phone_grey import phone_grey

    image = _image(96, 80)
    out = phone_grey(image, np.random.default_rng(3))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out, phone_grey(image, np.random.default_rng(3)))
    assert np.array_equal(phone_grey(to_rgb(image), np.random.default_rng(3)), out)  # RGB in: grey first

    # The same draws up to the sensor noise: the same monitor, room and warp as the RGB recipe's
    # luma (its later draws differ, so compare by correlation, blind to exposure changes).
    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])

    for level in (1, 2):
        same = [
            corr(
                phone_grey(image, np.random.default_rng(s), level),
                _luma(phone(image, np.random.default_rng(s), level)),
            )
            for s in SEEDS
        ]
        other = [
            corr(
                phone_grey(image, np.random.default_rng(s), level),
                _luma(phone(image, np.random.default_rng(s + 50), level)),
            )
            for s in SEEDS
        ]
        assert np.mean(same) > 0.9 and np.mean(same) > np.mean(other) + 0.2


def test_simulate_photo_grey_runs_every_recipe_in_grey():
    from chextrain.data.phone_grey import phone_grey, simulate_photo_grey

    image = _image()
    for recipe in RECIPES:
        out = simulate_photo_grey(image, recipe, 1, np.random.default_rng(0))
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert np.array_equal(
        simulate_photo_grey(image, "phone", 2, np.random.default_rng(1)),
        phone_grey(image, np.random.default_rng(1), 2),
    )
    with pytest.raises(ValueError, match="unknown photo recipe"):
        simulate_photo_grey(image, "fax", 1, np.random.default_rng(0))


# --- the radiograph's corners in the photo ------------------------------------------------


def _polygon_mask(corners: np.ndarray, shape: tuple[int, int], grow: float = 0.0) -> np.ndarray:
    """Boolean H x W mask of the quadrilateral, moved `grow` px outwards from its centre."""
    from PIL import ImageDraw

    c = np.asarray(corners, dtype=float)
    centre = c.mean(axis=0)
    away = c - centre
    c = centre + away * (1 + grow / np.linalg.norm(away, axis=1, keepdims=True))
    mask = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in c], fill=1)
    return np.asarray(mask, dtype=bool)


@pytest.mark.parametrize("grey", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phone_corners_outline_the_xray_inside_its_canvas(grey: bool, seed: int) -> None:
    """A bright x-ray padded onto a black canvas: the corners outline the x-ray, not the canvas."""
    from chextrain.data.phone_grey import simulate_photo_grey_with_corners
    from chextrain.data.photo import simulate_photo_with_corners

    canvas = np.zeros((128, 96), dtype=np.uint8)
    canvas[24:104] = 220  # the x-ray: rows 24-104 of the canvas
    region = (0, 24, 96, 104)
    rng = np.random.default_rng(seed)
    if grey:
        photo, corners = simulate_photo_grey_with_corners(canvas, "phone", 1, rng, region=region)
    else:
        photo, corners = simulate_photo_with_corners(canvas, "phone", 1, rng, region=region)
        photo = np.asarray(Image.fromarray(photo).convert("L"))
    assert corners.shape == (4, 2) and corners.dtype == np.float32
    inside = _polygon_mask(corners, photo.shape, grow=-4)
    ring = _polygon_mask(corners, photo.shape, grow=6) & ~_polygon_mask(corners, photo.shape, grow=2)
    above_below = ring & (np.abs(np.arange(128)[:, None] - corners[:, 1].mean()) > 25)  # the black canvas
    assert photo[inside].mean() > 150
    assert photo[above_below].mean() < 80


def test_corners_do_not_change_the_photo_or_the_draws() -> None:
    from chextrain.data.phone_grey import phone_grey, phone_grey_with_corners
    from chextrain.data.photo import simulate_photo_with_corners

    image = (np.arange(60 * 48) % 251).astype(np.uint8).reshape(60, 48)
    for recipe in RECIPES:
        a, b = np.random.default_rng(5), np.random.default_rng(5)
        photo, _ = simulate_photo_with_corners(image, recipe, 2, a)
        assert np.array_equal(photo, simulate_photo(image, recipe, 2, b))
        assert a.random() == b.random()  # the generators moved alike
    assert np.array_equal(
        phone_grey_with_corners(image, np.random.default_rng(1), 2)[0],
        phone_grey(image, np.random.default_rng(1), 2),
    )


def test_tilt_and_digital_corners() -> None:
    from chextrain.data.photo import simulate_photo_with_corners

    image = np.full((50, 40), 200, dtype=np.uint8)
    _, digital = simulate_photo_with_corners(
        image, "digital", 1, np.random.default_rng(0), region=(2, 3, 30, 40)
    )
    assert np.array_equal(digital, np.array([[2, 3], [30, 3], [30, 40], [2, 40]], np.float32))
    photo, tilted = simulate_photo_with_corners(image, "photographic", 4, np.random.default_rng(0))
    grey = photo[..., 0]
    assert grey[_polygon_mask(tilted, grey.shape, grow=-2)].mean() > 100  # the tilted x-ray (moire lines)
    assert grey[~_polygon_mask(tilted, grey.shape, grow=2)].max() < 30  # the black border
    assert not np.allclose(tilted, [[0, 0], [40, 0], [40, 50], [0, 50]], atol=0.5)
    with pytest.raises(ValueError, match="region"):
        simulate_photo_with_corners(image, "digital", 1, np.random.default_rng(0), region=(0, 0, 41, 10))


def test_phone_grey_noise_is_cut_from_the_bank_with_its_sigma_and_falls_back_when_larger() -> None:
    from chextrain.data.phone_grey import NOISE_BANK, _noise_window, phone_grey

    draws = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        sigma = float(np.random.default_rng(seed).uniform(0.25, 1.0) * 0.025 * 255.0)  # the recipe's draw
        window, drawn = _noise_window((320, 320), rng, 1)
        assert drawn == sigma and window.dtype == np.float32 and window.shape == (320, 320)
        noise = window * np.float32(sigma)
        assert abs(float(noise.std()) / sigma - 1) < 0.02 and abs(float(noise.mean())) < 0.05 * sigma
        # neighbouring pixels are independent (a window of the bank, not a smoothed field)
        assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.02
        draws.append(noise / sigma)
    assert all(not np.allclose(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])  # other windows
    tall = (np.random.default_rng(0).random((NOISE_BANK + 6, 40)) * 255).astype(np.uint8)
    out = phone_grey(tall, np.random.default_rng(1))  # larger than the bank: its own noise
    assert out.shape == tall.shape and np.array_equal(out, phone_grey(tall, np.random.default_rng(1)))


def test_phone_grey_cast_is_the_rgb_casts_gain_on_a_grey_pixel_with_the_same_draws() -> None:
    """_cast_gain keeps only the warm and tint gains (hue and saturation leave grey alone); checked
    against the RGB recipe's colour_cast on a flat grey image, and the draws it consumes."""
    from chextrain.data.phone import colour_cast
    from chextrain.data.phone_grey import _cast_gain

    grey = np.full((4, 4), 100, np.uint8)  # no channel clips at 255
    for level in (1, 2, 3):
        for seed in range(20):
            a, b = np.random.default_rng(seed), np.random.default_rng(seed)
            luma = float(_luma(colour_cast(grey, a, level)).mean())
            assert abs(luma - 100 * _cast_gain(b, level)) <= 1.0, (level, seed)
            assert a.random() == b.random()  # the same draws consumed


def test_phone_grey_light_from_one_product_is_the_lighting_times_the_vignette() -> None:
    """_light builds its gain by one matrix product while the vignette stays positive: the same
    gain as lighting x max(vignette, 0) from the factors, for each level."""
    from chextrain.data.phone import lighting_factors, vignette_factors
    from chextrain.data.phone_grey import _light

    x = np.random.default_rng(0).uniform(0, 255, (40, 56)).astype(np.float32)
    for level in (1, 2, 3):
        for seed in range(10):
            got = x.copy()
            _light(got, np.random.default_rng(seed), level)
            rng = np.random.default_rng(seed)
            slope, xn, yn, amp, gx, gy = lighting_factors(40, 56, rng, level)
            k, rx, ry = vignette_factors(40, 56, rng, level)
            gain = (1 + slope * (yn[:, None] + xn[None, :])) * np.maximum(
                1 - k * (ry[:, None] + rx[None, :]), 0
            )
            want = np.clip(x * gain + amp * gy[:, None] * gx[None, :], 0, 255)
            assert np.allclose(got, want, atol=1e-3), (level, seed)
