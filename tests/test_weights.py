"""Weights: init from imagenet / files / foreign checkpoints / bundles; bundles round-trip."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from chextrain.labels import PATHOLOGIES
from chextrain.models.bundle import load_bundle, save_bundle
from chextrain.models.net import CXRNet
from chextrain.models.pretrained import init_fallback
from chextrain.models.weights import WeightsError, imagenet_checkpoint_path, init_model


def _images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _encoder_equal(model: CXRNet, state: dict[str, torch.Tensor], prefix: str) -> bool:
    return all(
        torch.equal(v, state[prefix + k])
        for k, v in model.encoder.state_dict().items()
        if prefix + k in state
    )


def _source(backbone: str, seed: int = 1) -> CXRNet:
    torch.manual_seed(seed)
    return CXRNet(backbone, heads=("digital", "photo"), router=True)


# ---------------------------------------------------------------- bundles


def test_bundle_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _source("tiny").eval()
    with torch.no_grad():  # move BN statistics off their defaults so they must be saved
        model.encoder.features.block1[1].running_mean.add_(0.5)
    x = _images()
    with torch.no_grad():
        ref = model.forward_all(x)
    model = model.to(memory_format=torch.channels_last)  # saved tensors must be made contiguous
    meta = {
        "image_size": 64,
        "thresholds": {"photo": {"edema": 0.25}},
        "stage": {"name": "ft"},
        "metrics": {"val": {"auc": np.float32(0.75), "mcc": float("nan")}},
        "note": Path("x"),
    }
    out = save_bundle(model, tmp_path / "run", meta)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "model.json",
        "model.safetensors",
    ]  # no temp
    for where in [out, out / "model.json", out / "model.safetensors"]:
        loaded, doc = load_bundle(where)
        assert not loaded.training
        with torch.no_grad():
            got = loaded.forward_all(x)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert doc["architecture"] == {
        "backbone": "tiny",
        "heads": ["digital", "photo"],
        "router": True,
        "num_features": 48,
        "num_classes": 5,
    }
    assert doc["pathologies"] == list(PATHOLOGIES) and doc["image_size"] == 64
    assert doc["thresholds"]["photo"]["edema"] == 0.25 and doc["thresholds"]["digital"]["edema"] == 0.5
    assert doc["domain_heads"] == {"digital": "digital", "photo": "photo"}
    assert doc["preprocessing"]["name"] == "imagenet" and len(doc["preprocessing"]["mean"]) == 3
    assert doc["metrics"]["val"] == {"auc": 0.75, "mcc": None} and doc["note"] == "x"
    assert doc["stage"] == {"name": "ft"} and doc["format_version"] == 1


def test_load_bundle_refuses_other_pathologies_and_missing_files(tmp_path: Path) -> None:
    out = save_bundle(CXRNet("tiny"), tmp_path / "b", {})
    doc = json.loads((out / "model.json").read_text())
    doc["pathologies"] = list(reversed(PATHOLOGIES))
    (out / "model.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="pathologies"):
        load_bundle(out)
    doc["pathologies"] = list(PATHOLOGIES)
    doc["architecture"]["heads"] = ["other"]  # json no longer matches the weights
    doc["domain_heads"] = {"digital": "other", "photo": "other"}
    doc["thresholds"] = {"other": doc["thresholds"]["shared"]}
    (out / "model.json").write_text(json.dumps(doc))
    with pytest.raises(WeightsError, match="does not match"):
        load_bundle(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors is missing"):
        load_bundle(out)
    with pytest.raises(WeightsError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.json").write_text("{not json")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="not valid JSON"):
        load_bundle(tmp_path / "c")


def test_save_bundle_checks_meta(tmp_path: Path) -> None:
    two = CXRNet("tiny", heads=("a", "b"))
    with pytest.raises(WeightsError, match="domain_heads"):
        save_bundle(two, tmp_path, {})
    with pytest.raises(WeightsError, match="'c'"):
        save_bundle(two, tmp_path, {"domain_heads": {"digital": "a", "photo": "c"}})
    ok = {"domain_heads": {"digital": "a", "photo": "b"}}
    with pytest.raises(WeightsError, match="head 'edema'"):
        save_bundle(two, tmp_path, {**ok, "thresholds": {"edema": 0.3}})
    with pytest.raises(WeightsError, match="flu"):
        save_bundle(two, tmp_path, {**ok, "thresholds": {"a": {"flu": 0.3}}})
    with pytest.raises(WeightsError, match="meta.extra"):
        save_bundle(two, tmp_path, {**ok, "extra": object()})
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_init_from_bundle_loads_encoder_and_optionally_heads(tmp_path: Path) -> None:
    source = _source("tiny")
    save_bundle(source, tmp_path / "run", {"stage": "baseline"})
    target = CXRNet("tiny", heads=("digital", "photo", "film"), router=True)
    before = target.heads["digital"].weight.clone()
    report = init_model(target, tmp_path / "run")
    assert report.kind == "bundle" and report.meta["stage"] == "baseline" and not report.missing
    assert _encoder_equal(target, source.encoder.state_dict(), "")
    assert torch.equal(target.heads["digital"].weight, before) and report.heads_loaded == []
    report = init_model(target, tmp_path / "run" / "model.json", load_heads=True)
    assert report.heads_loaded == ["digital", "photo", "router"]
    assert torch.equal(target.heads["photo"].weight, source.heads["photo"].weight)
    with pytest.raises(WeightsError, match="'tiny'.*'resnet18'"):
        init_model(CXRNet("resnet18"), tmp_path / "run")


# ---------------------------------------------------------------- foreign checkpoints


def test_torchvision_densenet_checkpoint_with_old_key_names(tmp_path: Path) -> None:
    tv = torchvision.models.densenet121(weights=None).state_dict()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in tv.items()}
    assert any("norm.1." in k for k in old)
    torch.save(old, tmp_path / "densenet.pth")
    model = CXRNet("densenet121")
    report = init_model(model, tmp_path / "densenet.pth")
    assert report.format == "torchvision" and report.prefix == "" and not report.missing
    assert report.dropped == ["classifier.bias", "classifier.weight"] and not report.unexpected
    assert _encoder_equal(model, tv, "")


def test_covidprognosis_moco_checkpoint_loads_the_query_encoder(tmp_path: Path) -> None:
    q = torchvision.models.densenet121(weights=None)
    q.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128))
    k_state = {f"model.encoder_k.{k}": torch.zeros_like(v) for k, v in q.state_dict().items()}
    state = {
        **{f"model.encoder_q.{k}": v for k, v in q.state_dict().items()},
        **k_state,
        "model.queue": torch.randn(128, 16),
        "model.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    torch.save({"epoch": 3, "state_dict": state, "hyper_parameters": {"lr": 0.1}}, tmp_path / "cp.pt")
    model = CXRNet("densenet121")
    report = init_model(model, tmp_path / "cp.pt")
    assert report.format == "covidprognosis-moco" and report.prefix == "model.encoder_q."
    assert _encoder_equal(model, state, "model.encoder_q.") and not report.missing and not report.unexpected
    assert {"model.queue", "model.encoder_q.classifier.0.weight"} <= set(report.dropped)
    assert all(k in report.dropped for k in k_state)


def test_moco_cxr_checkpoint_with_module_prefix(tmp_path: Path) -> None:
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v + 1 for k, v in net.state_dict().items() if v.is_floating_point()}
    state["module.queue"] = torch.randn(128, 8)
    torch.save(
        {"epoch": 20, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}},
        tmp_path / "checkpoint_0019.pth.tar",
    )
    model = CXRNet("resnet18")
    report = init_model(model, tmp_path / "checkpoint_0019.pth.tar")
    assert report.format == "moco-cxr" and report.prefix == "module.encoder_q."
    assert _encoder_equal(model, state, "module.encoder_q.") and not report.missing
    assert "module.encoder_q.fc.0.weight" in report.dropped and "module.queue" in report.dropped


@pytest.mark.parametrize("prefix", ["module.model.", "model.", "module.densenet121."])
def test_chexpert_style_prefixes_missing_and_unexpected_keys(tmp_path: Path, prefix: str) -> None:
    source = _source("tiny").encoder.state_dict()
    state = {prefix + k: v for k, v in source.items() if k != "features.block3.0.weight"}
    state[prefix + "features.extra.weight"] = torch.ones(3)
    state[prefix + "classifier.0.weight"] = torch.ones(14, 48)
    save_file(state, tmp_path / "ckpt.safetensors")
    model = CXRNet("tiny")
    kept = model.encoder.features.block3[0].weight.clone()
    report = init_model(model, tmp_path / "ckpt.safetensors")
    assert report.prefix == prefix and report.format == "prefixed"
    assert report.missing == ["encoder.features.block3.0.weight"]
    assert report.unexpected == [prefix + "features.extra.weight"]
    assert report.dropped == [prefix + "classifier.0.weight"]
    assert torch.equal(model.encoder.features.block3[0].weight, kept)
    assert _encoder_equal(model, state, prefix)


def test_chextrain_lightning_checkpoint_with_heads(tmp_path: Path) -> None:
    source = _source("tiny")
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    torch.save(
        {"state_dict": state, "optimizer_states": [{"state": {}}], "hyper_parameters": {"lr": 1e-4}},
        tmp_path / "last.ckpt",
    )
    model = CXRNet("tiny", heads=("photo",))
    report = init_model(model, tmp_path / "last.ckpt", load_heads=True)
    assert report.format == "chextrain" and report.heads_loaded == ["photo"]
    assert torch.equal(model.heads["photo"].bias, source.heads["photo"].bias)
    assert "model.heads.digital.weight" in report.dropped and "model.router.weight" in report.dropped


def test_backbone_mismatch_is_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match=r"ResNet-18/34.*'densenet121'"):
        init_model(CXRNet("densenet121"), tmp_path / "r18.pth")
    with pytest.raises(WeightsError, match="backbone mismatch.*'resnet50'"):
        init_model(CXRNet("resnet50"), tmp_path / "r18.pth")


class _Payload:
    """Unpickling this calls Path.touch(target): harmless, but visible."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.target,))


def test_pickle_payload_is_refused_and_never_executed(tmp_path: Path) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))  # the payload is real: plain unpickling runs it
    assert proof.exists()
    marker = tmp_path / "pwned"
    state = {k: v for k, v in CXRNet("tiny").encoder.state_dict().items()}
    torch.save({"state_dict": state, "evil": _Payload(marker)}, tmp_path / "evil.pt")
    raw = pickle.dumps({"state_dict": state, "evil": _Payload(marker)}, protocol=2)
    (tmp_path / "evil.pkl").write_bytes(raw)
    for name in ["evil.pt", "evil.pkl"]:
        with pytest.raises(WeightsError, match="refusing to unpickle.*evil"):
            init_model(CXRNet("tiny"), tmp_path / name)
    assert not marker.exists()


def test_bad_init_values(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="not a torch or safetensors file"):
        init_model(CXRNet("tiny"), tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        init_model(CXRNet("tiny"), tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="'imagenet1k' is not imagenet, random"):
        init_model(CXRNet("tiny"), "imagenet1k")
    with pytest.raises(WeightsError, match="no model.json"):
        init_model(CXRNet("tiny"), tmp_path)
    with pytest.raises(WeightsError, match="stage runner|study runner"):
        init_model(CXRNet("tiny"), "stage:baseline")
    torch.save({"epoch": 1}, tmp_path / "no_tensors.pt")
    with pytest.raises(WeightsError, match="no state dict"):
        init_model(CXRNet("tiny"), tmp_path / "no_tensors.pt")
    assert init_model(CXRNet("tiny"), "random").kind == "random"


# ---------------------------------------------------------------- imagenet


def test_imagenet_offline_error_names_the_path(tmp_path: Path) -> None:
    expected = tmp_path / "checkpoints" / "densenet121-a639ec97.pth"
    with pytest.raises(WeightsError) as err:
        init_model(CXRNet("densenet121"), "imagenet", hub_dir=tmp_path)
    assert str(expected) in str(err.value) and "init: FILE" in str(err.value)
    assert "download.pytorch.org" in str(err.value)
    with pytest.raises(WeightsError, match="no ImageNet weights for backbone 'tiny'"):
        init_model(CXRNet("tiny"), "imagenet", hub_dir=tmp_path)


def test_imagenet_loads_from_the_hub_cache(tmp_path: Path) -> None:
    path, _ = imagenet_checkpoint_path("resnet18", tmp_path)
    path.parent.mkdir(parents=True)
    tv = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(tv, path)
    model = CXRNet("resnet18")
    report = init_model(model, "imagenet", hub_dir=tmp_path)
    assert report.kind == "imagenet" and report.preprocessing["name"] == "imagenet"
    assert _encoder_equal(model, tv, "") and report.dropped == ["fc.bias", "fc.weight"]


def test_profile_fallbacks_replace_named_weights_that_are_missing(tmp_path: Path) -> None:
    fallbacks = {"imagenet": "random", "xrv": "random"}
    assert init_fallback("imagenet", "densenet121", fallbacks, hub_dir=tmp_path) == (
        "random",
        ["ImageNet weights for densenet121 are not on this machine: init 'random' used"],
    )
    assert init_fallback("imagenet", "tiny", fallbacks, hub_dir=tmp_path)[0] == "random"  # none exist
    assert init_fallback("imagenet", "densenet121", {}, hub_dir=tmp_path) == ("imagenet", [])
    path, _ = imagenet_checkpoint_path("resnet18", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    assert init_fallback("imagenet", "resnet18", fallbacks, hub_dir=tmp_path) == ("imagenet", [])
    init, notes = init_fallback("xrv:densenet121-res224-all", "densenet121", fallbacks, xrv_root=tmp_path)
    assert init == "random" and "xrv weights of init 'xrv:densenet121-res224-all'" in notes[0]
    for other in ("random", "stage:baseline", str(tmp_path / "model.pt")):  # not named weights
        assert init_fallback(other, "densenet121", fallbacks) == (other, [])
    with pytest.raises(WeightsError, match="for a timm backbone: init: timm"):
        init_model(CXRNet("timm:test_convnext"), "imagenet", hub_dir=tmp_path)
