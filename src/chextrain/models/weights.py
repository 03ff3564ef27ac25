"""Initialise a CXRNet from imagenet / random / a checkpoint file / a bundle (weights only).

Nothing here unpickles arbitrary objects: safetensors, or torch.load(weights_only=True).
Foreign checkpoints (torchvision, CheXpert-style wrappers, CovidPrognosis and MoCo-CXR MoCo
files) are matched to the encoder by finding the key prefix under which its parameter names
appear; the key encoder, queue and projection/classifier are dropped and reported.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision.models as tvm
from safetensors.torch import load_file

from chextrain.models.bundle import (
    IMAGENET_PREPROCESSING,
    META_FILE,
    WEIGHTS_FILE,
    WeightsError,
    bundle_meta_path,
    read_bundle_meta,
)
from chextrain.models.net import CXRNet

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
            origin = source.removeprefix("heads.")
            report.heads_loaded.append(label if source == name else f"{label}<-{origin}")
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
    meta_path = bundle_meta_path(path)
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
    meta_path = bundle_meta_path(path)
    if meta_path is not None:
        meta = read_bundle_meta(meta_path)
        return {k: meta[k] for k in ("preprocessing", "image_size") if meta.get(k) is not None}
    if path.is_dir():
        return {}
    payload = read_checkpoint(path)
    keys = extract_state_dict(payload, str(path))
    prefix = next((k[: k.index("encoder_q.") + len("encoder_q.")] for k in keys if "encoder_q." in k), "")
    return json.loads(json.dumps(EXPECTED_INPUT.get(_format_name(prefix, payload), {})))


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
