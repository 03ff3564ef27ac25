"""The demo tree: official layouts and encodings, pairing, determinism, the catalog and the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.data.catalog import pair_keys, read_catalog
from chextrain.data.demo import DemoError, write_demo
from chextrain.labels import CHEXPERT_COLUMNS, LABEL_COLUMNS, NAME_OF, SLUGS
from tests.conftest import DEMO

SMALL = dict(digital=14, photos=10, valid=5, size=32, seed=3, workers=1, progress=False)
# The tests of one tree read the session's demo tree (conftest.demo_tree), written with DEMO.
D, P, V, S = DEMO["digital"], DEMO["photos"], DEMO["valid"], DEMO["size"]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def csv_of(out: Path, key: str) -> Path:
    return (
        out
        / {"chexpert": "CheXpert-v1.0-small", "chexphoto": "CheXphoto-v1.0"}[key.split("/")[0]]
        / f"{key.split('/')[1]}.csv"
    )


def test_layout_header_and_counts(demo_tree) -> None:
    out, summary = demo_tree
    keys = ("chexpert/train", "chexpert/valid", "chexphoto/train", "chexphoto/valid")
    assert set(summary.csvs) == set(keys)
    for key in keys:
        path = csv_of(out, key)
        assert summary.csvs[key] == path
        assert path.read_text("utf-8").splitlines()[0] == ",".join(CHEXPERT_COLUMNS)
        assert len(rows(path)) == summary.rows[key]
        prefix = "CheXpert-v1.0-small/" if key.startswith("chexpert") else "CheXphoto-v1.0/"
        assert all(r["Path"].startswith(prefix + key.split("/")[1] + "/") for r in rows(path))
        assert all((out / r["Path"]).is_file() for r in rows(path))
    assert summary.rows == {
        "chexpert/train": D,
        "chexpert/valid": V,
        "chexphoto/train": P,
        "chexphoto/valid": 3 * V,
    }
    assert summary.images == D + V + P + 3 * V
    n_each = round(P * 10507 / 32521)  # the real release's share of each folder
    assert summary.kinds["chexphoto/train/natural/nokia"] == n_each
    assert summary.kinds["chexphoto/train/synthetic/digital"] == n_each
    assert summary.kinds["chexphoto/train/synthetic/photographic"] == n_each
    assert summary.kinds["chexphoto/train/natural/iphone"] == P - 3 * n_each > 0
    for folder in ("natural/oneplus", "synthetic/digital", "synthetic/photographic"):
        assert summary.kinds[f"chexphoto/valid/{folder}"] == V


def test_cell_encodings(demo_tree) -> None:
    out, _ = demo_tree
    train = rows(csv_of(out, "chexpert/train")) + rows(csv_of(out, "chexphoto/train"))
    for r in train:
        assert {r[c] for c in LABEL_COLUMNS} <= {"1.0", "0.0", "-1.0", ""}
        assert r["No Finding"] in ("1.0", "")
        assert r["Sex"] in ("Male", "Female", "Unknown") and 0 <= int(r["Age"]) <= 90
        assert r["Frontal/Lateral"] in ("Frontal", "Lateral")
        assert r["AP/PA"] in (("",) if r["Frontal/Lateral"] == "Lateral" else ("AP", "PA", "LL", "RL"))
        assert r["Path"].endswith(f"_{r['Frontal/Lateral'].lower()}.jpg")
    for r in rows(csv_of(out, "chexpert/valid")):
        assert {r[c] for c in LABEL_COLUMNS} <= {"1.0", "0.0"}
    for r in rows(csv_of(out, "chexphoto/valid")):
        assert {r[c] for c in LABEL_COLUMNS} <= {"1", "0"}


def test_valid_patients_are_numbered_from_64541_with_one_study(demo_tree) -> None:
    out, _ = demo_tree
    paths = [r["Path"].split("/") for r in rows(csv_of(out, "chexpert/valid"))]
    patients = sorted({p[2] for p in paths})
    assert patients[0] == "patient64541"
    assert patients == [f"patient{64541 + i}" for i in range(len(patients))]
    assert {p[3] for p in paths} == {"study1"}


def test_catalog_reads_back_what_was_written(demo_tree) -> None:
    out, summary = demo_tree
    cat = read_catalog(out, check_files=True)
    assert not cat.attrs["issues"]
    for key, n in summary.rows.items():
        dataset, file = key.split("/")
        part = cat[(cat.dataset == dataset) & (cat.file == file)]
        assert len(part) == n
        written = rows(csv_of(out, key))
        assert part["rel_path"].tolist() == [r["Path"] for r in written]
        for slug in SLUGS:
            cells = [r[NAME_OF[slug]] for r in written]
            expect = np.array([float(c) if c else np.nan for c in cells], dtype=np.float32)
            np.testing.assert_array_equal(part[slug].to_numpy(), expect)
        assert part["patient"].nunique() == summary.patients[key]
    photos = cat[cat.dataset == "chexphoto"]
    counts = photos.groupby(["file", "kind", "device"]).size()
    assert counts[("train", "natural", "nokia")] == summary.kinds["chexphoto/train/natural/nokia"]
    assert counts[("valid", "natural", "oneplus")] == summary.kinds["chexphoto/valid/natural/oneplus"]
    assert (
        counts[("train", "synthetic-photographic", "")]
        == summary.kinds["chexphoto/train/synthetic/photographic"]
    )
    # every photo pairs with its source x-ray: same file, labels and metadata
    xrays = cat[cat.dataset == "chexpert"].set_index(pair_keys(cat[cat.dataset == "chexpert"]))
    for (_, photo), key in zip(photos.iterrows(), pair_keys(photos), strict=True):
        src = xrays.loc[key]
        assert src["file"] == photo["file"]
        meta = ["sex", "age", "view", "ap_pa"]
        assert src[meta].tolist() == photo[meta].tolist()
        np.testing.assert_array_equal(src[list(SLUGS)].to_numpy(float), photo[list(SLUGS)].to_numpy(float))
    assert set(pair_keys(photos[photos.file == "valid"])) == set(xrays[xrays.file == "valid"].index)


def test_image_modes_sizes_and_exif(demo_tree) -> None:
    out, _ = demo_tree
    cat = read_catalog(out)
    rotated = 0
    for p, kind, device in zip(cat.path, cat.kind, cat.device, strict=True):
        with Image.open(p) as im:
            assert im.format == "JPEG"
            w, h = im.size
            if kind in ("digital", "synthetic-digital"):
                assert im.mode == "L" and w == S and 1.1 * w <= h <= 1.32 * w
            else:
                assert im.mode == "RGB"
            if kind == "natural":
                exif = im.getexif()
                assert exif[0x010F] and exif[0x0110]  # Make, Model
                assert (device == "iphone") == (exif[0x010F] == "Apple")
                upright = ImageOps.exif_transpose(im)
                assert upright.size == (S, round(S * 4 / 3))  # 3:4 portrait once turned
                if exif.get(0x0112, 1) == 6:
                    rotated += 1
                    assert (w, h) == (upright.height, upright.width)  # stored sideways
    assert rotated >= 1  # seed 0 turns some (EXIF Orientation 6 with pixels stored sideways)


def test_photos_show_their_source_xray(demo_tree) -> None:
    out, _ = demo_tree
    cat = read_catalog(out)
    xrays = cat[cat.dataset == "chexpert"].set_index(pair_keys(cat[cat.dataset == "chexpert"]))
    synth = cat[cat.kind == "synthetic-digital"]
    for path, key in zip(synth.path, pair_keys(synth), strict=True):
        photo = np.asarray(Image.open(path), dtype=float).ravel()
        own = np.asarray(Image.open(xrays.loc[key, "path"]), dtype=float)
        view = xrays.loc[key, "view"]
        other_key = next(k for k in xrays.index if k != key and xrays.loc[k, "view"] == view)
        other = np.asarray(Image.open(xrays.loc[other_key, "path"]).resize(own.shape[::-1]), dtype=float)
        assert np.corrcoef(photo, own.ravel())[0, 1] > 0.9
        assert np.corrcoef(photo, own.ravel())[0, 1] > np.corrcoef(photo, other.ravel())[0, 1]


def read_all(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path) -> None:
    args = dict(SMALL, digital=8, photos=4, valid=2)
    write_demo(tmp_path / "a", **args)
    write_demo(tmp_path / "b", **{**args, "workers": 2})
    write_demo(tmp_path / "c", **{**args, "seed": 4})
    a, b, c = read_all(tmp_path / "a"), read_all(tmp_path / "b"), read_all(tmp_path / "c")
    assert a == b
    assert a["CheXpert-v1.0-small/train.csv"] != c["CheXpert-v1.0-small/train.csv"]


def test_proportions_follow_the_real_release(tmp_path: Path) -> None:
    summary = write_demo(tmp_path, digital=500, photos=0, valid=0, size=32, seed=0, workers=1, progress=False)
    assert set(summary.csvs) == {"chexpert/train"}
    train = rows(summary.csvs["chexpert/train"])
    frontal = [r for r in train if r["Frontal/Lateral"] == "Frontal"]
    assert 0.78 < len(frontal) / len(train) < 0.92  # real: 0.855
    assert 0.75 < sum(r["AP/PA"] == "AP" for r in frontal) / len(frontal) < 0.93  # real: 0.846
    assert 1.5 < len(train) / summary.patients["chexpert/train"] < 4.0  # several studies per patient
    effusion = [r["Pleural Effusion"] for r in train]
    assert 0.28 < effusion.count("1.0") / len(train) < 0.5  # real: 0.386
    assert 0.3 < effusion.count("") / len(train) < 0.5  # real: 0.404
    assert 0.05 < sum(r["No Finding"] == "1.0" for r in train) / len(train) < 0.2  # real: 0.100
    studies = {}
    for r in train:  # views of a study share its labels, patients keep their sex
        _, _, patient, study, _ = r["Path"].split("/")
        cells = tuple(r[c] for c in ("Sex", *LABEL_COLUMNS))
        assert studies.setdefault((patient, study), cells) == cells


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(digital=3, photos=40), "need"),
        (dict(digital=0, photos=0), "counts"),
        (dict(digital=5, photos=-1), "counts"),
        (dict(digital=5, photos=0, valid=-2), "counts"),
        (dict(digital=5, photos=0, size=16), "size 16"),
        (dict(digital=5, photos=0, seed=-1), "seed -1"),
        (dict(digital=5, photos=0, workers=0), "workers 0"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DemoError, match=match):
        write_demo(tmp_path, **{"progress": False, "workers": 1, **kwargs})
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_synth_writes_the_tree_and_prints_the_summary(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "data",
        "synth",
        str(tmp_path),
        "--digital",
        "6",
        "--photos",
        "3",
        "--valid",
        "2",
        "--size",
        "32",
        "--seed",
        "1",
        "--workers",
        "1",
        "--no-progress",
    ]
    result = runner.invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    assert "CheXphoto-v1.0/valid.csv" in result.output and "natural/oneplus" in result.output
    assert len(rows(tmp_path / "CheXpert-v1.0-small" / "train.csv")) == 6
    assert len(rows(tmp_path / "CheXphoto-v1.0" / "valid.csv")) == 6
    bad = runner.invoke(
        build_app(),
        ["data", "synth", str(tmp_path / "x"), "--digital", "2", "--photos", "50", "--no-progress"],
    )
    assert bad.exit_code == 2 and "need" in bad.output
    assert runner.invoke(build_app(), ["data", "synth", "--help"]).exit_code == 0


@pytest.mark.parametrize("photos", [1, 2, 3, 4, 7, 31])
def test_any_photo_count_is_split_into_the_release_folders(tmp_path: Path, photos: int) -> None:
    summary = write_demo(tmp_path, digital=12, photos=photos, valid=0, size=32, workers=1, progress=False)
    assert summary.rows["chexphoto/train"] == photos
    folders = {k.split("/", 2)[2]: n for k, n in summary.kinds.items() if k.startswith("chexphoto/train/")}
    assert sum(folders.values()) == photos and min(folders.values()) > 0
    each = {folders.get(f, 0) for f in ("natural/nokia", "synthetic/digital", "synthetic/photographic")}
    assert len(each) == 1  # the three releases of the same x-rays
