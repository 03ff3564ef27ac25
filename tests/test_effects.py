"""The report's effect of rectification: Photos MCC and AUC, rectified against its plain twin, paired CIs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from chextrain.evaluation import effects
from chextrain.evaluation.report import write_report
from chextrain.labels import SLUGS
from tests.test_report import make_study

CONFIG = {"name": "mixed", "label": "Mixed Training", "data": {"train": ["chexpert", "chexphoto"]}}
CONFIG["preprocessing"] = {"name": "imagenet", "resize": "stretch"}


def _add_rectified(study: Path, rng: np.random.Generator) -> pd.DataFrame:
    """A `mixed_rectified` stage: mixed's test photos with sharper probabilities (the same photos)."""
    stages = study / "stages"
    (stages / "mixed" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    shutil.copytree(stages / "mixed", stages / "mixed_rectified")
    rectified = {**CONFIG, "name": "mixed_rectified", "label": "Mixed + Rectified Photos", "num_workers": 3}
    rectified["preprocessing"] = {**CONFIG["preprocessing"], "rectify": {"model": "classical"}}
    (stages / "mixed_rectified" / "config.yaml").write_text(yaml.safe_dump(rectified))
    for split in ("val", "test"):
        path = stages / "mixed_rectified" / f"predictions_{split}.parquet"
        table = pd.read_parquet(path)
        photo = (table["domain"] == "photo").to_numpy()
        for s in SLUGS:
            t = table[f"target_{s}"].to_numpy()
            sharper = 1 / (1 + np.exp(-(3.0 * (2 * t - 1) + rng.normal(0, 1, len(t)))))
            table.loc[photo, f"prob_{s}"] = sharper[photo].astype(np.float32)
        table = table.sample(frac=1.0, random_state=0)  # row order must not matter: photos match by path
        table.to_parquet(path, index=False)
    info = json.loads((study / "study.json").read_text())
    mixed = next(s for s in info["stages"] if s["name"] == "mixed")
    info["stages"].append(
        {
            **mixed,
            "name": "mixed_rectified",
            "label": "Mixed + Rectified Photos",
            "dir": str(stages / "mixed_rectified"),
        }
    )
    (study / "study.json").write_text(json.dumps(info))
    return pd.read_parquet(stages / "mixed_rectified" / "predictions_test.parquet")


def _photos_average(table: pd.DataFrame, metric: str) -> float:
    part = table.loc[(table["domain"] == "photo") & (table["kind"] != "film")]
    values = []
    for s in SLUGS:
        keep = part[f"mask_{s}"].to_numpy() > 0
        t, p = part[f"target_{s}"].to_numpy()[keep], part[f"prob_{s}"].to_numpy()[keep]
        values.append(matthews_corrcoef(t, p >= 0.5) if metric == "mcc" else roc_auc_score(t, p))
    return float(np.mean(values))


def test_the_report_shows_rectifications_paired_effect_on_photos(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    rectified = _add_rectified(study, np.random.default_rng(5))
    plain = pd.read_parquet(study / "stages" / "mixed" / "predictions_test.parquet")
    paths = write_report(study, n_boot=100, seed=3)
    df = pd.read_csv(paths.tables / "rectify_effect.csv")
    assert list(df.columns) == list(effects.COLUMNS)
    assert set(df["strategy"]) == {"Mixed + Rectified Photos"} and set(df["reference"]) == {"Mixed Training"}
    assert set(df["split"]) == {"test"} and set(df["metric"]) == {"mcc", "auc"}
    avg = df.loc[df["pathology"] == "average"].set_index(["row", "metric"])
    n_photos = int(((plain["domain"] == "photo") & (plain["kind"] != "film")).sum())
    assert set(avg["n"]) == {n_photos}
    for metric in ("mcc", "auc"):
        ours, theirs = _photos_average(rectified, metric), _photos_average(plain, metric)
        assert np.isclose(avg.loc[("rectified", metric), "value"], ours)
        assert np.isclose(avg.loc[("plain", metric), "value"], theirs)
        effect = avg.loc[("rectified - plain", metric)]
        assert np.isclose(effect["value"], ours - theirs)
        assert effect["ci_low"] <= effect["value"] <= effect["ci_high"]
        assert effect["ci_low"] > 0  # sharper photo probabilities: a clear gain
    md = paths.md.read_text()
    assert "## Effect of rectification (test)" in md
    assert md.index("Effect of rectification") < md.index("Appendix")


def test_the_difference_is_paired_on_shared_patient_resamples() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        for kind in ("natural", "synthetic-digital"):
            target = (rng.random(len(SLUGS)) < 0.5).astype(np.float32)
            row = {"path": f"/p/{i}/{kind}.jpg", "dataset": "chexphoto", "domain": "photo", "kind": kind}
            row |= {"patient": f"patient{i:05d}", "study": "study1", "image": "view1_frontal"}
            for j, s in enumerate(SLUGS):
                row |= {f"prob_{s}": float(rng.random()), f"target_{s}": target[j], f"mask_{s}": 1.0}
            rows.append(row)
    table = pd.DataFrame(rows)
    found = effects.effect_rows(table, table.copy(), "a", "b", "test", n_boot=50, seed=1)
    same = pd.DataFrame(found).query("row == 'rectified - plain'")
    # identical predictions: every paired resample difference is 0 (unpaired resamples would not be)
    assert (same[["value", "ci_low", "ci_high"]].abs().to_numpy() < 1e-12).all()


def test_no_rectified_stage_no_section(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    paths = write_report(study, n_boot=0, seed=3)
    assert not (paths.tables / "rectify_effect.csv").exists()
    assert "rectification" not in paths.md.read_text()
