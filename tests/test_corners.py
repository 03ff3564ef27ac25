"""Tests for data/corners.py: CheXphoto v1.1's labelme corner files, read and written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from chextrain.data.corners import (
    CornersError,
    catalog_corners,
    label_path,
    labelme_document,
    order_corners,
    read_labelme,
    write_labelme,
)
from chextrain.errors import ChextrainError

CORNERS = np.array([[10, 12], [90, 8], [95, 120], [6, 118]], dtype=np.float32)  # TL, TR, BR, BL


def _doc(**changes: object) -> dict:
    doc = labelme_document(CORNERS, 100, 130, "view1_frontal.jpg")
    doc.update(changes)
    return doc


def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "view1_frontal.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_stored_tr_br_bl_tl_and_read_back_tl_tr_br_bl(tmp_path: Path) -> None:
    path = write_labelme(tmp_path / "a" / "view1_frontal.json", CORNERS, 100, 130, "view1_frontal.jpg")
    doc = json.loads(path.read_text())
    assert doc["shapes"][0]["points"] == [[90, 8], [95, 120], [6, 118], [10, 12]]  # TR, BR, BL, TL
    assert (doc["imageWidth"], doc["imageHeight"], doc["shapes"][0]["shape_type"]) == (100, 130, "polygon")
    got = read_labelme(path)
    assert np.array_equal(got.corners, CORNERS) and (got.width, got.height) == (100, 130)
    assert np.allclose(got.normalised()[2], [0.95, 120 / 130])


@pytest.mark.parametrize(
    "doc, match",
    [
        ("{not json", "not a labelme JSON"),
        ([1, 2], "expected a JSON object"),
        (_doc(imageWidth="100"), "field 'imageWidth'"),
        ({k: v for k, v in _doc().items() if k != "imageHeight"}, "field 'imageHeight' is missing"),
        (_doc(shapes=[]), "0 polygons"),
        (_doc(shapes=_doc()["shapes"] * 2), "2 polygons"),
        (
            _doc(shapes=[{"shape_type": "polygon", "points": [[1, 2]] * 3}]),
            r"shapes\[0\].points has 3 points",
        ),
        (_doc(shapes=[{"shape_type": "polygon", "points": [[1, "a"]] * 4}]), "4 .x, y. number pairs"),
        (
            _doc(shapes=[{"shape_type": "polygon", "points": [[500, 2], [1, 2], [1, 2], [1, 2]]}]),
            r"points\[0\] \(TR\).*outside the 100 x 130",
        ),
    ],
)
def test_bad_files_name_the_file_and_field(tmp_path: Path, doc: object, match: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(CornersError, match=match) as err:
        read_labelme(path)
    assert str(path) in str(err.value) and isinstance(err.value, ChextrainError)


def test_missing_file_is_a_corners_error(tmp_path: Path) -> None:
    with pytest.raises(CornersError, match="cannot read"):
        read_labelme(tmp_path / "nope.json")


def test_a_corner_just_outside_is_accepted(tmp_path: Path) -> None:
    corners = CORNERS.copy()
    corners[2] = [104, 133]  # cut off by the photo's edge
    got = read_labelme(write_labelme(tmp_path / "x.json", corners, 100, 130, "x.jpg"))
    assert np.array_equal(got.corners, corners)


def test_order_corners_from_any_order() -> None:
    for perm in ([0, 1, 2, 3], [2, 0, 3, 1], [3, 2, 1, 0]):
        assert np.array_equal(order_corners(CORNERS[perm]), CORNERS)


def test_label_path_and_catalog_corners(tmp_path: Path) -> None:
    rel = "CheXphoto-v1.0/valid/natural/oneplus/patient64541/study1/view1_frontal.jpg"
    target = label_path(tmp_path, rel)
    assert (
        target
        == tmp_path / "labels/CheXphoto-v1.1/valid/natural/oneplus/patient64541/study1/view1_frontal.json"
    )
    write_labelme(target, CORNERS, 100, 130, "view1_frontal.jpg")
    film = "CheXphoto-v1.1/valid/film/VBSF00001/study1/view1_frontal.jpg"
    write_labelme(
        tmp_path / "CheXphoto-v1.1/labels/valid/film/VBSF00001/study1/view1_frontal.json",
        CORNERS,
        100,
        130,
        "v",
    )
    other = "CheXphoto-v1.0/valid/natural/oneplus/patient64542/study1/view1_frontal.jpg"
    catalog = pd.DataFrame(
        {
            "path": [f"{tmp_path}/{r}" for r in (rel, film, other)],
            "rel_path": [rel, film, other],
            "kind": ["natural", "film", "natural"],
        }
    )
    found = catalog_corners(catalog)
    assert sorted(found) == sorted([f"{tmp_path}/{rel}", f"{tmp_path}/{film}"])


def test_demo_writes_corner_labels_for_natural_photos(demo_root: Path) -> None:
    from chextrain.data.catalog import read_catalog
    from chextrain.data.images import load_image

    catalog = read_catalog(demo_root)
    natural = catalog.loc[catalog["kind"] == "natural"]
    found = catalog_corners(catalog)
    assert len(found) == len(natural) > 0  # every natural photo, train and valid
    assert not any(p in found for p in catalog.loc[catalog["kind"] != "natural", "path"])
    for path, labelled in list(found.items())[:6]:
        image = load_image(Path(path))  # EXIF orientation applied, as the labels are
        assert image.shape[:2] == (labelled.height, labelled.width)
        c = labelled.corners
        assert c[1, 0] > c[0, 0] and c[2, 1] > c[1, 1] and c[3, 0] < c[2, 0]  # TL, TR, BR, BL
