"""What an upload request may carry and the errors it earns: the body read up to a limit, the
multipart form parsed in memory, the image sniffed and decoded (serve/app.py's routes call these).

Each ApiError subclass fixes the HTTP status and the JSON `error` code of its refusals; the
message is the `detail`. `upload_error` maps the image reader's errors onto them by type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from chextrain.data.images import (
    READABLE,
    ImageLoadError,
    ImageTooLargeError,
    ReaderMissingError,
    load_image_bytes,
    sniff_format,
)
from chextrain.errors import ChextrainError

FORM_OVERHEAD = 16 * 1024  # multipart boundaries and part headers around the file
DRAIN_BYTES = 256 * 1024 * 1024  # an oversized body up to this size is read and dropped before the 413


class ApiError(ChextrainError):
    """An error answered as JSON {"error": code, "detail": detail}; each subclass fixes status and code."""

    status, code = 500, "internal-error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequestError(ApiError):
    """The request is not a well-formed multipart upload."""

    status, code = 400, "bad-request"


class NotFoundError(ApiError):
    """No such page or static file."""

    status, code = 404, "not-found"


class TooLargeError(ApiError):
    """More bytes than the upload limit."""

    status, code = 413, "too-large"


class TooManyPixelsError(ApiError):
    """An image whose header declares more pixels (or a file more bytes) than max_pixels allows."""

    status, code = 413, "too-many-pixels"


class UnsupportedMediaTypeError(ApiError):
    """Not an image format this service reads (sniffed from the content)."""

    status, code = 415, "unsupported-media-type"


class EmptyFileError(ApiError):
    """The uploaded file has no bytes."""

    status, code = 422, "empty-file"


class MissingFieldError(ApiError):
    """The form lacks the `file` field."""

    status, code = 422, "missing-field"


class UnreadableImageError(ApiError):
    """An image of a readable format that cannot be decoded (corrupt, truncated)."""

    status, code = 422, "unreadable-image"


class InvalidRequestError(ApiError):
    """A query parameter with a value the API does not accept."""

    status, code = 422, "invalid-request"


class InvalidCornersError(ApiError):
    """A `corners` field that is not a convex quadrilateral inside the image (the detail says why)."""

    status, code = 422, "invalid-corners"


async def read_body(request: Request, limit: int, drain: int = DRAIN_BYTES) -> bytes:
    """The request body, refused with 413 once it exceeds `limit` bytes (declared or streamed).

    Chunks are kept only up to `limit`. An oversized body of up to `drain` bytes is read to its end
    and dropped before the 413 is sent: a client such as httpx or a browser sends the whole body
    before it reads the answer, and a server that closes while it is still sending gets
    "connection reset by peer" instead of the 413. A body declared larger than `drain` is refused
    at once (nobody waits for a gigabyte to arrive).
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequestError(f"invalid Content-Length {declared!r}")
        if int(declared) > drain:
            raise TooLargeError(f"upload of {int(declared):,} bytes exceeds the limit of {limit:,}")
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= limit:
            body += chunk
        elif seen >= drain:
            break  # stop reading: the client may see the connection close
    if seen > limit:
        size = f"{int(declared):,}" if declared is not None else f"{seen:,}" + ("+" if seen >= drain else "")
        raise TooLargeError(f"upload of {size} bytes exceeds the limit of {limit:,}")
    return bytes(body)


def form_file(body: bytes, content_type: str, field: str = "file") -> bytes:
    """The bytes of the multipart/form-data field `field`, parsed in memory."""
    return form_fields(body, content_type, field)[field]


def form_fields(body: bytes, content_type: str, field: str = "file") -> dict[str, bytes]:
    """Every field of a multipart/form-data body (the first of each name), parsed in memory;
    MissingFieldError when `field` is not among them."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise BadRequestError(
            f"expected a multipart/form-data upload with a field {field!r}; "
            f"got Content-Type {content_type or '(none)'!r}"
        )
    parts: dict[str, bytes] = {}
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, name=b"", value=b"", data=bytearray())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["name"].lower()] = state["value"]
        state["name"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        parts.setdefault(name, bytes(state["data"]))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception as err:  # python-multipart raises its own error types
        raise BadRequestError(f"malformed multipart form: {err}") from None
    if field not in parts:
        got = sorted(parts) or "none"
        raise MissingFieldError(f"the form has no field {field!r} (got {got})")
    return parts


_UPLOAD_ERRORS: dict[type[ImageLoadError], type[ApiError]] = {
    ImageTooLargeError: TooManyPixelsError,  # 413
    ReaderMissingError: UnsupportedMediaTypeError,  # 415
}


def upload_error(err: ImageLoadError) -> type[ApiError]:
    """The ApiError type for an error of the image reader, by its type; UnreadableImageError otherwise."""
    return next((api for cls, api in _UPLOAD_ERRORS.items() if isinstance(err, cls)), UnreadableImageError)


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Sniffed, size-checked and decoded upload -> uint8 H x W; an ApiError otherwise."""
    if not data:
        raise EmptyFileError("the uploaded file is empty")
    kind = sniff_format(data)
    if kind not in READABLE:
        raise UnsupportedMediaTypeError(
            "the upload is not an image this service reads (JPEG, PNG, TIFF, BMP, WebP, DICOM, HEIC)"
        )
    try:
        return load_image_bytes(data, "upload", max_pixels=max_pixels, truncated="error")
    except ImageLoadError as err:
        error = upload_error(err)
        detail = (
            f"{kind} image cannot be decoded: {err.reason}" if error is UnreadableImageError else err.reason
        )
        raise error(detail) from None
