"""Guards that fail when a known defect of the paper's code returns, and the shipped study settings.

Each test here was checked by reintroducing its defect by hand (see the docstrings): undefined AUC
turned into 0, images resampled instead of patients, the shipped YAML settings changed, the
augmentation dropped from the training loader, and a report that is not regenerated identically.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from chextrain.data.splits import assign_splits
from chextrain.evaluation import tables
from chextrain.labels import SLUGS
from chextrain.training.specs import SplitSpec
from chextrain.training.stage import SupervisedStage
from chextrain.training.study import load_study
from tests.test_report import COLUMNS, predictions, routed_study, value

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "studies"


def rows_of(table: pd.DataFrame, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    return tables.frame(
        tables.evaluate_table(table, "toy", n_boot=n_boot, seed=seed, kinds=False).main, COLUMNS
    )


def test_undefined_auc_stays_undefined_and_out_of_the_average() -> None:
    """Defect: `found[k]` -> `np.nan_to_num(found[k])` in bootstrap._weighted (AUC of one class = 0)."""
    table = predictions(np.random.default_rng(0), n_patients=60, skill=3.0, photo_skill=3.0)
    table["target_cardiomegaly"] = np.float32(0.0)  # one class: AUC undefined everywhere
    rare = np.zeros(len(table), np.float32)
    chosen = table["patient"].isin(["patient00000", "patient00001"]).to_numpy()
    rare[chosen] = 1.0  # two patients positive: many resamples have no positive at all
    table["target_edema"] = rare
    table["prob_edema"] = np.where(rare > 0, 0.9, 0.1).astype(np.float32)
    rows = rows_of(table)
    cardio = value(rows, comparison="Standard", pathology="cardiomegaly", metric="auc")
    assert np.isnan(cardio["value"]) and np.isnan(cardio["ci_low"]) and np.isnan(cardio["ci_high"])
    others = [
        value(rows, comparison="Standard", pathology=s, metric="auc")["value"]
        for s in SLUGS
        if s != "cardiomegaly"
    ]
    average = value(rows, comparison="Standard", pathology="average", metric="auc")
    assert average["value"] == pytest.approx(np.mean(others), abs=1e-12)
    edema = value(rows, comparison="Standard", pathology="edema", metric="auc")
    assert (edema["value"], edema["ci_low"], edema["ci_high"]) == (1.0, 1.0, 1.0)  # never 0 in a resample
    assert average["ci_low"] > 0.8  # an undefined resample counted as 0 would drag the average's CI down


def test_report_resamples_patients_not_images() -> None:
    """Defect: `table["patient"]` -> `table["path"]` in tables.evaluate_table.

    Ten copies of every image of a patient leave a patient-level bootstrap unchanged (each patient
    is drawn as often, every weight scales by ten); an image-level bootstrap would change.
    """
    table = predictions(np.random.default_rng(2), n_patients=30, skill=1.0, photo_skill=0.8)
    copies = pd.concat(
        [table.assign(path=table["path"] + f"#{i}", image=table["image"] + f"_{i}") for i in range(10)],
        ignore_index=True,
    )
    once, ten = rows_of(table), rows_of(copies)
    for c in ("value", "ci_low", "ci_high"):
        assert np.allclose(once[c], ten[c], equal_nan=True, atol=1e-12), c


def stages(name: str, profile: str | None = None) -> dict:
    return load_study(CONFIGS / name, profile=profile).stages


@pytest.mark.parametrize("profile", [None, "demo"])
def test_shipped_paper_settings(profile: str | None) -> None:
    """Defects: freeze, fine-tuning learning rates or the split changed in chextraining.yaml."""
    paper = stages("chextraining.yaml", profile)
    assert paper["baseline_ft_chexphoto_frozen"].freeze == "last-block"
    assert paper["baseline_ft_chexphoto"].freeze == "none"
    for name in ("baseline_ft_chexphoto", "baseline_ft_chexphoto_frozen", "moco_chexpert_ft_chexphoto"):
        assert paper[name].optimizer.lr == pytest.approx(1.0e-5), name
    assert paper["baseline"].optimizer.lr == pytest.approx(1.0e-4)
    for name in ("mixed_chexpert_head", "mixed_chexphoto_head", "routed"):
        assert paper[name].freeze == "encoder", name
    for stage in paper.values():
        assert stage.split.by == "patient", stage.name
        if isinstance(stage, SupervisedStage):
            assert stage.evaluate == ["val", "test"], stage.name
    budget = stages("fixed_budget.yaml", profile)
    assert budget and all(s.evaluate == ["test"] for s in budget.values())


def test_patient_split_is_the_default_everywhere() -> None:
    """Defect: the default `split.by` (SplitSpec or assign_splits) changed to the leaky `image`."""
    assert SplitSpec().by == "patient"
    assert inspect.signature(assign_splits).parameters["by"].default == "patient"
    stage = SupervisedStage.model_validate({"name": "s", "backbone": "tiny"})
    assert stage.split.by == "patient"


def test_external_weights_bring_their_input_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect: the study's defaults fix image_size, so CovidPrognosis weights keep 320 px."""
    from chextrain.training import lifecycle

    monkeypatch.setattr(lifecycle, "expected_input", lambda init: {"image_size": 224})
    paper = stages("chextraining.yaml")
    for name in ("moco_ft_chexphoto", "moco_chexpert", "moco_mixed"):
        assert lifecycle.apply_expected_input(paper[name], "covid.pt").image_size == 224, name
    assert paper["baseline"].image_size == 320  # the paper's size where the init says nothing
    demo = stages("chextraining.yaml", "demo")  # a profile that sets a size keeps it
    assert lifecycle.apply_expected_input(demo["moco_mixed"], "covid.pt").image_size == 64


def test_augmentation_reaches_the_training_loader(demo_root: Path) -> None:
    """Defect: `augment=stage.augment.build() if train else ()` dropped in objectives/supervised.py."""
    from chextrain.data.transforms import PhotoSim
    from chextrain.models.net import CXRNet
    from chextrain.training.loaders import prepare_catalog, stage_rows
    from chextrain.training.objectives import OBJECTIVES, LoaderSettings

    stage = stages("chextraining.yaml", "demo")["mixed_photosim"]
    stage = stage.model_copy(update={"backbone": "tiny", "image_size": 32})
    catalog = prepare_catalog(stage, demo_root)
    settings = LoaderSettings(num_workers=0, pin_memory=False, channels_last=False)
    plan = OBJECTIVES["supervised"].plan(
        stage, CXRNet("tiny"), catalog, stage_rows(stage, catalog, "train"), settings
    )
    train = plan.data.train  # the dataset train_dataloader() serves
    assert [type(a) for a in train.augment] == [PhotoSim]
    assert train.augment[0].p == pytest.approx(0.5) and train.augment[0].recipe == "phone"
    assert plan.data.val.augment == ()  # validation is never augmented


def test_study_report_command_regenerates_identical_files(tmp_path: Path) -> None:
    """Defect: anything unstable in the report (set order, timestamps, PNG metadata, unseeded
    resamples), or a number that needs more than the saved files (model.json's thresholds).

    The second run starts from a copy holding only the stages' saved files (report, tables and
    figures deleted, model.json without thresholds) and must write the same bytes.
    """
    import shutil

    from chextrain.cli import build_app

    first = routed_study(tmp_path / "a")  # a routed stage with its oracle routing, budget stages
    second = tmp_path / "b"
    shutil.copytree(first, second)

    def outputs(out: Path) -> dict[str, bytes]:
        result = CliRunner().invoke(build_app(), ["study", "report", str(out), "--n-boot", "50"])
        assert result.exit_code == 0, result.output
        names = ["report.md", "report.html"]
        names += [f"{d}/{p.name}" for d in ("tables", "figures") for p in sorted((out / d).iterdir())]
        return {n: (out / n).read_bytes() for n in names}

    study = json.loads((second / "study.json").read_text())
    for record in study["stages"]:
        record.pop("dir")  # the copy reads its own stages/NAME folders
    (second / "study.json").write_text(json.dumps(study))
    for meta in second.glob("stages/*/model.json"):
        meta.write_text(
            json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "thresholds"})
        )
    once, again = outputs(first), outputs(first)
    fresh = outputs(second)
    assert len(once) >= 12 and {n for n in once if n.endswith(".png")} and "tables/router.csv" in once
    assert once == again
    for name in once:  # the paths inside report.md are relative: the copy's bytes are the same
        assert fresh[name] == once[name], name
    assert "Baseline" in once["report.md"].decode()


def test_a_stage_can_ask_for_the_holdout_split() -> None:
    """CheXpert's test_labels.csv is `holdout`, never part of `test`; a stage may ask to score it."""
    stage = SupervisedStage.model_validate({"name": "s", "backbone": "tiny", "evaluate": ["test", "holdout"]})
    assert stage.evaluate == ["test", "holdout"]
    assert SupervisedStage.model_validate({"name": "s", "backbone": "tiny"}).evaluate == ["val", "test"]
