"""A bundle's files read and checked without torch: model.json and the safetensors header.

`chextrain info` and the command line's early checks need to know whether a bundle is usable
before anything heavy is imported; models/bundle.py uses the same checks before it builds the
model. Every problem is a WeightsError naming the file and what was expected. This module imports
the standard library and chextrain.errors / chextrain.labels only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chextrain.errors import ChextrainError
from chextrain.labels import PATHOLOGIES, SLUGS

BUNDLE_FORMAT = "chextrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE, META_FILE, CARD_FILE = "model.safetensors", "model.json", "README.md"
OOD_PREFIX = "ood.groups."  # safetensors keys of the OOD calibration arrays: ood.groups.<i>.<array>
OOD_ARRAYS: tuple[str, ...] = ("mean", "axes", "variances")
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class WeightsError(ChextrainError):
    """A checkpoint or bundle that cannot be used as asked; the message names the file."""


def bundle_meta_path(path: Path) -> Path | None:
    """model.json of a bundle given as its folder, its model.json or its model.safetensors; else None."""
    path = Path(path)
    if path.is_dir():
        return path / META_FILE if (path / META_FILE).is_file() else None
    if path.name == META_FILE:
        return path
    if path.name == WEIGHTS_FILE and (path.parent / META_FILE).is_file():
        return path.parent / META_FILE
    return None


def meta_path_of(path: Path) -> Path:
    """model.json of `path` (a folder or a file in it), refusing a path that does not exist."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"bundle path {path} does not exist")
    return path / META_FILE if path.is_dir() else path.parent / META_FILE


def read_bundle_meta(meta_path: Path) -> dict[str, Any]:
    """Read and check a bundle's model.json: format, version, pathologies and every key a loader uses."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise WeightsError(f"bundle file {meta_path} is missing")
    if not (meta_path.parent / WEIGHTS_FILE).is_file():
        raise WeightsError(f"bundle file {meta_path.parent / WEIGHTS_FILE} is missing (next to {meta_path})")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise WeightsError(f"cannot read bundle file {meta_path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"bundle file {meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{meta_path} is not a chextrain bundle (format {BUNDLE_FORMAT!r} expected)")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightsError(f"bundle {meta_path}: format_version {version!r} is not a whole number")
    if version > BUNDLE_VERSION:
        raise WeightsError(
            f"bundle {meta_path} has format_version {version}; this "
            f"chextrain reads up to {BUNDLE_VERSION}: upgrade chextrain"
        )
    if meta.get("pathologies") != list(PATHOLOGIES):
        raise WeightsError(
            f"bundle {meta_path} has pathologies {meta.get('pathologies')}; this chextrain "
            f"expects {list(PATHOLOGIES)} in that order"
        )
    problems = _problems(meta)
    if problems:
        raise WeightsError(f"bundle {meta_path}: " + "; ".join(problems))
    return meta


def _problems(meta: Mapping[str, Any]) -> list[str]:
    """What is missing or of the wrong type among the keys the loaders read ("key: expected ...")."""
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not {"backbone", "heads", "router"} <= set(arch):
        return ["lacks architecture.backbone/heads/router"]
    problems = []
    heads = arch["heads"]
    if not isinstance(arch["backbone"], str):
        problems.append(f"architecture.backbone: expected a name, got {arch['backbone']!r}")
    if not (isinstance(heads, list) and heads and all(isinstance(h, str) for h in heads)):
        problems.append(f"architecture.heads: expected a list of head names, got {heads!r}")
        heads = []
    if not isinstance(arch["router"], bool):
        problems.append(f"architecture.router: expected true or false, got {arch['router']!r}")
    size = meta.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 16:
        problems.append(f"image_size: expected a whole number >= 16, got {size!r}")
    prep = meta.get("preprocessing")
    if not isinstance(prep, dict) or not isinstance(prep.get("name"), str):
        problems.append(f"preprocessing: expected a mapping with a name, got {prep!r}")
    thresholds = meta.get("thresholds")
    ok = isinstance(thresholds, dict) and all(
        isinstance(per, dict) and all(isinstance(v, int | float) and s in SLUGS for s, v in per.items())
        for per in thresholds.values()
    )
    if not ok:
        problems.append("thresholds: expected {head: {pathology slug: number}}")
    domains = meta.get("domain_heads")
    if not isinstance(domains, dict) or set(domains) != {"digital", "photo"}:
        problems.append(f"domain_heads: expected {{digital: HEAD, photo: HEAD}}, got {domains!r}")
    elif heads and any(h not in heads for h in domains.values()):
        problems.append(f"domain_heads: {domains} names a head not in architecture.heads {heads}")
    temperature = meta.get("temperature", {})
    ok = isinstance(temperature, dict) and all(
        isinstance(t, int | float) and not isinstance(t, bool) and t > 0 and (not heads or h in heads)
        for h, t in temperature.items()
    )
    if not ok:
        problems.append(
            f"temperature: expected {{head in architecture.heads: number > 0}}, got {temperature!r}"
        )
    return problems  # meta["ood"] is checked against the model by ood.check_calibration


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}), checked for truncation.

    Reads only the header: a file cut short, or whose header is not safetensors', is a WeightsError.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            text = f.read(length) if 0 <= length <= _MAX_HEADER else b""
            size = f.seek(0, 2)
    except OSError as err:
        raise WeightsError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        header = json.loads(text.decode("utf-8")) if text and len(text) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch zip file or a raw pickle
            raise WeightsError(f"{path} is a torch/pickle file, not safetensors: weights are never unpickled")
        raise WeightsError(f"{path} is not a safetensors file (truncated or corrupt header)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            count = 1
            for n in entry["shape"]:
                count *= int(n)
            if stop - start != count * _DTYPE_BYTES.get(entry["dtype"], 0) and entry["dtype"] in _DTYPE_BYTES:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: tensor {name!r} has a malformed header entry") from None
        end = max(end, int(stop))
    if size < 8 + length + end:
        raise WeightsError(
            f"{path} is truncated: {size} bytes, its header describes {8 + length + end} (copy it again)"
        )
    return header


def tensor_summary(header: Mapping[str, Any]) -> dict[str, int]:
    """{"tensors", "parameters", "ood_tensors"} of a safetensors header (model weights vs OOD arrays)."""
    names = [n for n in header if n != "__metadata__"]
    model = [n for n in names if not n.startswith(OOD_PREFIX)]
    params = 0
    for n in model:
        count = 1
        for d in header[n]["shape"]:
            count *= int(d)
        params += count
    return {"tensors": len(model), "parameters": params, "ood_tensors": len(names) - len(model)}
