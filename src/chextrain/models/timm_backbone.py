"""timm models as CXRNet encoders: `backbone: timm:NAME` for any model `timm.list_models()` knows.

The encoder is the timm model itself, built with `num_classes=0`: its forward gives the pooled
features B x F (F = the pre-logits width where the model has one, else `num_features`), and its
parameter names are timm's, so a timm checkpoint loads into it as a torchvision one does into the
torchvision encoders (models/weights.py). Keyword arguments for timm's constructor may follow the
name, `timm:test_vit(img_size=64)`; they are part of the architecture a bundle records.

Models that take `dynamic_img_size` (ViT and its relatives) are built with it, so they run at any
input size; their positional embeddings are resampled when the input's patch grid differs from
the native one (`img_size`), which torch does but the ONNX exporter cannot: export a ViT at its
native size, or give `img_size` = the stage's image size.

`last-block` freezing trains the model's last stage (the last module of its `feature_info`) and
every top-level module after it (final norm, pooling, head). timm is imported by the functions
that use it only (about 2.5 s).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

TIMM_PREFIX = "timm:"
_SPEC = re.compile(r"^timm:(?P<name>[A-Za-z0-9_.\-]+)(?:\((?P<args>[^()]*)\))?$")
_ARG = re.compile(r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>[^=,]+?)\s*$")
# Constructor arguments chextrain sets itself: the encoder is always a 3-channel feature extractor.
_RESERVED = (
    "pretrained",
    "num_classes",
    "in_chans",
    "features_only",
    "pretrained_cfg_overlay",
    "global_pool",
)
SAFE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for on the HF hub


def is_timm(backbone: str) -> bool:
    """Whether `backbone` names a timm model (`timm:NAME`)."""
    return backbone.startswith(TIMM_PREFIX)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text.strip("'\""))


def parse_timm_backbone(backbone: str) -> tuple[str, dict[str, Any]]:
    """`timm:NAME` or `timm:NAME(key=value, ...)` -> (NAME, {key: value}); ValueError when malformed."""
    match = _SPEC.match(backbone)
    if match is None:
        raise ValueError(
            f"backbone {backbone!r}: expected `timm:NAME` or `timm:NAME(key=value, ...)` with a timm model "
            "name (see timm.list_models())"
        )
    kwargs: dict[str, Any] = {}
    for part in filter(str.strip, (match.group("args") or "").split(",")):
        arg = _ARG.match(part)
        if arg is None:
            raise ValueError(f"backbone {backbone!r}: argument {part.strip()!r} is not key=value")
        if arg.group("key") in _RESERVED:
            raise ValueError(
                f"backbone {backbone!r}: {arg.group('key')} is set by chextrain, not the backbone"
            )
        kwargs[arg.group("key")] = _value(arg.group("value"))
    return match.group("name"), kwargs


def check_timm_backbone(backbone: str) -> str:
    """`backbone` if it is well formed and timm knows the model; ValueError naming close names if not."""
    import difflib

    import timm

    name, _ = parse_timm_backbone(backbone)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        raise ValueError(f"backbone {backbone!r}: timm has no model {name!r}; close names: {close}")
    return backbone


def _last_block(model: nn.Module) -> tuple[str, ...]:
    """The last stage (last `feature_info` module) and the top-level modules after it; () without stages."""
    info = getattr(model, "feature_info", None) or []
    modules = [f["module"] for f in info if isinstance(f, dict) and f.get("module")]
    if not modules:
        return ()
    children = [name for name, _ in model.named_children()]
    top = modules[-1].split(".")[0]
    after = children[children.index(top) + 1 :] if top in children else []
    return (modules[-1], *after)


def build_timm_encoder(backbone: str, pretrained_file: Path | None = None) -> tuple[nn.Module, int]:
    """The timm model of `backbone` as an encoder (random, or timm loads `pretrained_file`); (encoder, F).

    The encoder gets `last_block` (see module doc). `pretrained_file` goes through timm's own
    loading (its checkpoint filter, e.g. resampling a ViT's positional embeddings).
    """
    import timm

    name, kwargs = parse_timm_backbone(check_timm_backbone(backbone))
    args: dict[str, Any] = {"pretrained": pretrained_file is not None, "num_classes": 0, **kwargs}
    if pretrained_file is not None:
        args["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        try:
            model = timm.create_model(name, dynamic_img_size=True, **args)
        except TypeError as err:
            if "dynamic_img_size" not in str(err):
                raise
            model = timm.create_model(name, **args)
    except TypeError as err:  # a keyword argument the model does not take
        raise ValueError(f"backbone {backbone!r}: {err}") from None
    model.last_block = _last_block(model)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return model, int(width)


def timm_weights_file(
    pretrained_cfg: dict[str, Any], hf_cache: Path | None = None, hub_dir: Path | None = None
) -> tuple[Path | None, list[str]]:
    """(the local file of timm's pretrained weights, or None; the places looked at), never downloading.

    timm fetches from the Hugging Face hub (`hf_hub_id`, cached in the HF cache, `hf_cache`) or,
    for some models, from a URL (cached in the torch hub folder `hub_dir`/checkpoints).
    """
    import torch
    from huggingface_hub import constants, try_to_load_from_cache

    looked: list[str] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = str(hub_id).partition("@")
        names = (
            [pretrained_cfg["hf_hub_filename"]]
            if pretrained_cfg.get("hf_hub_filename")
            else SAFE_WEIGHT_FILES
        )
        cache = Path(hf_cache) if hf_cache is not None else Path(constants.HF_HUB_CACHE)
        for filename in names:
            hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit), looked
        looked.append(f"the Hugging Face cache {cache} (repo {repo}, {' or '.join(names)})")
    url = pretrained_cfg.get("url")
    if url:
        root = Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())
        path = root / "checkpoints" / os.path.basename(urlparse(str(url)).path)
        if path.is_file():
            return path, looked
        looked.append(f"{path} (downloaded from {url})")
    return None, looked
