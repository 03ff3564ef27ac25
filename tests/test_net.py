"""CXRNet: backbones, head routing, freeze modes and frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chextrain.models.net import (
    BACKBONES,
    FREEZE_MODES,
    CXRNet,
    apply_freeze,
    build_encoder,
    frozen_batchnorms,
)


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_pooled_features(name: str) -> None:
    torch.manual_seed(0)
    encoder, num_features = build_encoder(name)
    encoder.eval()
    with torch.no_grad():
        f = encoder(_images(2))
    assert f.shape == (2, num_features)
    assert (
        num_features
        == {"densenet121": 1024, "resnet18": 512, "resnet50": 2048, "efficientnet_b0": 1280, "tiny": 48}[name]
    )
    for block in encoder.last_block:  # every backbone names a real last block
        assert any(True for _ in encoder.get_submodule(block).parameters())


def test_densenet_features_match_torchvision_forward() -> None:
    import torchvision

    tv = torchvision.models.densenet121(weights=None).eval()
    net = CXRNet("densenet121").eval()
    net.encoder.load_state_dict({k: v for k, v in tv.state_dict().items() if k.startswith("features.")})
    tv.classifier = nn.Identity()  # torchvision's forward: features -> ReLU -> pool -> flatten
    x = _images(2)
    with torch.no_grad():
        assert torch.allclose(net.features(x), tv(x), atol=1e-6)


def test_unknown_backbone_and_bad_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="'vgg16'.*densenet121"):
        build_encoder("vgg16")
    for heads in [(), ("a", "a"), ("router",), ("bad.name",), ("train",)]:
        with pytest.raises(ValueError, match="head"):
            CXRNet("tiny", heads=heads)


def test_forward_selects_heads_by_name_and_per_sample() -> None:
    torch.manual_seed(0)
    net = CXRNet("tiny", heads=("digital", "photo"), router=True).eval()
    x = _images(4)
    with torch.no_grad():
        digital, photo = net(x, "digital"), net(x, "photo")
        mixed = net(x, torch.tensor([0, 1, 1, 0]))
        everything = net.forward_all(x)
    assert digital.shape == (4, 5) and not torch.allclose(digital, photo)
    assert torch.allclose(mixed[[0, 3]], digital[[0, 3]]) and torch.allclose(mixed[[1, 2]], photo[[1, 2]])
    assert everything["logits"].shape == (4, 2, 5) and everything["features"].shape == (4, 48)
    assert torch.allclose(everything["logits"][:, 1], photo)
    assert everything["router"].shape == (4,)
    assert "router" not in CXRNet("tiny").eval().forward_all(x)


def test_forward_refuses_ambiguous_or_bad_heads() -> None:
    net = CXRNet("tiny", heads=("digital", "photo")).eval()
    x = _images(2)
    with pytest.raises(ValueError, match="pass head="):
        net(x)
    with pytest.raises(ValueError, match="'nope'.*digital"):
        net(x, "nope")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        net(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        net(x, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor"):
        net(x, torch.tensor([0.0, 1.0]))
    single = CXRNet("tiny").eval()
    with torch.no_grad():
        assert torch.equal(single(x), single(x, "shared"))


def test_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    net = CXRNet("resnet18").eval()
    x = _images(2)
    with torch.no_grad():
        ref = net(x)
        net = net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


def _trainable_names(net: CXRNet) -> set[str]:
    return {n for n, p in net.named_parameters() if p.requires_grad}


def test_freeze_modes_select_the_right_parameters() -> None:
    net = CXRNet("densenet121", heads=("digital", "photo"), router=True)
    params = apply_freeze(net, "last-block", ["photo"])
    names = _trainable_names(net)
    assert len(params) == len(names)
    assert {n.split(".")[2] for n in names if n.startswith("encoder.")} == {"denseblock4", "norm5"}
    assert {n for n in names if not n.startswith("encoder.")} == {"heads.photo.weight", "heads.photo.bias"}

    apply_freeze(net, "encoder", ["digital", "router"])
    assert _trainable_names(net) == {
        "heads.digital.weight",
        "heads.digital.bias",
        "router.weight",
        "router.bias",
    }
    apply_freeze(net, "none", ["digital"])
    names = _trainable_names(net)
    assert all(p.requires_grad for p in net.encoder.parameters())
    assert not any(n.startswith(("heads.photo", "router")) for n in names)

    resnet = CXRNet("resnet18")
    apply_freeze(resnet, "last-block", ["shared"])
    assert {n.split(".")[1] for n in _trainable_names(resnet) if n.startswith("encoder.")} == {"layer4"}
    effnet = CXRNet("efficientnet_b0")
    apply_freeze(effnet, "last-block", ["shared"])
    assert {n.split(".")[2] for n in _trainable_names(effnet) if n.startswith("encoder.")} == {"7", "8"}


def test_freeze_refuses_bad_mode_and_heads() -> None:
    net = CXRNet("tiny")
    with pytest.raises(ValueError, match="'all'.*last-block"):
        apply_freeze(net, "all", ["shared"])
    with pytest.raises(ValueError, match="'photo'"):
        apply_freeze(net, "none", ["photo"])
    with pytest.raises(ValueError, match="'router'"):  # no router on this model
        apply_freeze(net, "none", ["router"])
    assert FREEZE_MODES == ("none", "encoder", "last-block")


@pytest.mark.parametrize(
    ("backbone", "mode"), [("tiny", "encoder"), ("tiny", "last-block"), ("densenet121", "last-block")]
)
def test_frozen_parameters_and_buffers_are_bit_identical_after_training(backbone: str, mode: str) -> None:
    torch.manual_seed(0)
    net = CXRNet(backbone, heads=("digital", "photo"), router=True)
    params = apply_freeze(net, mode, ["photo"])
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    frozen_prefixes = {n.rsplit(".", 1)[0] for n in frozen}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapper = nn.ModuleDict({"model": net})  # as a LightningModule would hold it
    wrapper.train()
    assert frozen_batchnorms(net) and all(not m.training for m in frozen_batchnorms(net))
    opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)
    for step in range(3):
        x = _images(4, seed=step)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x, "photo"), torch.ones(4, 5))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    for key, value in before.items():
        module = key.rsplit(".", 1)[0]
        if module in frozen_prefixes:  # frozen weights AND their BN buffers
            assert torch.equal(value, after[key]), key
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "heads.photo.weight" in changed
    assert not any(k.startswith(("heads.digital", "router")) for k in changed)
    last = net.encoder.last_block[-1]
    bn_stats = [k for k in changed if k.startswith(f"encoder.{last}") and k.endswith("running_mean")]
    assert bool(bn_stats) == (mode == "last-block")  # trainable BN layers still update their stats
