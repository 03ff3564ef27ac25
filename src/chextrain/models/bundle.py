"""Bundles: `model.safetensors` + `model.json` + `README.md`, the one format chextrain saves and serves.

model.json holds the architecture (backbone, heads, router), the pathologies in order, image size,
preprocessing, thresholds per head, domain_heads, the stage that made the model and its metrics,
and, when fitted, a temperature per head (`temperature`: {head: T}, evaluation.calibration; the
thresholds stay on the raw probabilities and inference maps them with T; no key means T = 1);
the OOD calibration's arrays (per feature group: mean, axes, variances) are float64 tensors of
model.safetensors named `ood.groups.<i>.<array>`, so model.json stays a few KB. README.md is the
model card (models/card.py). Loading checks the files (models/meta.py), reads weights with
safetensors only and puts the OOD arrays back into meta["ood"] as lists, as they were written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chextrain.fileio import atomic_write, atomic_write_text, json_text
from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.card import model_card
from chextrain.models.meta import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CARD_FILE,
    META_FILE,
    OOD_ARRAYS,
    OOD_PREFIX,
    WEIGHTS_FILE,
    WeightsError,
    bundle_meta_path,
    meta_path_of,
    read_bundle_meta,
    read_safetensors_header,
)
from chextrain.models.net import CXRNet

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "CARD_FILE",
    "IMAGENET_PREPROCESSING",
    "META_FILE",
    "WEIGHTS_FILE",
    "WeightsError",
    "bundle_meta_path",
    "load_bundle",
    "read_bundle_meta",
    "save_bundle",
    "write_model_card",
]
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "name": "imagenet",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


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


def _temperature(model: CXRNet, given: Any) -> dict[str, float]:
    """{head: T > 0} for heads of the model (evaluation.calibration.head_temperatures)."""
    if not isinstance(given, Mapping):
        raise WeightsError(f"bundle meta temperature must be {{head: number > 0}}; got {given!r}")
    out = {}
    for head, t in given.items():
        if head not in model.head_names:
            raise WeightsError(
                f"bundle meta temperature names head {head!r}; the model has heads {model.head_names}"
            )
        ok = (
            isinstance(t, int | float | np.floating)
            and not isinstance(t, bool)
            and math.isfinite(t)
            and t > 0
        )
        if not ok:
            raise WeightsError(f"bundle meta temperature[{head!r}] = {t!r}; expected a finite number > 0")
        out[str(head)] = float(t)
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
    """Write model.safetensors, model.json and the model card README.md (each atomically); return out_dir.

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
    if "temperature" in meta:
        document["temperature"] = _temperature(model, meta["temperature"])
    arrays: dict[str, torch.Tensor] = {}
    if "ood" in document:
        document["ood"], arrays = _split_ood(document["ood"])
    text = json_text(document, newline=True)  # before any file is written: a bad meta writes nothing
    card = model_card(document)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update(arrays)
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(out_dir / META_FILE, text)
    atomic_write_text(out_dir / CARD_FILE, card)
    return out_dir


def _split_ood(ood: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(meta["ood"] without its arrays, {safetensors name: float64 tensor}) of an OOD calibration."""
    if not isinstance(ood, Mapping) or not isinstance(ood.get("groups"), list):
        return ood, {}
    groups, arrays = [], {}
    for i, group in enumerate(ood["groups"]):
        kept = {k: v for k, v in group.items() if k not in OOD_ARRAYS}
        for name in OOD_ARRAYS:
            if name in group:
                arrays[f"{OOD_PREFIX}{i}.{name}"] = torch.tensor(np.asarray(group[name], dtype=np.float64))
        groups.append(kept | {"tensors": f"{OOD_PREFIX}{i}"})
    return {**ood, "groups": groups}, arrays


def _restore_ood(ood: Any, arrays: Mapping[str, torch.Tensor], weights: Path) -> Any:
    """meta["ood"] with each group's arrays read back from the safetensors tensors (as lists)."""
    if not isinstance(ood, Mapping) or not isinstance(ood.get("groups"), list):
        return ood
    groups = []
    for i, group in enumerate(ood["groups"]):
        group = {k: v for k, v in group.items() if k != "tensors"}
        for name in OOD_ARRAYS:
            if name in group:  # a bundle written with the arrays in model.json
                continue
            key = f"{OOD_PREFIX}{i}.{name}"
            if key not in arrays:
                raise WeightsError(
                    f"bundle {weights} lacks the OOD tensor {key} that its {META_FILE} refers to"
                )
            group[name] = arrays[key].tolist()
        groups.append(group)
    return {**ood, "groups": groups}


def write_model_card(out_dir: Path, evaluation: list[dict[str, Any]] | None = None) -> Path:
    """(Re)write out_dir/README.md from its model.json, with bootstrap CIs when `evaluation` gives them."""
    path = Path(out_dir) / CARD_FILE
    return atomic_write_text(path, model_card(read_bundle_meta(Path(out_dir) / META_FILE), evaluation))


def load_bundle(path: Path) -> tuple[CXRNet, dict[str, Any]]:
    """Rebuild a CXRNet from a bundle (folder, model.json or model.safetensors); eval mode.

    Loads the safetensors strictly; returns (model, the parsed model.json with meta["ood"]'s
    arrays read back from the weights file).
    """
    meta_path = meta_path_of(Path(path))
    meta = read_bundle_meta(meta_path)
    weights = meta_path.parent / WEIGHTS_FILE
    read_safetensors_header(weights)  # a truncated or foreign file: an error naming it
    try:
        state = load_file(str(weights))  # safetensors: never a pickle
    except Exception as err:  # safetensors raises its own error types
        raise WeightsError(f"bundle {weights} is not a readable safetensors file: {err}") from None
    arrays = {k: state.pop(k) for k in [k for k in state if k.startswith(OOD_PREFIX)]}
    if "ood" in meta:
        meta["ood"] = _restore_ood(meta["ood"], arrays, weights)
    arch = meta["architecture"]
    try:
        model = CXRNet(
            arch["backbone"],
            heads=arch["heads"],
            router=bool(arch["router"]),
            num_classes=int(arch.get("num_classes", len(PATHOLOGIES))),
        )
    except (ValueError, TypeError) as err:
        raise WeightsError(f"bundle {meta_path}: architecture {arch} cannot be built: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"bundle {weights} does not match its {META_FILE}: {str(err)[:500]}") from None
    return model.eval(), meta
