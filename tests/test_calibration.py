"""Calibration maths: ECE, Brier, reliability bins, temperature scaling (by hand and vs scikit-learn)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from chextrain.evaluation import calibration as C
from chextrain.evaluation import report, tables
from chextrain.evaluation.bootstrap import Bootstrap, interval
from chextrain.evaluation.predict import arrays
from chextrain.evaluation.report import write_report
from chextrain.evaluation.tables import COLUMNS
from chextrain.labels import SLUGS
from tests.test_report import make_study


def test_ece_and_brier_of_hand_worked_cases() -> None:
    # two bins (0, .5], (.5, 1]: bin 0 holds p = .2, .4 (mean .3) with outcomes 0, 1 (rate .5): gap .2;
    # bin 1 holds p = .6, .8, 1.0 (mean .8) with outcomes 1, 1, 1: gap .2. ECE = 2/5 .2 + 3/5 .2 = .2
    y = np.array([0, 1, 1, 1, 1])
    p = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    assert C.ece(y, p, n_bins=2) == pytest.approx(0.2)
    assert C.brier(y, p) == pytest.approx((0.04 + 0.36 + 0.16 + 0.04 + 0.0) / 5)
    assert C.ece([0, 1], [0.0, 1.0]) == 0.0  # perfect
    assert C.ece([1, 1, 1, 1], [0.5] * 4) == pytest.approx(0.5)
    # an edge belongs to the bin below it (calibration_curve's rule): 0.5 is in (0, .5]
    assert list(C.bin_index(np.array([0.0, 0.5, 0.50001, 1.0]), 2)) == [0, 0, 1, 1]


def test_against_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(500) ** 2
    y = (rng.random(500) < p * 0.8).astype(int)
    assert C.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    for n_bins in (5, 10, 15):
        frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
        bins = C.reliability_bins(y, p, n_bins)
        full = bins.count > 0
        np.testing.assert_allclose(bins.frac_pos[full], frac)
        np.testing.assert_allclose(bins.mean_prob[full], mean)
        # ECE from scikit-learn's bins: share of entries x |rate - mean probability|
        counts = bins.count[full]
        assert C.ece(y, p, n_bins) == pytest.approx(float((counts / 500 * np.abs(frac - mean)).sum()))


def test_weights_are_repeated_rows() -> None:
    rng = np.random.default_rng(1)
    p, y = rng.random(40), (rng.random(40) < 0.5).astype(int)
    w = rng.integers(0, 3, size=(3, 40)).astype(float)  # 3 resamples
    many = C.ece(y, p, weights=w)
    assert many.shape == (3,)
    for b in range(3):
        reps = np.repeat(np.arange(40), w[b].astype(int))
        assert many[b] == pytest.approx(C.ece(y[reps], p[reps]))
        assert C.brier(y, p, weights=w)[b] == pytest.approx(brier_score_loss(y[reps], p[reps]))


def test_temperature_recovers_a_known_overconfidence() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, 20_000)  # true logits
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(float)
    t = C.fit_temperature(y, 3.0 * z)  # the model is 3x over-confident
    assert t == pytest.approx(3.0, rel=0.05)
    assert C.nll(y, 3.0 * z, t) < C.nll(y, 3.0 * z, 1.0)
    p = 1 / (1 + np.exp(-3.0 * z))
    assert C.ece(y, C.apply_temperature(p, t)) < C.ece(y, p) / 3


def test_apply_temperature_keeps_order_dtype_and_identity() -> None:
    p = np.array([[0.0, 0.1, 0.5, 0.9, 1.0]], dtype=np.float32)
    assert C.apply_temperature(p, 1.0) is p  # old bundles: exactly as before
    q = C.apply_temperature(p, 2.0)
    assert q.dtype == np.float32 and q[0, 0] == 0.0 and q[0, 4] == 1.0 and q[0, 2] == 0.5
    assert q[0, 1] == pytest.approx(1 / (1 + np.exp(-np.log(0.1 / 0.9) / 2)), rel=1e-6)
    assert np.all(np.diff(q[0]) >= 0)
    for bad in (0, -1.0, float("nan"), "2", True):
        with pytest.raises(C.CalibrationError, match="temperature"):
            C.apply_temperature(p, bad)


def test_head_temperatures_fit_each_head_on_its_unmasked_rows() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    rows = {"head": np.where(np.arange(n) % 2, "photo", "digital")}
    scale = np.where(rows["head"] == "photo", 2.5, 1.0)  # the photo head is over-confident
    for s in SLUGS:
        z = rng.normal(0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)
        rows[f"prob_{s}"] = (1 / (1 + np.exp(-scale * z))).astype(np.float32)
        rows[f"target_{s}"] = y
        rows[f"mask_{s}"] = np.ones(n, np.float32)
    table = pd.DataFrame(rows)
    table.loc[:99, f"target_{SLUGS[0]}"] = 7.0  # garbage under a mask is never read
    table.loc[:99, f"mask_{SLUGS[0]}"] = 0.0
    found = C.head_temperatures(table)
    assert found["photo"] == pytest.approx(2.5, rel=0.08)
    assert found["digital"] == pytest.approx(1.0, rel=0.08)
    one_class = table.assign(**{f"target_{s}": np.float32(1.0) for s in SLUGS})
    assert C.head_temperatures(one_class) == {"digital": 1.0, "photo": 1.0}


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(C.CalibrationError, match="0/1"):
        C.ece([0, 2], [0.1, 0.2])
    with pytest.raises(C.CalibrationError, match=r"within \[0, 1\]"):
        C.brier([0, 1], [0.1, 1.2])
    with pytest.raises(C.CalibrationError, match="length"):
        C.ece([0, 1], [0.1])
    with pytest.raises(C.CalibrationError, match="weights"):
        C.ece([0, 1], [0.1, 0.2], weights=np.ones((2, 3)))


# ---------------------------------------------------------------- the report's calibration section


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, report.ReportPaths]:
    """The canned study of test_report, one stage with temperatures in model.json; reported once."""
    out = make_study(tmp_path_factory.mktemp("calibration"))
    meta = out / "stages" / "mixed" / "model.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "temperature": {"main": 2.0}}))
    return out, write_report(out, n_boot=200, seed=3)


def test_report_scores_ece_and_brier_with_patient_bootstrap_cis(
    reported: tuple[Path, report.ReportPaths],
) -> None:
    out, paths = reported
    df = pd.read_csv(paths.tables / "calibration.csv", keep_default_na=False, na_values=[""])
    assert list(df.columns) == ["strategy", "comparison", "scaling", *COLUMNS[2:]]
    assert set(df["comparison"]) == {"Standard", "Photos", "Film"}
    assert set(df["metric"]) == {"ece", "brier"} and set(df["scaling"]) == {"none", "temperature"}
    assert not {s for s in df["strategy"] if "digital +" in s}  # fixed-budget stages are left out
    table = tables.read_predictions(out / "stages" / "baseline" / "predictions_test.parquet")
    rows = tables.side_rows(table, "Photos")
    boot = Bootstrap(arrays(table), table["patient"].to_numpy(), 200, 3)  # the report's resamples
    for slug in SLUGS:
        keep = rows[table[f"mask_{slug}"].to_numpy()[rows] > 0]
        y, p = table[f"target_{slug}"].to_numpy()[keep], table[f"prob_{slug}"].to_numpy()[keep]
        row = df.loc[
            (df["strategy"] == "Baseline")
            & (df["comparison"] == "Photos")
            & (df["scaling"] == "none")
            & (df["pathology"] == slug)
        ].set_index("metric")
        assert row.loc["ece", "value"] == pytest.approx(C.ece(y, p))
        assert row.loc["brier", "value"] == pytest.approx(brier_score_loss(y, p))
        w = np.concatenate(list(boot.weights(keep)))  # patients drawn, all their images kept
        low, high = interval(C.brier(y, p, weights=w))
        assert (row.loc["brier", "ci_low"], row.loc["brier", "ci_high"]) == pytest.approx((low, high))
        assert low < row.loc["brier", "value"] < high


def test_report_shows_ece_before_and_after_the_bundle_temperature(
    reported: tuple[Path, report.ReportPaths],
) -> None:
    out, paths = reported
    df = pd.read_csv(paths.tables / "calibration.csv")
    table = tables.read_predictions(out / "stages" / "mixed" / "predictions_test.parquet")
    rows = tables.side_rows(table, "Standard")
    slug = SLUGS[0]
    y, p = table[f"target_{slug}"].to_numpy()[rows], table[f"prob_{slug}"].to_numpy()[rows]
    pick = (df["strategy"] == "Mixed Training") & (df["comparison"] == "Standard") & (df["pathology"] == slug)
    scaled = df.loc[pick & (df["scaling"] == "temperature") & (df["metric"] == "ece"), "value"].item()
    assert scaled == pytest.approx(C.ece(y, C.apply_temperature(p, 2.0)))  # model.json's T
    assert scaled != pytest.approx(
        df.loc[pick & (df["scaling"] == "none") & (df["metric"] == "ece"), "value"].item()
    )
    md = paths.md.read_text()
    section = md[md.index("## Calibration (test)") : md.index("## Subgroups")]
    assert "Before and after temperature scaling" in section and "ECE scaled" in section
    assert "| Mixed Training | main 2.00 | model.json |" in section
    assert "fitted on saved validation predictions" in section  # stages whose model.json has none
    assert "![Reliability diagrams" in section and "figures/reliability.png" in section
    assert md.index("## Calibration") < md.index("## Appendix")
    assert "Calibration (test)" in paths.html.read_text()


def test_reliability_figure_is_deterministic(
    reported: tuple[Path, report.ReportPaths], tmp_path: Path
) -> None:
    out, paths = reported
    first = (paths.figures / "reliability.png").read_bytes()
    copy = shutil.copytree(out, tmp_path / "again")
    again = write_report(copy, n_boot=200, seed=3)
    assert (again.figures / "reliability.png").read_bytes() == first
    assert (again.tables / "calibration.csv").read_bytes() == (paths.tables / "calibration.csv").read_bytes()
