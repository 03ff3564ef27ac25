"""DICOM decoding for chextrain.data.images: modality LUT, VOI LUT / windowing, MONOCHROME1.

pydicom is imported only when a DICOM file is met. Errors and the uint8 scaling come from
data/decoding.py; this module never imports data/images.py (which imports it).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from chextrain.data.decoding import ImageLoadError, check_pixel_count, minmax_to_uint8, scale_to_uint8


def read_dicom(fp: IO[bytes], name: str, stop_before_pixels: bool = False) -> Any:
    """Parse a DICOM file object with pydicom (a `pydicom.Dataset`); `name` is used in errors.

    `force=True` also reads files without the 128-byte preamble. `stop_before_pixels` reads the
    header only (for `image_size`).

    Raises:
        ImageLoadError: the file is not DICOM pydicom can parse.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(fp, force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, AttributeError) as e:
        raise ImageLoadError(name, f"corrupt DICOM file ({e})") from None


def _dicom_luts() -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    """apply_modality_lut and apply_voi_lut from wherever this pydicom version keeps them."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def decode_dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """DICOM -> uint8: modality LUT, VOI LUT / window, MONOCHROME1 inverted. First frame only."""
    ds = read_dicom(io.BytesIO(data), name)
    if "PixelData" not in ds:
        raise ImageLoadError(name, "DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise ImageLoadError(name, "DICOM file has no valid Rows/Columns") from None
    check_pixel_count(name, (cols, rows), max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types; say which transfer syntax failed
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise ImageLoadError(
            name, f"cannot decode DICOM pixel data ({syntax}: {e}); compressed DICOMs need pylibjpeg or gdcm"
        ) from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    if arr.ndim == 3:  # colour (pydicom returns RGB): luma like PIL's convert("L")
        rgb = scale_to_uint8(arr).astype(np.float32)
        return np.rint(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    try:
        out = _dicom_grey(arr, ds)
    except (ValueError, NotImplementedError, AttributeError, TypeError, KeyError) as e:
        raise ImageLoadError(name, f"invalid DICOM LUT / window ({e})") from None
    return 255 - out if photometric == "MONOCHROME1" else out


def _dicom_grey(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the modality and VOI transforms, then map the VOI output range to 0-255."""
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    values = apply_modality_lut(arr, ds)
    if values.dtype.kind == "f" and np.all(values == np.round(values)) and np.abs(values).max() < 2**62:
        values = values.astype(np.int64)  # VOI LUT sequences index with integers
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_window or ds.get("VOILUTSequence")):
        return scale_to_uint8(values) if values.min() >= 0 else minmax_to_uint8(values.astype(np.float64))
    out = apply_voi_lut(values, ds).astype(np.float64)
    # Map the VOI output range (not the image's own min/max) to 0-255: the range is what the
    # transform gives over its whole input domain.
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        entries, first = int(lut[0].LUTDescriptor[0]) or 2**16, int(lut[0].LUTDescriptor[1])
        domain = np.arange(first, first + entries, dtype=np.int64)
    else:
        domain = np.array([-1e30, 1e30])
    ends = apply_voi_lut(domain, ds)
    lo, hi = float(np.min(ends)), float(np.max(ends))
    if hi <= lo:
        return minmax_to_uint8(out)
    return np.rint(np.clip((out - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
