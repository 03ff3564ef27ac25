"""CXRNet: a backbone encoder + named classifier heads (+ an optional domain router).

The encoders keep torchvision's parameter names (`features.denseblock1...`, `layer4...`), so a
torchvision-style checkpoint loads into `CXRNet.encoder` once its classifier is dropped
(see models/weights.py). No weights are downloaded here: every backbone starts random.
Besides the names in BACKBONES, `timm:NAME` makes any timm model the encoder
(models/timm_backbone.py); `check_backbone` says whether a name is valid.

torchvision is imported by the builders that need it, not by this module: `import torchvision`
also imports torchvision.ops and with it torch._dynamo (about 1.5 s), which a tiny model, a
bundle's meta or `chextrain predict --help` should not pay for. Importing it later changes no
random draw, so seeded weights are the same.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from chextrain.models.timm_backbone import build_timm_encoder, check_timm_backbone, is_timm

if TYPE_CHECKING:
    from torchvision.models import ResNet

FREEZE_MODES: tuple[str, ...] = ("none", "encoder", "last-block")
ROUTER = "router"  # the name that selects the domain router in `train_heads`
_HEAD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class FeaturesEncoder(nn.Module):
    """images B x 3 x H x W -> features B x F via `features` (a Sequential), ReLU?, global pool.

    Used for DenseNet (final ReLU as in torchvision's forward), EfficientNet and the tiny net.
    `last_block` names the submodules that `last-block` freezing leaves trainable.
    """

    def __init__(
        self, features: nn.Sequential, num_features: int, last_block: tuple[str, ...], final_relu: bool
    ) -> None:
        super().__init__()
        self.features = features
        self.num_features = num_features
        self.last_block = last_block
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # B x F x h x w
        if self.final_relu:
            f = F.relu(f)
        return F.adaptive_avg_pool2d(f, 1).flatten(1)  # B x F


class ResNetEncoder(nn.Module):
    """torchvision ResNet without its `fc`: images B x 3 x H x W -> features B x F."""

    def __init__(self, net: ResNet, num_features: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = num_features
        self.last_block: tuple[str, ...] = ("layer4",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # B x F x h x w
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # B x F


def _densenet121() -> nn.Module:
    import torchvision.models as tvm

    net = tvm.densenet121(weights=None)
    return FeaturesEncoder(net.features, 1024, ("features.denseblock4", "features.norm5"), final_relu=True)


def _resnet18() -> nn.Module:
    import torchvision.models as tvm

    return ResNetEncoder(tvm.resnet18(weights=None), 512)


def _resnet50() -> nn.Module:
    import torchvision.models as tvm

    return ResNetEncoder(tvm.resnet50(weights=None), 2048)


def _efficientnet_b0() -> nn.Module:
    import torchvision.models as tvm

    net = tvm.efficientnet_b0(weights=None)
    # The last MBConv stage (7) and the 1x1 head conv (8): the analogue of denseblock4 + norm5.
    return FeaturesEncoder(net.features, 1280, ("features.7", "features.8"), final_relu=False)


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _tiny() -> nn.Module:
    """Three conv-BN-ReLU blocks (16, 32, 48 channels): a backbone for tests, seconds on a CPU."""
    features = nn.Sequential(
        OrderedDict(
            block1=_conv_bn_relu(3, 16, 2),
            block2=_conv_bn_relu(16, 32, 2),
            block3=_conv_bn_relu(32, 48, 2),
        )
    )
    return FeaturesEncoder(features, 48, ("features.block3",), final_relu=False)


# name -> builder of a randomly initialised encoder (attributes num_features, last_block).
BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "densenet121": _densenet121,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "efficientnet_b0": _efficientnet_b0,
    "tiny": _tiny,
}


def check_backbone(name: str) -> str:
    """`name` if it is a backbone: one of BACKBONES, or `timm:NAME` of a model timm knows; else ValueError."""
    if name in BACKBONES:
        return name
    if is_timm(name):
        return check_timm_backbone(name)
    raise ValueError(
        f"{name!r} is not one of {sorted(BACKBONES)} or timm:NAME (a model of timm.list_models())"
    )


def build_encoder(name: str) -> tuple[nn.Module, int]:
    """Build the random-init encoder `name` (see check_backbone); returns (encoder, F).

    The encoder maps images B x 3 x H x W to globally pooled features B x F; its `last_block`
    names the submodules `last-block` freezing leaves trainable (empty: the model has no stages).
    """
    if is_timm(check_backbone(name)):
        return build_timm_encoder(name)
    encoder = BACKBONES[name]()
    return encoder, int(encoder.num_features)


class CXRNet(nn.Module):
    """Encoder + `nn.ModuleDict` of classifier heads (features -> num_classes logits) + router.

    The router is a Linear(F, 1) giving the logit of P(photo), used to pick a domain head.
    Frozen BatchNorm layers (all their parameters requires_grad False) stay in eval mode when
    `train()` is called, so their running statistics never move (see `apply_freeze`).
    """

    def __init__(
        self,
        backbone: str = "densenet121",
        heads: Sequence[str] = ("shared",),
        router: bool = False,
        num_classes: int = 5,
    ) -> None:
        super().__init__()
        head_names = [heads] if isinstance(heads, str) else list(heads)
        if not head_names:
            raise ValueError("CXRNet needs at least one head; got heads=[]")
        for h in head_names:
            if not isinstance(h, str) or not _HEAD_NAME.match(h) or h == ROUTER:
                raise ValueError(
                    f"bad head name {h!r}: expected letters, digits and '_', starting with a "
                    f"letter, and not {ROUTER!r}"
                )
        if len(set(head_names)) != len(head_names):
            raise ValueError(f"head names must be unique; got {head_names}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.encoder, self.num_features = build_encoder(backbone)
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.head_names = head_names
        try:
            self.heads = nn.ModuleDict({h: nn.Linear(self.num_features, num_classes) for h in head_names})
        except KeyError as err:  # a name that clashes with an nn.Module attribute, e.g. "train"
            raise ValueError(f"bad head name in {head_names}: {err}") from None
        self.router: nn.Linear | None = nn.Linear(self.num_features, 1) if router else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """images B x 3 x H x W -> features B x F."""
        return self.encoder(x)

    def head_index(self, head: str) -> int:
        """Position of `head` in head_names (the index used by per-sample routing)."""
        if head not in self.heads:
            raise ValueError(f"unknown head {head!r}; this model has heads {self.head_names}")
        return self.head_names.index(head)

    def forward(self, x: torch.Tensor, head: str | torch.Tensor | None = None) -> torch.Tensor:
        """Logits B x num_classes from one head, or per sample from `head[i]`.

        head: a head name; a LongTensor B of indices into head_names (a mixed batch); or None
        when the model has a single head.
        """
        f = self.features(x)  # B x F
        if head is None:
            if len(self.head_names) != 1:
                raise ValueError(f"this model has heads {self.head_names}: pass head= a name or indices")
            return self.heads[self.head_names[0]](f)
        if isinstance(head, str):
            self.head_index(head)  # a clear error for an unknown name
            return self.heads[head](f)
        idx = self._check_indices(head, f.shape[0]).to(f.device)
        logits = torch.stack([self.heads[h](f) for h in self.head_names], dim=1)  # B x heads x C
        return logits[torch.arange(f.shape[0], device=f.device), idx]  # B x C

    def _check_indices(self, head: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(head, torch.Tensor) or head.dtype.is_floating_point or head.dtype == torch.bool:
            raise ValueError(f"head must be a name, an integer tensor of head indices or None; got {head!r}")
        if head.shape != (batch,):
            raise ValueError(f"head indices must have shape ({batch},); got {tuple(head.shape)}")
        if batch and (int(head.min()) < 0 or int(head.max()) >= len(self.head_names)):
            raise ValueError(
                f"head indices must lie in [0, {len(self.head_names)}) for heads "
                f"{self.head_names}; got {head.tolist()}"
            )
        return head.long()

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every head at once: features B x F, logits B x heads x C, router B (if present)."""
        f = self.features(x)  # B x F
        out = {"features": f, "logits": torch.stack([self.heads[h](f) for h in self.head_names], dim=1)}
        if self.router is not None:
            out["router"] = self.router(f).squeeze(-1)  # B: logit of P(photo)
        return out

    def train(self, mode: bool = True) -> CXRNet:
        """Set train/eval mode, keeping frozen BatchNorm layers in eval mode."""
        super().train(mode)
        if mode:
            for m in frozen_batchnorms(self):
                m.eval()
        return self


def frozen_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers whose parameters are all frozen (they must run in eval mode)."""
    out = []
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, _BatchNorm) and params and not any(p.requires_grad for p in params):
            out.append(m)
    return out


def _trainable_encoder_modules(model: CXRNet, mode: str) -> list[nn.Module]:
    if mode == "none":
        return [model.encoder]
    if mode == "encoder":
        return []
    if not model.encoder.last_block:
        raise ValueError(
            f"freeze 'last-block': backbone {model.backbone_name!r} has no stages to tell its last "
            "block by; use freeze 'encoder' or 'none'"
        )
    return [model.encoder.get_submodule(name) for name in model.encoder.last_block]


def apply_freeze(model: CXRNet, mode: str, train_heads: Sequence[str]) -> list[nn.Parameter]:
    """Set requires_grad for a stage; return the trainable parameters (for the optimiser).

    mode: `none` (whole encoder trains), `encoder` (encoder frozen), `last-block` (only the
    encoder's last block trains: DenseNet denseblock4 + norm5, ResNet layer4, EfficientNet
    its last stage + head conv, tiny its last block, a timm model its last stage and what
    follows it; a model without stages refuses it). Heads not in train_heads are always
    frozen; the router trains only when "router" is in train_heads. Frozen BatchNorm layers
    are put in eval mode now and by every later `model.train()`.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"unknown freeze mode {mode!r}; expected one of {list(FREEZE_MODES)}")
    train_heads = [train_heads] if isinstance(train_heads, str) else list(train_heads)
    allowed = model.head_names + ([ROUTER] if model.router is not None else [])
    bad = [h for h in train_heads if h not in allowed]
    if bad:
        raise ValueError(f"train_heads {bad} are not heads of this model; expected some of {allowed}")
    model.requires_grad_(False)
    trainable = _trainable_encoder_modules(model, mode)
    trainable += [model.heads[h] for h in train_heads if h != ROUTER]
    if ROUTER in train_heads and model.router is not None:
        trainable.append(model.router)
    for m in trainable:
        m.requires_grad_(True)
    model.train(model.training)  # re-applies eval mode to the BatchNorm layers just frozen
    return [p for p in model.parameters() if p.requires_grad]
