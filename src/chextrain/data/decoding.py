"""What every image decoder shares: the errors it raises, reading a file (whole, or streamed when
large), the size guards, high depths -> uint8, and naming a file's format from its first bytes.

data/images.py (PIL formats) and data/dicom.py (DICOM) both decode to uint8 H x W grey and
both refuse files the same way. What they have in common lives here, so images.py depends on
dicom.py and both depend on this module, never the other way round. This module imports
nothing from the package.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import IO

import numpy as np

from chextrain.errors import ChextrainError

IN_MEMORY = 32 << 20  # files up to this many bytes are read whole and decoded from memory
BIT_DEPTHS: tuple[int, ...] = (8, 10, 12, 14, 16, 24, 32)  # the depths integer data is scaled by
HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
)


class ImageLoadError(ChextrainError):
    """An image could not be opened; `name` is the file, `reason` says why.

    Re-exported by chextrain.data.images, where callers import it from.
    """

    def __init__(self, name: str, reason: str | None = None) -> None:
        # One-argument form keeps the error re-raisable by torch DataLoader workers.
        super().__init__(name if reason is None else f"{name}: {reason}")
        self.name = name
        self.reason = reason if reason is not None else name


class ImageTooLargeError(ImageLoadError):
    """The image is over the pixel limit (max_pixels) or its file over the byte limit that follows."""


class ReaderMissingError(ImageLoadError):
    """The image needs an optional reader that is not installed (pillow-heif for HEIC/HEIF)."""


def check_pixel_count(name: str, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image of `size` (width, height) with no pixels or more than `max_pixels`.

    Called with the size from the header, before any pixel is decoded, so a decompression bomb
    costs nothing.

    Raises:
        ImageLoadError: naming the file `name` and its size, for an image with no pixels.
        ImageTooLargeError: naming the file `name`, its size and the limit.
    """
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageLoadError(name, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLargeError(
            name,
            f"too many pixels: {w}x{h} = {w * h:,} > max_pixels={max_pixels:,} "
            "(refused as a possible decompression bomb; raise max_pixels to read it)",
        )


def check_file_size(name: str, size: int, max_pixels: int) -> None:
    """Refuse an empty file, or one larger than any uncompressed image of `max_pixels` could be.

    Raises:
        ImageLoadError: naming the file `name`, for an empty one.
        ImageTooLargeError: naming the file `name`, its size and the limit.
    """
    if size == 0:
        raise ImageLoadError(name, "empty file (0 bytes)")
    limit = 8 * max_pixels + (1 << 20)  # more than any uncompressed image of max_pixels holds
    if size > limit:
        raise ImageTooLargeError(name, f"file too large ({size:,} bytes) for max_pixels={max_pixels:,}")


def os_error(name: str, err: OSError) -> ImageLoadError:
    """The OS's error while reading `name` as an ImageLoadError with a plain reason."""
    if isinstance(err, FileNotFoundError):
        return ImageLoadError(name, "file not found")
    if isinstance(err, IsADirectoryError):
        return ImageLoadError(name, "is a directory, not an image file")
    if isinstance(err, PermissionError):
        return ImageLoadError(name, "permission denied")
    return ImageLoadError(name, f"cannot read the file ({err.strerror or err})")


class FileErrors:
    """`with FileErrors(name):` turns the OS's errors inside into ImageLoadError (a class, not a
    generator: it runs once per image read)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        if isinstance(err, OSError):
            raise os_error(self.name, err) from None


class ImageBytes(FileErrors):
    """`with ImageBytes(path, max_pixels) as f:` the file's bytes to decode, the OS's errors (also
    while decoding), empty and oversized files as ImageLoadError.

    A file of up to IN_MEMORY bytes is read in one call and decoded from memory (fewer system
    calls than the decoders' many small reads); a larger one is streamed from the open file, so no
    copy of it is held in memory.
    """

    __slots__ = ("file", "path", "max_pixels")

    def __init__(self, path: str | Path, max_pixels: int) -> None:
        super().__init__(str(path))
        self.path, self.max_pixels = path, max_pixels
        self.file: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        try:
            f = open(self.path, "rb")  # a folder: IsADirectoryError
            try:
                size = os.fstat(f.fileno()).st_size
                check_file_size(self.name, size, self.max_pixels)
                if size <= IN_MEMORY:
                    with f:
                        return io.BytesIO(f.read())
            except BaseException:
                f.close()
                raise
        except OSError as e:
            raise os_error(self.name, e) from None
        self.file = f
        return f

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: object) -> None:
        if self.file is not None:
            self.file.close()
        super().__exit__(kind, err, tb)


def scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Scale a high-depth grey array to uint8 without clipping.

    Non-negative integers are divided by the smallest common bit depth that holds their
    maximum (BIT_DEPTHS), so 12-bit data stored in 16 bits uses the full range and relative
    brightness between images is kept. Floats in [0, 1] are multiplied by 255. Anything else
    (negative values, other floats) is min-max scaled.

    Raises:
        ValueError: for a dtype that holds no grey values (complex, object, strings).
    """
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        return minmax_to_uint8(a)
    if a.dtype.kind not in "iub":
        raise ValueError(f"cannot scale array of dtype {a.dtype} to uint8")
    if a.size == 0:
        return a.astype(np.uint8)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        return minmax_to_uint8(a.astype(np.float64))
    bits = next((b for b in BIT_DEPTHS if hi < 2**b), 64)
    if bits == 8:
        return a.astype(np.uint8)
    return np.rint(a.astype(np.float64) * (255.0 / (2**bits - 1))).astype(np.uint8)


def minmax_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map the array's own range [min, max] to 0-255 (all zeros when the range is empty)."""
    lo, hi = float(a.min()), float(a.max())
    if not math.isfinite(hi - lo) or hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


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
    if is_heif(head):
        return "HEIF"
    if head[4:12] == b"ftypavif":
        return "AVIF"
    return None


def is_dicom(head: bytes, name: str) -> bool:
    """DICOM by its preamble, or a .dcm / .dicom file (which may lack the preamble)."""
    return head[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def is_heif(head: bytes) -> bool:
    """HEIF/HEIC by the brand of the ftyp box."""
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS
