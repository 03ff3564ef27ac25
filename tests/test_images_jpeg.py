"""The direct route plain JPEGs take (data/jpeg.py): Pillow's very pixels, or the file is declined
and read the general way, with the same result, warning or error."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from chextrain.data import images
from chextrain.data.images import ImageLoadError, load_image, load_resized
from chextrain.data.jpeg import decode_plain, draft_scale, plain_frame

DRAFTS = (None, 6, 12, 24, 48, 96)  # for the small damaged files: every scale, and none


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth shading plus noise: what an x-ray or a photo of one looks like to a JPEG coder."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    image = 120 + 80 * np.sin(x / (w / 5)) * np.cos(y / (h / 4)) + rng.normal(0, 8, (h, w))
    return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(path: Path, image: np.ndarray, **options) -> Path:
    Image.fromarray(image).save(path, "JPEG", **options)
    return path


def _colour(grey: np.ndarray) -> np.ndarray:
    return np.stack([grey, np.roll(grey, 5, 1), 255 - grey], -1)


def _with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """The JPEG `data` with one more marker segment right after its start-of-image marker."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _segment_at(data: bytes, marker: int) -> int:
    """Where the first segment with `marker` starts (its 0xFF byte)."""
    return data.index(bytes([0xFF, marker]))


def _reads(
    path: Path, drafts: tuple[int | None, ...] = DRAFTS, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> list[object]:
    """What each reader gives for `path`: pixels, or the error's type and text; and the warnings."""
    calls: list[Callable[[], np.ndarray]] = [
        *(lambda d=d: load_image(path, draft=d, max_pixels=max_pixels) for d in drafts),
        lambda: load_resized(path, 64, max_pixels=max_pixels),
        lambda: load_resized(path, 50, "pad", max_pixels=max_pixels),
    ]
    out: list[object] = []
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out.append(call())
            except ImageLoadError as e:
                out.append((type(e).__name__, str(e)))
        out.append([(w.category.__name__, str(w.message)) for w in caught])
    return out


def _same(a: list[object], b: list[object]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )


@pytest.fixture
def general(monkeypatch):
    """Runs a reader with the direct route switched off: every JPEG goes through Image.open."""

    def run(read: Callable[[], list[object]]) -> list[object]:
        with monkeypatch.context() as m:
            m.setattr(images, "decode_plain", lambda *args: None)
            return read()

    return run


@pytest.fixture
def taken(monkeypatch):
    """How many files the direct route decoded (not declined)."""
    count = [0]

    def spy(*args):
        image = decode_plain(*args)
        count[0] += image is not None
        return image

    monkeypatch.setattr(images, "decode_plain", spy)
    return count


PLAIN = {
    "grey baseline": lambda: (_picture(300, 260), {"quality": 95}),
    "grey progressive, odd size": lambda: (_picture(517, 333, 1), {"quality": 90, "progressive": True}),
    "grey optimised tables, low quality": lambda: (_picture(641, 480, 2), {"quality": 40, "optimize": True}),
    "colour 4:2:0, odd size": lambda: (_colour(_picture(481, 641, 3)), {"quality": 90, "subsampling": 2}),
    "colour 4:4:4 progressive": lambda: (
        _colour(_picture(400, 700, 4)),
        {"subsampling": 0, "progressive": True},
    ),
    "grey with restart markers": lambda: (_picture(330, 350, 5), {"quality": 90, "restart_marker_blocks": 3}),
}


@pytest.mark.parametrize("kind", list(PLAIN))
def test_a_plain_jpeg_takes_the_direct_route_with_pillows_pixels(tmp_path, kind, general, taken):
    image, options = PLAIN[kind]()
    path = _jpeg(tmp_path / "plain.jpg", image, **options)
    h, w = image.shape[:2]
    side = min(h, w)
    drafts = (None, side // 8, side // 4, side // 2, side, 2 * side)
    assert {draft_scale(w, h, d) for d in drafts} == {1, 2, 4, 8}  # every scale libjpeg offers Pillow
    expected = general(lambda: _reads(path, drafts))
    assert taken[0] == 0
    got = _reads(path, drafts)
    assert taken[0] == len(drafts) + 2  # every read took the direct route
    assert _same(got, expected)


def test_the_route_finds_the_frame_and_declines_what_it_cannot_take(tmp_path, monkeypatch):
    grey = _jpeg(tmp_path / "g.jpg", _picture(60, 80), quality=90).read_bytes()
    assert plain_frame(grey) == (80, 60, 1)
    colour = _jpeg(tmp_path / "c.jpg", _colour(_picture(60, 80)), quality=90).read_bytes()
    assert plain_frame(colour) == (80, 60, 3)
    assert plain_frame(grey[:2] + b"\xff" + grey[2:]) == (80, 60, 1)  # a fill byte before a marker
    sof = _segment_at(grey, 0xC0)
    exif = Image.Exif()
    exif[0x0112] = 6
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><tiff:Orientation>6</tiff:Orientation></x:xmpmeta>"
    declined = {
        "EXIF": _jpeg(tmp_path / "e.jpg", _picture(60, 80), exif=exif).read_bytes(),
        "XMP": _with_segment(grey, 0xE1, xmp),
        "lossless frame": grey[: sof + 1] + b"\xc3" + grey[sof + 2 :],
        "arithmetic frame": grey[: sof + 1] + b"\xc9" + grey[sof + 2 :],
        "12-bit precision": grey[: sof + 4] + b"\x0c" + grey[sof + 5 :],
        "two frames": grey[:sof] + grey[sof : sof + 13] + grey[sof:],
        "a segment past the end": grey[: sof + 2] + b"\xff\xf0" + grey[sof + 4 : sof + 40],
        "no start-of-image marker": grey[2:],
        "no scan": grey[:sof],
        "not a JPEG": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "empty": b"",
    }
    for why, data in declined.items():
        assert plain_frame(data) is None, why
        assert decode_plain(data, 32, 10**6) is None, why
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 60), (10, 20, 30, 40)).save(cmyk, "JPEG")
    broken = bytearray(grey)
    broken[_segment_at(grey, 0xDA) + 5] = 0x7F  # the scan names a component the frame does not have
    adobe = cmyk.getvalue()
    assert adobe[2:4] == b"\xff\xee" and plain_frame(adobe) is None  # Pillow reads the Adobe block
    four = adobe[:2] + adobe[4 + (adobe[4] << 8 | adobe[5]) :]  # without it: four components
    assert plain_frame(four) == (80, 60, 4) and decode_plain(four, None, 10**6) is None
    assert decode_plain(grey[: len(grey) * 2 // 3], None, 10**6) is None  # truncated: Pillow recovers it
    assert decode_plain(bytes(broken), None, 10**6) is None  # libjpeg refuses it: Pillow names the error
    (tmp_path / "broken.jpg").write_bytes(broken)
    with pytest.raises(ImageLoadError, match="broken.jpg: corrupt image data"):
        load_image(tmp_path / "broken.jpg")
    assert decode_plain(grey, None, 80 * 60 - 1) is None  # over the caller's pixel limit
    assert decode_plain(grey, None, 80 * 60) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 60 - 1)  # Pillow would warn: let it
    assert decode_plain(grey, None, 10**6) is None


def test_the_frame_found_is_the_one_libjpeg_reads(tmp_path, general, taken):
    """Markers without a length (RST, TEM) are stepped over as libjpeg does, so a frame hidden
    where a walk by lengths would land (inside a comment) is never taken for the real one; stray
    bytes, which libjpeg skips with a warning, make the route decline instead of guessing."""
    grey = _jpeg(tmp_path / "g.jpg", _picture(60, 80), quality=90).read_bytes()
    sof = _segment_at(grey, 0xC0)
    decoy = grey[sof : sof + 5] + (4000).to_bytes(2, "big") + grey[sof + 7 : sof + 19] + b"\xff\xda\x00\x02"
    comment = b"\xff\xfe" + (len(decoy) + 2).to_bytes(2, "big") + decoy
    cases = {
        "an RST marker before the frame": (grey[:2] + b"\xff\xd0" + grey[2:], (80, 60, 1)),
        "fill bytes": (grey[:2] + b"\xff\xff\xff" + grey[2:], (80, 60, 1)),
        "a TEM marker (Pillow refuses it)": (grey[:2] + b"\xff\x01" + grey[2:], None),
        "a short JFIF block (Pillow refuses it)": (grey[:2] + b"\xff\xe0\x00\x07JFIF\x00" + grey[2:], None),
        "a short quantization table (Pillow refuses it)": (
            grey[:2] + b"\xff\xdb\x00\x05\x00\x01\x01" + grey[2:],
            None,
        ),
        "an ICC block (Pillow reads it)": (
            grey[:2] + b"\xff\xe2\x00\x10ICC_PROFILE\x00\x01" + grey[2:],
            None,
        ),
        "a wide frame inside a comment": (grey[:2] + b"\xff\xd3" + comment + grey[2:], (80, 60, 1)),
        "stray bytes after an RST marker": (grey[:2] + b"\xff\xd0\x00\x0b" + grey[2:], None),
        "a stuffed zero before the frame": (grey[:2] + b"\xff\x00" + grey[2:], None),
        "a second start-of-image marker": (grey[:2] + grey, None),
        "an end-of-image marker before the scan": (grey[:2] + b"\xff\xd9" + grey[2:], None),
        "an unknown marker": (grey[:2] + b"\xff\xf3\x00\x02" + grey[2:], None),
    }
    path = tmp_path / "case.jpg"
    for why, (data, frame) in cases.items():
        assert plain_frame(data) == frame, why
        path.write_bytes(data)
        before = taken[0]
        assert _same(_reads(path), general(lambda: _reads(path))), why  # as Pillow reads it
        assert (taken[0] > before) == (frame is not None), why


def test_damaged_jpegs_read_the_same_with_and_without_the_route(tmp_path, general, taken):
    """Hostile and damaged JPEGs (bytes changed, in the headers too, cut, markers dropped in,
    stretches repeated): every reader gives the same pixels, the same error text and the same
    warnings whether the direct route is there or not (it declines, or decodes what Pillow does)."""
    rng = np.random.default_rng(7)
    seeds = [
        _jpeg(tmp_path / "g.jpg", _picture(48, 64), quality=85).read_bytes(),
        _jpeg(tmp_path / "c.jpg", _colour(_picture(40, 56, 1)), quality=80, progressive=True).read_bytes(),
    ]
    path = tmp_path / "mutant.jpg"
    took_the_route = 0
    for i in range(250):
        data = bytearray(seeds[i % 2])
        kind = i % 5
        if kind in (0, 4):  # bytes changed anywhere, or in the headers before the scan
            stop = len(data) if kind == 0 else _segment_at(bytes(data), 0xDA) + 14
            for at in rng.integers(0, stop, rng.integers(1, 4)):
                data[at] = int(rng.integers(0, 256))
        elif kind == 1:  # cut short
            data = data[: int(rng.integers(2, len(data)))]
        elif kind == 2:  # a marker dropped in
            at = int(rng.integers(2, len(data) - 1))
            data[at : at + 2] = bytes(
                [0xFF, int(rng.choice([0xC0, 0xC4, 0xD0, 0xD8, 0xD9, 0xDA, 0xDB, 0xE1]))]
            )
        else:  # a stretch repeated
            at, n = int(rng.integers(2, len(data) - 20)), int(rng.integers(1, 20))
            data[at:at] = data[at : at + n]
        path.write_bytes(bytes(data))
        before = taken[0]
        expected = general(lambda: _reads(path, max_pixels=20_000))
        got = _reads(path, max_pixels=20_000)
        assert _same(got, expected), f"mutant {i} (kind {kind}) reads differently"
        took_the_route += taken[0] > before
    assert took_the_route > 20  # the route decoded many of them: the comparison has teeth


def test_a_plain_jpeg_never_reaches_pillows_python_loader(tmp_path, monkeypatch):
    """The point of the route: no Image.open, no ImageFile.load for a plain JPEG in memory. If a
    Pillow release moves the decoder the route uses, this fails (the route would decline all)."""
    path = _jpeg(tmp_path / "plain.jpg", _picture(200, 160), quality=95)
    calls: list[str] = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append("load") or load(self))
    load_resized(path, 64)
    load_image(path)
    assert calls == []
    exif = Image.Exif()
    exif[0x0112] = 1
    load_image(_jpeg(tmp_path / "exif.jpg", _picture(200, 160), exif=exif))
    assert calls  # declined: the general way
