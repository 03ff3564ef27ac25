import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chextrain.data.catalog import pair_keys, read_catalog
from chextrain.data.catalog_csv import CATALOG_COLUMNS, CatalogError, read_csv_file
from tests.csvutil import HEADER, row, write_csv

SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "chexpert_train.csv.gz"


def make_releases(root: Path) -> Path:
    """A tree with every layout variant the reader accepts."""
    write_csv(
        root / "CheXpert-v1.0-small" / "train.csv",
        [
            row(
                "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                {"Pleural Effusion": "1.0", "Edema": "-1.0", "Cardiomegaly": "0.0"},
            ),
            row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", view="Lateral", ap_pa=""),
            row("CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg", {"Atelectasis": "1.0"}),
        ],
    )
    write_csv(
        root / "CheXpert-v1.0-small" / "valid.csv",
        [
            row(
                "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                {p: "0.0" for p in ("Pleural Effusion", "Edema", "Atelectasis", "Consolidation")}
                | {"Cardiomegaly": "1.0"},
            ),
        ],
    )
    write_csv(
        root / "CheXpert-v1.0-small" / "test_labels.csv",
        [
            row("test/patient64741/study1/view1_frontal.jpg", {"Edema": "1.0"}),
        ],
    )
    write_csv(
        root / "CheXphoto-v1.0" / "train.csv",
        [
            row(
                "CheXphoto-v1.0/train/natural/nokia/patient00001/study1/view1_frontal.jpg",
                {"Pleural Effusion": "1.0"},
            ),
            row("CheXphoto-v1.0/train/natural/iphone/patient00002/study2/view1_frontal.jpg"),
            row("CheXphoto-v1.0/train/synthetic/digital/patient00001/study1/view1_frontal.jpg"),
            row("CheXphoto-v1.0/train/synthetic/photographic/patient00002/study2/view1_frontal.jpg"),
        ],
    )
    write_csv(
        root / "CheXphoto-v1.0" / "valid" / "valid.csv",
        [  # the other accepted location
            row(
                "CheXphoto-v1.0/valid/natural/oneplus/patient64541/study1/view1_frontal.jpg",
                {"Cardiomegaly": "1", "Edema": "0"},
            ),
        ],
    )
    write_csv(
        root / "CheXphoto-v1.1" / "valid.csv",
        [
            row(
                "CheXphoto-v1.1/valid/film/VBSF00001/study1/view1_frontal.jpg",
                {"Edema": "1"},
                sex="",
                age="",
                ap_pa="",
            ),
        ],
    )
    return root


ALL_RELEASES = ("CheXpert-v1.0-small", "CheXphoto-v1.0", "CheXphoto-v1.1")


def test_reads_every_layout_into_one_schema(tmp_path):
    catalog = read_catalog(make_releases(tmp_path), releases=ALL_RELEASES)
    assert tuple(catalog.columns) == CATALOG_COLUMNS
    assert len(catalog) == 11
    by_rel = catalog.set_index("rel_path")
    first = by_rel.loc["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert first["path"] == str(tmp_path / "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    assert (first["dataset"], first["domain"], first["kind"], first["file"], first["split"]) == (
        "chexpert",
        "digital",
        "digital",
        "train",
        "train",
    )
    assert (first["patient"], first["study"], first["image"], first["view"]) == (
        "patient00001",
        "study1",
        "view1_frontal",
        "frontal",
    )
    assert first["pleural_effusion"] == 1.0 and first["edema"] == -1.0 and first["cardiomegaly"] == 0.0
    assert np.isnan(first["atelectasis"])
    test = by_rel.loc["test/patient64741/study1/view1_frontal.jpg"]
    assert test["path"] == str(tmp_path / "CheXpert-v1.0-small/test/patient64741/study1/view1_frontal.jpg")
    assert (test["file"], test["split"]) == ("test", "holdout")  # the paper's test = the valid files
    assert (test["release"], test["source"]) == ("CheXpert-v1.0-small", "test_labels.csv")
    kinds = catalog.set_index("rel_path")[["kind", "device", "domain"]]
    assert tuple(kinds.loc["CheXphoto-v1.0/train/natural/nokia/patient00001/study1/view1_frontal.jpg"]) == (
        "natural",
        "nokia",
        "photo",
    )
    assert kinds.loc[
        "CheXphoto-v1.0/train/synthetic/digital/patient00001/study1/view1_frontal.jpg", "kind"
    ] == ("synthetic-digital")
    assert (
        kinds.loc["CheXphoto-v1.0/train/synthetic/photographic/patient00002/study2/view1_frontal.jpg", "kind"]
        == "synthetic-photographic"
    )
    film = by_rel.loc["CheXphoto-v1.1/valid/film/VBSF00001/study1/view1_frontal.jpg"]
    assert (film["kind"], film["patient"], film["file"], film["sex"]) == ("film", "VBSF00001", "valid", "")
    assert np.isnan(film["age"])
    oneplus = by_rel.loc["CheXphoto-v1.0/valid/natural/oneplus/patient64541/study1/view1_frontal.jpg"]
    assert oneplus["cardiomegaly"] == 1.0 and oneplus["edema"] == 0.0  # integer labels parsed numerically
    # a photo pairs with its source x-ray through patient/study/image
    keys = pair_keys(catalog)
    assert (keys == "patient00001/study1/view1_frontal").sum() == 3


def test_prefix_is_stripped_not_hard_coded(tmp_path):
    write_csv(
        tmp_path / "CheXpert-v1.0" / "train.csv",
        [
            row("SomeOtherCopy/train/patient00009/study1/view1_frontal.jpg", {"Edema": "1.0"}),
        ],
    )
    catalog = read_catalog(tmp_path)
    assert catalog["path"].iat[0] == str(
        tmp_path / "CheXpert-v1.0/train/patient00009/study1/view1_frontal.jpg"
    )


def test_generic_csv(tmp_path):
    csv = write_csv(
        tmp_path / "mine.csv", [row("images/a/p1/s1/img1.png", {"Edema": "1.0"}), row("b.png")], header=HEADER
    )
    catalog = read_csv_file(csv)
    assert list(catalog["dataset"]) == ["other", "other"]
    assert list(catalog["kind"]) == ["digital", "digital"]
    assert catalog["path"].iat[1] == str(tmp_path / "b.png")
    assert catalog["patient"].iat[0] == "p1" and catalog["patient"].iat[1] == "b"


def test_generic_csv_may_say_domain_and_kind(tmp_path):
    csv = write_csv(
        tmp_path / "mine.csv", [row("p1/s1/v1.jpg") + ",photo,natural"], header=HEADER + ",domain,kind"
    )
    catalog = read_csv_file(csv)
    assert (catalog["domain"].iat[0], catalog["kind"].iat[0]) == ("photo", "natural")


@pytest.mark.parametrize("cell", ["2.0", "yes", "1.5"])
def test_unknown_label_value_names_file_line_column(tmp_path, cell):
    csv = write_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv",
        [
            row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"),
            row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", {"Edema": cell}),
        ],
    )
    with pytest.raises(CatalogError) as err:
        read_catalog(tmp_path)
    assert str(csv) in str(err.value) and "line 3" in str(err.value) and "'Edema'" in str(err.value)
    assert repr(cell) in str(err.value)


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "CheXpert-v1.0-small/train/../../../x.jpg",
        "C:/Windows/x.jpg",
        "CheXpert-v1.0-small/../../secret/p/s/v.jpg",
    ],
)
def test_path_escaping_the_dataset_folder_is_refused(tmp_path, path):
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", [row(path)])
    with pytest.raises(CatalogError, match="escapes the dataset folder"):
        read_catalog(tmp_path)


def test_blank_path_and_duplicates(tmp_path):
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", [row("")])
    with pytest.raises(CatalogError, match="line 2.*blank Path"):
        read_catalog(tmp_path)
    p = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", [row(p), row(p, {"Edema": "1.0"})])
    with pytest.raises(CatalogError, match="line 3.*duplicate of line 2"):
        read_catalog(tmp_path)


def test_missing_columns_empty_and_encoding(tmp_path):
    csv = tmp_path / "CheXpert-v1.0-small" / "train.csv"
    write_csv(csv, ["x/train/p/s/v.jpg,Female"], header="Path,Sex")
    with pytest.raises(CatalogError, match=r"missing column\(s\) \['Age'"):
        read_catalog(tmp_path)
    csv.write_bytes(b"")
    with pytest.raises(CatalogError, match="empty CSV"):
        read_catalog(tmp_path)
    write_csv(csv, [])
    with pytest.raises(CatalogError, match="header but no rows"):
        read_catalog(tmp_path)
    write_csv(
        csv,
        [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", sex="Fémale")],
        encoding="latin-1",
    )
    with pytest.raises(CatalogError, match="not UTF-8"):
        read_catalog(tmp_path)


def test_malformed_row_raises_or_is_skipped_and_reported(tmp_path):
    good = row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    write_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv",
        [good, good.replace("view1", "view2") + ",extra,cells"],
    )
    with pytest.raises(CatalogError, match="malformed CSV"):
        read_catalog(tmp_path)
    catalog = read_catalog(tmp_path, on_error="skip")
    assert len(catalog) == 1
    [issue] = catalog.attrs["issues"]
    assert issue.line == 3 and "expected 19 fields" in issue.message


def test_skip_mode_keeps_good_rows_and_lists_every_bad_one(tmp_path):
    write_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv",
        [
            row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", {"Edema": "1.0"}),
            row("../../etc/passwd"),
            row("CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", {"Edema": "yes"}),
            row("CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg", age="old"),
        ],
    )
    catalog = read_catalog(tmp_path, on_error="skip", check_files=True)
    assert list(catalog["patient"]) == ["patient00001"]
    messages = [str(i) for i in catalog.attrs["issues"]]
    assert any("line 3" in m and "escapes" in m for m in messages)
    assert any("line 4" in m and "'yes'" in m for m in messages)
    assert any("line 5" in m and "'old'" in m for m in messages)
    assert any("line 2" in m and "image file not found" in m for m in messages)


def test_chexphoto_path_without_kind_folder_is_an_error(tmp_path):
    write_csv(
        tmp_path / "CheXphoto-v1.0" / "train.csv",
        [row("CheXphoto-v1.0/train/patient00001/study1/view1_frontal.jpg")],
    )
    with pytest.raises(CatalogError, match="lacks the natural"):
        read_catalog(tmp_path)
    write_csv(
        tmp_path / "CheXphoto-v1.0" / "train.csv",
        [row("CheXphoto-v1.0/train/synthetic/blurry/patient00001/study1/view1_frontal.jpg")],
    )
    with pytest.raises(CatalogError, match="unknown image kind folder 'synthetic/blurry'"):
        read_catalog(tmp_path)


def test_no_release_found(tmp_path):
    with pytest.raises(CatalogError, match="no CheXpert or CheXphoto release"):
        read_catalog(tmp_path)


@pytest.mark.skipif(not SHARED_CSV.exists(), reason="shared/data/chexpert_train.csv.gz not present")
def test_real_chexpert_train_csv(tmp_path):
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    (folder / "train.csv").write_bytes(gzip.decompress(SHARED_CSV.read_bytes()))
    catalog = read_catalog(tmp_path)
    assert len(catalog) == 223_414
    assert catalog["patient"].nunique() == 64_540
    assert (catalog["patient"] + catalog["study"]).nunique() == 187_641
    assert catalog["view"].value_counts().to_dict() == {"frontal": 191_027, "lateral": 32_387}
    expected = {  # DATASETS.md: 1 / 0 / -1 / blank
        "pleural_effusion": (86_187, 35_396, 11_628, 90_203),
        "edema": (52_246, 20_726, 12_984, 137_458),
        "atelectasis": (33_376, 1_328, 33_739, 154_971),
        "consolidation": (14_783, 28_097, 27_742, 152_792),
        "cardiomegaly": (27_000, 11_116, 8_087, 177_211),
    }
    for slug, counts in expected.items():
        v = catalog[slug]
        assert ((v == 1).sum(), (v == 0).sum(), (v == -1).sum(), v.isna().sum()) == counts
    assert catalog["sex"].value_counts()["Unknown"] == 1
    assert catalog["ap_pa"].value_counts().to_dict()["LL"] == 16
    assert pd.api.types.is_float_dtype(catalog["age"]) and catalog["age"].between(0, 90).all()


def test_two_releases_of_one_dataset_are_refused_unless_chosen(tmp_path):
    root = make_releases(tmp_path)
    with pytest.raises(CatalogError, match="CheXphoto-v1.0 and CheXphoto-v1.1"):
        read_catalog(root)
    chosen = read_catalog(root, releases=["CheXpert-v1.0-small", "CheXphoto-v1.0"])
    assert set(chosen["release"]) == {"CheXpert-v1.0-small", "CheXphoto-v1.0"}
    assert not chosen["rel_path"].str.startswith("CheXphoto-v1.1").any()
    sources = chosen.groupby("release")["source"].unique().map(sorted).to_dict()
    assert sources == {
        "CheXpert-v1.0-small": ["test_labels.csv", "train.csv", "valid.csv"],
        "CheXphoto-v1.0": ["train.csv", "valid/valid.csv"],
    }
    assert dict(chosen.groupby("file")["split"].unique().map(list)) == {
        "train": ["train"],
        "valid": ["test"],
        "test": ["holdout"],
    }
    with pytest.raises(CatalogError, match=r"\['CheXpert-v1.0'\] not found"):
        read_catalog(root, releases=["CheXpert-v1.0"])
    (root / "CheXpert-v1.0").mkdir()
    (root / "CheXpert-v1.0" / "valid.csv").write_text(
        (root / "CheXpert-v1.0-small" / "valid.csv").read_text()
    )
    with pytest.raises(CatalogError, match="2 releases of chexpert found"):
        read_catalog(root, releases=None)


def test_a_non_utf8_csv_names_its_line_and_column(tmp_path):
    good = row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    bad = row("CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", sex="Fémale")
    write_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv", [good, bad], encoding="latin-1")
    with pytest.raises(
        CatalogError, match=r"train\.csv, line 3: not UTF-8 text \(byte b'\\xe9' at column \d+\)"
    ):
        read_catalog(tmp_path)


def test_skip_mode_reports_a_broken_file_and_reads_the_others(tmp_path):
    """`data check` reads every file: an empty or undecodable CSV is one issue, not the end."""
    good = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    write_csv(
        tmp_path / "CheXpert-v1.0-small" / "train.csv", [row(good), row(good.replace("view1", "view2"))]
    )
    (tmp_path / "CheXpert-v1.0-small" / "valid.csv").write_bytes(b"")
    photo = tmp_path / "CheXphoto-v1.0" / "valid.csv"
    write_csv(
        photo,
        [row("CheXphoto-v1.0/valid/natural/nokia/patient1/study1/view1_frontal.jpg", sex="é")],
        encoding="latin-1",
    )
    catalog = read_catalog(tmp_path, on_error="skip")
    assert len(catalog) == 2
    issues = {Path(i.file).parent.name + "/" + Path(i.file).name: i for i in catalog.attrs["issues"]}
    assert "empty CSV" in issues["CheXpert-v1.0-small/valid.csv"].message
    assert (
        issues["CheXphoto-v1.0/valid.csv"].line == 2
        and "not UTF-8" in issues["CheXphoto-v1.0/valid.csv"].message
    )
    assert str(issues["CheXphoto-v1.0/valid.csv"]).count("valid.csv") == 1  # the file named once
    with pytest.raises(CatalogError, match="empty CSV"):
        read_catalog(tmp_path)


def test_a_stage_names_the_release_of_a_dataset_found_twice(tmp_path):
    """`data: {releases: [...]}` picks one CheXphoto release; CheXpert (found once) is read as found."""
    from chextrain.data.catalog import select_releases
    from chextrain.training.loaders import prepare_catalog
    from chextrain.training.stage import parse_stage, resolved_config

    root = make_releases(tmp_path)
    with pytest.raises(
        CatalogError, match=r"CheXphoto-v1.0 and CheXphoto-v1.1.*`data: \{releases: \[CheXphoto-v1.0\]\}`"
    ):
        read_catalog(root)
    chosen = read_catalog(root, releases=["CheXphoto-v1.1"])
    assert set(chosen["release"]) == {"CheXpert-v1.0-small", "CheXphoto-v1.1"}
    everything = read_catalog(root, releases=ALL_RELEASES)
    pd.testing.assert_frame_equal(
        select_releases(everything, ["CheXphoto-v1.1"]), chosen.reset_index(drop=True)
    )
    base = {"name": "s", "backbone": "tiny"}
    stage = parse_stage({**base, "data": {"train": ["chexphoto"], "releases": ["CheXphoto-v1.0"]}})
    assert set(prepare_catalog(stage, root)["release"]) == {"CheXpert-v1.0-small", "CheXphoto-v1.0"}
    assert set(prepare_catalog(stage, None, everything)["release"]) == {
        "CheXpert-v1.0-small",
        "CheXphoto-v1.0",
    }
    with pytest.raises(CatalogError, match="2 releases of chexphoto"):
        prepare_catalog(parse_stage(base), root)
    # Unset, the key stays out of the resolved config: the hash of every stage without it is unchanged.
    assert "releases" not in resolved_config(parse_stage(base))["data"]
    assert resolved_config(stage)["data"]["releases"] == ["CheXphoto-v1.0"]
