"""Linear probe, kNN probe, pair similarity, `probe_run` and the `chextrain probe` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.evaluation.probe import (
    ProbeError,
    auc_by_pathology,
    knn_probe,
    linear_probe,
    pair_similarity,
    probe_run,
)
from chextrain.labels import SLUGS
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.models.weights import WeightsError


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features N x 8 whose first 5 coordinates carry the 5 targets (N x 5), plus noise."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, 5)) < 0.4).astype(np.float32)
    x = np.concatenate([t * 2.0 - 1.0, np.zeros((n, 3))], axis=1) + rng.normal(0, 0.3, (n, 8))
    return x.astype(np.float32), t


def test_auc_by_pathology_matches_sklearn_and_skips_one_class_columns() -> None:
    rng = np.random.default_rng(0)
    t = (rng.random((40, 5)) < 0.5).astype(np.float32)
    t[:, 4] = 0.0  # a single class: AUC undefined
    p = rng.random((40, 5))
    mask = np.ones_like(t)
    mask[:10, 0] = 0.0
    out = auc_by_pathology(t, p, mask)
    assert out["pleural_effusion"] == pytest.approx(roc_auc_score(t[10:, 0], p[10:, 0]))
    assert out["edema"] == pytest.approx(roc_auc_score(t[:, 1], p[:, 1]))
    assert np.isnan(out["cardiomegaly"])
    assert out["mean"] == pytest.approx(np.mean([out[s] for s in SLUGS[:4]]))


def test_linear_and_knn_probes_separate_separable_features() -> None:
    x, t = _separable(120, 0)
    xt, tt = _separable(60, 1)
    mask = np.ones_like(t)
    for probs in (linear_probe(x, t, mask, xt), knn_probe(x, t, mask, xt, k=5)):
        assert probs.shape == (60, 5)
        assert auc_by_pathology(tt, probs, np.ones_like(tt))["mean"] > 0.95
    one_class = t.copy()
    one_class[:, 2] = 1.0
    assert np.isnan(linear_probe(x, one_class, mask, xt)[:, 2]).all()
    assert np.isnan(knn_probe(x, one_class, mask, xt)[:, 2]).all()
    masked = mask.copy()
    masked[t[:, 3] == 1, 3] = 0.0  # only negatives left unmasked
    assert np.isnan(linear_probe(x, t, masked, xt)[:, 3]).all()


def test_pair_similarity_counts_pairs_and_non_pairs() -> None:
    rows = pd.DataFrame(
        {
            "domain": ["digital", "digital", "photo", "photo", "photo"],
            "kind": ["digital", "digital", "natural", "natural", "synthetic-digital"],
            "patient": ["p1", "p2", "p1", "p2", "p1"],
            "study": ["study1"] * 5,
            "image": ["view1_frontal"] * 5,
        }
    )
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    features = np.stack([a, b, a, b, -a])  # photos 1-2 copy their x-ray; photo 3 is its opposite
    out = pair_similarity(features, rows)
    assert out["n_pairs"] == 3 and out["n_non_pairs"] == 3
    z = features - features.mean(axis=0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    assert out["pair"] == pytest.approx((z[0] @ z[2] + z[1] @ z[3] + z[0] @ z[4]) / 3)
    assert out["non_pair"] == pytest.approx((z[0] @ z[3] + z[1] @ z[2] + z[1] @ z[4]) / 3)
    assert out["gap"] == pytest.approx(out["pair"] - out["non_pair"])
    assert out["by_kind"]["natural"]["pair"] == pytest.approx(1.0)
    assert out["by_kind"]["synthetic-digital"]["n_pairs"] == 1 and out["by_kind"]["natural"]["n_pairs"] == 2
    with pytest.raises(ProbeError, match="4 rows for 5"):
        pair_similarity(features[:4], rows)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = CXRNet("tiny")
    return save_bundle(model, tmp_path_factory.mktemp("probe") / "run", {"image_size": 32, "stage": "rand"})


def test_probe_run_writes_auc_tables_and_pair_similarity(random_run: Path, demo_root: Path) -> None:
    document = probe_run(random_run, demo_root, k=5)
    written = json.loads((random_run / "probe.json").read_text())
    assert written["n_train"] == document["n_train"] > 0 and written["eval_split"] == "test"
    assert (written["objective"], written["backbone"], written["num_features"]) == ("supervised", "tiny", 48)
    for method in ("linear", "knn"):
        assert set(written["auc"][method]) == {"All", "Standard", "Photos"}
        for group in written["auc"][method].values():
            assert set(group) == {*SLUGS, "mean"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in group.values())
    pairs = written["pairs"]
    assert pairs["n_pairs"] == 36 and pairs["n_non_pairs"] == 12 * 36 - 36  # 12 x-rays x 3 photos each
    assert set(pairs["by_kind"]) == {"natural", "synthetic-digital", "synthetic-photographic"}
    assert -1.0 <= pairs["non_pair"] < pairs["pair"] <= 1.0  # even random features see the same image


def test_probe_run_errors(random_run: Path, demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="no catalog rows in split 'train2'"):
        probe_run(random_run, demo_root, split="train2")
    with pytest.raises(ProbeError, match="k must be >= 1"):
        probe_run(random_run, demo_root, k=0)
    with pytest.raises(ProbeError, match="needs data_root or a catalog"):
        probe_run(random_run)
    with pytest.raises(WeightsError):
        probe_run(tmp_path, demo_root)


def test_probe_command_prints_tables_and_writes_probe_json(
    random_run: Path, demo_root: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    result = runner.invoke(build_app(), ["probe", str(random_run), "--data", str(demo_root), "--k", "3"])
    assert result.exit_code == 0, result.output
    for text in ("linear probe AUC", "knn probe AUC", "pleural_effusion", "same x-ray", "synthetic-digital"):
        assert text in result.output
    assert json.loads((random_run / "probe.json").read_text())["k"] == 3
    bad = runner.invoke(build_app(), ["probe", str(tmp_path), "--data", str(demo_root)])
    assert bad.exit_code == 2 and "error" in bad.output
    assert runner.invoke(build_app(), ["probe", "--help"]).exit_code == 0
