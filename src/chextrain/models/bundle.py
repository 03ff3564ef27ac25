"""Bundles: `model.safetensors` + `model.json`, the one format chextrain saves and serves.

model.json holds the architecture (backbone, heads, router), the pathologies in order, image size,
preprocessing, thresholds per head, domain_heads, the stage that made the model and its metrics;
loading checks the pathologies against the package's and reads weights with safetensors only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

from chextrain.fileio import atomic_write, atomic_write_text, json_text
from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.net import CXRNet

BUNDLE_FORMAT = "chextrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "name": "imagenet",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


class WeightsError(ValueError):
    """A checkpoint or bundle that cannot be used as asked; the message names the file."""


def bundle_meta_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / META_FILE if (path / META_FILE).is_file() else None
    if path.name == META_FILE:
        return path
    if path.name == WEIGHTS_FILE and (path.parent / META_FILE).is_file():
        return path.parent / META_FILE
    return None


def read_bundle_meta(meta_path: Path) -> dict[str, Any]:
    """Read and check a bundle's model.json (format, version, pathologies, architecture)."""
    if not meta_path.is_file():
        raise WeightsError(f"bundle file {meta_path} is missing")
    if not (meta_path.parent / WEIGHTS_FILE).is_file():
        raise WeightsError(f"bundle file {meta_path.parent / WEIGHTS_FILE} is missing (next to {meta_path})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"bundle file {meta_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise WeightsError(f"{meta_path} is not a chextrain bundle (format {BUNDLE_FORMAT!r} expected)")
    if int(meta.get("format_version", 0)) > BUNDLE_VERSION:
        raise WeightsError(
            f"bundle {meta_path} has format_version {meta.get('format_version')}; this "
            f"chextrain reads up to {BUNDLE_VERSION}: upgrade chextrain"
        )
    if meta.get("pathologies") != list(PATHOLOGIES):
        raise WeightsError(
            f"bundle {meta_path} has pathologies {meta.get('pathologies')}; this chextrain "
            f"expects {list(PATHOLOGIES)} in that order"
        )
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not {"backbone", "heads", "router"} <= set(arch):
        raise WeightsError(f"bundle {meta_path} lacks architecture.backbone/heads/router")
    return meta


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types: numpy scalars/arrays and Paths converted, NaN/inf -> null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return [_jsonable(v, f"{where}[]") for v in items]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | bool):
        return value
    raise WeightsError(f"bundle meta {where} = {value!r} is not JSON-serialisable")


def _thresholds(model: CXRNet, given: Any) -> dict[str, dict[str, float]]:
    out = {h: dict.fromkeys(SLUGS, 0.5) for h in model.head_names}
    for head, per in (given or {}).items():
        if head not in out:
            raise WeightsError(
                f"bundle meta thresholds names head {head!r}; the model has heads {model.head_names}"
            )
        bad = set(per) - set(SLUGS)
        if bad:
            raise WeightsError(
                f"bundle meta thresholds[{head!r}] has unknown pathologies {sorted(bad)}; "
                f"expected slugs {list(SLUGS)}"
            )
        out[head].update({k: float(v) for k, v in per.items()})
    return out


def _domain_heads(model: CXRNet, given: Any) -> dict[str, str]:
    names = model.head_names
    if given is None:
        if len(names) == 1:
            given = {"digital": names[0], "photo": names[0]}
        elif {"digital", "photo"} <= set(names):
            given = {"digital": "digital", "photo": "photo"}
        else:
            raise WeightsError(f"bundle meta needs domain_heads (digital/photo -> head) for heads {names}")
    if set(given) != {"digital", "photo"} or any(h not in names for h in given.values()):
        raise WeightsError(f"bundle meta domain_heads {given} must map digital and photo to heads in {names}")
    return dict(given)


def save_bundle(model: CXRNet, out_dir: Path, meta: dict[str, Any]) -> Path:
    """Write model.safetensors and model.json (each atomically) into out_dir; return out_dir.

    meta may set image_size (default 320, the paper's), preprocessing (default imagenet),
    thresholds {head: {slug: t}} (default 0.5), domain_heads {digital: head, photo: head}
    (default: the only head, or heads named digital/photo), stage, metrics, and anything else
    JSON-serialisable, which is kept as given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {
        k: v
        for k, v in meta.items()
        if k not in {"image_size", "preprocessing", "thresholds", "domain_heads", "stage", "metrics"}
    }
    preprocessing = meta.get("preprocessing", "imagenet")
    if isinstance(preprocessing, str):
        named = preprocessing == "imagenet"
        preprocessing = dict(IMAGENET_PREPROCESSING) if named else {"name": preprocessing}
    document = {
        **_jsonable(extra, "meta"),
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "architecture": {
            "backbone": model.backbone_name,
            "heads": list(model.head_names),
            "router": model.router is not None,
            "num_features": model.num_features,
            "num_classes": model.num_classes,
        },
        "pathologies": list(PATHOLOGIES),
        "slugs": list(SLUGS),
        "image_size": int(meta.get("image_size", 320)),
        "preprocessing": _jsonable(preprocessing, "meta.preprocessing"),
        "thresholds": _thresholds(model, meta.get("thresholds")),
        "domain_heads": _domain_heads(model, meta.get("domain_heads")),
        "stage": _jsonable(meta.get("stage"), "meta.stage"),
        "metrics": _jsonable(meta.get("metrics", {}), "meta.metrics"),
    }
    text = json_text(document, newline=True)  # before any file is written: a bad meta writes nothing
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / META_FILE, text)
    return out_dir


def load_bundle(path: Path) -> tuple[CXRNet, dict[str, Any]]:
    """Rebuild a CXRNet from a bundle (folder, model.json or model.safetensors); eval mode.

    Loads the safetensors strictly; returns (model, the parsed model.json).
    """
    path = Path(path)
    meta_path = path / META_FILE if path.is_dir() else path.parent / META_FILE
    if not path.exists():
        raise WeightsError(f"bundle path {path} does not exist")
    meta = read_bundle_meta(meta_path)
    arch = meta["architecture"]
    model = CXRNet(
        arch["backbone"],
        heads=arch["heads"],
        router=bool(arch["router"]),
        num_classes=int(arch.get("num_classes", len(PATHOLOGIES))),
    )
    state = load_file(str(meta_path.parent / WEIGHTS_FILE))  # safetensors: never a pickle
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"bundle {meta_path.parent / WEIGHTS_FILE} does not match its {META_FILE}: {str(err)[:500]}"
        ) from None
    return model.eval(), meta
