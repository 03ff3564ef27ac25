"""torchxrayvision (XRV) weights -> a chextrain bundle: converted once, explicitly.

XRV's weight files are pickles: whole `torchxrayvision.models.DenseNet` modules, or a state dict
(its ResNet-50). Unpickling can run any code, so chextrain unpickles in one place, `read_xrv_file`,
and only when asked to (`chextrain convert xrv ... --trust-pickle`). Without that, a file that
`torch.load(weights_only=True)` refuses is described (its format and the Python classes its pickle
names, read from the opcodes without running them) and refused. Everything after the conversion
reads the safetensors bundle written here.

The bundle (backbone densenet121 or resnet50, one head `shared`):
- the encoder; XRV's 1-channel stem is spread over chextrain's three identical grey channels
  (weights / 3: the same function of the grey image);
- the head: XRV's classifier rows for Effusion, Edema, Atelectasis, Consolidation and Cardiomegaly
  in chextrain's order (meta `xrv.head_rows`); a pathology the weights do not predict starts at
  zero and is listed in `xrv.untrained`;
- XRV's input as the bundle's preprocessing (`xrv`: grey scaled to [-1024, 1024], XRV's centre crop
  and resize) at the weights' resolution (224 px; the ResNet's 512);
- XRV's operating points (`op_threshs`), where the weights have them, as the head's thresholds: XRV
  rescales its outputs so that each sits at 0.5, so the decisions are XRV's.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from chextrain.labels import PATHOLOGIES, SLUGS
from chextrain.models.bundle import WeightsError, save_bundle
from chextrain.models.net import CXRNet
from chextrain.models.pickles import describe_pickle

XRV_INIT = "xrv:"  # `init: xrv:NAME` starts a stage from the converted bundle of NAME
# chextrain's pathology -> XRV's label for it (xrv.datasets.default_pathologies spells them so).
XRV_LABELS: dict[str, str] = {
    "Pleural Effusion": "Effusion",
    "Edema": "Edema",
    "Atelectasis": "Atelectasis",
    "Consolidation": "Consolidation",
    "Cardiomegaly": "Cardiomegaly",
}
XRV_PREPROCESSING: dict[str, Any] = {"name": "xrv", "resize": "crop"}
_ARCHES: dict[str, dict[str, Any]] = {  # backbone -> XRV's key names and input size
    "densenet121": {
        "stem": "features.conv0.weight",
        "classifier": "classifier",
        "size": 224,
        "marker": "features.denseblock4.denselayer16.conv2.weight",
    },
    "resnet50": {"stem": "conv1.weight", "classifier": "fc", "size": 512, "marker": "layer4.2.conv3.weight"},
}


class XrvError(WeightsError):
    """XRV weights that cannot be converted or found; the message names the file and what to do."""


def xrv_cache_dir() -> Path:
    """XRV's own download folder (`xrv.utils.get_cache_dir()`), where it keeps its weight files."""
    return Path.home() / ".torchxrayvision" / "models_data"


def xrv_bundle_dir(name: str, root: Path | None = None) -> Path:
    """Where `chextrain convert xrv NAME` writes and `init: xrv:NAME` looks (root: ~/.cache/chextrain/xrv)."""
    if not name or "/" in name or name.startswith("."):
        raise XrvError(f"XRV weights name {name!r}: expected a name such as densenet121-res224-all")
    return (Path(root) if root is not None else Path.home() / ".cache" / "chextrain" / "xrv") / name


def import_xrv() -> ModuleType:
    """torchxrayvision, imported so that its import-time `warnings.filterwarnings("ignore")` stays inside.

    (XRV silences every warning of the process when imported; catch_warnings restores the filters.)
    """
    try:
        with warnings.catch_warnings():
            import torchxrayvision
    except ImportError as err:
        raise XrvError(
            f"converting XRV weights needs torchxrayvision ({err}): pip install 'chextrain[xrv]'"
        ) from None
    return torchxrayvision


def _canonical_name(xrv: ModuleType, path: Path) -> str | None:
    """XRV's name of the weights whose download file `path` is (the long form: densenet121-res224-all)."""
    urls = xrv.models.model_urls
    names = [n for n, e in urls.items() if os.path.basename(e["weights_url"]) == path.name]
    return max(names, key=lambda n: (n.startswith(("densenet", "resnet")), len(n))) if names else None


def resolve_source(source: str | Path, cache_dir: Path | None = None) -> tuple[Path, str | None]:
    """(the weights file, XRV's name for it when known) for a weights NAME or a FILE; never downloads."""
    xrv = import_xrv()
    path = Path(source)
    if path.is_file():
        return path, _canonical_name(xrv, path)
    urls = xrv.models.model_urls
    if str(source) not in urls:
        known = sorted(n for n in urls if "-" in n)
        raise XrvError(f"{str(source)!r} is neither a file nor one of XRV's weights names {known}")
    url = urls[str(source)]["weights_url"]
    path = Path(cache_dir or xrv_cache_dir()) / os.path.basename(url)
    if not path.is_file():
        raise XrvError(
            f"XRV weights {str(source)!r} are not on this machine: expected {path}. chextrain never "
            f"downloads: fetch {url} where there is internet and copy it to exactly that path (or pass the "
            "file itself)."
        )
    return path, _canonical_name(xrv, path)


def read_xrv_file(path: Path, *, trust_pickle: bool) -> Any:
    """The object in an XRV weights file: weights_only when that suffices, else only if `trust_pickle`.

    This is the one place chextrain unpickles a file (torch.load with weights_only=False), and it does
    so only after the flag was checked: without it the error says what the file holds and why.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # more than tensors: a pickled module
    except Exception as err:  # torch.load raises many types for a file that is not a torch file
        raise XrvError(
            f"{path} is not a torch weights file ({describe_pickle(path).text()}): {err}"
        ) from None
    if not trust_pickle:
        raise XrvError(
            f"{path} is {describe_pickle(path).text()}. Loading it means unpickling, which can run any code "
            "the file contains, so chextrain does it only when told to: pass --trust-pickle if the file "
            "comes from a source you trust (XRV's releases, github.com/mlmed/torchxrayvision). The "
            "conversion writes a safetensors bundle; the pickle is never read again."
        )
    import_xrv()  # the pickle names XRV's classes
    return torch.load(path, map_location="cpu", weights_only=False)  # trusted: checked above


def xrv_contents(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, what the object says of itself: labels, op_threshs, input_resolution, class)."""
    about: dict[str, Any] = {}
    if isinstance(obj, nn.Module):
        for module in obj.modules():  # modules pickled by old torch versions lack it (XRV patches the same)
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        own = vars(obj)
        about["class"] = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if own.get("pathologies") or own.get("targets"):
            about["labels"] = list(own.get("pathologies") or own.get("targets"))
        if own.get("input_resolution"):
            about["input_resolution"] = int(own["input_resolution"])
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise XrvError(f"{path} holds a {type(obj).__name__}, not an XRV model or state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("model.") for k in state if k != "op_threshs"):  # a whole xrv ResNet
        state = {k.removeprefix("model."): v for k, v in state.items()}
    op = state.pop("op_threshs", None)
    if op is not None:
        about["op_threshs"] = [float(v) for v in op.flatten()]
    return state, about


def detect_arch(state: Mapping[str, torch.Tensor], path: Path) -> str:
    """densenet121 or resnet50, from XRV's key names; XrvError for anything else."""
    for arch, spec in _ARCHES.items():
        if spec["stem"] in state and spec["marker"] in state:
            return arch
    raise XrvError(f"{path} is neither XRV's DenseNet-121 nor its ResNet-50 (first keys: {list(state)[:5]})")


def xrv_model(
    state: Mapping[str, torch.Tensor], arch: str, labels: list[str], path: Path
) -> tuple[CXRNet, dict[str, int | None]]:
    """CXRNet(arch): XRV's encoder, a five-row head from its classifier; (model, slug -> row or None)."""
    spec = _ARCHES[arch]
    model = CXRNet(arch, heads=["shared"])
    target = model.encoder.state_dict()
    stem = state[spec["stem"]]
    if stem.shape[1] != 1:
        raise XrvError(f"{path}: {spec['stem']} takes {stem.shape[1]} channels; XRV's models take 1")
    source = {k: v for k, v in state.items() if k in target}
    source[spec["stem"]] = stem.repeat(1, 3, 1, 1) / 3  # one grey channel -> three identical ones
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")]
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in source.items()
        if v.shape != target[k].shape
    ]
    if missing or bad:
        raise XrvError(f"{path} does not fit chextrain's {arch}: missing {missing[:5]}, shapes {bad[:5]}")
    model.encoder.load_state_dict(source, strict=False)
    weight, bias = state[f"{spec['classifier']}.weight"], state[f"{spec['classifier']}.bias"]
    if weight.shape[0] != len(labels):
        raise XrvError(f"{path}: the classifier has {weight.shape[0]} outputs but the labels are {labels}")
    rows = {
        slug: (labels.index(XRV_LABELS[p]) if XRV_LABELS[p] in labels else None)
        for p, slug in zip(PATHOLOGIES, SLUGS, strict=True)
    }
    if all(r is None for r in rows.values()):
        raise XrvError(f"{path} predicts none of {list(XRV_LABELS.values())} (its labels: {labels})")
    head = model.heads["shared"]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for i, slug in enumerate(SLUGS):
            if rows[slug] is not None:
                head.weight[i] = weight[rows[slug]]
                head.bias[i] = bias[rows[slug]]
    return model.eval(), rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_xrv(
    source: str | Path,
    out_dir: Path | None = None,
    *,
    trust_pickle: bool = False,
    cache_dir: Path | None = None,
    root: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Convert XRV weights (a NAME in XRV's cache folder, or a FILE) into a bundle; (folder, its meta).

    out_dir defaults to xrv_bundle_dir(NAME, root) when the weights have an XRV name.
    """
    xrv = import_xrv()
    path, name = resolve_source(source, cache_dir)
    state, about = xrv_contents(read_xrv_file(path, trust_pickle=trust_pickle), path)
    entry = xrv.models.model_urls.get(name, {}) if name else {}
    arch = detect_arch(state, path)
    labels = list(entry.get("labels") or about.get("labels") or xrv.datasets.default_pathologies)
    model, rows = xrv_model(state, arch, labels, path)
    op = about.get("op_threshs") or [float(v) for v in entry.get("op_threshs", [])] or None
    size = int(about.get("input_resolution") or entry.get("input_resolution") or _ARCHES[arch]["size"])
    if out_dir is None:
        if name is None:
            raise XrvError(
                f"{path.name} is not one of XRV's named weights files: say where to write (--out DIR)"
            )
        out_dir = xrv_bundle_dir(name, root)
    thresholds = {s: op[r] for s, r in rows.items() if r is not None and op and math.isfinite(op[r])}
    meta = {
        "image_size": size,
        "preprocessing": dict(XRV_PREPROCESSING),
        "thresholds": {"shared": thresholds},
        "label": f"XRV {name or path.name}",
        "objective": "converted from torchxrayvision (not trained by chextrain)",
        "xrv": {
            "weights": name,
            "source": str(path),
            "sha256": _sha256(path),
            "torchxrayvision": getattr(xrv, "__version__", "unknown"),
            "class": about.get("class", "state dict"),
            "labels": labels,
            "head_rows": {
                s: (None if r is None else {"row": r, "label": labels[r]}) for s, r in rows.items()
            },
            "untrained": [s for s, r in rows.items() if r is None],
            "op_threshs": None if op is None else {k: v for k, v in zip(labels, op, strict=False) if k},
            "input_resolution": size,
            "stem": "XRV's 1-channel stem, weights / 3 on each of chextrain's 3 identical grey channels",
        },
    }
    save_bundle(model, Path(out_dir), meta)
    return Path(out_dir), meta
