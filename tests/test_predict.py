"""Predictions table and run evaluation (parquet + metrics.json) on a tiny untrained bundle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

from chextrain.data.catalog import read_catalog
from chextrain.data.images import load_image
from chextrain.data.splits import assign_splits
from chextrain.data.store import ImageStore
from chextrain.data.transforms import Decoding, preprocess
from chextrain.evaluation.predict import (
    EvaluationError,
    calibrate_ood_or_none,
    evaluate_run,
    group_metrics,
    predict,
    predict_rows,
    tune_head_thresholds,
)
from chextrain.labels import SLUGS, apply_policy
from chextrain.models.bundle import save_bundle
from chextrain.models.net import CXRNet
from chextrain.ood import calibrate_ood, image_features

DOMAIN_HEADS = {"digital": "xray", "photo": "photo"}


@pytest.fixture(scope="module")
def catalog(demo_root: Path) -> pd.DataFrame:
    return assign_splits(read_catalog(demo_root), val_fraction=0.25)


@pytest.fixture(scope="module")
def model() -> CXRNet:
    torch.manual_seed(0)
    return CXRNet("tiny", heads=("xray", "photo"), router=True).eval()


def test_table_columns_order_and_probabilities(model: CXRNet, catalog: pd.DataFrame) -> None:
    rows = catalog.loc[catalog["split"] == "test"].iloc[::5]
    table = predict(model, rows, domain_heads=DOMAIN_HEADS, image_size=32, batch_size=4, policy="ignore")
    for column in ("path", "dataset", "domain", "kind", "patient", "study", "image", "view", "head"):
        assert column in table
    assert table["router_prob"].between(0, 1).all()
    assert [c for c in table if c.startswith("prob_")] == [f"prob_{s}" for s in SLUGS]
    assert table["path"].tolist() == rows["path"].tolist()
    assert (table["head"] == table["domain"].map(DOMAIN_HEADS)).all()
    targets, mask = apply_policy(rows, "ignore")
    assert np.array_equal(table[[f"target_{s}" for s in SLUGS]].to_numpy(), targets)
    assert np.array_equal(table[[f"mask_{s}" for s in SLUGS]].to_numpy(), mask)
    # Each probability is the sigmoid of that image's head, on the preprocessed image.
    i = int(np.flatnonzero(rows["domain"].to_numpy() == "photo")[0])
    x = preprocess(load_image(rows.iloc[i]["path"]), 32)[None]
    with torch.no_grad():
        expected = torch.sigmoid(model(x, "photo"))[0].numpy()
    assert np.allclose(table.loc[i, [f"prob_{s}" for s in SLUGS]].to_numpy(dtype=float), expected, atol=1e-5)


def test_fixed_head_and_router_routing(model: CXRNet, catalog: pd.DataFrame) -> None:
    rows = catalog.iloc[:10]
    fixed = predict(model, rows, head="photo", domain_heads=DOMAIN_HEADS, image_size=32)
    assert (fixed["head"] == "photo").all()
    routed = predict(model, rows, head="router", domain_heads=DOMAIN_HEADS, image_size=32)
    expect = np.where(routed["router_prob"] > 0.5, "photo", "xray")
    assert (routed["head"].to_numpy() == expect).all()


def test_routed_scoring_keeps_the_oracle_routing_of_the_same_pass(
    model: CXRNet, catalog: pd.DataFrame
) -> None:
    """head="router": the table follows the router; `oracle` is each image's domain head, byte for byte."""
    rows = catalog.loc[catalog["split"] == "test"].reset_index(drop=True)
    kwargs = {"domain_heads": DOMAIN_HEADS, "image_size": 32, "batch_size": 8, "num_workers": 0}
    routed = predict_rows(model, rows, head="router", **kwargs)
    by_domain = predict_rows(model, rows, **kwargs).table
    pd.testing.assert_frame_equal(routed.oracle, by_domain, check_exact=True)
    wrong = (routed.table["head"] != by_domain["head"]).to_numpy()
    assert 0 < wrong.sum() < len(rows)  # the untrained router errs on some images, not all
    probs = [f"prob_{s}" for s in SLUGS]
    same = routed.table[probs].to_numpy() == by_domain[probs].to_numpy()
    assert same[~wrong].all() and not same[wrong].all(axis=1).any()  # a misrouted image: the other head
    assert predict_rows(model, rows, **kwargs).oracle is None
    with pytest.raises(EvaluationError, match="router"):
        predict(CXRNet("tiny"), rows, head="router", image_size=32)


def test_one_pass_gives_the_table_and_ood_calibration_of_separate_passes(
    model: CXRNet, catalog: pd.DataFrame
) -> None:
    """What a stage does (val predictions with OOD features, then calibration) equals separate passes."""
    rows = catalog.loc[catalog["split"] == "val"].reset_index(drop=True)
    kwargs = {"domain_heads": DOMAIN_HEADS, "image_size": 32, "batch_size": 4}
    val = predict_rows(model, rows, ood_features=True, num_workers=2, **kwargs)  # batches from 2 workers
    calibration = calibrate_ood_or_none(model, val.features)
    assert calibration is not None and calibration["n"] == len(rows) >= 10
    # The table: the same rows in the same order as scored in this process, byte for byte.
    alone = predict(model, rows, num_workers=0, **kwargs)
    pd.testing.assert_frame_equal(val.table, alone, check_exact=True)
    assert val.table["path"].tolist() == rows["path"].tolist()
    assert val.table["prob_edema"].dtype == np.float32
    assert predict_rows(model, rows, num_workers=0, **kwargs).features is None
    # The features: those of each decoded image, batched outside any loader.
    features = image_features(model, [load_image(p) for p in rows["path"]], 32, batch_size=4)
    assert val.features.dtype == np.float32 and np.array_equal(val.features.astype(np.float64), features)
    assert calibration == calibrate_ood(model, features)
    assert calibrate_ood_or_none(model, val.features[:5]) is None  # too few images: uncalibrated


@pytest.mark.parametrize("size", [32, 16])  # 16 px: the 48 px demo JPEGs decode at half scale (draft)
def test_the_store_and_the_files_give_the_same_evaluation(
    model: CXRNet, catalog: pd.DataFrame, tmp_path: Path, size: int
) -> None:
    rows = catalog.loc[catalog["split"] == "val"].reset_index(drop=True)
    kwargs = {"domain_heads": DOMAIN_HEADS, "image_size": size, "batch_size": 8, "num_workers": 0}
    files = predict_rows(model, rows, ood_features=True, **kwargs)
    store = ImageStore(tmp_path / "store", Decoding(size), progress=False)
    stored = predict_rows(model, rows, ood_features=True, store=store, **kwargs)
    probs = [f"prob_{s}" for s in SLUGS]
    a, b = files.table[probs].to_numpy(), stored.table[probs].to_numpy()
    assert np.array_equal(a >= 0.5, b >= 0.5)  # the same decisions
    assert np.abs(a - b).max() == 0.0 and np.array_equal(files.features, stored.features)  # the same pixels
    assert sum(
        json.loads(f.read_text())[0]["decoded"] for f in (tmp_path / "store").rglob("builds.json")
    ) == len(rows)


def test_inputs_follow_the_model_dtype(model: CXRNet, catalog: pd.DataFrame) -> None:
    rows = catalog.loc[catalog["split"] == "val"].reset_index(drop=True)
    kwargs = {"domain_heads": DOMAIN_HEADS, "image_size": 32, "batch_size": 8, "num_workers": 0}
    double = copy.deepcopy(model).double()  # float32 images into a float64 model would raise
    got = predict_rows(double, rows, device="cpu", ood_features=True, **kwargs)
    ref = predict_rows(model, rows, device="cpu", ood_features=True, **kwargs)
    probs = [f"prob_{s}" for s in SLUGS]
    assert (got.table[probs].dtypes == np.float32).all()
    assert np.allclose(got.table[probs].to_numpy(), ref.table[probs].to_numpy(), atol=1e-5)
    assert np.allclose(got.features, ref.features, rtol=1e-4, atol=1e-5)
    assert calibrate_ood_or_none(double, got.features) is not None


def test_group_metrics_tuned_only_for_single_head_groups() -> None:
    rng = np.random.default_rng(0)
    n = 40
    table = pd.DataFrame(
        {
            "dataset": ["chexpert"] * 20 + ["chexphoto"] * 20,
            "kind": ["digital"] * 20 + ["natural"] * 20,
            "patient": [f"p{i % 10}" for i in range(n)],
            "head": ["a"] * 20 + ["b"] * 10 + ["a"] * 10,
        }
    )
    for s in SLUGS:
        table[f"target_{s}"] = (rng.random(n) > 0.5).astype(float)
        table[f"prob_{s}"] = rng.random(n)
        table[f"mask_{s}"] = 1.0
    thresholds = tune_head_thresholds(table)
    groups = group_metrics(table, thresholds)
    assert set(groups) == {"Standard", "Photos", "kind:digital", "kind:natural"}
    assert "tuned" in groups["Standard"] and "tuned" not in groups["Photos"]  # Photos used two heads
    part = table.iloc[:20]
    for s in SLUGS:
        y, p = part[f"target_{s}"], part[f"prob_{s}"]
        assert groups["Standard"]["at_0.5"][s]["auc"] == pytest.approx(roc_auc_score(y, p))
        assert groups["Standard"]["at_0.5"][s]["f1"] == pytest.approx(f1_score(y, p >= 0.5))
        assert groups["Standard"]["tuned"][s]["mcc"] == pytest.approx(
            matthews_corrcoef(y, p >= thresholds["a"][s])
        )


@pytest.fixture(scope="module")
def bundle(model: CXRNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    thresholds = {"xray": dict.fromkeys(SLUGS, 0.4), "photo": dict.fromkeys(SLUGS, 0.6)}
    save_bundle(
        model,
        run,
        {
            "image_size": 32,
            "domain_heads": DOMAIN_HEADS,
            "thresholds": thresholds,
            "config": {
                "split": {"by": "patient", "val_fraction": 0.25, "seed": 0, "frontal_only": False},
                "policy": "zeros",
            },
        },
    )
    return run


def test_evaluate_run_writes_predictions_and_metrics(
    bundle: Path, demo_root: Path, catalog: pd.DataFrame
) -> None:
    doc = evaluate_run(bundle, demo_root, "val")
    # A routed bundle is scored through its router (as deployed), its oracle routing beside it.
    routed = pd.read_parquet(bundle / "predictions_val.parquet")
    assert (routed["head"] == np.where(routed["router_prob"] > 0.5, "photo", "xray")).all()
    main = json.loads((bundle / "metrics_val.json").read_text())
    xray_heads = sorted(set(routed.loc[routed["dataset"] == "chexpert", "head"]))
    assert main["groups"]["Standard"]["heads"] == doc["groups"]["Standard"]["heads"] == xray_heads
    assert xray_heads != ["xray"]  # the untrained router sends x-rays to the photo head
    table = pd.read_parquet(bundle / "predictions_val_oracle.parquet")
    on_disk = json.loads((bundle / "metrics_val_oracle.json").read_text())
    assert on_disk["routing"] == "oracle" and "routing" not in doc
    assert on_disk["split"] == "val" and on_disk["n"] == len(table) == (catalog["split"] == "val").sum()
    assert doc["groups"]["Standard"]["n"] == on_disk["groups"]["Standard"]["n"]
    # The run's own split settings and policy: zeros turns every uncertain label into 0, unmasked.
    assert set(table["split"]) == {"val"} and (table[[f"mask_{s}" for s in SLUGS]] == 1).all().all()
    photos = on_disk["groups"]["Photos"]
    assert photos["heads"] == ["photo"] and photos["thresholds"] == dict.fromkeys(SLUGS, 0.6)
    part = table.loc[table["dataset"] == "chexphoto"]
    for s in SLUGS:
        y, p = part[f"target_{s}"].to_numpy(), part[f"prob_{s}"].to_numpy()
        assert photos["tuned"][s]["mcc"] == pytest.approx(matthews_corrcoef(y, p >= 0.6))
        assert photos["at_0.5"][s]["positives"] == y.sum()


def test_evaluate_run_with_a_head_writes_separate_files(bundle: Path, demo_root: Path) -> None:
    evaluate_run(bundle, demo_root, "test", head="xray")
    table = pd.read_parquet(bundle / "predictions_test_xray.parquet")
    assert (table["head"] == "xray").all() and (bundle / "metrics_test_xray.json").exists()


def test_evaluate_run_refuses_bad_requests(bundle: Path, demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="split 'train'"):
        evaluate_run(bundle, demo_root, "train")
    with pytest.raises(EvaluationError, match="head 'chexpert'.*heads \\['xray', 'photo'\\]"):
        evaluate_run(bundle, demo_root, "test", head="chexpert")
    with pytest.raises(ValueError, match="model.json"):
        evaluate_run(tmp_path, demo_root, "test")


def test_evaluate_run_reads_a_store_at_the_bundle_size(bundle: Path, demo_root: Path, tmp_path: Path) -> None:
    plain = evaluate_run(bundle, demo_root, "test")
    stored = evaluate_run(bundle, demo_root, "test", store=tmp_path / "store")
    assert stored == plain
    assert [p.parent.name for p in (tmp_path / "store").rglob("images.u8")] == [Decoding(32).tag] * 2
