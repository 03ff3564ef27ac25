"""Writing files so that a reader never sees half of one: atomic replace, and strict JSON.

Every file the package writes for later reading (bundles, checkpoints, metrics, predictions,
study state, reports) goes through `atomic_write`: the content goes to a temporary file in the
same folder (so the final rename never crosses file systems), is flushed to disk (fsync), and then
replaces the target in one `os.replace`. A failure or a kill leaves the old file (or none) and no
temporary file behind. This module imports nothing from the package.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temporary file beside it, then it replaces `path`.

    Args:
        path: the target file; its folder must exist.
        write: called with the temporary file's path; writes the whole content there (e.g.
            `lambda tmp: frame.to_parquet(tmp)`).

    Returns the target path. On any exception the temporary file is removed and the target is
    left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the content reaches the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text (UTF-8) to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def jsonable(value: Any) -> Any:
    """Strict-JSON copy: NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def json_text(data: Any, *, newline: bool = False) -> str:
    """Strict JSON (indent 2, non-finite -> null, other objects by str()), optionally with a final newline."""
    text = json.dumps(jsonable(data), indent=2, default=str, allow_nan=False)
    return text + "\n" if newline else text


def write_json(path: str | Path, data: Any, *, newline: bool = False) -> Path:
    """Write `json_text(data)` to `path` atomically."""
    return atomic_write_text(path, json_text(data, newline=newline))
