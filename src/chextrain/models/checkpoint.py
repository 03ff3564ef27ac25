"""Foreign checkpoints read safely and matched to a CXRNet encoder (what `init: FILE` loads).

Nothing here unpickles arbitrary objects: safetensors, or torch.load(weights_only=True).
Foreign checkpoints (torchvision, timm, CheXpert-style wrappers, CovidPrognosis and MoCo-CXR MoCo
files) are matched to the encoder by finding the key prefix under which its parameter names
appear; the key encoder, queue and projection/classifier are dropped and reported (`InitReport`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from chextrain.models.bundle import WeightsError
from chextrain.models.net import CXRNet

MIN_MATCHED_FRACTION = 0.5  # below this share of encoder keys found, the backbone is wrong
# Old torchvision DenseNet names ("norm.1") -> current ones ("norm1"), as torchvision does.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_KEY_ENCODER = ("encoder_k", "momentum", "teacher")
_HEAD_PARTS = ("classifier", "fc", "head", "heads", "projection", "projector", "router")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


@dataclass
class InitReport:
    """What `init_model` loaded: keys are the checkpoint's names unless said otherwise."""

    init: str
    kind: str  # imagenet | timm | random | file | bundle (xrv:NAME: its converted bundle)
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
        """One line for logs (and the run's record): what was loaded and the input the weights expect."""
        where = f" from {self.source}" if self.source else ""
        expects = ""
        if self.preprocessing or self.image_size:
            name = (self.preprocessing or {}).get("name", "?")
            expects = f"; the weights expect {name} input" + (
                f" at {self.image_size} px" if self.image_size else ""
            )
        return (
            f"init {self.init!r} ({self.kind}{', ' + self.format if self.format else ''}){where}: "
            f"{len(self.loaded)} encoder tensors loaded, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped, heads {self.heads_loaded}"
            f"{expects}"
        )


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
            raise WeightsError(
                f"checkpoint {path} is not a torch or safetensors file: {text[:200]}"
            ) from None
        found = re.search(r"Unsupported (?:global|operand)[^.,]*?(?= was not|$)", text, re.MULTILINE)
        raise WeightsError(
            f"refusing to unpickle {path}: it holds Python objects beyond tensors "
            f"({found.group(0)[:200] if found else 'not allowed by weights_only=True'}). Loading it could "
            "run arbitrary code. If you trust the file, convert its state dict to safetensors on a "
            "trusted machine (torch.load(..., weights_only=False) then safetensors.torch.save_file) and "
            "pass that file."
        ) from None
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise WeightsError(f"checkpoint {path} is not a torch or safetensors file: {err}") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


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
    raise WeightsError(
        f"checkpoint {source} holds no state dict of tensors (top level: {type(payload).__name__} {top})"
    )


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


def format_name(prefix: str, payload: Any) -> str:
    if prefix.endswith("encoder.") and "encoder_q" not in prefix:
        return "chextrain"
    if "encoder_q." in prefix:
        if isinstance(payload, Mapping) and "arch" in payload and prefix.startswith("module."):
            return "moco-cxr"
        return "covidprognosis-moco" if prefix.startswith("model.encoder_q.") else "moco"
    return "torchvision" if prefix == "" else "prefixed"


def load_encoder_state(
    model: CXRNet,
    state: Mapping[str, torch.Tensor],
    report: InitReport,
    *,
    load_heads: bool = False,
    payload: Any = None,
) -> InitReport:
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
            f"{model.backbone_name!r} (only {found} of its {len(weights)} encoder tensors found)"
        )
    enc = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in target
    }
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in enc.items()
        if v.shape != target[k].shape
    ]
    if bad:
        raise WeightsError(
            f"backbone mismatch: {where} has encoder tensors of other shapes than "
            f"{model.backbone_name!r}: {bad[:5]}"
        )
    model.encoder.load_state_dict(enc, strict=False)
    report.prefix, report.format = prefix, format_name(prefix, payload)
    report.loaded = sorted(f"encoder.{k}" for k in enc)
    report.missing = sorted(f"encoder.{k}" for k in weights if k not in enc)
    used = {prefix + k for k in enc}
    if load_heads and report.format == "chextrain":
        used |= _load_heads(model, state, prefix[: -len("encoder.")], report)
    for k in keys:
        if k in used:
            continue
        rest = k[len(prefix) :] if k.startswith(prefix) else None
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
    sources = sorted({k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)})
    parts = {f"heads.{h}": model.heads[h] for h in model.head_names}
    if model.router is not None:
        parts["router"] = model.router
    for name, module in parts.items():
        source = name
        if name.startswith("heads.") and name[len("heads.") :] not in sources and len(sources) == 1:
            source = f"heads.{sources[0]}"
        sd = {k: state.get(f"{base}{source}.{k}") for k in module.state_dict()}
        if all(v is not None and v.shape == module.state_dict()[k].shape for k, v in sd.items()):
            module.load_state_dict(sd)
            used |= {f"{base}{source}.{k}" for k in sd}
            label = name.removeprefix("heads.")
            origin = source.removeprefix("heads.")
            report.heads_loaded.append(label if source == name else f"{label}<-{origin}")
    return used
