"""The web service: a FastAPI app around a `Predictor`, and a page for a phone.

Routes: `GET /` (the page), `GET /static/{app.js,style.css}`, `POST /api/predict` and
`POST /api/explain` (multipart form, field `file`, optional field `corners`), `GET /api/health`,
OpenAPI docs at `/docs`.

The outline. Every upload gets the radiograph's quadrilateral (`chextrain.rectify.find_quad`: the
served corner model when there is one, else OpenCV's classical finder); when the image is scored as
a photo, the quality gate's size and tilt checks use it and the answer carries it as `quad`
({"corners": [[x, y] x 4: TL, TR, BR, BL in the uploaded image's pixels], "confidence", "method",
"width", "height"}). The whole photo is scored, as the served models were trained on. A request
that sends `corners` (8 numbers: x, y of TL, TR, BR, BL; the page sends them after the person drags
the outline) is scored on that quadrilateral warped flat (`rectify.warp`), as a photo, and its
quality gate judges what the model saw (the flat radiograph; size and tilt then pass, the warp
removed them); the answer says `quad.method: "user"` and `rectified: true`.

Safety: the request body is read in memory up to a limit (413 from Content-Length, and again while
streaming, so a chunked upload cannot exceed it; an oversized body is read to its end and dropped
before the 413 is sent, so that clients that send first and read after receive it); the multipart
form is parsed in memory (no temporary files); the content is sniffed from its magic bytes, never
from the name or Content-Type (415 for anything else); images larger than `max_pixels` are refused
from their header before decoding (413); corrupt and truncated images are refused (422). No
client-supplied name or path touches the disk. Every error is JSON: {"error": code, "detail":
message}; its HTTP status and code come from the error's type (the ApiError subclasses of
serve/uploads.py, which also reads the body, parses the form and decodes the upload; upload_error
maps the image reader's errors onto them), never from its message.
Inference runs in a worker thread under the predictor's lock, so concurrent requests are served
one model call at a time and each gets its own answer.
"""

from __future__ import annotations

import base64
import importlib.resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import chextrain
from chextrain.evaluation.saliency import (
    METHODS,
    blank_notes,
    display_image,
    explain_maps,
    overlay,
    png_bytes,
)
from chextrain.inference import Predictor
from chextrain.labels import SLUGS
from chextrain.rectify import CornerModel
from chextrain.serve.outline import CORNERS_FIELD, CornersError, parse_corners, score_upload
from chextrain.serve.uploads import (
    FORM_OVERHEAD,
    ApiError,
    InvalidCornersError,
    InvalidRequestError,
    NotFoundError,
    TooLargeError,
    decode_upload,
    form_fields,
    read_body,
)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a 12 MP phone JPEG is 3-8 MB
MAX_PIXELS = 50_000_000  # a 4608 x 3456 phone photo is 16 M
STATIC = ("app.js", "style.css")
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_MEDIA_TYPES = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
_UPLOAD_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "JPEG, PNG, TIFF, BMP, WebP, DICOM or HEIC image",
                    },
                    "corners": {
                        "type": "string",
                        "description": "optional: the radiograph's corners, 8 numbers 'x,y' of TL, TR, "
                        "BR, BL in the image's pixels; the image is then scored warped flat",
                    },
                },
            }
        }
    },
    "required": True,
}


def explain_result(
    predictor: Predictor,
    image: np.ndarray,
    method: str,
    score_anyway: bool = False,
    *,
    corners: np.ndarray | None = None,
    corner_model: CornerModel | None = None,
) -> dict[str, Any]:
    """The prediction plus a base64 PNG overlay per pathology (on the head the router chose).

    "method" is the method used (gradcam falls back to gradient on inputs too small for it), and
    "saliency" says how: {"method", "layer", "cells", "note", "notes": {slug: why a map is blank}}.
    With `corners`, the maps are those of the flattened radiograph that was scored (score_upload).
    """
    result, image = score_upload(
        predictor, image, corners, corner_model=corner_model, score_anyway=score_anyway
    )
    x = predictor.inputs(image)  # 1 x 3 x S x S
    with predictor.lock, torch.enable_grad():
        maps, how = explain_maps(predictor.model, x, result["head"], method)
    maps = maps[0]  # 5 x S x S
    shown = display_image(image)
    result["method"] = how["method"]
    result["saliency"] = {
        **how,
        "notes": dict(zip(SLUGS, blank_notes(maps, str(how["method"])), strict=True)),
    }
    mode = predictor.preprocessing.resize
    result["heatmaps"] = {
        slug: base64.b64encode(png_bytes(overlay(shown, sal, resize=mode))).decode("ascii")
        for slug, sal in zip(SLUGS, maps, strict=True)
    }
    return result


def preview_png(image: np.ndarray) -> str:
    """uint8 H x W -> a base64 PNG of it shrunk to at most 512 px a side (the server-rendered preview)."""
    return base64.b64encode(png_bytes(display_image(image))).decode("ascii")


def _error(status: int, code: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status)


def _static_text(name: str) -> str:
    return importlib.resources.files("chextrain.serve").joinpath("static", name).read_text("utf-8")


def create_app(
    predictor: Predictor,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    explain_method: str = "gradcam",
    corner_model: CornerModel | None = None,
) -> FastAPI:
    """The FastAPI app serving `predictor`; the page and scripts are read once, here.

    corner_model: a learned corner model (`rectify.CornerModel`) that finds the radiograph's outline
    in photos; None: OpenCV's classical finder.
    """
    if explain_method not in METHODS:
        raise ValueError(f"explain_method {explain_method!r} is not one of {list(METHODS)}")
    app = FastAPI(
        title="chextrain",
        version=chextrain.__version__,
        description="Chest x-ray findings for digital x-rays and phone photos of x-rays. "
        "Research software: not a medical device.",
    )
    page = _static_text("index.html")
    assets = {name: _static_text(name) for name in STATIC}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(type(err).status, type(err).code, err.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not-found", 405: "method-not-allowed"}.get(err.status_code, "http-error")
        return _error(err.status_code, code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error(
            422,
            "invalid-request",
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()),
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        return _error(500, "internal-error", f"{type(err).__name__}: the server failed on this request")

    async def upload(request: Request, query_corners: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(the decoded image, the corners sent as form field or query parameter, or None)."""
        body = await read_body(request, max_upload_bytes + FORM_OVERHEAD)
        fields = form_fields(body, request.headers.get("content-type", ""))
        data = fields["file"]
        if len(data) > max_upload_bytes:
            raise TooLargeError(f"file of {len(data):,} bytes exceeds the limit of {max_upload_bytes:,}")
        if CORNERS_FIELD in fields and query_corners is not None:
            raise InvalidCornersError(
                f"{CORNERS_FIELD}: sent both as a form field and as a query parameter; send it once"
            )
        text = query_corners
        if CORNERS_FIELD in fields:
            try:
                text = fields[CORNERS_FIELD].decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidCornersError(f"{CORNERS_FIELD}: expected UTF-8 text of 8 numbers") from None
        image = await run_in_threadpool(decode_upload, data, max_pixels)
        if text is None:
            return image, None
        try:
            return image, parse_corners(text, image.shape[1], image.shape[0])
        except CornersError as err:
            raise InvalidCornersError(str(err)) from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}
        return HTMLResponse(page, headers=headers)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in assets:  # a fixed set: the name never becomes a path
            raise NotFoundError(f"no static file {name!r}")
        return Response(
            assets[name],
            media_type=_MEDIA_TYPES[name.rsplit(".", 1)[1]],
            headers={"X-Content-Type-Options": "nosniff"},
        )

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """Model, version and what it reports on."""
        meta = predictor.meta
        return {
            "status": "ok",
            "version": chextrain.__version__,
            "model": {
                "name": predictor.name,
                "backbone": meta["architecture"]["backbone"],
                "heads": meta["architecture"]["heads"],
                "router": meta["architecture"]["router"],
                "image_size": predictor.size,
                "runtime": predictor.runtime.name,
                "domain": predictor.domain,
                "ood_calibrated": predictor.ood is not None,
            },
            "pathologies": predictor.pathology_names,
            "slugs": list(meta["slugs"]),
            "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels},
        }

    @app.post("/api/predict", openapi_extra={"requestBody": _UPLOAD_BODY})
    async def predict(
        request: Request, score_anyway: bool = False, preview: bool = False, corners: str | None = None
    ) -> dict[str, Any]:
        """Probabilities and decisions for one image (multipart field `file`).

        A flagged image (OOD, unsure router, poor photo) has its findings withheld
        (`withheld: true`, `withheld_reason`, the probabilities under `withheld_pathologies`)
        unless `score_anyway` is true. `preview`: add "preview_png", the decoded image as a base64
        PNG of at most 512 px a side, for what a browser cannot draw itself (DICOM, HEIC).
        A photo's answer has `quad`, the radiograph's outline found in it. `corners` (form field or
        query parameter: 8 numbers, x, y of TL, TR, BR, BL in the image's pixels) scores that
        quadrilateral warped flat instead (`quad.method` "user", `rectified` true); 422
        invalid-corners when they are not a convex quadrilateral inside the image.
        """
        image, given = await upload(request, corners)
        result, _ = await run_in_threadpool(
            lambda: score_upload(
                predictor, image, given, corner_model=corner_model, score_anyway=score_anyway
            )
        )
        if preview:
            result["preview_png"] = await run_in_threadpool(preview_png, image)
        return result

    @app.post("/api/explain", openapi_extra={"requestBody": _UPLOAD_BODY})
    async def explain(
        request: Request, method: str = explain_method, score_anyway: bool = False, corners: str | None = None
    ) -> dict[str, Any]:
        """The prediction plus a base64 PNG saliency overlay per pathology (`method`: gradcam | gradient);
        `corners` as for /api/predict (the maps are then those of the flattened radiograph)."""
        if method not in METHODS:
            raise InvalidRequestError(f"method {method!r} is not one of {list(METHODS)}")
        image, given = await upload(request, corners)
        return await run_in_threadpool(
            lambda: explain_result(
                predictor, image, method, score_anyway, corners=given, corner_model=corner_model
            )
        )

    return app
