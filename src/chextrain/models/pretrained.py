"""Named pretrained weights: where each lives on this machine (chextrain never downloads them).

- `imagenet`: torchvision's ImageNet weights of a backbone, in the torch hub cache.
- `timm`: timm's pretrained weights of a `timm:NAME` backbone, in the Hugging Face cache where timm
  keeps them (or, for a model timm fetches from a URL, in the torch hub cache).
- `xrv:NAME`: the bundle `chextrain convert xrv NAME` wrote from torchxrayvision's weights NAME.

`missing_weights(init, backbone)` says why an init's weights are not here (None when they are), and
`init_fallback` applies a study profile's `fallbacks` (e.g. `{imagenet: random, xrv: random}`) with it.
models/weights.py loads what these functions find.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from chextrain.models.bundle import IMAGENET_PREPROCESSING, META_FILE, WeightsError
from chextrain.models.timm_backbone import is_timm, parse_timm_backbone, timm_weights_file
from chextrain.models.xrv import XRV_INIT, xrv_bundle_dir

IMAGENET_WEIGHTS: dict[str, str] = {
    "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
}
FALLBACK_KINDS: tuple[str, ...] = ("imagenet", "timm", "xrv")  # the keys a profile's `fallbacks` may use


def imagenet_checkpoint_path(backbone: str, hub_dir: Path | None = None) -> tuple[Path, str]:
    """(path in the torch hub cache, download url) of a backbone's torchvision ImageNet weights."""
    import torch
    import torchvision.models as tvm

    if backbone not in IMAGENET_WEIGHTS:
        hint = " (for a timm backbone: init: timm)" if is_timm(backbone) else ""
        raise WeightsError(
            f"no ImageNet weights for backbone {backbone!r}; available for "
            f"{sorted(IMAGENET_WEIGHTS)} (use init: random or init: FILE){hint}"
        )
    url = tvm.get_weight(IMAGENET_WEIGHTS[backbone]).url
    root = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
    return root / "checkpoints" / os.path.basename(urlparse(url).path), url


def timm_pretrained_cfg(backbone: str) -> dict[str, Any]:
    """timm's pretrained config (hub id, url, mean/std, input size) of a `timm:NAME` backbone."""
    from timm.models import get_pretrained_cfg

    if not is_timm(backbone):
        raise WeightsError(
            f"init 'timm' needs a timm:NAME backbone; this model's is {backbone!r} "
            "(torchvision backbones: init: imagenet)"
        )
    name, _ = parse_timm_backbone(backbone)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise WeightsError(f"timm has no pretrained weights for {name!r} (init: random, or init: FILE)")
    return cfg.to_dict()


def timm_pretrained_file(backbone: str, hf_cache: Path | None = None, hub_dir: Path | None = None) -> Path:
    """The local file of timm's pretrained weights for `backbone`; WeightsError saying where to put it."""
    cfg = timm_pretrained_cfg(backbone)
    if cfg.get("file") and Path(cfg["file"]).is_file():
        return Path(cfg["file"])
    path, looked = timm_weights_file(cfg, hf_cache, hub_dir)
    if path is not None:
        return path
    name, _ = parse_timm_backbone(backbone)
    raise WeightsError(
        f"timm's pretrained weights for {backbone!r} are not on this machine: looked in {'; '.join(looked)}. "
        f'chextrain never downloads: where there is internet run `python -c "import timm; '
        f"timm.create_model('{name}', pretrained=True)\"` and copy the files it cached to the same place "
        "here, or use init: FILE with its model.safetensors, or init: random."
    )


def timm_expected_input(backbone: str) -> dict[str, Any]:
    """{"preprocessing": ...}: the mean/std timm's pretrained weights of `backbone` were trained with."""
    cfg = timm_pretrained_cfg(backbone)
    mean, std = [float(v) for v in cfg.get("mean", ())], [float(v) for v in cfg.get("std", ())]
    if (mean, std) == (IMAGENET_PREPROCESSING["mean"], IMAGENET_PREPROCESSING["std"]):
        return {"preprocessing": dict(IMAGENET_PREPROCESSING)}
    return (
        {"preprocessing": {"name": "meanstd", "mean": mean, "std": std}} if len(mean) == len(std) == 3 else {}
    )


def xrv_init_bundle(init: str, root: Path | None = None) -> Path:
    """model.json of the converted bundle `init: xrv:NAME` starts from; WeightsError naming the command."""
    name = init[len(XRV_INIT) :]
    folder = xrv_bundle_dir(name, root)
    if not (folder / META_FILE).is_file():
        raise WeightsError(
            f"init {init!r}: the XRV weights {name!r} have not been converted ({folder / META_FILE} is "
            f"missing). Run `chextrain convert xrv {name} --trust-pickle` once: it reads XRV's file for "
            f"{name} from ~/.torchxrayvision/models_data/ and writes that folder."
        )
    return folder / META_FILE


def missing_weights(
    init: str,
    backbone: str,
    *,
    hub_dir: Path | None = None,
    hf_cache: Path | None = None,
    xrv_root: Path | None = None,
) -> str | None:
    """Why the named weights of `init` (imagenet, timm, xrv:NAME) are not on this machine; None if they are.

    Other inits (random, files, stages) are not named weights: None.
    """
    try:
        if init == "imagenet":
            if not imagenet_checkpoint_path(backbone, hub_dir)[0].is_file():
                return f"ImageNet weights for {backbone} are not on this machine"
        elif init == "timm":
            timm_pretrained_file(backbone, hf_cache, hub_dir)
        elif init.startswith(XRV_INIT):
            xrv_init_bundle(init, xrv_root)
    except WeightsError as err:
        return f"ImageNet weights for {backbone} are not on this machine" if init == "imagenet" else str(err)
    return None


def init_fallback(
    init: str, backbone: str, fallbacks: Mapping[str, str], **where: Any
) -> tuple[str, list[str]]:
    """(init to use, notes): a profile's fallback replaces `init` when its named weights are missing.

    fallbacks maps a kind of FALLBACK_KINDS (`xrv` covers every xrv:NAME) to the init used instead;
    `where` passes hub_dir / hf_cache / xrv_root to missing_weights.
    """
    kind = "xrv" if init.startswith(XRV_INIT) else init
    if kind not in FALLBACK_KINDS or kind not in fallbacks:
        return init, []
    why = missing_weights(init, backbone, **where)
    if why is None:
        return init, []
    short = why if kind == "imagenet" else f"the {kind} weights of init {init!r} are not on this machine"
    return str(fallbacks[kind]), [f"{short}: init {fallbacks[kind]!r} used"]
