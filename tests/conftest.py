"""Shared fixtures: one tiny demo tree (official CheXpert + CheXphoto layouts) per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from chextrain.data.demo import write_demo


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo data root: 60 x-rays, 60 photos, 12 valid x-rays (x 3 photos), 48 px wide.

    Session-scoped and shared: tests must not write into it.
    """
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, digital=60, photos=60, valid=12, size=48, seed=0, workers=1, progress=False)
    return root
