"""The web service: predictions, explanations, health, limits, sniffing, JSON errors, load.

Each test talks to the real server (uvicorn on a free loopback port, conftest.running_server).
"""

from __future__ import annotations

import base64
import io
import re
import socket
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import chextrain
from chextrain.data.images import load_image_bytes
from chextrain.inference import Predictor
from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.rectify import find_quad
from chextrain.serve.app import create_app
from chextrain.serve.outline import quad_json, score_upload
from chextrain.serve.uploads import (
    ApiError,
    TooManyPixelsError,
    UnreadableImageError,
    UnsupportedMediaTypeError,
    upload_error,
)
from tests.conftest import demo_files, running_server

STATIC = Path(chextrain.__file__).parent / "serve" / "static"


@pytest.fixture(scope="module")
def predictor(routed_bundle: Path) -> Predictor:
    return Predictor.from_bundle(routed_bundle)


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[httpx.Client]:
    """httpx against the real server (uvicorn on a free loopback port), small limits."""
    app = create_app(predictor, max_upload_bytes=300_000, max_pixels=1_000_000)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def photo(use_demo: Path) -> bytes:
    return demo_files(use_demo, "natural", "valid")[0].read_bytes()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _pixel_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (CRC fixed)."""
    data = bytearray(_png(np.zeros((8, 8), np.uint8)))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    return body["detail"]


def test_health(client: httpx.Client) -> None:
    body = client.get("/api/health").json()
    assert body["version"] == chextrain.__version__ and body["status"] == "ok"
    assert body["pathologies"] == list(PATHOLOGIES) and body["slugs"] == list(SLUGS)
    assert body["model"]["backbone"] == "tiny" and body["model"]["ood_calibrated"] is True
    assert body["limits"] == {"max_upload_bytes": 300_000, "max_pixels": 1_000_000}


def test_predict_a_phone_photo(client: httpx.Client, photo: bytes, predictor: Predictor) -> None:
    r = client.post("/api/predict", files={"file": ("IMG_0001.jpg", photo, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["head"] == "photo" and body["domain_source"] == "router" and body["p_photo"] > 0.5
    assert list(body["pathologies"]) == list(SLUGS)
    assert all(
        0 <= p["prob"] <= 1 and p["positive"] == (p["prob"] >= p["threshold"])
        for p in body["pathologies"].values()
    )
    assert body["ood"]["status"] in ("in-distribution", "out-of-distribution")
    assert list(body["quality"]["checks"]) == ["blur", "glare", "exposure", "size", "tilt"]
    assert body["quality"]["passed"] and body["quality"]["retake"] is None and not body["withheld"]
    image = load_image_bytes(photo)
    quad = find_quad(image)  # the outline the server finds, given to the quality gate when found
    direct = predictor.predict_images([image], ["upload"], quads=[None if quad.method == "none" else quad])[0]
    assert body.pop("quad") == quad_json(quad, image.shape[1], image.shape[0])
    assert body.pop("rectified") is False
    assert body == direct  # the same answer as the library


def test_a_blurred_photo_gets_retake_advice_and_no_findings(client: httpx.Client, photo: bytes) -> None:
    from PIL import ImageFilter

    blurred = Image.open(io.BytesIO(photo)).filter(ImageFilter.GaussianBlur(2.5))
    buf = io.BytesIO()
    blurred.save(buf, format="PNG")
    body = client.post("/api/predict", files={"file": ("blurred.png", buf.getvalue())}).json()
    assert body["head"] == "photo" and body["quality"]["checks"]["blur"]["verdict"] == "fail"
    assert body["quality"]["retake"] == "Please take the photo again: hold the phone still."
    assert body["withheld"] and "poor photo: blur" in body["withheld_reason"] and "pathologies" not in body


def test_predict_flags_a_document_and_withholds_its_findings(client: httpx.Client) -> None:
    page = np.full((120, 90), 245, np.uint8)
    page[10:110:8, 8:80] = 20
    body = client.post("/api/predict", files={"file": ("scan.png", _png(page))}).json()
    assert body["ood"]["flag"] is True and body["flagged"] and body["warnings"]
    assert body["withheld"] is True and body["withheld_reason"].startswith("out-of-distribution")
    assert "pathologies" not in body and list(body["withheld_pathologies"]) == list(SLUGS)
    anyway = client.post("/api/predict?score_anyway=true", files={"file": ("scan.png", _png(page))}).json()
    assert anyway["withheld"] is False and anyway["scored_anyway"] is True
    assert anyway["pathologies"] == body["withheld_pathologies"]
    explained = client.post("/api/explain", files={"file": ("scan.png", _png(page))}).json()
    assert explained["withheld"] and "pathologies" not in explained and len(explained["heatmaps"]) == 5
    _error(
        client.post("/api/predict?score_anyway=maybe", files={"file": ("s.png", _png(page))}),
        422,
        "invalid-request",
    )


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_explain_returns_a_png_heatmap_per_pathology(client: httpx.Client, photo: bytes, method: str) -> None:
    r = client.post(f"/api/explain?method={method}", files={"file": ("p.jpg", photo)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["method"] == method and list(body["heatmaps"]) == list(SLUGS)
    if method == "gradcam":  # the tiny net's last block is 8 x 8 at 64 px: enough cells
        assert (body["saliency"]["layer"], body["saliency"]["cells"]) == ("features.block3", [8, 8])
    assert list(body["saliency"]["notes"]) == list(SLUGS)
    w, h = Image.open(io.BytesIO(photo)).size
    pixels = []
    for png in body["heatmaps"].values():
        with Image.open(io.BytesIO(base64.b64decode(png))) as im:
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
            pixels.append(np.asarray(im))
    assert not np.array_equal(pixels[0], pixels[1])
    _error(client.post("/api/explain?method=lime", files={"file": ("p.jpg", photo)}), 422, "invalid-request")


def test_dicom_uploads_get_a_server_rendered_preview(
    client: httpx.Client, use_demo: Path, tmp_path: Path
) -> None:
    from chextrain.data.images import load_image
    from tests.test_cli_use import _dicom

    xray = load_image(demo_files(use_demo, "digital", "valid")[0])
    dicom = _dicom(tmp_path / "a.dcm", xray).read_bytes()
    body = client.post("/api/predict?preview=true", files={"file": ("a.dcm", dicom)}).json()
    with Image.open(io.BytesIO(base64.b64decode(body["preview_png"]))) as png:
        assert png.format == "PNG" and png.size == xray.shape[::-1]
        np.testing.assert_array_equal(np.asarray(png), load_image(tmp_path / "a.dcm"))
    assert "preview_png" not in client.post("/api/predict", files={"file": ("a.dcm", dicom)}).json()


def test_corrupt_and_truncated_images_are_422(client: httpx.Client, photo: bytes) -> None:
    corrupt = photo[:20] + bytes(range(256)) * 4
    assert "cannot be decoded" in _error(
        client.post("/api/predict", files={"file": ("a.jpg", corrupt)}), 422, "unreadable-image"
    )
    truncated = photo[: len(photo) // 2]
    r = client.post("/api/predict", files={"file": ("b.jpg", truncated)})
    detail = _error(r, 422, "unreadable-image")
    assert "truncated" in detail
    _error(client.post("/api/predict", files={"file": ("c.jpg", b"")}), 422, "empty-file")


def test_non_images_are_415_whatever_their_name(client: httpx.Client) -> None:
    for name, data, ctype in [
        ("x-ray.jpg", b"hello, I am text" * 20, "image/jpeg"),
        ("scan.png", b"%PDF-1.7\n" + b"0" * 300, "image/png"),
        ("anim.gif", b"GIF89a" + b"\0" * 300, "image/gif"),
        ("page.jpg", b"<html><script>alert(1)</script></html>", "image/jpeg"),
    ]:
        r = client.post("/api/predict", files={"file": (name, data, ctype)})
        _error(r, 415, "unsupported-media-type")


def test_uploads_over_the_byte_limit_are_413(client: httpx.Client) -> None:
    big = _png(np.random.default_rng(0).integers(0, 256, (700, 700)).astype(np.uint8))  # ~490 kB
    assert len(big) > 300_000 + 16 * 1024
    _error(client.post("/api/predict", files={"file": ("big.png", big)}), 413, "too-large")
    just_over = big[:300_100]  # the body is under limit + form overhead, the file is not
    _error(client.post("/api/predict", files={"file": ("big.png", just_over)}), 413, "too-large")

    def chunks():  # no Content-Length: the streamed size is what is checked
        yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 10_000

    r = client.post(
        "/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    _error(r, 413, "too-large")
    host, port = client.base_url.host, client.base_url.port
    with socket.create_connection((host, port), timeout=30) as s:  # a declared size httpx would not send
        s.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\nConnection: close\r\n\r\nxx"
        )
        reply = b"".join(iter(lambda: s.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.1 413") and b'"error":"too-large"' in reply


def test_a_60_mb_post_gets_its_413_answer(client: httpx.Client) -> None:
    """httpx sends the whole body before it reads: the server must read it to the end, then answer."""
    big = b"\0" * (60 * 1024 * 1024)
    detail = _error(client.post("/api/predict", files={"file": ("huge.jpg", big)}), 413, "too-large")
    assert "exceeds the limit of 316,384" in detail
    detail = _error(
        client.post("/api/explain", content=big, headers={"content-type": "image/jpeg"}), 413, "too-large"
    )
    assert f"{len(big):,} bytes" in detail
    # urllib (like curl and many phone clients) gives up on the first failed write: with a server that
    # answers before reading the body it got "connection reset by peer", never the 413
    import urllib.error
    import urllib.request

    form = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        + big
        + b"\r\n--b--\r\n"
    )
    request = urllib.request.Request(
        str(client.base_url.join("/api/predict")),
        data=form,
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 413 and b'"too-large"' in answer.value.read()
    assert client.get("/api/health").status_code == 200  # and the server goes on serving


def test_pixel_bombs_are_413(client: httpx.Client) -> None:
    for w, h in [(30_000, 30_000), (2_000, 1_000)]:  # over PIL's own limit; over the server's 1 MP
        detail = _error(
            client.post("/api/predict", files={"file": ("bomb.png", _pixel_bomb(w, h))}),
            413,
            "too-many-pixels",
        )
        assert "pixels" in detail


def test_missing_field_and_bad_forms(client: httpx.Client, photo: bytes) -> None:
    detail = _error(client.post("/api/predict", files={"image": ("a.jpg", photo)}), 422, "missing-field")
    assert "'file'" in detail and "image" in detail
    _error(client.post("/api/predict", data={"note": "hi"}), 400, "bad-request")  # urlencoded, not multipart
    _error(client.post("/api/predict", json={"file": "a.jpg"}), 400, "bad-request")
    detail = _error(
        client.post(
            "/api/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"}
        ),
        400,
        "bad-request",
    )
    assert "malformed multipart" in detail
    empty_form = b"--zz--\r\n"
    _error(
        client.post(
            "/api/predict", content=empty_form, headers={"content-type": "multipart/form-data; boundary=zz"}
        ),
        422,
        "missing-field",
    )
    _error(client.get("/api/predict"), 405, "method-not-allowed")
    _error(client.get("/nowhere"), 404, "not-found")
    _error(client.get("/static/..%2F..%2Fapp.py"), 404, "not-found")


def test_uploads_never_touch_the_disk(
    predictor: Predictor, photo: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the server tried to create a temporary file")

    app = create_app(predictor, max_upload_bytes=5_000_000, max_pixels=5_000_000)
    big = _png(np.random.default_rng(1).integers(0, 256, (1200, 1100)).astype(np.uint8))
    assert len(big) > 1024 * 1024  # above Starlette's in-memory spool size
    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        for data in (photo, big):
            r = client.post("/api/predict", files={"file": ("a.png", data)})
            assert r.status_code == 200, r.text


def test_page_and_docs(client: httpx.Client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    assert re.search(r'<input[^>]+accept="image/\*"[^>]+capture="environment"', html)
    assert 'name="viewport"' in html
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.text == (STATIC / name).read_text()
    for f in STATIC.iterdir():  # no external resources
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text()), f.name
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"]["format"] == "binary"
    assert "/api/explain" in spec["paths"] and "/api/health" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_create_app_rejects_unknown_method(predictor: Predictor) -> None:
    with pytest.raises(ValueError, match="explain_method 'lime'"):
        create_app(predictor, explain_method="lime")


HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64  # header of a HEIC photo


def test_heic_without_its_reader_is_415(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed
    detail = _error(
        client.post("/api/predict", files={"file": ("a.heic", HEIC)}), 415, "unsupported-media-type"
    )
    assert "chextrain[heic]" in detail


def test_reader_errors_map_to_statuses_by_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from chextrain.data.images import ImageLoadError, ImageTooLargeError, ReaderMissingError, load_image_bytes

    def refused(data: bytes, max_pixels: int = 1_000_000) -> ImageLoadError:
        with pytest.raises(ImageLoadError) as info:
            load_image_bytes(data, "upload", max_pixels=max_pixels, truncated="error")
        return info.value

    assert upload_error(refused(_pixel_bomb(2_000, 1_000))) is TooManyPixelsError
    assert upload_error(refused(_pixel_bomb(30_000, 30_000), 10**10)) is TooManyPixelsError  # PIL's own limit
    assert upload_error(refused(_png(np.zeros((8, 8), np.uint8))[:40])) is UnreadableImageError
    too_many_bytes = refused(b"\xff" * (1 << 21), 1000)
    assert type(too_many_bytes) is ImageTooLargeError and upload_error(too_many_bytes) is TooManyPixelsError
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    no_reader = refused(HEIC)
    assert type(no_reader) is ReaderMissingError and upload_error(no_reader) is UnsupportedMediaTypeError
    # by type, never by text: a plain ImageLoadError is unreadable whatever its reason says
    assert (
        upload_error(ImageLoadError("x", "too many pixels; install the optional reader"))
        is UnreadableImageError
    )
    assert upload_error(ImageTooLargeError("x", "anything")) is TooManyPixelsError
    assert upload_error(ReaderMissingError("x", "anything")) is UnsupportedMediaTypeError
    statuses = {
        cls: (cls.status, cls.code)
        for cls in (TooManyPixelsError, UnsupportedMediaTypeError, UnreadableImageError)
    }
    assert statuses == {
        TooManyPixelsError: (413, "too-many-pixels"),
        UnsupportedMediaTypeError: (415, "unsupported-media-type"),
        UnreadableImageError: (422, "unreadable-image"),
    }
    assert all(issubclass(cls, ApiError) for cls in statuses)


@pytest.mark.slow
def test_load_on_loopback_has_no_errors_and_consistent_answers(plain_bundle: Path, use_demo: Path) -> None:
    """40 uploads from 8 concurrent clients: no error, and each answer equals that image's own."""
    files = demo_files(use_demo, "digital", "valid")[:2] + demo_files(use_demo, "natural", "valid")[:2]
    payloads = [f.read_bytes() for f in files]
    predictor = Predictor.from_bundle(plain_bundle)
    expected = [score_upload(predictor, load_image_bytes(p))[0] for p in payloads]
    answers: dict[int, dict] = {}
    errors: list[str] = []

    def client(first: int, url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(first, 40, 8):
                r = c.post("/api/predict", files={"file": ("a.jpg", payloads[i % len(payloads)])})
                if r.status_code == 200:
                    answers[i] = r.json()
                else:
                    errors.append(f"{i}: {r.status_code} {r.text[:200]}")

    with running_server(create_app(Predictor.from_bundle(plain_bundle))) as url:
        assert url.startswith("http://127.0.0.1:")
        threads = [threading.Thread(target=client, args=(k, url)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and sorted(answers) == list(range(40))
    for i, answer in answers.items():
        assert answer == expected[i % len(payloads)]


# --- the radiograph's outline ---------------------------------------------------------------


def tilted_photo() -> tuple[np.ndarray, np.ndarray]:
    """A simulated photo of a phantom x-ray tilted on the film plane (RGB 256 x 256) and the
    radiograph's true corners (TL, TR, BR, BL); the classical finder finds it."""
    from chextrain.data.phantom import render_xray
    from chextrain.data.photo import simulate_photo_with_corners

    rng = np.random.default_rng(0)
    xray, _ = render_xray({}, "frontal", rng, 256)
    return simulate_photo_with_corners(xray, "photographic", 2, rng)


def _corners_text(corners: np.ndarray) -> str:
    return ",".join(f"{v:.1f}" for v in np.asarray(corners, np.float64).ravel())


def _findings(body: dict) -> dict[str, float]:
    found = body["withheld_pathologies"] if body["withheld"] else body["pathologies"]
    return {slug: v["prob"] for slug, v in found.items()}


def test_a_photo_answer_carries_the_outline_found_in_it(client: httpx.Client, use_demo: Path) -> None:
    from chextrain.quality import frame_share, tilt
    from chextrain.rectify import quad_iou

    photo, true = tilted_photo()
    body = client.post("/api/predict", files={"file": ("tilted.png", _png(photo))}).json()
    assert body["domain"] == "photo" and body["rectified"] is False
    quad = body["quad"]
    assert quad["method"] == "classical" and 0.6 <= quad["confidence"] <= 1
    assert (quad["width"], quad["height"]) == (256, 256)
    corners = np.array(quad["corners"])
    assert corners.shape == (4, 2) and quad_iou(corners, true) > 0.6
    # the quality gate measured the radiograph's size and tilt on that quadrilateral
    checks = body["quality"]["checks"]
    assert body["quality"]["region"] == "quadrilateral"
    assert checks["size"]["value"] == pytest.approx(frame_share(corners, (256, 256)), abs=0.01)
    assert checks["size"]["value"] < 0.95 and checks["tilt"]["value"] == pytest.approx(tilt(corners), abs=0.5)
    xray = demo_files(use_demo, "digital", "valid")[0].read_bytes()
    digital = client.post("/api/predict", files={"file": ("x.jpg", xray)}).json()
    assert digital["domain"] == "digital" and digital["quad"] is None and digital["quality"] is None


def test_corrected_corners_score_the_flattened_radiograph(client: httpx.Client, predictor: Predictor) -> None:
    from chextrain.rectify import warp

    photo, true = tilted_photo()
    corners = np.clip(np.round(true, 1), 0, 256).astype(np.float32)
    found = client.post("/api/predict", files={"file": ("t.png", _png(photo))}).json()
    text = _corners_text(corners)
    body = client.post("/api/predict", files={"file": ("t.png", _png(photo))}, data={"corners": text}).json()
    assert np.allclose(body["quad"].pop("corners"), corners, atol=1e-4)
    assert body["quad"] == {"confidence": None, "method": "user", "width": 256, "height": 256}
    assert body["rectified"] is True and body["domain"] == "photo"
    assert _findings(body) != _findings(found)  # the scores changed
    grey = load_image_bytes(_png(photo))
    flat = warp(grey, corners)
    direct = predictor.predict_images([flat], ["upload"], domain="photo")[0]
    assert _findings(body) == _findings(direct)  # scored: the radiograph warped flat
    assert body["quality"]["region"] == "whole image"  # the gate judged what the model saw
    by_query = client.post(f"/api/predict?corners={text}", files={"file": ("t.png", _png(photo))}).json()
    by_query["quad"].pop("corners")
    assert by_query == body
    explained = client.post(
        "/api/explain", files={"file": ("t.png", _png(photo))}, data={"corners": text}
    ).json()
    assert explained["quad"]["method"] == "user" and _findings(explained) == _findings(body)
    assert len(explained["heatmaps"]) == 5


@pytest.mark.parametrize(
    ("corners", "says"),
    [
        ("10,10,200,10,200,200", "expected 8 numbers"),
        ("10,10,200,10,200,200,10,200,5", "expected 8 numbers"),
        ("10,10,200,10,200,200,10,abc", "value 8 ('abc') is not a number"),
        ("10,10,200,10,200,inf,10,200", "not a finite number"),
        ("10,10,nan,10,200,200,10,200", "not a finite number"),
        ("10,10,300,10,200,200,10,200", "corner TR (300, 10) lies outside the 256 x 256 image"),
        ("-1,10,200,10,200,200,10,200", "corner TL (-1, 10) lies outside"),
        ("10,10,10,200,200,200,200,10", "convex quadrilateral in the order TL, TR, BR, BL"),  # anticlockwise
        ("10,10,200,200,200,10,10,200", "convex quadrilateral"),  # crossed (a bow tie)
        ("10,10,200,10,100,50,10,200", "convex quadrilateral"),  # a dent
        ("10,10,10,10,200,200,10,200", "on top of each other"),
        ("10,10,20,10,20,20,10,20", "covers 0.15% of the image"),
        ("1," * 300, "characters"),
    ],
)
def test_bad_corners_are_422_naming_the_field(client: httpx.Client, corners: str, says: str) -> None:
    photo, _ = tilted_photo()
    r = client.post("/api/predict", files={"file": ("t.png", _png(photo))}, data={"corners": corners})
    detail = _error(r, 422, "invalid-corners")
    assert detail.startswith("corners: ") and says in detail, detail


def test_corners_sent_twice_or_not_as_text_are_422(client: httpx.Client) -> None:
    photo, true = tilted_photo()
    text = _corners_text(np.clip(true, 0, 256))
    r = client.post(
        f"/api/predict?corners={text}", files={"file": ("t.png", _png(photo))}, data={"corners": text}
    )
    assert "sent both" in _error(r, 422, "invalid-corners")
    r = client.post("/api/explain", files={"file": ("t.png", _png(photo)), "corners": ("c", b"\xff\xfe1,2")})
    assert _error(r, 422, "invalid-corners") == "corners: expected UTF-8 text of 8 numbers"


def _corner_bundle(out: Path) -> Path:
    """An untrained corner model's bundle whose threshold is 0: its outline is always 'learned'."""
    import torch

    from chextrain.models.bundle import save_bundle
    from chextrain.models.net import CXRNet
    from chextrain.rectify import CORNER_HEAD, to_corner_network

    torch.manual_seed(0)
    net = to_corner_network(CXRNet("tiny", heads=[CORNER_HEAD]))
    meta = {"image_size": 64, "objective": "corners", "corners": {"min_confidence": 0.0}}
    return save_bundle(net, out, meta)


def test_serve_uses_a_corner_model_from_corners_or_beside_the_bundle(
    routed_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --corners CB` and BUNDLE/corners give the app a learned corner model; without either,
    the classical finder; a path that is not a corner bundle is a one-line error."""
    import shutil

    import uvicorn
    from typer.testing import CliRunner

    from chextrain.cli import build_app
    from chextrain.rectify import CornerModel

    corners = _corner_bundle(tmp_path / "corners_model")
    served = shutil.copytree(routed_bundle, tmp_path / "served")
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))

    def serve(*args: object) -> tuple[int, str]:
        result = CliRunner().invoke(build_app(), ["serve", *map(str, args)], env={"COLUMNS": "250"})
        return result.exit_code, result.stderr

    def method(app) -> str:
        with running_server(app) as url, httpx.Client(base_url=url, timeout=60) as c:
            return c.post("/api/predict", files={"file": ("t.png", _png(photo))}).json()["quad"]["method"]

    photo, _ = tilted_photo()
    assert serve(served, "--corners", corners)[0] == 0 and method(apps[-1]) == "learned"
    code, err = serve(served)
    assert code == 0 and "classical outline finder" in err and method(apps[-1]) == "classical"
    shutil.copytree(corners, served / "corners")  # found beside the served bundle
    code, err = serve(served)
    assert code == 0 and "corner model" in err and method(apps[-1]) == "learned"
    code, err = serve(served, "--corners", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    code, err = serve(served, "--corners", routed_bundle)
    assert code != 0 and "not a corner model" in err
    assert len(apps) == 3  # the refused ones never served: the last app is BUNDLE/corners's
    expected, _ = CornerModel.load(corners).predict(load_image_bytes(_png(photo)))
    with running_server(apps[-1]) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = c.post("/api/predict", files={"file": ("t.png", _png(photo))}).json()
    assert np.allclose(body["quad"]["corners"], expected, atol=0.06)
