"""Initialise a CXRNet (imagenet / random / checkpoint file / bundle) and save or load bundles.

Nothing here unpickles arbitrary objects: safetensors, or torch.load(weights_only=True).
Foreign checkpoints (torchvision, CheXpert-style wrappers, CovidPrognosis and MoCo-CXR MoCo
files) are matched to the encoder by finding the key prefix under which its parameter names
appear; the key encoder, queue and projection/classifier are dropped and reported.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision.models as tvm
from safetensors.torch import load_file, save_file

from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.net import CXRNet

BUNDLE_FORMAT = "chextrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "name": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# The input published MoCo checkpoints were pre-trained on, by format (a stage uses it unless it sets
# its own `preprocess` / `image_size`): CovidPrognosis histogram-equalised 0-255 images at 224 px;
# MoCo-CXR x/255 normalised by its CheXpert mean/std (aihc_utils/image_transform.py) at 320 px.
EXPECTED_INPUT: dict[str, dict[str, Any]] = {
    "covidprognosis-moco": {"preprocessing": {"name": "histeq"}, "image_size": 224},
    "moco-cxr": {"preprocessing": {"name": "meanstd", "mean": [0.5020] * 3, "std": [0.085585] * 3},
                 "image_size": 320},
}
IMAGENET_WEIGHTS: dict[str, str] = {
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
}
MIN_MATCHED_FRACTION = 0.5  # below this share of encoder keys found, the backbone is wrong
# Old torchvision DenseNet names ("norm.1") -> current ones ("norm1"), as torchvision does.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_KEY_ENCODER = ("encoder_k", "momentum", "teacher")
_HEAD_PARTS = ("classifier", "fc", "head", "heads", "projection", "projector", "router")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


class WeightsError(ValueError):
    """A checkpoint or bundle that cannot be used as asked; the message names the file."""


@dataclass
class InitReport:
    """What `init_model` loaded: keys are the checkpoint's names unless said otherwise."""

    init: str
    kind: str  # imagenet | random | file | bundle
    source: str = ""  # the file read
    format: str = ""  # torchvision | prefixed | chextrain | covidprognosis-moco | moco-cxr | moco
    prefix: str = ""  # stripped from the checkpoint's encoder keys
    loaded: list[str] = field(default_factory=list)  # encoder keys (model names) set
    missing: list[str] = field(default_factory=list)  # encoder keys (model names) left as they were
    unexpected: list[str] = field(default_factory=list)  # under the prefix, unused and unrecognised
    dropped: list[str] = field(default_factory=list)  # key encoder, queue, projection, classifier, ...
    heads_loaded: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] | None = None  # what the weights expect, when known
    image_size: int | None = None  # the input side the weights were trained at, when known
    meta: dict[str, Any] | None = None  # a bundle's model.json

    def summary(self) -> str:
        """One line for logs."""
        where = f" from {self.source}" if self.source else ""
        return (f"init {self.init!r} ({self.kind}{', ' + self.format if self.format else ''}){where}: "
                f"{len(self.loaded)} encoder tensors loaded, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped, heads {self.heads_loaded}")


def imagenet_checkpoint_path(backbone: str, hub_dir: Path | None = None) -> tuple[Path, str]:
    """(path in the torch hub cache, download url) of a backbone's torchvision ImageNet weights."""
    if backbone not in IMAGENET_WEIGHTS:
        raise WeightsError(f"no ImageNet weights for backbone {backbone!r}; available for "
                           f"{sorted(IMAGENET_WEIGHTS)} (use init: random or init: FILE)")
    url = tvm.get_weight(IMAGENET_WEIGHTS[backbone]).url
    root = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    return root / "checkpoints" / os.path.basename(urlparse(url).path), url


def read_checkpoint(path: Path) -> Any:
    """Read a .safetensors file, or any other file with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"checkpoint {path} is not a readable safetensors file: {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" not in text.lower() and "weights_only" not in text:
            raise WeightsError(f"checkpoint {path} is not a torch or safetensors file: {text[:200]}") \
                from None
        found = re.search(r"Unsupported (?:global|operand)[^.,]*?(?= was not|$)", text, re.MULTILINE)
        raise WeightsError(
            f"refusing to unpickle {path}: it holds Python objects beyond tensors "
            f"({found.group(0)[:200] if found else 'not allowed by weights_only=True'}). Loading it could "
            "run arbitrary code. If you trust the file, convert its state dict to safetensors on a "
            "trusted machine (torch.load(..., weights_only=False) then safetensors.torch.save_file) and "
            "pass that file.") from None
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise WeightsError(f"checkpoint {path} is not a torch or safetensors file: {err}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint payload (plain, or under 'state_dict' etc.)."""
    if isinstance(payload, Mapping):
        if _is_state_dict(payload):
            return dict(payload)
        for key in _STATE_DICT_KEYS:
            inner = payload.get(key)
            if isinstance(inner, Mapping):
                tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
                if tensors:
                    return tensors
        tensors = {k: v for k, v in payload.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    top = list(payload)[:8] if isinstance(payload, Mapping) else ""
    raise WeightsError(f"checkpoint {source} holds no state dict of tensors (top level: "
                       f"{type(payload).__name__} {top})")


def _guess_backbone(keys: list[str]) -> str:
    text = "\n".join(keys)
    if "denseblock" in text:
        return "a DenseNet"
    if "layer1.0.conv3" in text:
        return "a ResNet-50-like (bottleneck) ResNet"
    if "layer1.0.conv2" in text:
        return "a ResNet-18/34-like (basic block) ResNet"
    if re.search(r"features\.\d+\.\d+\.block", text):
        return "an EfficientNet"
    if "features.block1" in text:
        return "the tiny test backbone"
    return "an unrecognised model"


def _new_densenet_key(key: str) -> str:
    m = _OLD_DENSENET_KEY.match(key)
    return m.group(1) + m.group(2) if m else key


def _best_prefix(keys: list[str], expected: set[str]) -> tuple[str, int]:
    """The prefix p maximising #{e in expected: p + e in keys}; ties prefer query over key encoder."""
    counts: dict[str, int] = {}
    for k in keys:
        for i in [0] + [j + 1 for j, c in enumerate(k) if c == "."]:
            if k[i:] in expected:
                counts[k[:i]] = counts.get(k[:i], 0) + 1
    if not counts:
        return "", 0
    best = max(counts, key=lambda p: (counts[p], not any(t in p for t in _KEY_ENCODER), -len(p)))
    return best, counts[best]


def _format_name(prefix: str, payload: Any) -> str:
    if prefix.endswith("encoder.") and "encoder_q" not in prefix:
        return "chextrain"
    if "encoder_q." in prefix:
        if isinstance(payload, Mapping) and "arch" in payload and prefix.startswith("module."):
            return "moco-cxr"
        return "covidprognosis-moco" if prefix.startswith("model.encoder_q.") else "moco"
    return "torchvision" if prefix == "" else "prefixed"


def load_encoder_state(model: CXRNet, state: Mapping[str, torch.Tensor], report: InitReport, *,
                       load_heads: bool = False, payload: Any = None) -> InitReport:
    """Load the encoder (and, if asked, same-named heads/router of a chextrain model) from `state`.

    Fills `report` with the prefix, format, loaded/missing/unexpected/dropped keys; raises
    WeightsError for a backbone mismatch (few keys found, or any shape differing).
    """
    state = {_new_densenet_key(k): v for k, v in state.items()}
    target = model.encoder.state_dict()
    weights = {k for k in target if not k.endswith("num_batches_tracked")}
    keys = list(state)
    prefix, found = _best_prefix(keys, weights)
    where = report.source or report.init
    if found < MIN_MATCHED_FRACTION * len(weights):
        raise WeightsError(
            f"backbone mismatch: {where} looks like {_guess_backbone(keys)}, but the model is "
            f"{model.backbone_name!r} (only {found} of its {len(weights)} encoder tensors found)")
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in target}
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
           for k, v in enc.items() if v.shape != target[k].shape]
    if bad:
        raise WeightsError(f"backbone mismatch: {where} has encoder tensors of other shapes than "
                           f"{model.backbone_name!r}: {bad[:5]}")
    model.encoder.load_state_dict(enc, strict=False)
    report.prefix, report.format = prefix, _format_name(prefix, payload)
    report.loaded = sorted(f"encoder.{k}" for k in enc)
    report.missing = sorted(f"encoder.{k}" for k in weights if k not in enc)
    used = {prefix + k for k in enc}
    if load_heads and report.format == "chextrain":
        used |= _load_heads(model, state, prefix[: -len("encoder.")], report)
    for k in keys:
        if k in used:
            continue
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is None or rest.split(".")[0] in _HEAD_PARTS or rest.endswith("num_batches_tracked"):
            report.dropped.append(k)
        else:
            report.unexpected.append(k)
    report.dropped.sort()
    report.unexpected.sort()
    return report


def _load_heads(model: CXRNet, state: Mapping[str, torch.Tensor], base: str, report: InitReport) -> set[str]:
    """Copy heads (and the router) whose names and shapes match; return the checkpoint keys used.

    A head the checkpoint lacks starts from the checkpoint's head when it has exactly one (e.g.
    per-domain heads grown from a mixed model's shared head), reported as `new<-old`.
    """
    used: set[str] = set()
    prefix = f"{base}heads."
    sources = sorted({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})
    parts = {f"heads.{h}": model.heads[h] for h in model.head_names}
    if model.router is not None:
        parts["router"] = model.router
    for name, module in parts.items():
        source = name
        if name.startswith("heads.") and name[len("heads."):] not in sources and len(sources) == 1:
            source = f"heads.{sources[0]}"
        sd = {k: state.get(f"{base}{source}.{k}") for k in module.state_dict()}
        if all(v is not None and v.shape == module.state_dict()[k].shape for k, v in sd.items()):
            module.load_state_dict(sd)
            used |= {f"{base}{source}.{k}" for k in sd}
            label = name.removeprefix("heads.")
            report.heads_loaded.append(label if source == name else f"{label}<-{source.removeprefix('heads.')}")
    return used


def init_model(model: CXRNet, init: str | Path, *, hub_dir: Path | None = None,
               load_heads: bool = False) -> InitReport:
    """Initialise `model` in place from `init` and report what was loaded.

    init: `imagenet` (torchvision weights from the torch hub cache, never downloaded), `random`
    (leave as built), a state-dict file (.safetensors, or .pt/.pth/.ckpt read with
    weights_only=True), or a chextrain bundle (a folder holding model.json + model.safetensors,
    or either file). Only the encoder is loaded unless `load_heads`, which also copies the
    heads/router of a chextrain checkpoint whose names and shapes match.
    """
    text = str(init)
    if text == "random":
        return InitReport(init=text, kind="random")
    if text == "imagenet":
        path, url = imagenet_checkpoint_path(model.backbone_name, hub_dir)
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights for {model.backbone_name!r} are not in the torch hub cache: expected "
                f"the file {path} (downloaded from {url}). chextrain never downloads: copy that file to "
                "exactly this path, or use `init: FILE` with a local checkpoint, or `init: random`.")
        report = InitReport(init=text, kind="imagenet", source=str(path),
                            preprocessing=dict(IMAGENET_PREPROCESSING))
        return load_encoder_state(model, extract_state_dict(read_checkpoint(path), str(path)), report)
    if text.startswith("stage:"):
        raise WeightsError(f"init {text!r} names another stage's output: the study runner resolves it to "
                           "that stage's folder; pass the folder (or its model.json) here")
    path = Path(init)
    if not path.exists():
        raise WeightsError(f"init {text!r} is not imagenet, random, stage:NAME, or an existing file or "
                           "folder (a state dict, a chextrain run folder or bundle)")
    meta_path = _bundle_meta_path(path)
    if meta_path is not None:
        return _init_from_bundle(model, meta_path, text, load_heads)
    if path.is_dir():
        raise WeightsError(f"init folder {path} holds no {META_FILE} + {WEIGHTS_FILE} bundle")
    payload = read_checkpoint(path)
    report = InitReport(init=text, kind="file", source=str(path))
    report = load_encoder_state(model, extract_state_dict(payload, str(path)), report,
                                load_heads=load_heads, payload=payload)
    expected = EXPECTED_INPUT.get(report.format, {})
    report.preprocessing, report.image_size = expected.get("preprocessing"), expected.get("image_size")
    return report


def expected_input(init: str | Path) -> dict[str, Any]:
    """What the weights at `init` were trained on: {"preprocessing": {...}, "image_size": S}, keys known.

    imagenet: ImageNet's normalisation; a chextrain bundle (our MoCo output included): its
    model.json; a CovidPrognosis or MoCo-CXR file: EXPECTED_INPUT of its format; anything else
    (random, torchvision or unrecognised files, paths that do not exist): {}. Loads no weights.
    """
    text = str(init)
    if text == "imagenet":
        return {"preprocessing": dict(IMAGENET_PREPROCESSING)}
    path = Path(init)
    if text == "random" or text.startswith("stage:") or not path.exists():
        return {}
    meta_path = _bundle_meta_path(path)
    if meta_path is not None:
        meta = read_bundle_meta(meta_path)
        return {k: meta[k] for k in ("preprocessing", "image_size") if meta.get(k) is not None}
    if path.is_dir():
        return {}
    payload = read_checkpoint(path)
    keys = extract_state_dict(payload, str(path))
    prefix = next((k[: k.index("encoder_q.") + len("encoder_q.")] for k in keys if "encoder_q." in k), "")
    return json.loads(json.dumps(EXPECTED_INPUT.get(_format_name(prefix, payload), {})))


def _bundle_meta_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / META_FILE if (path / META_FILE).is_file() else None
    if path.name == META_FILE:
        return path
    if path.name == WEIGHTS_FILE and (path.parent / META_FILE).is_file():
        return path.parent / META_FILE
    return None


def _init_from_bundle(model: CXRNet, meta_path: Path, init: str, load_heads: bool) -> InitReport:
    meta = read_bundle_meta(meta_path)
    arch = meta["architecture"]
    if arch["backbone"] != model.backbone_name:
        raise WeightsError(f"backbone mismatch: bundle {meta_path} holds a {arch['backbone']!r} model, "
                           f"but the model is {model.backbone_name!r}")
    weights_path = meta_path.parent / WEIGHTS_FILE
    report = InitReport(init=init, kind="bundle", source=str(weights_path), meta=meta,
                        preprocessing=meta.get("preprocessing"), image_size=meta.get("image_size"))
    # A MoCo stage's bundle holds its encoder and untrained heads: never copy those heads.
    load_heads = load_heads and meta.get("objective") != "moco"
    return load_encoder_state(model, read_checkpoint(weights_path), report, load_heads=load_heads)


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
        raise WeightsError(f"bundle {meta_path} has format_version {meta.get('format_version')}; this "
                           f"chextrain reads up to {BUNDLE_VERSION}: upgrade chextrain")
    if meta.get("pathologies") != list(PATHOLOGIES):
        raise WeightsError(f"bundle {meta_path} has pathologies {meta.get('pathologies')}; this chextrain "
                           f"expects {list(PATHOLOGIES)} in that order")
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
            raise WeightsError(f"bundle meta thresholds names head {head!r}; "
                               f"the model has heads {model.head_names}")
        bad = set(per) - set(SLUGS)
        if bad:
            raise WeightsError(f"bundle meta thresholds[{head!r}] has unknown pathologies {sorted(bad)}; "
                               f"expected slugs {list(SLUGS)}")
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
    extra = {k: v for k, v in meta.items() if k not in {"image_size", "preprocessing", "thresholds",
                                                         "domain_heads", "stage", "metrics"}}
    preprocessing = meta.get("preprocessing", "imagenet")
    if isinstance(preprocessing, str):
        named = preprocessing == "imagenet"
        preprocessing = dict(IMAGENET_PREPROCESSING) if named else {"name": preprocessing}
    document = {
        **_jsonable(extra, "meta"),
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "architecture": {"backbone": model.backbone_name, "heads": list(model.head_names),
                         "router": model.router is not None, "num_features": model.num_features,
                         "num_classes": model.num_classes},
        "pathologies": list(PATHOLOGIES),
        "slugs": list(SLUGS),
        "image_size": int(meta.get("image_size", 320)),
        "preprocessing": _jsonable(preprocessing, "meta.preprocessing"),
        "thresholds": _thresholds(model, meta.get("thresholds")),
        "domain_heads": _domain_heads(model, meta.get("domain_heads")),
        "stage": _jsonable(meta.get("stage"), "meta.stage"),
        "metrics": _jsonable(meta.get("metrics", {}), "meta.metrics"),
    }
    text = json.dumps(document, indent=2, allow_nan=False)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(out_dir / META_FILE, lambda tmp: Path(tmp).write_text(text + "\n"))
    return out_dir


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    model = CXRNet(arch["backbone"], heads=arch["heads"], router=bool(arch["router"]),
                   num_classes=int(arch.get("num_classes", len(PATHOLOGIES))))
    state = read_checkpoint(meta_path.parent / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"bundle {meta_path.parent / WEIGHTS_FILE} does not match its {META_FILE}: "
                           f"{str(err)[:500]}") from None
    return model.eval(), meta
