import pandas as pd
import pytest

from chextrain.data.splits import assign_splits, check_no_leak, sample_budget


def catalog(n_patients: int = 400) -> pd.DataFrame:
    rows = []
    for i in range(n_patients):
        patient = f"patient{i:05d}"
        for dataset, kind, domain in (
            ("chexpert", "digital", "digital"),
            ("chexphoto", "natural", "photo"),
            ("chexphoto", "synthetic-digital", "photo"),
        ):
            for view in ("frontal", "lateral"):
                rows.append(
                    {
                        "dataset": dataset,
                        "kind": kind,
                        "domain": domain,
                        "file": "train",
                        "split": "train",
                        "patient": patient,
                        "view": view,
                        "rel_path": f"{dataset}/{kind}/{patient}/study1/view_{view}.jpg",
                    }
                )
    rows.append(
        {
            "dataset": "chexpert",
            "kind": "digital",
            "domain": "digital",
            "file": "valid",
            "split": "test",
            "patient": "patient64541",
            "view": "frontal",
            "rel_path": "valid/patient64541/study1/v.jpg",
        }
    )
    return pd.DataFrame(rows)


def test_patient_split_is_shared_across_datasets_and_never_leaks():
    out = assign_splits(catalog(), val_fraction=0.1, seed=0)
    check_no_leak(out)
    per_patient = out.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    share = (out.loc[out["file"] == "train"].groupby("patient")["split"].first() == "val").mean()
    assert 0.05 < share < 0.15
    assert out.loc[out["file"] == "valid", "split"].eq("test").all()


def test_split_is_stable_for_a_seed_and_changes_with_it():
    a = assign_splits(catalog(), seed=3)
    b = assign_splits(catalog(), seed=3)
    c = assign_splits(catalog(), seed=4)
    assert a["split"].equals(b["split"])
    assert not a["split"].equals(c["split"])
    # adding rows never moves an existing patient
    bigger = assign_splits(catalog(500), seed=3)
    assert bigger["split"].iloc[: len(a) - 1].reset_index(drop=True).equals(a["split"].iloc[:-1])


def test_image_split_reproduces_the_papers_leak():
    out = assign_splits(catalog(), by="image", seed=0)
    with pytest.raises(ValueError, match="appear in several splits"):
        check_no_leak(out)


def test_frontal_only():
    out = assign_splits(catalog(), frontal_only=True)
    assert set(out["view"]) == {"frontal"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="by='study'"):
        assign_splits(catalog(), by="study")
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        assign_splits(catalog(), val_fraction=1.5)


def test_fixed_budget_sampling():
    split = assign_splits(catalog(), seed=0)
    chosen = sample_budget(split, total=100, digital=40, seed=1)
    assert (chosen["domain"] == "digital").sum() == 40 and (chosen["domain"] == "photo").sum() == 60
    assert chosen["split"].eq("train").all()
    assert chosen.equals(sample_budget(split, total=100, digital=40, seed=1))
    with pytest.raises(ValueError, match="asks for 5000 digital"):
        sample_budget(split, total=5000, digital=5000)


def test_valid_files_are_test_and_the_test_file_is_a_separate_holdout() -> None:
    """The paper's test set is the official valid files only; CheXpert's test_labels.csv stays apart."""
    base = catalog(20)
    extra = base.iloc[[-1]].assign(file="test", patient="patient64741", rel_path="test/patient64741/s/v.jpg")
    out = assign_splits(pd.concat([base, extra], ignore_index=True))
    assert dict(out.groupby("file")["split"].unique().map(sorted)) == {
        "test": ["holdout"],
        "train": ["train", "val"],
        "valid": ["test"],
    }
