"""Preprocessing (the paper's, histeq, mean/std, pad) and the augmentation callables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chextrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Decoding,
    PhotoSim,
    Preprocessing,
    StandardAugment,
    as_preprocessing,
    augment,
    histeq,
    input_uint8,
    preprocess,
    resize,
    to_grey,
    to_network_input,
)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 50)[None, :] * np.ones((60, 1))
    return np.clip(ramp + rng.normal(0, 10, (60, 50)), 0, 255).astype(np.uint8)  # H 60 x W 50


def test_imagenet_preprocess_matches_torchvision_recipe(image: np.ndarray) -> None:
    x = preprocess(image, 32)
    small = np.asarray(Image.fromarray(image).resize((32, 32), Image.Resampling.BILINEAR), np.float32) / 255
    ref = (torch.from_numpy(small)[None] - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(
        IMAGENET_STD
    )[:, None, None]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.allclose(x, ref, atol=1e-6)


def test_rgb_input_becomes_grey_first(image: np.ndarray) -> None:
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    assert torch.equal(preprocess(rgb, 16), preprocess(image, 16))
    with pytest.raises(ValueError, match="H x W"):
        to_grey(np.zeros((4, 4, 2), np.uint8))


def test_histeq_is_covidprognosis_histogram_normalize(image: np.ndarray) -> None:
    # CovidPrognosis: histogram of the [0, 1] image, CDF scaled to 255, np.interp per pixel.
    x = image.astype(np.float64) / 255
    hist, bins = np.histogram(x.flatten(), 256, density=True)
    cdf = 255 * hist.cumsum() / hist.cumsum()[-1]
    ref = np.interp(x.flatten(), bins[:-1], cdf).reshape(x.shape)
    assert np.allclose(histeq(image), ref, atol=1e-3)
    t = preprocess(image, 24, "histeq")
    assert torch.equal(t[0], t[2]) and float(t.max()) == pytest.approx(255.0) and float(t.min()) >= 0


def test_meanstd_and_spec_validation(image: np.ndarray) -> None:
    t = preprocess(image, 16, {"name": "meanstd", "mean": 0.5, "std": 0.25})
    small = resize(image, 16).astype(np.float32) / 255
    assert torch.allclose(t[1], (torch.from_numpy(small) - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="needs both mean and std"):
        Preprocessing(name="meanstd", mean=0.5)
    with pytest.raises(ValueError, match="meanstd"):
        Preprocessing(name="imagenet", mean=0.1, std=0.2)
    with pytest.raises(ValueError, match="std must be > 0"):
        Preprocessing(name="meanstd", mean=0.5, std=0)
    with pytest.raises(ValueError, match="unknown preprocessing name 'zscore'"):
        as_preprocessing("zscore")
    # The bundle's dict form (weights.py writes name/mean/std) reads back.
    assert (
        as_preprocessing({"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
        == Preprocessing()
    )


def test_pad_resize_keeps_aspect_ratio() -> None:
    wide = np.full((10, 40), 200, np.uint8)
    out = resize(wide, 40, "pad")
    assert out.shape == (40, 40)
    assert (out[:15] == 0).all() and (out[25:] == 0).all() and (out[16:24] == 200).all()
    with pytest.raises(ValueError, match="resize mode"):
        resize(wide, 8, "zoom")


def test_standard_augment_is_deterministic_small_and_uint8(image: np.ndarray) -> None:
    aug = StandardAugment()
    a = aug(image, np.random.default_rng(5))
    b = aug(image, np.random.default_rng(5))
    c = aug(image, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == image.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Small: the centre of the ramp keeps roughly its grey level.
    assert abs(float(a[25:35, 20:30].mean()) - float(image[25:35, 20:30].mean())) < 45


def test_standard_augment_identity_settings_change_nothing(image: np.ndarray) -> None:
    still = StandardAugment(rotation=0, scale=(1, 1), translate=0, brightness=0, contrast=0)
    assert np.array_equal(still(image, np.random.default_rng(0)), image)


def test_standard_augment_rotation_moves_pixels_the_right_way() -> None:
    img = np.zeros((41, 41), np.uint8)
    img[20, 30] = 255  # a dot right of centre
    turn = StandardAugment(rotation=90, scale=(1, 1), translate=0, brightness=0, contrast=0)
    rng = np.random.default_rng(0)
    out = turn(img, rng)
    angle = np.random.default_rng(0).uniform(-90, 90)
    y, x = np.unravel_index(np.argmax(out), out.shape)
    # The dot turns about the centre by `angle` in (x, y-down) pixel coordinates.
    expect = np.array([20 + 10 * np.sin(np.radians(angle)), 20 + 10 * np.cos(np.radians(angle))])
    assert abs(angle) > 10 and np.abs(np.array([y, x]) - expect).max() <= 1.5


def test_photo_sim_probability_and_grey_output(image: np.ndarray) -> None:
    never, always = PhotoSim(p=0.0, recipe="photographic"), PhotoSim(p=1.0, recipe="photographic")
    assert never(image, np.random.default_rng(0)) is image
    out = always(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert np.array_equal(out, always(image, np.random.default_rng(0)))
    hits = sum(
        not np.array_equal(PhotoSim(p=0.5, recipe="digital")(image, np.random.default_rng(s)), image)
        for s in range(40)
    )
    assert 10 <= hits <= 30


def test_augment_applies_in_order(image: np.ndarray) -> None:
    steps = [PhotoSim(p=1.0, recipe="digital"), StandardAugment()]
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    manual = steps[1](steps[0](image, rng_b), rng_b)
    assert np.array_equal(augment(image, steps, rng_a), manual)


# --- the two steps: uint8 on the worker, the network input on the device ----------------------


def _table_input(small: np.ndarray, spec: Preprocessing) -> torch.Tensor:
    """The former CPU preprocessing: a float32 table (v / 255 - mean) / std looked up per channel."""
    values = np.arange(256, dtype=np.float32) / 255.0
    mean, std = spec.stats()
    lut = (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    return torch.from_numpy(np.stack([lut[c][small] for c in range(3)]).astype(np.float32))


@pytest.mark.parametrize("spec", ["imagenet", {"name": "meanstd", "mean": [0.1, 0.5, 0.9], "std": 0.3}])
def test_device_step_is_the_former_preprocessing_bit_for_bit(spec) -> None:
    spec = as_preprocessing(spec)
    every = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every grey level once
    batch = torch.from_numpy(np.stack([every, every[::-1]]))  # B x S x S
    x = to_network_input(batch, spec)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x[0], _table_input(every, spec)) and torch.equal(x[1], _table_input(every[::-1], spec))
    assert torch.equal(to_network_input(batch[:, None], spec), x)  # B x 1 x S x S as well
    assert torch.equal(preprocess(every, 16, spec), x[0])


def test_device_step_refuses_floats_and_odd_shapes() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_network_input(torch.zeros(1, 8, 8), "imagenet")
    with pytest.raises(ValueError, match="B x S x S or B x 1 x S x S"):
        to_network_input(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "imagenet")


def test_histeq_hands_over_rounded_equalised_uint8(image: np.ndarray) -> None:
    small = resize(image, 24)
    out = input_uint8(small, "histeq")
    assert out.dtype == np.uint8 and np.abs(out.astype(float) - histeq(small)).max() <= 0.5
    assert input_uint8(small, "imagenet") is small
    x = to_network_input(torch.from_numpy(out)[None], "histeq")[0]
    assert torch.equal(x[0], torch.from_numpy(out.astype(np.float32))) and torch.equal(x[0], x[2])


def test_decoding_fits_decoded_images_and_names_its_settings(image: np.ndarray, tmp_path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    assert np.array_equal(Decoding(20).load(str(path)), resize(image, 20))
    assert np.array_equal(Decoding(20, "pad").load(str(path)), resize(image, 20, "pad"))
    assert np.array_equal(Decoding(20).fit(np.repeat(image[..., None], 3, 2)), resize(image, 20))
    assert (
        Decoding(320).tag == "320px-stretch-draft-v1" and Decoding(64, "pad", False).tag == "64px-pad-full-v1"
    )
    with pytest.raises(ValueError, match="positive int"):
        Decoding(0)
    with pytest.raises(ValueError, match="resize mode"):
        Decoding(32, "zoom")


def test_photo_sim_phone_is_the_grey_recipe(image: np.ndarray) -> None:
    from chextrain.data.phone_grey import phone_grey

    rng = np.random.default_rng(4)
    rng.random()  # PhotoSim's draw of p
    out = PhotoSim(p=1.0, recipe="phone")(image, np.random.default_rng(4))
    assert out.ndim == 2 and np.array_equal(out, phone_grey(image, rng, 1))
