"""timm backbones (`backbone: timm:NAME`): a ConvNeXt and a small ViT train, predict and export to ONNX.

Both are timm's test-sized models (`test_convnext`, `test_vit`), random (pretrained=False), on the
demo tree at 64 px for 3 steps. `init: timm` is checked against a Hugging Face cache laid out on
disk, as timm leaves it; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chextrain.data.catalog import read_catalog
from chextrain.data.images import load_image
from chextrain.data.transforms import preprocess
from chextrain.export import OnnxRuntime, export_onnx, max_prob_difference
from chextrain.inference import Predictor
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet, apply_freeze, check_backbone
from chextrain.models.pretrained import init_fallback
from chextrain.models.weights import WeightsError, expected_input, init_model
from chextrain.ood import feature_groups
from chextrain.training.lifecycle import StageResult, train_stage
from chextrain.training.stage import StageError, parse_stage
from tests.conftest import demo_files

CONVNEXT, VIT = "timm:test_convnext", "timm:test_vit(img_size=64)"


@pytest.fixture(scope="module", params=[CONVNEXT, VIT], ids=["convnext", "vit"])
def trained(
    request: pytest.FixtureRequest, demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> StageResult:
    stage = parse_stage(
        {
            "name": "timm",
            "backbone": request.param,
            "init": "random",
            "image_size": 64,
            "batch_size": 8,
            "max_steps": 3,
            "split": {"val_fraction": 0.25},
            "num_workers": 0,
            "checkpoint_every_n_steps": 100,
            "val_every_n_steps": 3,
            "optimizer": {"lr": 1e-3},
        }
    )
    out = tmp_path_factory.mktemp("timm")
    return train_stage(stage, demo_root, out, catalog=read_catalog(demo_root), progress=False)


def test_a_timm_stage_trains_predicts_and_exports(trained: StageResult, demo_root: Path) -> None:
    model, meta = load_bundle(trained.bundle)
    backbone = meta["architecture"]["backbone"]
    assert backbone in (CONVNEXT, VIT) and model.num_features == 64
    assert meta["training"]["global_step"] == 3 and "auc" in str(trained.metrics)
    # OOD features degrade to the pooled features alone (no tapped blocks for timm models).
    assert feature_groups(model) == [("features", 64)] and meta["ood"]["groups"]
    images = [load_image(f) for f in demo_files(demo_root, "digital", "valid")[:3]]
    images += [load_image(f) for f in demo_files(demo_root, "natural", "valid")[:3]]
    torch_results = Predictor.from_bundle(trained.bundle).predict_images(images, score_anyway=True)
    onnx_results = Predictor.from_bundle(trained.bundle, runtime="onnx").predict_images(
        images, score_anyway=True
    )
    for t, o in zip(torch_results, onnx_results, strict=True):
        for slug, finding in t["pathologies"].items():
            assert 0.0 < finding["prob"] < 1.0
            assert abs(finding["prob"] - o["pathologies"][slug]["prob"]) <= 1e-4
    x = torch.stack([preprocess(im, 64, meta["preprocessing"]) for im in images])
    runtime = OnnxRuntime(export_onnx(model, meta))
    assert max_prob_difference(model, runtime, x) <= 1e-4


def test_timm_backbone_names_are_checked() -> None:
    assert check_backbone("timm:test_vit(img_size=64, drop_path_rate=0.1)").startswith("timm:test_vit")
    for bad, message in [
        ("timm:not_a_model", "timm has no model 'not_a_model'"),
        ("timm:test_vit(img_size)", "is not key=value"),
        ("timm:test_vit(num_classes=3)", "num_classes is set by chextrain"),
        ("timm:", "expected `timm:NAME`"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_backbone(bad)
    with pytest.raises(ValueError, match="unexpected keyword argument 'img_size'"):
        CXRNet("timm:test_convnext(img_size=64)")
    with pytest.raises(StageError, match="backbone: .*timm has no model"):
        parse_stage({"name": "x", "backbone": "timm:resnet5000"})
    assert parse_stage({"name": "x", "backbone": VIT, "init": "timm"}).backbone == VIT


@pytest.mark.parametrize(
    ("backbone", "last"),
    [
        (CONVNEXT, ("stages.3", "norm_pre", "head")),
        (VIT, ("blocks.5", "norm", "fc_norm", "head_drop", "head")),
    ],
)
def test_freeze_modes_on_timm_encoders(backbone: str, last: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = CXRNet(backbone, heads=["a", "b"], router=True)
    assert model.encoder.last_block == last
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {names[id(p)] for p in apply_freeze(model, "encoder", ["a", "router"])}
    assert trainable == {"heads.a.weight", "heads.a.bias", "router.weight", "router.bias"}
    trainable = {names[id(p)] for p in apply_freeze(model, "last-block", ["b"])}
    encoder = {n for n in trainable if n.startswith("encoder.")}
    assert encoder and all(n.startswith(tuple(f"encoder.{b}." for b in last)) for n in encoder)
    assert any(n.startswith(f"encoder.{last[0]}.") for n in encoder)
    assert not any(
        n.startswith(("encoder.stem", "encoder.patch_embed", "encoder.blocks.0.")) for n in trainable
    )
    model.encoder.last_block = ()  # a timm model without stages (no feature_info)
    with pytest.raises(ValueError, match="has no stages"):
        apply_freeze(model, "last-block", ["a"])


def _hf_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face cache holding `repo`'s model.safetensors, laid out as huggingface_hub does."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "snapshots" / "0123abcd" / "model.safetensors"),
    )
    return root


def test_init_timm_loads_through_timm_from_the_cache_and_fails_clearly_offline(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    published = timm.create_model("test_vit", pretrained=False)  # 160 px, with its classifier
    cache = _hf_cache(tmp_path / "hf", "timm/test_vit.r160_in1k", published.state_dict())
    model = CXRNet(VIT)
    report = init_model(model, "timm", hf_cache=cache)
    assert report.kind == "timm" and "model.safetensors" in report.source and not report.missing
    assert torch.equal(model.encoder.blocks[3].mlp.fc1.weight, published.blocks[3].mlp.fc1.weight)
    assert model.encoder.pos_embed.shape == (1, 17, 64)  # timm resampled 10 x 10 (+ cls) to 4 x 4
    assert report.preprocessing == {"name": "meanstd", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert expected_input("timm", VIT) == {"preprocessing": report.preprocessing}
    empty = tmp_path / "empty"
    with pytest.raises(
        WeightsError,
        match=r"not on this machine: looked in the Hugging Face cache .*empty.*"
        r"timm/test_convnext\.r160_in1k.*never downloads",
    ):
        init_model(CXRNet(CONVNEXT), "timm", hf_cache=empty)
    with pytest.raises(WeightsError, match="needs a timm:NAME backbone"):
        init_model(CXRNet("tiny"), "timm", hf_cache=empty)
    assert init_fallback("timm", CONVNEXT, {"timm": "random"}, hf_cache=empty)[0] == "random"
    assert init_fallback("timm", VIT, {"timm": "random"}, hf_cache=cache) == ("timm", [])


def test_a_timm_checkpoint_file_loads_as_init_file(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(2)
    published = timm.create_model("test_convnext", pretrained=False)  # keys as timm names them
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(path))
    model = CXRNet(CONVNEXT)
    report = init_model(model, path)
    assert report.prefix == "" and not report.missing and report.dropped == ["head.fc.bias", "head.fc.weight"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    published.reset_classifier(0)
    with torch.no_grad():
        assert torch.allclose(model.eval().features(x), published.eval()(x), atol=1e-6)
    assert np.isfinite(model.features(x).detach().numpy()).all()
