"""The one safe way the package opens an image: uint8 greyscale out, clear errors in.

Every reader (dataset, predict, web upload, `data check`) goes through `load_image` or
`load_image_bytes`, so the same rules hold everywhere:

- Content is sniffed, never trusted from the file name. Accepted: JPEG (incl. phone MPO),
  PNG (8- and 16-bit), TIFF, BMP, WebP, DICOM (pydicom), and HEIC/HEIF when the optional
  `pillow-heif` is installed (`pip install chextrain[heic]`).
- Decompression bombs are refused from the header, before any pixel is decoded.
- EXIF orientation is applied: phone photos are often rotated in EXIF only.
- Any pixel mode becomes uint8 H x W greyscale. 16-bit and other high-depth data is scaled
  by its bit depth (12-bit data in a 16-bit container uses the full 0-255 range); nothing is
  clipped at 255. Transparent pixels are composited on BLACK, the colour of the air around
  a body on a radiograph and of the padding used elsewhere in the package.
- A truncated JPEG either loads the part that is there with a `TruncatedImageWarning`
  (`truncated="warn"`) or raises (`truncated="error"`). PIL's global
  `LOAD_TRUNCATED_IMAGES` is never touched: the missing end-of-image marker is appended to
  an in-memory copy instead, which is what that flag does internally. Other truncated
  formats cannot be partly recovered and always raise.
- Every failure is an `ImageLoadError(ValueError)` naming the file and the reason; over the
  pixel or byte limit it is an `ImageTooLargeError`, a missing optional reader a `ReaderMissingError`.

DICOM is decoded by data/dicom.py; what both decoders share (`ImageLoadError`, the pixel-count
guard, `scale_to_uint8`) lives in data/decoding.py. Imports go images -> dicom -> decoding only;
The errors and `scale_to_uint8` are re-exported here, the import point for callers.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from chextrain.data.decoding import (
    ImageLoadError,
    ImageTooLargeError,
    ReaderMissingError,
    check_pixel_count,
    scale_to_uint8,
)
from chextrain.data.dicom import decode_dicom, read_dicom

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "PIL_FORMATS",
    "READABLE",
    "SUPPORTED",
    "TRUNCATED_OPTIONS",
    "ImageLoadError",
    "ImageTooLargeError",
    "ReaderMissingError",
    "TruncatedImageWarning",
    "image_size",
    "load_image",
    "load_image_bytes",
    "scale_to_uint8",
    "sniff_format",
    "verify_image",
]

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 4608 x 3456 phone photo is 16 M
TRUNCATED_OPTIONS: tuple[str, ...] = ("warn", "error")
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")  # JPEG also opens phone MPO
SUPPORTED = "JPEG, PNG, TIFF, BMP, WebP, DICOM, HEIC (with chextrain[heic])"

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_EOI = b"\xff\xd9"  # JPEG end-of-image marker
# EXIF Orientation tag value -> PIL transpose, the table ImageOps.exif_transpose uses.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class TruncatedImageWarning(UserWarning):
    """A truncated JPEG was loaded partly (`truncated="warn"`)."""


def load_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, truncated: str = "warn"
) -> np.ndarray:
    """Read an image file as uint8 H x W greyscale (see the module docstring for the rules).

    Args:
        path: the image file.
        max_pixels: refuse images whose width * height exceeds this (checked from the header).
        truncated: "warn" loads what a truncated JPEG holds and warns; "error" raises.

    Raises:
        ImageLoadError: naming the file and the reason. ValueError for bad options.
    """
    _check_options(max_pixels, truncated)
    name = str(path)
    path = Path(path)
    with _file_errors(name):
        size = path.stat().st_size
        if path.is_dir():
            raise ImageLoadError(name, "is a directory, not an image file")
        _check_file_size(name, size, max_pixels)
        data = path.read_bytes()
    return _decode(data, name, max_pixels, truncated)


def load_image_bytes(
    data: bytes,
    name: str = "<upload>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    truncated: str = "warn",
) -> np.ndarray:
    """Like `load_image` for bytes already in memory (an upload); `name` is used in messages."""
    _check_options(max_pixels, truncated)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    _check_file_size(name, len(data), max_pixels)
    return _decode(data, name, max_pixels, truncated)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as `load_image` would return it (EXIF orientation applied), from the header."""
    name = str(path)
    with _file_errors(name), open(path, "rb") as f:
        head = f.read(132)
        if not head:
            raise ImageLoadError(name, "empty file (0 bytes)")
        f.seek(0)
        if head[128:132] != b"DICM":
            if _is_heif(head):
                _register_heif(name)
            try:
                with _open_pil(f, name, head) as im:
                    w, h = im.size
                    return (h, w) if _orientation(im, header_only=True) in (5, 6, 7, 8) else (w, h)
            except ImageLoadError:
                if not _is_dicom(head, name):
                    raise
            f.seek(0)
        ds = read_dicom(f, name, stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageLoadError(name, "DICOM file has no image (Rows/Columns missing)")
        return int(ds.Columns), int(ds.Rows)


def verify_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Fully decode `path`; None if it is a readable image, else the reason it is not.

    Stricter than loading for training: a truncated JPEG is reported, not recovered.
    """
    try:
        load_image(path, max_pixels=max_pixels, truncated="error")
    except ImageLoadError as e:
        return e.reason
    return None


# --- decoding ---------------------------------------------------------------------------


@contextmanager
def _file_errors(name: str) -> Iterator[None]:
    """Turn the OS's errors while reading `name` into ImageLoadError with a plain reason."""
    try:
        yield
    except FileNotFoundError:
        raise ImageLoadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageLoadError(name, "permission denied") from None
    except OSError as e:
        raise ImageLoadError(name, f"cannot read the file ({e.strerror or e})") from None


def _check_options(max_pixels: int, truncated: str) -> None:
    if truncated not in TRUNCATED_OPTIONS:
        raise ValueError(f"truncated={truncated!r} is not one of {list(TRUNCATED_OPTIONS)}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _check_file_size(name: str, size: int, max_pixels: int) -> None:
    if size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    limit = 8 * max_pixels + (1 << 20)  # more than any uncompressed image of max_pixels holds
    if size > limit:
        raise ImageTooLargeError(name, f"file too large ({size:,} bytes) for max_pixels={max_pixels:,}")


def _decode(data: bytes, name: str, max_pixels: int, truncated: str) -> np.ndarray:
    """Sniff the content of `data` and decode it to uint8 H x W."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    if data[128:132] == b"DICM":
        return decode_dicom(data, name, max_pixels)
    if _is_heif(data):
        _register_heif(name)
    try:
        im = _open_pil(io.BytesIO(data), name, data)
    except ImageLoadError:
        if _is_dicom(data, name):  # a .dcm file without the 128-byte preamble
            return decode_dicom(data, name, max_pixels)
        raise
    with im:
        check_pixel_count(name, im.size, max_pixels)
        try:
            _load(im)
        except OSError as e:
            if "truncated" not in str(e):
                raise ImageLoadError(name, f"corrupt image data ({e})") from None
            im = _load_truncated(data, name, im.format, truncated, e)
        except (ValueError, SyntaxError, EOFError, MemoryError) as e:
            raise ImageLoadError(name, f"corrupt image data ({e})") from None
        grey = _to_grey(im, name)
        orientation = _orientation(im, header_only=False)
    if orientation in _ORIENTATION:
        grey = np.asarray(Image.fromarray(grey).transpose(_ORIENTATION[orientation]))
    return np.ascontiguousarray(grey)


def _open_pil(fp: IO[bytes], name: str, head: bytes) -> Image.Image:
    """Image.open restricted to the accepted formats, with errors translated."""
    formats = PIL_FORMATS + (("HEIF",) if _is_heif(head) else ())
    try:
        return Image.open(fp, formats=formats)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(name, f"too many pixels ({e})") from None
    except UnidentifiedImageError:
        kind = sniff_format(head)
        if kind in ("JPEG", "PNG", "TIFF", "BMP", "WEBP"):
            reason = f"corrupt or truncated {kind} header"
        elif kind:
            reason = f"unsupported format {kind} (supported: {SUPPORTED})"
        else:
            reason = f"not an image or an unsupported format (supported: {SUPPORTED})"
        raise ImageLoadError(name, reason) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(name, f"corrupt image header ({e})") from None


def _load(im: Image.Image) -> None:
    """Decode pixels; colour JPEGs decode straight to greyscale in libjpeg (faster)."""
    if im.format in ("JPEG", "MPO") and im.mode == "RGB":
        im.draft("L", None)
    im.load()


def _load_truncated(data: bytes, name: str, fmt: str | None, truncated: str, err: OSError) -> Image.Image:
    """Recover a truncated JPEG by appending the end-of-image marker, or raise."""
    if truncated == "error":
        raise ImageLoadError(name, f"truncated image file ({err})") from None
    if fmt not in ("JPEG", "MPO"):
        raise ImageLoadError(name, f"truncated {fmt} file; only truncated JPEGs can be partly loaded")
    try:
        im = Image.open(io.BytesIO(data + _EOI), formats=("JPEG",))
        _load(im)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(name, f"truncated JPEG that cannot be recovered ({e})") from None
    warnings.warn(
        f"{name}: truncated JPEG; loaded the part that is there (the rest is filled grey)",
        TruncatedImageWarning,
        stacklevel=4,
    )
    return im


def _orientation(im: Image.Image, header_only: bool) -> int:
    """The EXIF Orientation tag (1 = upright). PNG's getexif would decode pixels: read info."""
    if header_only and im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1


def _to_grey(im: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> uint8 H x W (transparency composited on black)."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode.startswith("I") or mode == "F":
        return scale_to_uint8(np.asarray(im))
    transparent = "A" in mode or "a" in mode or "transparency" in im.info
    try:
        if transparent:
            la = np.asarray(im.convert("RGBA").convert("LA"), dtype=np.uint16)
            return ((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)
        if mode not in ("1", "P", "RGB", "CMYK", "YCbCr"):
            im = im.convert("RGB")
        return np.asarray(im.convert("L"))
    except ValueError as e:
        raise ImageLoadError(name, f"unsupported pixel mode {mode} ({e})") from None


# --- format sniffing --------------------------------------------------------------------


READABLE: frozenset[str] = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP", "HEIF", "DICOM"})


def sniff_format(head: bytes) -> str | None:
    """Name the format of a file from its first bytes (the content, never the file name).

    READABLE lists the names load_image decodes; others (GIF, PDF, AVIF) are named for messages.
    """
    if head[128:132] == b"DICM":
        return "DICOM"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"%PDF":
        return "PDF"
    if _is_heif(head):
        return "HEIF"
    if head[4:12] == b"ftypavif":
        return "AVIF"
    return None


def _is_dicom(head: bytes, name: str) -> bool:
    return head[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _register_heif(name: str) -> None:
    """Register pillow-heif's opener on first use; a clear error when it is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        raise ReaderMissingError(
            name, "HEIC/HEIF image; install the optional reader with `pip install chextrain[heic]`"
        ) from None
    register_heif_opener()
