"""The study report: numbers from canned predictions tables, CSV schema, blocked stages, md/html."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, roc_auc_score

from chextrain.evaluation import report, tables
from chextrain.evaluation.bootstrap import Bootstrap, estimates
from chextrain.evaluation.metrics import tune_thresholds
from chextrain.evaluation.predict import arrays
from chextrain.evaluation.report import ReportError, headline_rows, write_report
from chextrain.labels import SLUGS

COLUMNS = ["strategy", "comparison", "pathology", "metric", "value", "ci_low", "ci_high"]
KINDS = ("synthetic-digital", "synthetic-photographic", "natural")
NOTE = "ImageNet weights absent: random init"


def predictions(
    rng: np.random.Generator,
    *,
    n_patients: int,
    skill: float,
    photo_skill: float,
    film: int = 0,
    head_digital: str = "main",
    head_photo: str = "main",
    patient_base: int = 0,
) -> pd.DataFrame:
    """A predictions table like predict.predict's: x-rays, 3 photos of each, optional film photos.

    probs = sigmoid(skill * (2 target - 1) + noise): higher skill separates classes better.
    """
    rows = []
    for i in range(n_patients):
        patient = f"patient{patient_base + i:05d}"
        for v in range(1 + (i % 2)):  # one or two x-rays per patient
            image = f"view{v + 1}_frontal"
            target = (rng.random(len(SLUGS)) < 0.4).astype(float)
            rows.append(
                dict(
                    dataset="chexpert",
                    domain="digital",
                    kind="digital",
                    patient=patient,
                    image=image,
                    head=head_digital,
                    target=target,
                    skill=skill,
                )
            )
            for kind in KINDS:
                rows.append(
                    dict(
                        dataset="chexphoto",
                        domain="photo",
                        kind=kind,
                        patient=patient,
                        image=image,
                        head=head_photo,
                        target=target,
                        skill=photo_skill,
                    )
                )
    for f in range(film):
        target = (rng.random(len(SLUGS)) < 0.4).astype(float)
        rows.append(
            dict(
                dataset="chexphoto",
                domain="photo",
                kind="film",
                patient=f"VBSF{f:05d}",
                image="view1_frontal",
                head=head_photo,
                target=target,
                skill=photo_skill,
            )
        )
    out = []
    for r in rows:
        logit = r["skill"] * (2 * r["target"] - 1) + rng.normal(0, 1, len(SLUGS))
        prob = 1 / (1 + np.exp(-logit))
        row = {
            "path": f"/data/{r['dataset']}/{r['kind']}/{r['patient']}/study1/{r['image']}.jpg",
            "dataset": r["dataset"],
            "domain": r["domain"],
            "kind": r["kind"],
            "patient": r["patient"],
            "study": "study1",
            "image": r["image"],
            "view": "frontal",
            "split": "test",
            "head": r["head"],
        }
        for j, s in enumerate(SLUGS):
            row[f"prob_{s}"] = np.float32(prob[j])
            row[f"target_{s}"] = np.float32(r["target"][j])
            row[f"mask_{s}"] = np.float32(1.0)
        out.append(row)
    table = pd.DataFrame(out)
    table.loc[table.index % 7 == 3, f"mask_{SLUGS[2]}"] = 0.0  # some masked entries (policy `ignore`)
    return table


def make_study(root: Path, seed: int = 0) -> Path:
    """A study folder: 3 done strategies, a blocked MoCo stage, a failed stage and 3 budget stages."""
    rng = np.random.default_rng(seed)
    out = root / "study"
    stages = []

    def stage(
        name: str,
        label: str,
        state: str,
        *,
        skill: float = 0.0,
        photo_skill: float = 0.0,
        budget: dict | None = None,
        splits: tuple[str, ...] = ("val", "test"),
        reason: str = "",
        kind: str = "supervised",
        notes: tuple[str, ...] = (),
        heads: tuple[str, str] = ("main", "main"),
        evaluate: tuple[str, ...] | None = None,
    ) -> None:
        folder = out / "stages" / name
        folder.mkdir(parents=True)
        if state == "done":
            for k, split in enumerate(splits):
                table = predictions(
                    rng,
                    n_patients=40,
                    skill=skill,
                    photo_skill=photo_skill,
                    film=6 if split == "test" else 0,
                    head_digital=heads[0],
                    head_photo=heads[1],
                    patient_base=1000 * k,
                )
                table.to_parquet(folder / f"predictions_{split}.parquet", index=False)
            thresholds = {h: {s: 0.4 + 0.05 * j for j, s in enumerate(SLUGS)} for h in set(heads)}
            meta: dict = {"thresholds": thresholds}  # the report tunes its own on predictions_val
            if evaluate is not None:
                meta["config"] = {"evaluate": list(evaluate)}
            (folder / "model.json").write_text(json.dumps(meta))
        stages.append(
            {
                "name": name,
                "label": label,
                "state": state,
                "reason": reason,
                "seconds": 12.5,
                "hash": "abc",
                "dir": str(folder),
                "budget": budget,
                "kind": kind,
                "notes": list(notes),
            }
        )

    stage("baseline", "Baseline", "done", skill=2.0, photo_skill=1.0, notes=(NOTE,))
    stage("mixed", "Mixed Training", "done", skill=1.6, photo_skill=1.5)
    stage("routed", "Mixed + Routed Heads", "done", skill=1.8, photo_skill=1.6, heads=("digital", "photo"))
    stage("moco", "MoCo pre-training", "blocked", reason="needs moco (not implemented)", kind="moco")
    stage("moco_mixed", "MoCo Mixed Training", "blocked", reason="needs moco (blocked)")
    stage("broken", "Broken Strategy", "failed", reason="RuntimeError: out of memory")
    for digital, skill in ((0, 0.8), (200, 1.2), (400, 1.6)):
        stage(
            f"budget_{digital:05d}",
            f"{digital} digital + {400 - digital} photos",
            "done",
            skill=skill,
            photo_skill=2.0 - skill,
            budget={"total": 400, "digital": digital},
            evaluate=("test",),  # validation predictions saved, not reported
        )
    (out / "study.json").write_text(
        json.dumps(
            {"name": "toy", "source": "toy.yaml", "profile": "demo", "stages": stages, "notes": [NOTE]}
        )
    )
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, report.ReportPaths]:
    """One canned study reported once (200 resamples keeps it quick); tests only read it."""
    out = make_study(tmp_path_factory.mktemp("report"))
    return out, write_report(out, n_boot=200, seed=3)


def csv(paths: report.ReportPaths, name: str) -> pd.DataFrame:
    return pd.read_csv(paths.tables / f"{name}.csv")


def side(table: pd.DataFrame, dataset: str, kind: str | None = None) -> pd.DataFrame:
    part = table.loc[table["dataset"] == dataset]
    return part.loc[part["kind"] == kind] if kind else part


def sk(part: pd.DataFrame, slug: str, metric: str, threshold: float = 0.5) -> float:
    """scikit-learn's value of one metric on one pathology's unmasked rows."""
    keep = part[f"mask_{slug}"] > 0
    y, p = part.loc[keep, f"target_{slug}"].to_numpy().astype(int), part.loc[keep, f"prob_{slug}"].to_numpy()
    pred = (p >= threshold).astype(int)
    if metric == "auc":
        return roc_auc_score(y, p)
    if metric == "f1":
        return f1_score(y, pred, zero_division=0)
    return {"mcc": matthews_corrcoef, "accuracy": accuracy_score}[metric](y, pred)


def value(df: pd.DataFrame, **where: str) -> pd.Series:
    sel = np.ones(len(df), dtype=bool)
    for column, v in where.items():
        sel &= (df[column] == v).to_numpy()
    assert sel.sum() == 1, where
    return df.loc[sel].iloc[0]


def test_csv_tables_have_the_documented_schema(study: tuple[Path, report.ReportPaths]) -> None:
    _, paths = study
    t1, t2 = csv(paths, "table1_val"), csv(paths, "table2_test")
    assert set(t1["comparison"]) == {"Standard", "Photos", "Standard - Photos"}
    assert set(t2["comparison"]) == {"Standard", "Photos", "Standard - Photos", "Film"}  # film: test only
    for df in (t1, t2):
        assert list(df.columns) == COLUMNS
        assert set(df["pathology"]) == {*SLUGS, "average"}
        assert set(df["metric"]) == {"mcc", "auc"}
    assert list(csv(paths, "appendix").columns) == ["split", *COLUMNS]
    assert set(csv(paths, "appendix")["metric"]) == {"precision", "recall", "f1", "accuracy"}
    assert set(csv(paths, "appendix")["split"]) == {"val", "test"}
    assert list(csv(paths, "budget").columns) == [*COLUMNS, "digital", "total"]
    assert list(csv(paths, "kinds").columns) == ["split", "strategy", "kind", "n", *COLUMNS[2:]]
    assert list(csv(paths, "thresholds").columns) == [
        "strategy",
        "comparison",
        "threshold",
        "cutoff",
        *COLUMNS[2:],
    ]
    # Budget stages were evaluated on test only: they are in Table 2, not Table 1.
    budget = "0 digital + 400 photos"
    assert budget in set(t2["strategy"]) and budget not in set(t1["strategy"])
    # One row per (strategy, comparison, pathology, metric).
    assert not t2.duplicated(["strategy", "comparison", "pathology", "metric"]).any()


def test_numbers_equal_scikit_learn_on_the_saved_predictions(study: tuple[Path, report.ReportPaths]) -> None:
    out, paths = study
    test = pd.read_parquet(out / "stages" / "baseline" / "predictions_test.parquet")
    t2, appendix = csv(paths, "table2_test"), csv(paths, "appendix")
    std, every_photo = side(test, "chexpert"), side(test, "chexphoto")
    photos = every_photo.loc[every_photo["kind"] != "film"]  # the paper's Photos: no film
    film = every_photo.loc[every_photo["kind"] == "film"]
    for metric in ("mcc", "auc"):
        for slug in SLUGS:
            got = {
                c: value(t2, strategy="Baseline", comparison=c, pathology=slug, metric=metric)["value"]
                for c in ("Standard", "Photos", "Standard - Photos")
            }
            assert got["Standard"] == pytest.approx(sk(std, slug, metric), abs=1e-9)
            assert got["Photos"] == pytest.approx(sk(photos, slug, metric), abs=1e-9)
            # The difference row is exactly Standard minus Photos as the table shows them.
            assert got["Standard - Photos"] == pytest.approx(got["Standard"] - got["Photos"], abs=1e-12)
            if len(np.unique(film[f"target_{slug}"])) == 2 or metric == "mcc":
                row = value(t2, strategy="Baseline", comparison="Film", pathology=slug, metric=metric)
                assert row["value"] == pytest.approx(sk(film, slug, metric), abs=1e-9)
        average = value(t2, strategy="Baseline", comparison="Standard", pathology="average", metric=metric)
        average = average["value"]
        assert average == pytest.approx(np.mean([sk(std, s, metric) for s in SLUGS]), abs=1e-9)
    for metric in ("f1", "accuracy"):
        row = value(
            appendix, split="test", strategy="Baseline", comparison="Photos", pathology="edema", metric=metric
        )
        assert row["value"] == pytest.approx(sk(photos, "edema", metric), abs=1e-9)
    pooled = tables.frame(
        tables.evaluate_table(test, "Baseline", n_boot=0, seed=0, kinds=False, pool_film=True).main, COLUMNS
    )
    assert "Film" not in set(pooled["comparison"])
    got = value(pooled, comparison="Photos", pathology="edema", metric="auc")["value"]
    assert got == pytest.approx(sk(every_photo, "edema", "auc"), abs=1e-9)


def test_confidence_intervals_hold_the_estimate_and_are_reproducible(
    study: tuple[Path, report.ReportPaths], tmp_path: Path
) -> None:
    out, paths = study
    t2 = csv(paths, "table2_test")
    finite = t2.dropna(subset=["ci_low", "ci_high"])
    assert len(finite) > 0.9 * len(t2)
    assert (finite["ci_low"] <= finite["value"] + 1e-12).all()
    assert (finite["value"] <= finite["ci_high"] + 1e-12).all()
    assert (finite["ci_high"] - finite["ci_low"]).max() > 0.01  # real intervals, not point estimates
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("tables", "figures", "report.*"))
    again = write_report(copy, n_boot=200, seed=3)
    for name in ("table1_val", "table2_test", "appendix", "budget", "kinds", "thresholds"):
        assert (again.tables / f"{name}.csv").read_bytes() == (paths.tables / f"{name}.csv").read_bytes()
    table = pd.read_parquet(out / "stages" / "mixed" / "predictions_test.parquet")
    seed3, seed4 = (
        tables.frame(
            tables.evaluate_table(table, "Mixed Training", n_boot=200, seed=s, kinds=False).main, COLUMNS
        )
        for s in (3, 4)
    )
    mine = t2.loc[t2["strategy"] == "Mixed Training"].reset_index(drop=True)
    main = seed3.loc[seed3["metric"].isin(["mcc", "auc"]), "ci_low"]
    assert np.allclose(main, mine["ci_low"], equal_nan=True)
    assert not np.allclose(seed4["ci_low"], seed3["ci_low"], equal_nan=True)
    assert np.allclose(seed4["value"], seed3["value"], equal_nan=True)  # the seed moves only the CIs


def test_hand_made_predictions_give_exact_values(tmp_path: Path) -> None:
    """Perfect x-rays, inverted photos: MCC 1 vs -1, AUC 1 vs 0, a difference of exactly 2 / 1."""
    rng = np.random.default_rng(0)
    table = predictions(rng, n_patients=40, skill=0.0, photo_skill=0.0)  # every resample sees both classes
    for s in SLUGS:
        target = table[f"target_{s}"].to_numpy()
        digital = (table["domain"] == "digital").to_numpy()
        table[f"prob_{s}"] = np.where(digital, 0.2 + 0.6 * target, 0.8 - 0.6 * target).astype(np.float32)
    found = tables.evaluate_table(table, "toy", n_boot=50, seed=0)
    rows = tables.frame(found.main, COLUMNS)
    for slug in (*SLUGS, "average"):
        std = value(rows, comparison="Standard", pathology=slug, metric="mcc")
        assert (std["value"], std["ci_low"], std["ci_high"]) == (1.0, 1.0, 1.0)
        assert value(rows, comparison="Photos", pathology=slug, metric="auc")["value"] == 0.0
        diff = value(rows, comparison="Standard - Photos", pathology=slug, metric="mcc")
        assert (diff["value"], diff["ci_low"], diff["ci_high"]) == (2.0, 2.0, 2.0)
        assert value(rows, comparison="Standard - Photos", pathology=slug, metric="auc")["value"] == 1.0
    assert found.pairs == 3 * (table["dataset"] == "chexpert").sum()
    digital_only = tables.evaluate_table(table.loc[table["domain"] == "digital"], "toy", n_boot=5, seed=0)
    assert {r["comparison"] for r in digital_only.main} == {"Standard"} and digital_only.pairs == 0
    assert digital_only.kinds == []


def test_every_group_of_a_table_uses_one_bootstrap_of_its_patients() -> None:
    """Standard, Photos and each photo kind are scored on the same resamples of the table's patients
    (film patients included), so the report's numbers are bootstrap.Bootstrap's, exactly."""
    table = predictions(np.random.default_rng(1), n_patients=25, skill=1.0, photo_skill=1.0, film=4)
    found = tables.evaluate_table(table, "toy", n_boot=120, seed=7)
    boot = Bootstrap(arrays(table), table["patient"].to_numpy(), 120, seed=7)
    rows, kinds = tables.frame(found.main, COLUMNS), tables.frame(found.kinds, ("kind", "n", *COLUMNS))
    film = (table["kind"] == "film").to_numpy()
    for comparison, dataset in (("Standard", "chexpert"), ("Photos", "chexphoto")):
        expected = estimates(boot.values(np.flatnonzero((table["dataset"] == dataset).to_numpy() & ~film)))
        for key in ("edema", "average"):
            for m in ("mcc", "auc", "f1"):
                got = value(rows, comparison=comparison, pathology=key, metric=m)
                assert (got["value"], got["ci_low"], got["ci_high"]) == expected[key][m], (comparison, key, m)
    natural = estimates(boot.values(np.flatnonzero(table["kind"] == "natural"), metrics=("auc",)))
    got = value(kinds, kind="natural", pathology="average", metric="auc")
    assert (got["value"], got["ci_low"], got["ci_high"]) == natural["average"]["auc"]


def test_blocked_and_failed_stages_have_reasons_and_no_numbers(
    study: tuple[Path, report.ReportPaths],
) -> None:
    _, paths = study
    missing = {"MoCo pre-training", "MoCo Mixed Training", "Broken Strategy"}
    for name in ("table1_val", "table2_test", "appendix", "budget", "kinds", "thresholds"):
        assert not missing & set(csv(paths, name)["strategy"]), name
    md = paths.md.read_text()
    for line in md.splitlines():
        if line.startswith("| moco_mixed") or line.startswith("| broken"):
            assert not re.search(r"\d\.\d{3}", line), line
    assert "needs moco (blocked)" in md and "RuntimeError: out of memory" in md


def test_report_files_are_self_contained(study: tuple[Path, report.ReportPaths]) -> None:
    _, paths = study
    html, md = paths.html.read_text(), paths.md.read_text()
    pngs = sorted(p.name for p in paths.figures.glob("*.png"))
    rocs = ["roc_film.png", "roc_photos.png", "roc_standard.png"]
    assert pngs == ["figure5_budget.png", "reliability.png", *rocs]
    assert all((paths.figures / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r"https?://", html) and "<script" not in html
    assert all(src.startswith("data:") for src in re.findall(r'(?:src|href)="([^"]*)"', html))
    assert "figures/roc_photos.png" in md and "figures/figure5_budget.png" in md
    # Notes come first, before the summary; the budget caveat and the generated summary are there.
    assert html.index("ImageNet weights absent: random init") < html.index("Summary")
    assert "internal holdout" in md and "Best on Standard (test, average MCC): Baseline" in md
    # Paper layout: 3 decimals with a bracketed 95% CI.
    assert re.search(r"\| Baseline \| Standard \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", md)


def test_budget_table_and_tuned_thresholds(study: tuple[Path, report.ReportPaths]) -> None:
    out, paths = study
    budget, t2, th = csv(paths, "budget"), csv(paths, "table2_test"), csv(paths, "thresholds")
    assert sorted(set(budget["digital"])) == [0, 200, 400] and set(budget["total"]) == {400}
    assert set(budget["comparison"]) == {"Standard", "Photos", "Film"}
    row = value(budget, digital=200, comparison="Photos", pathology="average", metric="mcc")
    assert (
        row["value"]
        == value(t2, strategy=row["strategy"], comparison="Photos", pathology="average", metric="mcc")[
            "value"
        ]
    )
    test = pd.read_parquet(out / "stages" / "routed" / "predictions_test.parquet")
    val = pd.read_parquet(out / "stages" / "routed" / "predictions_val.parquet")
    photo_val = val.loc[val["head"] == "photo"]
    routed = {"strategy": "Mixed + Routed Heads", "comparison": "Photos", "pathology": "edema"}
    tuned = value(th, threshold="tuned", **routed)
    # Tuned again on the saved validation predictions (the photo head's rows), not read from model.json.
    assert tuned["cutoff"] == tune_thresholds(*arrays(photo_val))["edema"]
    assert (
        tuned["cutoff"]
        != json.loads((out / "stages" / "routed" / "model.json").read_text())["thresholds"]["photo"]["edema"]
    )
    photos = side(test, "chexphoto").loc[lambda t: t["kind"] != "film"]
    expected = sk(photos, "edema", "mcc", tuned["cutoff"])
    assert tuned["value"] == pytest.approx(expected, abs=1e-9)
    assert value(th, threshold="0.5", **routed)["value"] == value(t2, metric="mcc", **routed)["value"]


def test_tuned_thresholds_need_one_head_per_side() -> None:
    table = predictions(np.random.default_rng(2), n_patients=10, skill=1.0, photo_skill=1.0)
    table.loc[table["kind"] == "natural", "head"] = "other"  # e.g. a router sent some photos elsewhere
    found = tables.evaluate_table(
        table, "mixed heads", n_boot=0, seed=0, thresholds={"main": dict.fromkeys(SLUGS, 0.3)}
    )
    tuned = {(r["comparison"], r["threshold"]) for r in found.thresholds}
    assert tuned == {("Standard", "0.5"), ("Standard", "tuned"), ("Photos", "0.5")}
    assert found.notes == [
        "mixed heads, Photos: no tuned thresholds (scored by heads ['main', 'other']; "
        "validation tuned thresholds for ['main'])"
    ]


def test_a_side_scored_by_several_heads_is_tuned_at_each_images_head() -> None:
    """A router sent some photos to the x-ray head: each image is judged at its own head's threshold."""
    table = predictions(np.random.default_rng(4), n_patients=20, skill=1.0, photo_skill=1.0)
    table.loc[table["kind"] == "natural", "head"] = "other"
    thresholds = {"main": dict.fromkeys(SLUGS, 0.3), "other": dict.fromkeys(SLUGS, 0.7)}
    found = tables.evaluate_table(table, "routed", n_boot=0, seed=0, thresholds=thresholds)
    rows = tables.frame(found.thresholds, [*COLUMNS, "threshold", "cutoff"])
    photos = side(table, "chexphoto")
    cut = np.where(photos["head"] == "other", 0.7, 0.3)
    keep = photos["mask_edema"] > 0
    y = photos.loc[keep, "target_edema"].to_numpy().astype(int)
    expected = matthews_corrcoef(y, photos.loc[keep, "prob_edema"].to_numpy() >= cut[keep.to_numpy()])
    got = value(rows, comparison="Photos", threshold="tuned", pathology="edema")
    assert got["value"] == pytest.approx(expected, abs=1e-12) and np.isnan(got["cutoff"])
    assert value(rows, comparison="Standard", threshold="tuned", pathology="edema")["cutoff"] == 0.3
    assert found.notes == [
        "routed, Photos: each image at the tuned thresholds of its head (['main', 'other'])"
    ]


def test_photo_kinds_breakdown(study: tuple[Path, report.ReportPaths]) -> None:
    out, paths = study
    kinds = csv(paths, "kinds")
    mine = kinds.loc[(kinds["split"] == "test") & (kinds["strategy"] == "Baseline")]
    assert list(dict.fromkeys(mine["kind"])) == [
        "natural",
        "synthetic-digital",
        "synthetic-photographic",
        "film",
    ]
    test = pd.read_parquet(out / "stages" / "baseline" / "predictions_test.parquet")
    natural = side(test, "chexphoto", "natural")
    row = value(mine, kind="natural", pathology="cardiomegaly", metric="auc")
    assert row["n"] == len(natural)
    assert row["value"] == pytest.approx(sk(natural, "cardiomegaly", "auc"), abs=1e-9)


def test_headline_rows_and_table(study: tuple[Path, report.ReportPaths]) -> None:
    out, paths = study
    rows = {r["strategy"]: r for r in headline_rows(out)}
    assert "Broken Strategy" not in rows and len(rows) == 6
    t2 = csv(paths, "table2_test")
    expected = value(t2, strategy="Mixed Training", comparison="Photos", pathology="average", metric="auc")
    assert rows["Mixed Training"]["photos_auc"] == pytest.approx(expected["value"], abs=1e-12)
    assert report.headline_table(out).row_count == 6


def test_without_bootstrap_and_without_finished_stages(tmp_path: Path) -> None:
    out = make_study(tmp_path)
    paths = write_report(out, n_boot=0)
    t2 = csv(paths, "table2_test")
    assert t2["ci_low"].isna().all() and t2["value"].notna().any()
    assert "[" not in paths.md.read_text().split("## Table 1")[1].split("\n\n")[2]  # values without CIs
    state = json.loads((out / "study.json").read_text())
    for s in state["stages"]:
        s.update(state="blocked", reason="needs moco")
    (out / "study.json").write_text(json.dumps(state))
    paths = write_report(out, n_boot=10)
    assert csv(paths, "table2_test").empty and list(csv(paths, "table2_test").columns) == COLUMNS
    assert "No stage has test predictions." in paths.md.read_text()
    assert headline_rows(out) == []


def test_moved_study_folder_and_duplicate_labels(tmp_path: Path) -> None:
    out = make_study(tmp_path)
    state = json.loads((out / "study.json").read_text())
    for s in state["stages"]:
        s["dir"] = f"/nonexistent/elsewhere/{s['name']}"  # written on another machine
    state["stages"][1]["label"] = "Baseline"
    (out / "study.json").write_text(json.dumps(state))
    _, stages = report.read_study(out)
    assert [s.strategy for s in stages[:2]] == ["Baseline", "Baseline (mixed)"]
    assert stages[0].dir == out / "stages" / "baseline"
    assert {"Baseline", "Baseline (mixed)"} <= {r["strategy"] for r in headline_rows(out)}


def test_bad_inputs_raise_report_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no study.json"):
        write_report(tmp_path)
    (tmp_path / "study.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        write_report(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"stages": {}}))
    with pytest.raises(ReportError, match="'stages' list"):
        write_report(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"stages": [{"state": "done"}]}))
    with pytest.raises(ReportError, match="stage 0 lacks 'name'"):
        write_report(tmp_path)
    out = make_study(tmp_path / "s")
    for bad in (-1, 1.5, True):
        with pytest.raises(ReportError, match="n_boot must be an integer"):
            write_report(out, n_boot=bad)
    file = out / "stages" / "baseline" / "predictions_test.parquet"
    bad_target = pd.read_parquet(file)
    bad_target.loc[0, ["target_edema", "mask_edema"]] = (2.0, 1.0)
    bad_target.to_parquet(file)
    with pytest.raises(ReportError, match=r"predictions_test.parquet: targets for edema must be 0/1"):
        write_report(out, n_boot=0)
    file.unlink()
    file = out / "stages" / "mixed" / "predictions_val.parquet"
    pd.read_parquet(file).drop(columns=["prob_edema", "patient"]).to_parquet(file)
    with pytest.raises(
        ReportError,
        match=r"predictions_val.parquet: predictions table lacks columns "
        r"\['patient', 'prob_edema'\]",
    ):
        write_report(out, n_boot=0)
    file.write_bytes(b"not a parquet file")
    with pytest.raises(ReportError, match="cannot read the predictions table"):
        write_report(out, n_boot=0)
    file.unlink()
    (out / "stages" / "mixed" / "model.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="model.json: expected a JSON object"):
        write_report(out, n_boot=0)


@pytest.mark.slow
@pytest.mark.browser
def test_html_opens_in_a_headless_browser_without_errors(study: tuple[Path, report.ReportPaths]) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    _, paths = study
    problems: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page()
        page.on(
            "console",
            lambda m: (
                problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None
            ),
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else problems.append(r.url))
        page.goto(paths.html.as_uri())
        widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        browser.close()
    assert problems == []
    assert len(widths) == 5 and min(widths) > 100  # ROC x 3, Figure 5, the reliability diagram
    assert headings[0] == "Summary" and "Table 2: test (official valid sets)" in headings


def routed_study(root: Path) -> Path:
    """make_study's study whose routed stage was scored through a router that sends every third photo
    to the x-ray head (which reads photos upside down), with its oracle routing saved beside it."""
    out = make_study(root)
    folder = out / "stages" / "routed"
    for split in ("val", "test"):
        file = folder / f"predictions_{split}.parquet"
        oracle = pd.read_parquet(file)
        photo = (oracle["domain"] == "photo").to_numpy()
        oracle["router_prob"] = np.where(photo, 0.9, 0.1).astype(np.float32)
        oracle.to_parquet(folder / f"predictions_{split}_oracle.parquet", index=False)
        routed = oracle.copy()
        wrong = photo & (np.arange(len(routed)) % 3 == 0)
        routed.loc[wrong, "router_prob"] = np.float32(0.2)
        routed.loc[wrong, "head"] = "digital"
        for s in SLUGS:
            routed.loc[wrong, f"prob_{s}"] = (1 - routed.loc[wrong, f"prob_{s}"]).astype(np.float32)
        routed.to_parquet(file, index=False)
    return out


def test_a_routed_model_is_reported_through_its_router_with_the_oracle_line_beside(tmp_path: Path) -> None:
    out = routed_study(tmp_path)
    paths = write_report(out, n_boot=50, seed=0)
    folder = out / "stages" / "routed"
    for name, split in (("table1_val", "val"), ("table2_test", "test")):
        rows = csv(paths, name)
        deployed = {"strategy": "Mixed + Routed Heads", "pathology": "average", "metric": "auc"}
        oracle = {**deployed, "strategy": "Mixed + Routed Heads (oracle routing)"}
        # The router errs on photos only: the x-ray rows agree, the photo rows do not.
        assert value(rows, comparison="Standard", **deployed)["value"] == pytest.approx(
            value(rows, comparison="Standard", **oracle)["value"], abs=1e-12
        )
        assert (
            value(rows, comparison="Photos", **deployed)["value"]
            < value(rows, comparison="Photos", **oracle)["value"] - 0.1
        )
        # Each line is its own saved table's number.
        for file, where in (("", deployed), ("_oracle", oracle)):
            table = pd.read_parquet(folder / f"predictions_{split}{file}.parquet")
            photos = side(table, "chexphoto").loc[lambda t: t["kind"] != "film"]
            got = value(rows, comparison="Photos", **{**where, "pathology": "edema"})["value"]
            assert got == pytest.approx(sk(photos, "edema", "auc"), abs=1e-9)
        # Router accuracy per kind, from the routed table.
        router = csv(paths, "router")
        router = router.loc[router["split"] == split]
        table = pd.read_parquet(folder / f"predictions_{split}.parquet")
        right = (table["router_prob"] > 0.5) == (table["domain"] == "photo")
        assert value(router, kind="all")["accuracy"] == pytest.approx(right.mean())
        assert value(router, kind="digital")["accuracy"] == 1.0
        natural = table["kind"] == "natural"
        assert value(router, kind="natural")["accuracy"] == pytest.approx(right[natural].mean())
        assert value(router, kind="natural")["n"] == natural.sum()
    md = paths.md.read_text()
    assert "| Mixed + Routed Heads (oracle routing) | Standard |" in md
    assert "Router accuracy (test)" in md and "Router accuracy (val)" in md
    assert "what router mistakes cost" in md
    assert "tables/router.csv" in md
    summary = md.split("## Summary")[1].split("##")[0]
    assert "oracle routing" not in summary  # the ranking is of deployed models
    html = paths.html.read_text()
    assert "Mixed + Routed Heads (oracle routing)" in html and "Router accuracy (test)" in html
