"""Subgroups: age bands, the 30-patient rule, numbers equal to scikit-learn on the subgroup's rows,
CIs from the one bootstrap engine, which strategies are broken down, and the report's section."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import matthews_corrcoef, roc_auc_score

from chextrain.evaluation import report, subgroups, tables
from chextrain.evaluation.bootstrap import Bootstrap, estimates
from chextrain.evaluation.predict import arrays
from chextrain.evaluation.report import write_report
from chextrain.labels import SLUGS
from tests.test_report import make_study, predictions

SEXES = ("Female", "Male")


def describe(table: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """The catalog columns predictions carry (sex, age, ap_pa), drawn per patient; film has no age."""
    rng = np.random.default_rng(seed)
    patients = sorted(table["patient"].unique())
    sex = dict(zip(patients, rng.choice(SEXES, len(patients)), strict=True))
    age = dict(
        zip(
            patients, rng.choice([25.0, 45.0, 70.0, 85.0], len(patients), p=[0.1, 0.2, 0.6, 0.1]), strict=True
        )
    )
    out = table.assign(
        sex=[sex[p] for p in table["patient"]],
        age=[age[p] for p in table["patient"]],
        ap_pa=np.where(table["image"] == "view1_frontal", "AP", "PA"),
    )
    out.loc[out["kind"] == "film", "age"] = np.nan
    return out


def test_age_bands_and_labels() -> None:
    cases = {
        0: "<40",
        39.9: "<40",
        40: "40-59",
        59.99: "40-59",
        60: "60-79",
        79.5: "60-79",
        80: "80+",
        101: "80+",
    }
    for age, band in cases.items():
        assert subgroups.age_band(age) == band
    for blank in (np.nan, None, "", "x", -3):
        assert subgroups.age_band(blank) == ""
    table = pd.DataFrame({"age": [30.0, np.nan, 65.0], "sex": ["Male", None, " Female "]})
    assert list(subgroups.labels(table, "age")) == ["<40", "", "60-79"]
    assert list(subgroups.labels(table, "sex")) == ["Male", "", "Female"]
    assert list(subgroups.labels(table, "view")) == ["", "", ""]  # no column: no subgroups
    with pytest.raises(tables.ReportError, match="attribute 'race'"):
        subgroups.labels(table, "race")


def test_numbers_equal_scikit_learn_and_small_groups_get_none() -> None:
    table = describe(predictions(np.random.default_rng(1), n_patients=90, skill=1.5, photo_skill=1.0))
    found = pd.DataFrame(subgroups.subgroup_rows(table, "S", n_boot=50, seed=4))
    assert list(found.columns) == list(subgroups.COLUMNS)
    standard = tables.side_rows(table, "Standard")
    part = table.iloc[standard]
    counts = part.groupby(subgroups.labels(part, "age"))["patient"].nunique()
    small = [band for band, n in counts.items() if n < 30]
    big = [band for band, n in counts.items() if n >= 30]
    assert small and big  # the draw makes both kinds
    for band in small:
        rows = found.loc[(found["comparison"] == "Standard") & (found["subgroup"] == band)]
        assert set(rows["note"]) == {"too small"} and rows["value"].isna().all()
        assert rows["patients"].iloc[0] == counts[band] < 30
    for band in big:
        sel = part.loc[subgroups.labels(part, "age") == band]
        mine = found.loc[(found["comparison"] == "Standard") & (found["subgroup"] == band)]
        assert set(mine["note"]) == {""} and mine["patients"].iloc[0] == sel["patient"].nunique()
        for slug in SLUGS:
            keep = sel[f"mask_{slug}"] > 0
            y, p = sel.loc[keep, f"target_{slug}"], sel.loc[keep, f"prob_{slug}"]
            got = mine.loc[mine["pathology"] == slug].set_index("metric")["value"]
            assert got["mcc"] == pytest.approx(matthews_corrcoef(y, p >= 0.5))
            assert got["auc"] == pytest.approx(roc_auc_score(y, p))
    sexes = found.loc[(found["comparison"] == "Photos") & (found["attribute"] == "sex"), "subgroup"]
    assert set(sexes) == set(SEXES)


def test_cis_come_from_patient_resamples_of_the_whole_table() -> None:
    table = describe(predictions(np.random.default_rng(2), n_patients=100, skill=1.5, photo_skill=1.0))
    found = pd.DataFrame(subgroups.subgroup_rows(table, "S", n_boot=80, seed=5))
    rows = tables.side_rows(table, "Photos")
    chosen = rows[subgroups.labels(table, "sex")[rows] == "Female"]
    want = estimates(
        Bootstrap(arrays(table), table["patient"].to_numpy(), 80, 5).values(chosen, metrics=("mcc", "auc"))
    )
    mine = found.loc[(found["comparison"] == "Photos") & (found["subgroup"] == "Female")]
    for r in mine.itertuples():
        assert (r.value, r.ci_low, r.ci_high) == pytest.approx(want[r.pathology][r.metric])
    image_level = Bootstrap(arrays(table), table["path"].to_numpy(), 80, 5).values(chosen, metrics=("mcc",))
    avg = mine.loc[(mine["pathology"] == "average") & (mine["metric"] == "mcc")].iloc[0]
    assert (avg.ci_low, avg.ci_high) != pytest.approx(estimates(image_level)["average"]["mcc"][1:])


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, report.ReportPaths]:
    """The canned study of test_report with sex / age / AP-PA in its predictions; reported once."""
    out = make_study(tmp_path_factory.mktemp("subgroups"))
    for i, file in enumerate(sorted(out.glob("stages/*/predictions_*.parquet"))):
        describe(pd.read_parquet(file), seed=i).to_parquet(file, index=False)
    return out, write_report(out, n_boot=100, seed=3)


def test_report_breaks_down_the_best_strategy_and_the_baseline(
    reported: tuple[Path, report.ReportPaths],
) -> None:
    out, paths = reported
    df = pd.read_csv(paths.tables / "subgroups.csv", keep_default_na=False, na_values=[""])
    main = pd.read_csv(paths.tables / "table2_test.csv")
    avg = main.loc[(main["metric"] == "mcc") & (main["pathology"] == "average")]
    avg = (
        avg.loc[avg["comparison"].isin(["Standard", "Photos"])]
        .groupby("strategy", sort=False)["value"]
        .mean()
    )
    best = avg.idxmax()
    assert best != "Baseline" and list(dict.fromkeys(df["strategy"])) == [best, "Baseline"]
    assert set(df["attribute"]) == {"sex", "age", "ap_pa", "view"}
    assert {"too small", ""} == set(df["note"].fillna(""))
    md = paths.md.read_text()
    section = md[md.index("## Subgroups (test)") : md.index("## Appendix")]
    assert f"for {best} (best by the mean" in section and "Baseline (the baseline)" in section
    assert "| Age band: 80+ |" in section and "too small" in section and "fewer than 30 patients" in section
    part = df.loc[(df["strategy"] == "Baseline") & (df["comparison"] == "Photos")]
    ap = part.loc[
        (part["subgroup"] == "AP") & (part["pathology"] == "average") & (part["metric"] == "auc")
    ].iloc[0]
    assert ap.patients == 40 and f"| AP/PA: AP | 40 | {ap.n} |" in section  # every patient has a view1 AP
    assert f"{ap.value:.3f} [{ap.ci_low:.3f}, {ap.ci_high:.3f}] |" in section
    female = part.loc[part["subgroup"] == "Female"].iloc[0]
    assert (
        female.patients < 30
        and f"| Sex: Female | {female.patients} | {female.n} | too small | too small |" in section
    )
    assert "Subgroups (test)" in paths.html.read_text()


def test_tables_without_sex_age_or_ap_pa_and_studies_without_numbers(tmp_path: Path) -> None:
    out = make_study(tmp_path)  # the canned tables carry `view` only: one subgroup (frontal) per side
    paths = write_report(out, n_boot=0, seed=0)
    df = pd.read_csv(paths.tables / "subgroups.csv")
    assert set(df["attribute"]) == {"view"} and set(df["subgroup"]) == {"frontal"}
    assert df["ci_low"].isna().all() and df.loc[df["note"].isna(), "value"].notna().all()  # no intervals
    assert set(df.loc[df["note"] == "too small", "comparison"]) == {"Film"}  # 6 film patients
    assert subgroups.chosen_strategies(pd.DataFrame(columns=tables.COLUMNS), []) == []
    blocks = subgroups.section({}, [], pd.DataFrame(columns=tables.COLUMNS), n_boot=0, seed=0)[1]
    assert "no strategy has numbers" in blocks[-1].text
