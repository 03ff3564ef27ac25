"""The supervised LightningModule: masked loss, per-sample heads, router loss, trainable-only optimiser."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from chextrain.labels import SLUGS
from chextrain.models.net import CXRNet
from chextrain.training.objectives.supervised import SupervisedModule, masked_bce, validation_metrics
from chextrain.training.optim import make_optimizer
from chextrain.training.specs import OptimizerSpec


def _batch(n: int = 6, heads: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "target": (torch.rand(n, 5, generator=g) > 0.5).float(),
        "mask": torch.ones(n, 5),
        "head": torch.tensor(heads if heads is not None else [0] * n),
        "domain": torch.tensor([i % 2 for i in range(n)]),
        "index": torch.arange(n),
    }


def test_masked_bce_is_bce_mean_and_ignores_masked_entries() -> None:
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.5).float()
    assert torch.allclose(
        masked_bce(logits, target, torch.ones(4, 5)), F.binary_cross_entropy_with_logits(logits, target)
    )
    mask = torch.ones(4, 5)
    mask[0, 2] = mask[3, 4] = 0
    changed = logits.clone()
    changed[0, 2], changed[3, 4] = 50.0, -50.0
    assert torch.allclose(masked_bce(logits, target, mask), masked_bce(changed, target, mask))
    keep = mask.bool()
    expected = F.binary_cross_entropy_with_logits(logits[keep], target[keep])
    assert torch.allclose(masked_bce(logits, target, mask), expected)
    assert masked_bce(logits, target, torch.zeros(4, 5)) == 0  # nothing labelled: no NaN


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_mixed_batch_routes_each_sample_through_its_head() -> None:
    torch.manual_seed(0)
    model = CXRNet("tiny", heads=("a", "b"))
    module = SupervisedModule(model, optimizer=OptimizerSpec(), train_heads=["a", "b"])
    batch = _batch(6, heads=[0, 1, 1, 0, 1, 0])
    loss = module.training_step(batch, 0)
    f = model.features(batch["image"])
    names = ["a" if h == 0 else "b" for h in batch["head"].tolist()]
    logits = torch.stack([model.heads[name](f[i]) for i, name in enumerate(names)])
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logits, batch["target"]), atol=1e-6)
    loss.backward()
    # Both heads served samples, so both receive gradient.
    assert model.heads["a"].weight.grad.abs().sum() > 0 and model.heads["b"].weight.grad.abs().sum() > 0


def test_optimizer_holds_only_trainable_params_at_the_stage_lr() -> None:
    model = CXRNet("tiny", heads=("a", "b"), router=True)
    module = SupervisedModule(
        model, optimizer=OptimizerSpec(name="sgd", lr=1e-5, momentum=0.5), freeze="encoder", train_heads=["a"]
    )
    opt = module.configure_optimizers()
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.heads["a"].parameters()}
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["lr"] == 1e-5 and opt.param_groups[0]["momentum"] == 0.5
    assert isinstance(
        make_optimizer(list(model.heads["a"].parameters()), OptimizerSpec(name="adamw")), torch.optim.AdamW
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_router_loss_is_added_when_router_trains() -> None:
    torch.manual_seed(0)
    model = CXRNet("tiny", heads=("a",), router=True)
    batch = _batch(6)
    plain = SupervisedModule(model, optimizer=OptimizerSpec(), train_heads=["a"])
    routed = SupervisedModule(model, optimizer=OptimizerSpec(), train_heads=["a", "router"])
    out = model.forward_all(batch["image"])
    router = F.binary_cross_entropy_with_logits(out["router"], batch["domain"].float())
    assert torch.allclose(routed.training_step(batch, 0) - plain.training_step(batch, 0), router, atol=1e-6)
    assert routed.train_router and not plain.train_router


def test_validation_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 5)) > 0.6).astype(float)
    probs = np.clip(targets * 0.3 + rng.random((40, 5)) * 0.7, 0, 1)
    mask = np.ones((40, 5))
    logs = validation_metrics(targets, probs, mask)
    aucs = [roc_auc_score(targets[:, j], probs[:, j]) for j in range(5)]
    for slug, auc in zip(SLUGS, aucs, strict=True):
        assert logs[f"val/auc_{slug}"] == pytest.approx(auc)
    assert logs["val/auc_mean"] == pytest.approx(np.mean(aucs))
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    assert logs["val/loss"] == pytest.approx(float(bce.mean()))


def test_validation_auc_mean_skips_undefined_pathologies() -> None:
    targets = np.zeros((6, 5))
    targets[:3, 0] = 1  # only the first pathology has both classes
    probs = np.linspace(0.1, 0.9, 30).reshape(6, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every validation would repeat it: the stage's evaluation warns once
        logs = validation_metrics(targets, probs, np.ones((6, 5)))
    assert np.isnan(logs["val/auc_edema"])
    assert logs["val/auc_mean"] == pytest.approx(logs["val/auc_pleural_effusion"])
