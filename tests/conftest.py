"""Shared fixtures and helpers: every demo tree and bundle the test files share is made here, once.

Fixtures (session-scoped, read-only: a test that changes files copies them first):
- `demo_tree` / `demo_root`: the tiny demo tree of DEMO (CheXpert + CheXphoto in the official
  layouts), used by the data, training, evaluation and CLI tests.
- `use_demo`: a larger demo tree (USE_DEMO) for the tests of a trained model (inference, export,
  predict / explain / serve, the browser): its router learns from 120 x-rays and 120 photos.
- `routed_bundle`: a tiny two-head bundle whose router was trained on `use_demo`, OOD calibrated.
- `plain_bundle`: a random tiny two-head bundle with a router and no OOD calibration.

Helpers, imported as `from tests.conftest import ...`: KINDS, SIZE, demo_files, calibration_files,
write_routed_bundle, running_server. Heavy libraries are imported inside them, so that a test
file that needs none of this (labels, photo-sim, the import graph) starts without torch.
"""

from __future__ import annotations

import contextlib
import glob
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from chextrain.data.demo import DemoSummary
    from chextrain.models.net import CXRNet

DEMO: dict[str, int] = {"digital": 60, "photos": 60, "valid": 12, "size": 48, "seed": 0}
SIZE = 64  # image side of `use_demo` and of the bundles' inputs
USE_DEMO: dict[str, int] = {"digital": 120, "photos": 120, "valid": 20, "size": SIZE, "seed": 0}
KINDS = {  # kind -> glob under a demo root
    "digital": "CheXpert-v1.0-small/{split}/**/*.jpg",
    "natural": "CheXphoto-v1.0/{split}/natural/**/*.jpg",
    "synthetic-digital": "CheXphoto-v1.0/{split}/synthetic/digital/**/*.jpg",
    "synthetic-photographic": "CheXphoto-v1.0/{split}/synthetic/photographic/**/*.jpg",
}


def demo_files(root: Path, kind: str, split: str) -> list[Path]:
    """Sorted image files of one kind ('digital', 'natural', ...) and split ('train', 'valid')."""
    return sorted(map(Path, glob.glob(str(root / KINDS[kind].format(split=split)), recursive=True)))


def calibration_files(root: Path) -> list[Path]:
    """The OOD calibration set: the valid images and every third train image of each kind.

    Like a real validation split it holds lateral views and every phone, which valid lacks.
    """
    return [f for k in KINDS for f in demo_files(root, k, "valid") + demo_files(root, k, "train")[::3]]


def train_router(model: CXRNet, x: Any, y: Any, steps: int = 150, seed: int = 0) -> None:
    """A short training of the encoder + router on the router's loss alone (heads untouched).

    x: images N x 3 x S x S, y: N targets (1 = photo), both torch tensors.
    """
    import torch
    import torch.nn.functional as F

    params = list(model.encoder.parameters()) + list(model.router.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared: one thread is fastest
    try:
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (16,), generator=gen)
            loss = F.binary_cross_entropy_with_logits(model.forward_all(x[idx])["router"], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()


def write_routed_bundle(out: Path, demo: Path) -> Path:
    """A tiny two-head bundle whose router was trained on demo train images; OOD calibrated."""
    import torch

    from chextrain.data.images import load_image
    from chextrain.data.transforms import preprocess
    from chextrain.models.bundle import save_bundle
    from chextrain.models.net import CXRNet
    from chextrain.ood import calibrate_ood, image_features

    train = [(f, 0.0) for f in demo_files(demo, "digital", "train")]
    for kind in ("natural", "synthetic-photographic"):
        train += [(f, 1.0) for f in demo_files(demo, kind, "train")]
    x = torch.stack([preprocess(load_image(f), SIZE) for f, _ in train])  # N x 3 x S x S
    y = torch.tensor([label for _, label in train])
    torch.manual_seed(0)
    model = CXRNet("tiny", heads=["digital", "photo"], router=True)
    train_router(model, x, y)
    calibration = [load_image(f) for f in calibration_files(demo)]
    ood = calibrate_ood(model, image_features(model, calibration, SIZE))
    meta = {"image_size": SIZE, "ood": ood, "thresholds": {"photo": {"edema": 0.4}}}
    return save_bundle(model, out, meta)


@contextlib.contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve an ASGI `app` with uvicorn in a background thread; yields its base URL (port 0: a free one)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not server.started:
            raise RuntimeError(f"uvicorn did not start on {host}:{sock.getsockname()[1]}")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoSummary]:
    """The session's small demo tree (DEMO: 60 x-rays, 60 photos, 12 valid x-rays x 3 photos, 48 px)
    and write_demo's summary of it. Read-only."""
    from chextrain.data.demo import write_demo

    root = tmp_path_factory.mktemp("demo")
    return root, write_demo(root, **DEMO, workers=1, progress=False)


@pytest.fixture(scope="session")
def demo_root(demo_tree: tuple[Path, DemoSummary]) -> Path:
    """The folder of `demo_tree`. Read-only: a test that damages data copies it first."""
    return demo_tree[0]


@pytest.fixture(scope="session")
def use_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tree of USE_DEMO: 120 x-rays, 120 photos, 20 valid x-rays (x 3 photos), 64 px. Read-only."""
    from chextrain.data.demo import write_demo

    root = tmp_path_factory.mktemp("use_demo")
    write_demo(root, **USE_DEMO, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def routed_bundle(tmp_path_factory: pytest.TempPathFactory, use_demo: Path) -> Path:
    """`write_routed_bundle` on `use_demo`. Read-only."""
    return write_routed_bundle(tmp_path_factory.mktemp("routed") / "bundle", use_demo)


@pytest.fixture(scope="session")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny two-head bundle with a router and no OOD calibration. Read-only."""
    import torch

    from chextrain.models.bundle import save_bundle
    from chextrain.models.net import CXRNet

    torch.manual_seed(1)
    model = CXRNet("tiny", heads=["digital", "photo"], router=True)
    return save_bundle(model, tmp_path_factory.mktemp("plain") / "bundle", {"image_size": SIZE})
