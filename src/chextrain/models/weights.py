"""Initialise a CXRNet from imagenet / timm / xrv:NAME / random / a checkpoint file / a bundle (weights only).

Nothing here unpickles arbitrary objects: safetensors, or torch.load(weights_only=True) (XRV's
pickles are converted once, explicitly, by models/xrv.py). How a foreign checkpoint is read and
matched to the encoder: models/checkpoint.py; where named weights live: models/pretrained.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chextrain.models.bundle import (
    IMAGENET_PREPROCESSING,
    META_FILE,
    WEIGHTS_FILE,
    WeightsError,
    bundle_meta_path,
    read_bundle_meta,
)
from chextrain.models.checkpoint import (
    InitReport,
    extract_state_dict,
    format_name,
    load_encoder_state,
    read_checkpoint,
)
from chextrain.models.net import CXRNet
from chextrain.models.pretrained import (
    imagenet_checkpoint_path,
    timm_expected_input,
    timm_pretrained_file,
    xrv_init_bundle,
)
from chextrain.models.timm_backbone import build_timm_encoder
from chextrain.models.xrv import XRV_INIT

# The input published MoCo checkpoints were pre-trained on, by format (a stage uses it unless it sets
# its own `preprocess` / `image_size`): CovidPrognosis histogram-equalised 0-255 images at 224 px;
# MoCo-CXR x/255 normalised by its CheXpert mean/std (aihc_utils/image_transform.py) at 320 px.
EXPECTED_INPUT: dict[str, dict[str, Any]] = {
    "covidprognosis-moco": {"preprocessing": {"name": "histeq"}, "image_size": 224},
    "moco-cxr": {
        "preprocessing": {"name": "meanstd", "mean": [0.5020] * 3, "std": [0.085585] * 3},
        "image_size": 320,
    },
}


def init_model(
    model: CXRNet,
    init: str | Path,
    *,
    hub_dir: Path | None = None,
    hf_cache: Path | None = None,
    xrv_root: Path | None = None,
    load_heads: bool = False,
) -> InitReport:
    """Initialise `model` in place from `init` and report what was loaded.

    init: `imagenet` (torchvision weights from the torch hub cache `hub_dir`, never downloaded),
    `timm` (timm's pretrained weights of a timm:NAME backbone, from the Hugging Face cache
    `hf_cache`, loaded by timm), `xrv:NAME` (the bundle `chextrain convert xrv NAME` wrote under
    `xrv_root`), `random` (leave as built), a state-dict file (.safetensors, or .pt/.pth/.ckpt read
    with weights_only=True), or a chextrain bundle (a folder holding model.json + model.safetensors,
    or either file). Only the encoder is loaded unless `load_heads`, which also copies the
    heads/router of a chextrain checkpoint whose names and shapes match.
    """
    text = str(init)
    if text == "random":
        return InitReport(init=text, kind="random")
    if text == "timm":
        return _init_from_timm(model, hf_cache, hub_dir)
    if text.startswith(XRV_INIT):
        return _init_from_bundle(model, xrv_init_bundle(text, xrv_root), text, load_heads)
    if text == "imagenet":
        path, url = imagenet_checkpoint_path(model.backbone_name, hub_dir)
        if not path.is_file():
            raise WeightsError(
                f"ImageNet weights for {model.backbone_name!r} are not in the torch hub cache: expected "
                f"the file {path} (downloaded from {url}). chextrain never downloads: copy that file to "
                "exactly this path, or use `init: FILE` with a local checkpoint, or `init: random`."
            )
        report = InitReport(
            init=text, kind="imagenet", source=str(path), preprocessing=dict(IMAGENET_PREPROCESSING)
        )
        return load_encoder_state(model, extract_state_dict(read_checkpoint(path), str(path)), report)
    if text.startswith("stage:"):
        raise WeightsError(
            f"init {text!r} names another stage's output: the study runner resolves it to "
            "that stage's folder; pass the folder (or its model.json) here"
        )
    path = Path(init)
    if not path.exists():
        raise WeightsError(
            f"init {text!r} is not imagenet, random, stage:NAME, or an existing file or "
            "folder (a state dict, a chextrain run folder or bundle)"
        )
    meta_path = bundle_meta_path(path)
    if meta_path is not None:
        return _init_from_bundle(model, meta_path, text, load_heads)
    if path.is_dir():
        raise WeightsError(f"init folder {path} holds no {META_FILE} + {WEIGHTS_FILE} bundle")
    payload = read_checkpoint(path)
    report = InitReport(init=text, kind="file", source=str(path))
    report = load_encoder_state(
        model, extract_state_dict(payload, str(path)), report, load_heads=load_heads, payload=payload
    )
    expected = EXPECTED_INPUT.get(report.format, {})
    report.preprocessing, report.image_size = expected.get("preprocessing"), expected.get("image_size")
    return report


def expected_input(
    init: str | Path, backbone: str | None = None, *, xrv_root: Path | None = None
) -> dict[str, Any]:
    """What the weights at `init` were trained on: {"preprocessing": {...}, "image_size": S}, keys known.

    imagenet: ImageNet's normalisation; timm (given the backbone): its pretrained config's mean/std;
    a chextrain bundle (our MoCo output and converted XRV weights, xrv:NAME, included): its
    model.json; a CovidPrognosis or MoCo-CXR file: EXPECTED_INPUT of its format; anything else
    (random, torchvision or unrecognised files, paths that do not exist): {}. Loads no weights.
    """
    text = str(init)
    if text == "imagenet":
        return {"preprocessing": dict(IMAGENET_PREPROCESSING)}
    if text == "timm":
        return timm_expected_input(backbone) if backbone else {}
    if text.startswith(XRV_INIT):
        try:
            init = xrv_init_bundle(text, xrv_root)
        except WeightsError:
            return {}
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
    return json.loads(json.dumps(EXPECTED_INPUT.get(format_name(prefix, payload), {})))


def _init_from_timm(model: CXRNet, hf_cache: Path | None, hub_dir: Path | None) -> InitReport:
    """timm's pretrained weights, loaded by timm (its checkpoint filter) into a twin encoder, then copied."""
    path = timm_pretrained_file(model.backbone_name, hf_cache, hub_dir)
    twin, _ = build_timm_encoder(model.backbone_name, pretrained_file=path)
    state = twin.state_dict()
    target = model.encoder.state_dict()
    bad = [k for k in target if k not in state or state[k].shape != target[k].shape]
    if bad:
        raise WeightsError(f"timm's weights {path} do not fit {model.backbone_name!r}: {bad[:5]}")
    model.encoder.load_state_dict(state)
    expected = timm_expected_input(model.backbone_name)
    return InitReport(
        init="timm",
        kind="timm",
        source=str(path),
        format="timm",
        loaded=sorted(f"encoder.{k}" for k in target),
        preprocessing=expected.get("preprocessing"),
    )


def _init_from_bundle(model: CXRNet, meta_path: Path, init: str, load_heads: bool) -> InitReport:
    meta = read_bundle_meta(meta_path)
    arch = meta["architecture"]
    if arch["backbone"] != model.backbone_name:
        raise WeightsError(
            f"backbone mismatch: bundle {meta_path} holds a {arch['backbone']!r} model, "
            f"but the model is {model.backbone_name!r}"
        )
    weights_path = meta_path.parent / WEIGHTS_FILE
    report = InitReport(
        init=init,
        kind="bundle",
        source=str(weights_path),
        meta=meta,
        preprocessing=meta.get("preprocessing"),
        image_size=meta.get("image_size"),
    )
    # A MoCo stage's bundle holds its encoder and untrained heads: never copy those heads.
    load_heads = load_heads and meta.get("objective") != "moco"
    return load_encoder_state(model, read_checkpoint(weights_path), report, load_heads=load_heads)
