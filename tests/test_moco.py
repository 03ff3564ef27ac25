"""MoCo v2: queue, momentum, InfoNCE, gradients, views, the stage's output, published checkpoints, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chextrain.data.catalog import read_catalog
from chextrain.data.demo import write_demo
from chextrain.data.splits import assign_splits
from chextrain.evaluation.probe import probe
from chextrain.models.bundle import load_bundle
from chextrain.models.net import CXRNet
from chextrain.models.weights import WeightsError, expected_input, init_model, read_checkpoint
from chextrain.training.lifecycle import apply_expected_input, train_stage
from chextrain.training.moco import (
    MocoModule,
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
    info_nce,
    momentum_update,
)
from chextrain.training.moco_data import MocoCxrAugment, MocoDataset, photo_partners
from chextrain.training.optim import cosine
from chextrain.training.specs import MocoSpec, PhotoAwareSpec
from chextrain.training.stage import StageError, config_hash, parse_stage


def _module(queue_size: int = 8, proj_dim: int = 4, momentum: float = 0.9) -> MocoModule:
    torch.manual_seed(0)  # the encoder's default init draws from the global generator
    spec = MocoSpec(queue_size=queue_size, proj_dim=proj_dim, momentum=momentum, hidden_dim=16)
    return MocoModule(CXRNet("tiny").encoder, 48, spec=spec, seed=0)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- queue, momentum, loss, gradients -------------------------------------------------------


def test_enqueue_writes_at_the_pointer_and_wraps_around() -> None:
    m = _module(queue_size=5, proj_dim=2)
    a = torch.arange(6.0).view(3, 2)  # 3 keys of dim 2
    m.enqueue(a)
    assert int(m.queue_ptr) == 3 and torch.equal(m.queue[:, :3], a.T)
    b = 10 + torch.arange(6.0).view(3, 2)
    m.enqueue(b)  # columns 3, 4, then 0
    assert int(m.queue_ptr) == 1
    assert torch.equal(m.queue[:, [3, 4, 0]], b.T)
    assert torch.equal(m.queue[:, 1:3], a[1:].T)  # the oldest survivors
    c = 100 + torch.arange(14.0).view(7, 2)  # more keys than the queue holds: the newest 5 fill it
    m.enqueue(c)
    assert int(m.queue_ptr) == 1
    assert torch.equal(m.queue[:, [1, 2, 3, 4, 0]], c[2:].T)


def test_initial_queue_is_normalised_and_seeded() -> None:
    a, b = _module(queue_size=16, proj_dim=4), _module(queue_size=16, proj_dim=4)
    assert a.queue.shape == (4, 16) and int(a.queue_ptr) == 0
    assert torch.allclose(a.queue.norm(dim=0), torch.ones(16))
    assert torch.equal(a.queue, b.queue)


def test_momentum_update_is_an_exponential_moving_average() -> None:
    key, query = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        key.weight.copy_(torch.tensor([[1.0, 2.0]]))
        key.bias.fill_(4.0)
        query.weight.copy_(torch.tensor([[3.0, -2.0]]))
        query.bias.fill_(0.0)
    momentum_update(key, query, 0.75)  # 0.75 * key + 0.25 * query
    assert torch.allclose(key.weight, torch.tensor([[1.5, 1.0]]))
    assert torch.allclose(key.bias, torch.tensor([3.0]))
    assert torch.equal(query.weight, torch.tensor([[3.0, -2.0]]))  # the query is never touched
    momentum_update(key, query, 1.0)
    assert torch.allclose(key.weight, torch.tensor([[1.5, 1.0]]))
    momentum_update(key, query, 0.0)
    assert torch.equal(key.weight, query.weight) and torch.equal(key.bias, query.bias)


def test_info_nce_on_a_hand_computed_case() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # D x K: negatives (1, 0) and (0, 1)
    loss, logits = info_nce(q, k, queue, temperature=0.5)
    # query 1: l_pos 0.6, l_neg (1, 0) -> logits (1.2, 2, 0): log(e^1.2 + e^2 + 1) - 1.2 = 1.26037
    # query 2: l_pos 1, l_neg (0, 1) -> logits (2, 0, 2): log(2 e^2 + 1) - 2 = 0.75862
    assert torch.allclose(logits, torch.tensor([[1.2, 2.0, 0.0], [2.0, 0.0, 2.0]]))
    assert loss.item() == pytest.approx((1.2603726 + 0.7586237) / 2, abs=1e-6)


def test_gradients_reach_only_the_query_side_and_the_key_encoder_moves_by_ema() -> None:
    m = _module(queue_size=16, momentum=0.9)
    x1, x2 = _images(4, 1), _images(4, 2)
    loss, logits = m(x1, x2)
    assert logits.shape == (4, 17) and int(m.queue_ptr) == 4
    loss.backward()
    key_side = [*m.encoder_k.parameters(), *m.projection_k.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in key_side)
    query_side = [*m.encoder_q.parameters(), *m.projection_q.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in query_side)
    torch.optim.SGD(query_side, lr=0.5).step()
    q_now = {n: p.detach().clone() for n, p in m.encoder_q.named_parameters()}
    k_before = {n: p.detach().clone() for n, p in m.encoder_k.named_parameters()}
    assert any(not torch.equal(q_now[n], k_before[n]) for n in q_now)  # the step moved the query
    m(x1, x2)  # the next step first moves the key encoder 10 % of the way towards the query
    for n, p in m.encoder_k.named_parameters():
        assert torch.allclose(p, 0.9 * k_before[n] + 0.1 * q_now[n], atol=1e-6), n


def test_training_step_logs_loss_and_instance_accuracy() -> None:
    m = _module(queue_size=16)
    batch = {"view1": _images(4, 1), "view2": _images(4, 1)}
    m.log = lambda *args, **kwargs: None  # no Trainer attached
    loss = m.training_step(batch, 0)
    assert torch.isfinite(loss) and m.samples_seen == 4
    assert set(m.last) == {"loss", "acc1"} and 0.0 <= m.last["acc1"] <= 1.0


def test_a_non_finite_moco_loss_stops_the_stage_naming_it_and_the_step() -> None:
    from chextrain.training.stage_errors import NonFiniteError

    m = _module(queue_size=16)
    m.stage_name = "moco_chexpert"
    m.log = lambda *args, **kwargs: None  # no Trainer attached
    batch = {"view1": _images(4, 1), "view2": _images(4, 2)}
    batch["view1"][0, 0, 0, 0] = float("nan")  # one poisoned input value reaches the loss
    with pytest.raises(NonFiniteError) as err:
        m.training_step(batch, 0)
    text = str(err.value)
    assert "stage 'moco_chexpert'" in text and "the MoCo loss is nan at training step 1" in text
    assert "optimizer.lr" in text and m.samples_seen == 0  # stopped before the step counted
    with torch.no_grad():
        next(iter(m.encoder_q.parameters())).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="check the init weights"):
        m.training_step({"view1": _images(4, 1), "view2": _images(4, 2)}, 0)


def test_cosine_schedule_runs_from_one_to_zero() -> None:
    f = cosine(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0) and f(12) == f(10)


def test_single_process_helpers_change_nothing() -> None:
    x = _images(3, 0)
    shuffled, unshuffle = batch_shuffle(x, torch.Generator().manual_seed(0))
    assert shuffled is x and unshuffle is None and batch_unshuffle(x, None) is x
    assert concat_all_gather(x) is x


# --- stage spec and views -------------------------------------------------------------------


def test_moco_spec_shorthands_and_bad_values() -> None:
    base = {"name": "m", "objective": "moco"}
    stage = parse_stage({**base, "moco": {"augmentation": ["mococxr", "photo_aware"], "queue_size": 256}})
    assert stage.moco.queue_size == 256 and stage.moco.augmentation.photo_aware == PhotoAwareSpec()
    assert stage.moco.augmentation.mococxr is not None
    mapping = {"augmentation": {"photo_aware": {"p": 1.0}}}
    only_photo = parse_stage({**base, "moco": mapping}).moco.augmentation
    assert only_photo.photo_aware.p == 1.0 and only_photo.mococxr is not None  # a mapping adds to the default
    assert parse_stage({**base, "moco": {"augmentation": "none"}}).moco.augmentation.mococxr is None
    defaults = parse_stage(base).moco
    settings = (defaults.queue_size, defaults.momentum, defaults.temperature, defaults.proj_dim)
    assert settings == (65536, 0.999, 0.2, 128)
    with pytest.raises(StageError) as err:
        parse_stage(
            {
                **base,
                "moco": {
                    "queue_size": 0,
                    "temperature": 0,
                    "augmentation": "jitter",
                    "bogus": 1,
                    "schedule": "step",
                },
            }
        )
    text = str(err.value)
    for field in ("moco.queue_size", "moco.temperature", "moco.augmentation", "moco.bogus", "moco.schedule"):
        assert field in text, field
    with pytest.raises(StageError, match="crop_scale"):
        parse_stage({**base, "moco": {"augmentation": {"mococxr": {"crop_scale": [0.9, 0.5]}}}})


def test_mococxr_augment_is_grey_seeded_and_crops_within_the_scale() -> None:
    image = (np.arange(40 * 30) % 251).astype(np.uint8).reshape(40, 30)  # H x W
    aug = MocoCxrAugment(scale=(0.8, 1.0))
    a = aug(image, np.random.default_rng(0))
    assert np.array_equal(a, aug(image, np.random.default_rng(0))) and a.dtype == np.uint8 and a.ndim == 2
    areas = [aug(image, np.random.default_rng(s)).size for s in range(20)]
    assert min(areas) >= 0.75 * image.size and max(areas) <= image.size
    mirror = MocoCxrAugment(scale=(1.0, 1.0), ratio=(0.75, 0.75), rotation=0.0, flip=1.0)
    assert np.array_equal(mirror(image, np.random.default_rng(0)), image[:, ::-1])
    rgb = np.repeat(image[..., None], 3, axis=2)
    assert aug(rgb, np.random.default_rng(0)).ndim == 2


def test_photo_partners_pair_xrays_and_photos_of_the_same_image() -> None:
    rows = pd.DataFrame(
        {
            "path": ["x1", "x2", "p1a", "p1b"],
            "domain": ["digital", "digital", "photo", "photo"],
            "patient": ["patient1", "patient2", "patient1", "patient1"],
            "study": ["study1"] * 4,
            "image": ["view1_frontal"] * 4,
        }
    )
    assert photo_partners(rows, rows) == [["p1a", "p1b"], [], ["x1"], ["x1"]]
    assert photo_partners(rows, rows.iloc[1:]) == [["p1a", "p1b"], [], [], []]  # x1 not in the pool
    assert photo_partners(rows.iloc[:0], rows) == []


def test_photo_aware_views_use_real_photos_then_simulated_ones(demo_root: Path) -> None:
    catalog = assign_splits(read_catalog(demo_root))
    rows = catalog.loc[catalog["split"] == "train"].reset_index(drop=True)
    partners = photo_partners(rows, rows)
    kwargs = {"image_size": 32, "augment": MocoCxrAugment(), "partners": partners, "seed": 3}
    real = MocoDataset(rows, photo=PhotoAwareSpec(p=1.0), **kwargs)
    simulated = MocoDataset(rows, photo=PhotoAwareSpec(p=1.0, real_pairs=False), **kwargs)
    plain = MocoDataset(rows, photo=None, **kwargs)
    paired = np.array([real[i]["paired"] for i in range(len(rows))])
    has = np.array([bool(p) for p in partners])
    digital = (rows["domain"] == "digital").to_numpy()
    assert has.any() and (~has & digital).any()
    assert (paired[has] == 2).all() and (paired[~has & digital] == 1).all()
    assert (paired[~has & ~digital] == 0).all()
    assert all(simulated[i]["paired"] == (1 if digital[i] else 0) for i in range(len(rows)))
    assert all(plain[i]["paired"] == 0 for i in range(len(rows)))
    i = int(np.flatnonzero(has)[0])
    item = real[(i, 2)]
    assert item["view1"].shape == item["view2"].shape == (1, 32, 32)  # uint8: normalised on the device
    assert item["view1"].dtype == item["view2"].dtype == torch.uint8
    assert torch.equal(item["view2"], real[(i, 2)]["view2"])  # same (seed, epoch, index): same views
    assert not torch.equal(item["view1"], real[(i, 3)]["view1"])  # another epoch: other views


# --- the stage: output folder, init of a supervised stage ----------------------------------------


def _moco_stage(**extra: object):
    return parse_stage(
        {
            "name": "pre",
            "objective": "moco",
            "init": "random",
            "backbone": "tiny",
            "data": {"train": ["chexpert", "chexphoto"]},
            "image_size": 32,
            "batch_size": 16,
            "max_steps": 4,
            "num_workers": 0,
            "optimizer": {"name": "adam", "lr": 1e-3},
            "moco": {"queue_size": 48, "momentum": 0.99, "augmentation": {"photo_aware": {"p": 0.5}}},
            **extra,
        }
    )


@pytest.fixture(scope="module")
def moco_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moco") / "pre"
    result = train_stage(_moco_stage(), demo_root, out, progress=False)  # the runner dispatches on objective
    assert result.bundle == out / "model.json" and not result.cached and result.metrics == {}
    return out


def test_moco_stage_writes_checkpoint_bundle_and_done(moco_run: Path, demo_root: Path) -> None:
    done = json.loads((moco_run / "done.json").read_text())
    assert done["config_hash"] == config_hash(_moco_stage()) and done["objective"] == "moco"
    assert done["global_step"] == 4 and math.isfinite(done["moco"]["final_loss"])
    meta = json.loads((moco_run / "model.json").read_text())
    assert meta["objective"] == "moco" and meta["preprocessing"]["name"] == "imagenet"
    assert meta["image_size"] == 32 and meta["architecture"]["backbone"] == "tiny"
    state = torch.load(moco_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = state["state_dict"]
    assert weights["queue"].shape == (128, 48) and int(weights["queue_ptr"]) == (4 * 16) % 48  # wrapped
    bundle = read_checkpoint(moco_run / "model.safetensors")  # holds the trained query encoder
    name = "features.block1.0.weight"
    assert torch.equal(bundle[f"encoder.{name}"], weights[f"encoder_q.{name}"])
    again = train_stage(_moco_stage(), demo_root, moco_run, progress=False)
    assert again.cached and (moco_run / "done.json").read_text() == json.dumps(done, indent=2)


def test_an_unfinished_moco_stage_resumes_from_its_checkpoint(
    moco_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pre"
    shutil.copytree(moco_run, out)
    for name in ("done.json", "model.json", "model.safetensors"):  # as if killed after the last checkpoint
        (out / name).unlink()
    result = train_stage(_moco_stage(), demo_root, out, progress=False)
    assert result.resumed and json.loads((out / "done.json").read_text())["global_step"] == 4
    before = read_checkpoint(moco_run / "model.safetensors")
    after = read_checkpoint(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))


def test_moco_output_initialises_a_supervised_stage(moco_run: Path, demo_root: Path, tmp_path: Path) -> None:
    model = CXRNet("tiny")
    heads_before = model.heads["shared"].weight.clone()
    report = init_model(model, moco_run, load_heads=True)
    assert report.kind == "bundle" and not report.missing
    assert report.heads_loaded == []  # a MoCo bundle's heads are untrained: never copied
    assert torch.equal(model.heads["shared"].weight, heads_before)
    assert report.preprocessing["name"] == "imagenet" and report.image_size == 32
    ckpt = init_model(CXRNet("tiny"), moco_run / "checkpoints" / "last.ckpt")  # the Lightning checkpoint too
    assert ckpt.format == "moco" and ckpt.prefix == "encoder_q." and not ckpt.missing and not ckpt.unexpected
    assert "queue" in ckpt.dropped and any(k.startswith("encoder_k.") for k in ckpt.dropped)
    assert "projection_q.0.weight" in ckpt.dropped
    stage = parse_stage(
        {
            "name": "ft",
            "init": "stage:pre",
            "backbone": "tiny",
            "max_steps": 1,
            "batch_size": 8,
            "num_workers": 0,
            "evaluate": [],
        }
    )
    result = train_stage(stage, demo_root, tmp_path / "ft", resolve_ref=lambda name: moco_run, progress=False)
    done = json.loads((result.out_dir / "done.json").read_text())
    assert "bundle" in done["init"] and "0 missing" in done["init"]
    assert json.loads(result.bundle.read_text())["image_size"] == 32  # the size the encoder was trained at


def test_moco_stage_rejects_supervised_augment_and_empty_data(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="augment: does not apply to an `objective: moco` stage"):
        _moco_stage(augment="standard")  # refused when the stage is read, before anything runs
    with pytest.raises(StageError, match="no training rows"):
        train_stage(_moco_stage(data={"train": ["other"]}), demo_root, tmp_path / "b", progress=False)


# --- published checkpoints and the preprocessing they expect --------------------------------------


def _covidprognosis_file(path: Path) -> dict[str, torch.Tensor]:
    q = torchvision.models.densenet121(weights=None)
    q.classifier = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 128))
    state = {f"model.encoder_q.{k}": v for k, v in q.state_dict().items()}
    state |= {f"model.encoder_k.{k}": torch.zeros_like(v) for k, v in list(q.state_dict().items())[:10]}
    state |= {"model.queue": torch.randn(128, 32), "model.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 2, "global_step": 10, "state_dict": state}, path)
    return state


def _moco_cxr_file(path: Path) -> dict[str, torch.Tensor]:
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in net.state_dict().items()}
    state |= {"module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    optimizer = {"state": {}, "param_groups": []}
    torch.save({"epoch": 20, "arch": "resnet18", "state_dict": state, "optimizer": optimizer}, path)
    return state


def test_covidprognosis_file_loads_and_brings_histeq_at_224(tmp_path: Path) -> None:
    state = _covidprognosis_file(tmp_path / "cp.ckpt")
    model = CXRNet("densenet121")
    report = init_model(model, tmp_path / "cp.ckpt")
    assert report.format == "covidprognosis-moco" and not report.missing and not report.unexpected
    assert torch.equal(model.encoder.features.conv0.weight, state["model.encoder_q.features.conv0.weight"])
    assert "model.queue" in report.dropped and "model.encoder_q.classifier.2.weight" in report.dropped
    assert "model.encoder_k.features.conv0.weight" in report.dropped  # the key encoder
    assert report.preprocessing == {"name": "histeq"} and report.image_size == 224
    assert expected_input(tmp_path / "cp.ckpt") == {"preprocessing": {"name": "histeq"}, "image_size": 224}
    stage = parse_stage({"name": "ft", "init": str(tmp_path / "cp.ckpt")})
    adapted = apply_expected_input(stage, stage.init)
    assert adapted.preprocessing.name == "histeq" and adapted.image_size == 224
    paper = parse_stage(
        {"name": "ft", "init": str(tmp_path / "cp.ckpt"), "preprocess": "imagenet", "image_size": 320}
    )
    kept = apply_expected_input(paper, paper.init)  # the paper's mismatch, on purpose
    assert kept.preprocessing.name == "imagenet" and kept.image_size == 320
    with pytest.raises(WeightsError, match="backbone mismatch"):
        init_model(CXRNet("resnet18"), tmp_path / "cp.ckpt")


def test_moco_cxr_file_loads_and_brings_its_mean_and_std(tmp_path: Path) -> None:
    state = _moco_cxr_file(tmp_path / "checkpoint_0019.pth.tar")
    model = CXRNet("resnet18")
    report = init_model(model, tmp_path / "checkpoint_0019.pth.tar")
    assert report.format == "moco-cxr" and report.prefix == "module.encoder_q." and not report.missing
    assert torch.equal(model.encoder.conv1.weight, state["module.encoder_q.conv1.weight"])
    assert any(k.startswith("module.encoder_k.") for k in report.dropped) and "module.queue" in report.dropped
    assert report.preprocessing["name"] == "meanstd" and report.preprocessing["mean"] == [0.5020] * 3
    assert report.preprocessing["std"] == [0.085585] * 3 and report.image_size == 320
    adapted = apply_expected_input(parse_stage({"name": "ft"}), str(tmp_path / "checkpoint_0019.pth.tar"))
    assert adapted.preprocessing.name == "meanstd" and adapted.preprocessing.mean == (0.502, 0.502, 0.502)
    unknown = apply_expected_input(parse_stage({"name": "ft", "init": "random"}), "random")
    assert unknown.preprocessing.name == "imagenet" and unknown.image_size == 320


class _Payload:
    """Not a tensor: unpickling it would run this module's code."""


def test_a_pickled_object_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": CXRNet("tiny").encoder.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        init_model(CXRNet("tiny"), path)
    with pytest.raises(WeightsError, match="refusing to unpickle"):
        expected_input(path)


# --- DDP: two CPU processes ---------------------------------------------------------------------


class _Recording(MocoModule):
    """Keeps the keys this process enqueued last."""

    def enqueue(self, keys: torch.Tensor) -> None:
        self.recorded = keys.detach().clone()
        super().enqueue(keys)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights in both processes
        spec = MocoSpec(queue_size=20, proj_dim=8, momentum=0.9, hidden_dim=16)
        module = _Recording(CXRNet("tiny").encoder, 48, spec=spec, seed=0)
        ddp = DistributedDataParallel(module)
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
        for step in range(3):
            x = _images(4, 10 * rank + step)
            loss, _ = ddp(x, x + 0.05 * _images(4, 100 + 10 * rank + step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = torch.full((4, 2), float(rank)) + torch.arange(4.0)[:, None] / 10  # rank-specific rows
        shuffled, unshuffle = batch_shuffle(x, torch.Generator().manual_seed(5))
        uneven = concat_all_gather(torch.full((3 - rank, 2), float(rank)))  # 3 rows, then 2
        torch.save(
            {
                "queue": module.queue,
                "ptr": module.queue_ptr,
                "keys": module.recorded,
                "encoder_q": {n: p.detach() for n, p in module.encoder_q.named_parameters()},
                "x": x,
                "shuffled": shuffled,
                "restored": batch_unshuffle(shuffled, unshuffle),
                "uneven": uneven,
                "uneven_shuffle": batch_shuffle(torch.zeros(3 - rank, 2), torch.Generator())[1],
            },
            Path(out) / f"{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gathers_keys_into_identical_queues_and_shuffles_across_processes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["queue"], r1["queue"]) and int(r0["ptr"]) == int(r1["ptr"]) == (3 * 2 * 4) % 20
    last = [(int(r0["ptr"]) - 8 + i) % 20 for i in range(8)]  # the last step's 8 keys, rank 0's first
    assert torch.allclose(r0["queue"][:, last], torch.cat([r0["keys"], r1["keys"]]).T)
    assert not torch.allclose(r0["keys"], r1["keys"])
    for name, value in r0["encoder_q"].items():  # DDP kept the query weights in step (BN stats are local)
        assert torch.equal(value, r1["encoder_q"][name]), name
    for r in (r0, r1):
        assert torch.equal(r["restored"], r["x"])  # unshuffle undoes the shuffle
    mixed = torch.cat([r0["shuffled"], r1["shuffled"]])
    assert not torch.equal(mixed, torch.cat([r0["x"], r1["x"]]))  # samples changed process
    assert sorted(mixed[:, 0].tolist()) == sorted(torch.cat([r0["x"], r1["x"]])[:, 0].tolist())
    assert r0["uneven"].shape == (5, 2) and r0["uneven"][:3].eq(0).all() and r0["uneven"][3:].eq(1).all()
    assert r0["uneven_shuffle"] is None and r1["uneven_shuffle"] is None  # unequal batches: no shuffle


# --- is the representation any good? (slow: two 20-epoch MoCo runs on a 300-image demo) ----------
# Measured on 2 shared CPU cores (linear-probe mean AUC on the test split; random = 3 random inits):
#   demo seed 1: random 0.597, MoCo 0.608, photo-aware MoCo 0.613; pair cos 0.459 vs 0.572
#   demo seed 2: random 0.516, MoCo 0.551, photo-aware MoCo 0.559; pair cos 0.459 vs 0.502


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("moco_demo")
    write_demo(root, digital=200, photos=100, valid=60, size=48, seed=2, workers=1, progress=False)
    catalog = assign_splits(read_catalog(root))
    found = {}
    for name, augmentation in (("plain", "mococxr"), ("photo", ["mococxr", "photo_aware"])):
        stage = parse_stage(
            {
                "name": name,
                "objective": "moco",
                "init": "random",
                "backbone": "tiny",
                "seed": 2,
                "data": {"train": ["chexpert", "chexphoto"]},
                "image_size": 48,
                "batch_size": 32,
                "epochs": 20,
                "num_workers": 0,
                "optimizer": {"name": "adam", "lr": 1e-3},
                "moco": {"queue_size": 256, "momentum": 0.99, "augmentation": augmentation},
            }
        )
        out = train_stage(stage, root, root.parent / name, progress=False).out_dir
        found[name] = probe(load_bundle(out)[0], catalog, image_size=48)
    for s in range(3):
        torch.manual_seed(100 + s)
        found[f"random{s}"] = probe(CXRNet("tiny"), catalog, image_size=48)
    return found


@pytest.mark.slow
def test_moco_encoder_beats_random_init_encoders_in_the_linear_probe(pretrained: dict[str, dict]) -> None:
    def auc(name: str) -> float:
        return pretrained[name]["auc"]["linear"]["All"]["mean"]

    random = float(np.mean([auc(f"random{s}") for s in range(3)]))
    assert auc("plain") > random + 0.01 and auc("photo") > random + 0.01, (auc("plain"), auc("photo"), random)


@pytest.mark.slow
def test_photo_aware_positives_draw_photo_and_xray_features_together(pretrained: dict[str, dict]) -> None:
    plain, photo = pretrained["plain"]["pairs"], pretrained["photo"]["pairs"]
    assert photo["pair"] > plain["pair"] + 0.02 and photo["gap"] > plain["gap"], (plain, photo)
    assert photo["n_pairs"] == 180  # 60 test x-rays x 3 photos
