"""The one safe way the package opens an image: uint8 greyscale out, clear errors in.

Every reader (dataset, predict, web upload, `data check`) goes through `load_image` or
`load_image_bytes`, so the same rules hold everywhere:

- Content is sniffed, never trusted from the file name. Accepted: JPEG (incl. phone MPO),
  PNG (8- and 16-bit), TIFF, BMP, WebP, DICOM (pydicom), and HEIC/HEIF when the optional
  `pillow-heif` is installed (`pip install chextrain[heic]`).
- Decompression bombs are refused from the header, before any pixel is decoded.
- A file of up to 32 MiB is read in one call and handed to the decoder in one piece (fewer
  system calls, no 64 kB steps); a larger one is streamed, never copied whole into memory.
- A plain JPEG in memory (8-bit grey or YCbCr, SOF0-2, with only tables, JFIF and comments
  before its scan: no EXIF, XMP or ICC) goes straight to Pillow's libjpeg decoder without
  Pillow's Python layers (data/jpeg.py: the same pixels, about
  9% less CPU for a CheXpert-small x-ray); every other file, and any JPEG that route declines
  (damaged, truncated), is opened the general way below.
- EXIF orientation is applied: phone photos are often rotated in EXIF only.
- Any pixel mode becomes uint8 H x W greyscale. 16-bit and other high-depth data is scaled
  by its bit depth (12-bit data in a 16-bit container uses the full 0-255 range); nothing is
  clipped at 255. Transparent pixels are composited on BLACK, the colour of the air around
  a body on a radiograph and of the padding used elsewhere in the package.
- `draft=S` decodes a large JPEG at the smallest scale libjpeg offers (1/2, 1/4, 1/8) whose
  sides stay >= S px: all a network input of S px needs, 3-8x faster for a full-size x-ray or
  a phone photo. `load_resized` decodes, makes grey and resizes to S x S in one pass (no numpy
  round trip in between): the path datasets and the image store take.
- A truncated JPEG either loads the part that is there with a `TruncatedImageWarning`
  (`truncated="warn"`) or raises (`truncated="error"`). PIL's global
  `LOAD_TRUNCATED_IMAGES` is never touched: the missing end-of-image marker is appended to
  an in-memory copy instead, which is what that flag does internally. Other truncated
  formats cannot be partly recovered and always raise.
- Every failure is an `ImageLoadError(ValueError)` naming the file and the reason; over the
  pixel or byte limit it is an `ImageTooLargeError`, a missing optional reader a `ReaderMissingError`.

DICOM is decoded by data/dicom.py, plain JPEGs by data/jpeg.py; what the decoders share
(`ImageLoadError`, the pixel-count guard, `scale_to_uint8`, format sniffing) lives in
data/decoding.py. Imports go images -> dicom -> decoding and images -> jpeg only; the errors,
`scale_to_uint8`, `sniff_format` and `READABLE` are re-exported here, the import point for callers.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from chextrain.data.decoding import (
    READABLE,
    FileErrors,
    ImageBytes,
    ImageLoadError,
    ImageTooLargeError,
    ReaderMissingError,
    check_file_size,
    check_pixel_count,
    is_dicom,
    is_heif,
    scale_to_uint8,
    sniff_format,
)
from chextrain.data.dicom import decode_dicom, read_dicom
from chextrain.data.jpeg import decode_plain
from chextrain.data.resizing import centre_square, resize_pil

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
    "centre_square",
    "image_size",
    "load_image",
    "load_image_bytes",
    "load_resized",
    "resize_pil",
    "scale_to_uint8",
    "sniff_format",
    "verify_image",
]

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; a 4608 x 3456 phone photo is 16 M
TRUNCATED_OPTIONS: tuple[str, ...] = ("warn", "error")
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")  # JPEG also opens phone MPO
SUPPORTED = "JPEG, PNG, TIFF, BMP, WebP, DICOM, HEIC (with chextrain[heic])"

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
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    truncated: str = "warn",
    draft: int | None = None,
) -> np.ndarray:
    """Read an image file as uint8 H x W greyscale (see the module docstring for the rules).

    Args:
        path: the image file.
        max_pixels: refuse images whose width * height exceeds this (checked from the header).
        truncated: "warn" loads what a truncated JPEG holds and warns; "error" raises.
        draft: decode a JPEG at the smallest reduced scale whose sides stay >= draft px (None:
            full size). Other formats always decode at full size.

    Raises:
        ImageLoadError: naming the file and the reason. ValueError for bad options.
    """
    _check_options(max_pixels, truncated, draft)
    with ImageBytes(path, max_pixels) as f:
        return _array(_decode(f, str(path), max_pixels, truncated, draft))


def load_resized(
    path: str | Path,
    size: int,
    mode: str = "stretch",
    *,
    draft: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    truncated: str = "warn",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Read an image file as uint8 size x size grey (`mode` as in `resize_pil`).

    The same bytes as `load_image(path, draft=size if draft else None)` resized by
    transforms.resize, without the round trip through numpy in between. Read-only, like
    load_image's arrays; with `out` (writable, C-contiguous uint8 size x size, e.g. a row of a
    batch) the pixels are written there in one copy and `out` is returned.
    """
    limit = size if draft else None
    _check_options(max_pixels, truncated, limit)
    with ImageBytes(path, max_pixels) as f:
        image = resize_pil(_decode(f, str(path), max_pixels, truncated, limit), size, mode)
    if out is None:
        return _array(image)
    if (
        out.shape != (size, size)
        or out.dtype != np.uint8
        or not (out.flags.c_contiguous and out.flags.writeable)
    ):
        raise ValueError(f"out must be a writable C-contiguous uint8 {size} x {size} array; got {out.shape}")
    target = Image.frombuffer("L", (size, size), out, "raw", "L", 0, 1)  # shares out's memory
    target.readonly = 0  # out is writable: paste into it, not into a copy
    target.paste(image)
    return out


def load_image_bytes(
    data: bytes,
    name: str = "<upload>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    truncated: str = "warn",
    draft: int | None = None,
) -> np.ndarray:
    """Like `load_image` for bytes already in memory (an upload); `name` is used in messages."""
    _check_options(max_pixels, truncated, draft)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    check_file_size(name, len(data), max_pixels)
    return _array(_decode(io.BytesIO(data), name, max_pixels, truncated, draft))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as `load_image` would return it (EXIF orientation applied), from the header."""
    name = str(path)
    with FileErrors(name), open(path, "rb") as f:
        head = f.read(132)
        if not head:
            raise ImageLoadError(name, "empty file (0 bytes)")
        f.seek(0)
        if head[128:132] != b"DICM":
            if is_heif(head):
                _register_heif(name)
            try:
                with _open_pil(f, name, head) as im:
                    w, h = im.size
                    return (h, w) if _orientation(im, header_only=True) in (5, 6, 7, 8) else (w, h)
            except ImageLoadError:
                if not is_dicom(head, name):
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


def _array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image))


def _check_options(max_pixels: int, truncated: str, draft: int | None = None) -> None:
    if draft is not None and (isinstance(draft, bool) or not isinstance(draft, int) or draft <= 0):
        raise ValueError(f"draft must be a positive int (px) or None, got {draft!r}")
    if truncated not in TRUNCATED_OPTIONS:
        raise ValueError(f"truncated={truncated!r} is not one of {list(TRUNCATED_OPTIONS)}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


def _decode(fp: IO[bytes], name: str, max_pixels: int, truncated: str, draft: int | None) -> Image.Image:
    """Sniff the content of `fp` (a seekable file or BytesIO) and decode it to a grey ("L"),
    upright PIL image."""
    head = fp.read(132)
    in_memory = fp.seek(0, io.SEEK_END) if isinstance(fp, io.BytesIO) else 0  # its length
    fp.seek(0)
    if not head:
        raise ImageLoadError(name, "empty file (0 bytes)")
    if head[128:132] == b"DICM":
        return Image.fromarray(decode_dicom(fp.read(), name, max_pixels))
    if is_heif(head):
        _register_heif(name)
    if in_memory and head[:2] == b"\xff\xd8":  # a plain JPEG: straight to libjpeg (data/jpeg.py)
        with fp.getbuffer() as data:  # type: ignore[attr-defined]
            plain = decode_plain(data, draft, max_pixels)
        if plain is not None:
            return plain
    try:
        im = _open_pil(fp, name, head)
    except ImageLoadError:
        if is_dicom(head, name):  # a .dcm file without the 128-byte preamble
            fp.seek(0)
            return Image.fromarray(decode_dicom(fp.read(), name, max_pixels))
        raise
    with im:
        check_pixel_count(name, im.size, max_pixels)
        try:
            _load(im, draft, in_memory)
        except OSError as e:
            if "truncated" not in str(e):
                raise ImageLoadError(name, f"corrupt image data ({e})") from None
            fp.seek(0)
            im = _load_truncated(fp.read(), name, im.format, truncated, e, draft)
        except (ValueError, SyntaxError, EOFError, MemoryError) as e:
            raise ImageLoadError(name, f"corrupt image data ({e})") from None
        grey = im if im.mode == "L" else Image.fromarray(_to_grey(im, name))
        orientation = _orientation(im, header_only=False)
    if orientation in _ORIENTATION:
        grey = grey.transpose(_ORIENTATION[orientation])
    return grey


def _open_pil(fp: IO[bytes], name: str, head: bytes) -> Image.Image:
    """Image.open restricted to the accepted formats, with errors translated."""
    formats = PIL_FORMATS + (("HEIF",) if is_heif(head) else ())
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


def _load(im: Image.Image, draft: int | None = None, in_memory: int = 0) -> None:
    """Decode pixels; colour JPEGs decode straight to greyscale in libjpeg (faster), and with
    `draft` at the smallest scale (1/2, 1/4, 1/8) whose sides stay >= draft px.

    A file held in memory (`in_memory`: its length in bytes; decoding.ImageBytes, an upload) goes
    to the decoder in one piece instead of Pillow's 64 kB steps: no re-joined remainders, and
    libjpeg never suspends for data (about 1% faster: benchmarks/images.py (c)).
    The pixels are the same.
    """
    if im.format in ("JPEG", "MPO") and (im.mode == "RGB" or draft):
        im.draft("L" if im.mode == "RGB" else im.mode, (draft, draft) if draft else None)
    if isinstance(im, ImageFile.ImageFile) and in_memory > im.decodermaxblock:
        im.decodermaxblock = in_memory
    im.load()


def _load_truncated(
    data: bytes, name: str, fmt: str | None, truncated: str, err: OSError, draft: int | None
) -> Image.Image:
    """Recover a truncated JPEG by appending the end-of-image marker, or raise."""
    if truncated == "error":
        raise ImageLoadError(name, f"truncated image file ({err})") from None
    if fmt not in ("JPEG", "MPO"):
        raise ImageLoadError(name, f"truncated {fmt} file; only truncated JPEGs can be partly loaded")
    try:
        im = Image.open(io.BytesIO(data + _EOI), formats=("JPEG",))
        _load(im, draft, len(data) + len(_EOI))
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
    if im.format in ("JPEG", "MPO") and "exif" not in im.info and "xmp" not in im.info:
        return 1  # a JPEG keeps its orientation in EXIF or XMP only
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


def _register_heif(name: str) -> None:
    """Register pillow-heif's opener on first use; a clear error when it is not installed."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        raise ReaderMissingError(
            name, "HEIC/HEIF image; install the optional reader with `pip install chextrain[heic]`"
        ) from None
    register_heif_opener()
