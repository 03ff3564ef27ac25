"""`chextrain predict | explain | serve | export` through the Typer app."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from chextrain.cli import build_app
from chextrain.data.images import load_image
from chextrain.labels import SLUGS
from tests.conftest import demo_files

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(build_app(), [str(a) for a in args], env={"COLUMNS": "250"})
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _dicom(path: Path, arr: np.ndarray) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", *arr.shape, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (arr.astype(np.uint16) * 16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def images(tmp_path: Path, use_demo: Path) -> Path:
    """A folder tree: 2 x-rays (JPEG, PNG), 2 photos in a subfolder, a DICOM, a CSV to skip."""
    root = tmp_path / "in"
    (root / "phone").mkdir(parents=True)
    xrays = demo_files(use_demo, "digital", "valid")[:2]
    shutil.copy(xrays[0], root / "a.jpg")
    Image.fromarray(load_image(xrays[1])).save(root / "b.png")
    for i, f in enumerate(demo_files(use_demo, "natural", "valid")[:2]):
        shutil.copy(f, root / "phone" / f"IMG_{i}.JPG")
    _dicom(root / "c.dcm", load_image(xrays[0]))
    (root / "labels.csv").write_text("not,an,image\n")
    return root


def test_predict_folder_json_routes_each_image(routed_bundle: Path, images: Path) -> None:
    code, out, _ = _run("predict", routed_bundle, images, "--format", "json")
    assert code == 0
    results = {Path(r["name"]).name: r for r in json.loads(out)}
    assert sorted(results) == ["IMG_0.JPG", "IMG_1.JPG", "a.jpg", "b.png", "c.dcm"]  # csv skipped
    assert {results[n]["head"] for n in ("a.jpg", "b.png", "c.dcm")} == {"digital"}
    assert {results[n]["head"] for n in ("IMG_0.JPG", "IMG_1.JPG")} == {"photo"}
    for s in SLUGS:  # the DICOM holds a.jpg's pixels as 12-bit values
        dicom, jpeg = results["c.dcm"]["pathologies"][s]["prob"], results["a.jpg"]["pathologies"][s]["prob"]
        assert dicom == pytest.approx(jpeg, abs=0.02)
    assert all(r["ood"]["status"] in ("in-distribution", "out-of-distribution") for r in results.values())


def test_unreadable_files_fail_alone_and_set_the_exit_code(routed_bundle: Path, images: Path) -> None:
    (images / "broken.jpg").write_bytes((images / "a.jpg").read_bytes()[:300])
    (images / "notes.png").write_text("hello")
    (images / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    inputs = ["a.jpg", "broken.jpg", "notes.png", "phone.heic", "missing.jpg", "nothing*.png"]
    code, out, err = _run("predict", routed_bundle, *[str(images / n) for n in inputs], "--format", "json")
    assert code == 1 and "5 of 6 inputs failed" in err
    by_name = {Path(r["name"]).name: r for r in json.loads(out)}
    assert "pathologies" in by_name["a.jpg"]
    assert "truncated" in by_name["broken.jpg"]["error"] or "corrupt" in by_name["broken.jpg"]["error"]
    assert "not an image" in by_name["notes.png"]["error"]
    assert "chextrain[heic]" in by_name["phone.heic"]["error"] or "HEIC" in by_name["phone.heic"]["error"]
    assert by_name["missing.jpg"]["error"] == "no such file or folder"
    assert by_name["nothing*.png"]["error"] == "no file matches this pattern"


def test_csv_and_table_formats(routed_bundle: Path, images: Path, tmp_path: Path) -> None:
    pattern = str(images / "**" / "*.JPG")
    code, out, _ = _run("predict", routed_bundle, pattern, images / "a.jpg", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [Path(r["name"]).name for r in rows] == ["IMG_0.JPG", "IMG_1.JPG", "a.jpg"]
    assert [r["head"] for r in rows] == ["photo", "photo", "digital"]
    for r in rows:
        for s in SLUGS:
            assert 0 <= float(r[f"{s}_prob"]) <= 1 and r[f"{s}_positive"] in ("0", "1")
            assert (float(r[f"{s}_prob"]) >= float(r[f"{s}_threshold"])) == (r[f"{s}_positive"] == "1")
        assert r["ood_status"] in ("in-distribution", "out-of-distribution") and float(r["p_photo"]) >= 0
        if r["head"] == "photo":  # the photo quality checks close the row; none for an x-ray
            assert r["quality"] in ("pass", "fail") and float(r["quality_blur"]) > 0
        else:
            assert r["quality"] == r["quality_blur"] == ""
    code, out, _ = _run("predict", routed_bundle, images / "a.jpg", images / "nope.png")
    assert code == 1
    row = next(line for line in out.splitlines() if line.strip().startswith("a.jpg"))
    assert "digital" in row and len(re.findall(r"\d\.\d\d[+ ]", row)) == 6  # P(photo) + 5 findings
    assert "failed nope.png: no such file or folder" in out
    target = tmp_path / "out.csv"
    code, out, _ = _run("predict", routed_bundle, images / "a.jpg", "--format", "csv", "--out", target)
    assert code == 0 and out == "" and target.read_text().startswith("name,error,head")
    code, _, err = _run("predict", routed_bundle, images / "a.jpg", "--format", "xml")
    assert code == 2 and "xml" in err


def test_domain_tta_batch_size_and_onnx_options(routed_bundle: Path, images: Path) -> None:
    def probs(*extra: str) -> dict[str, dict]:
        code, out, _ = _run("predict", routed_bundle, images, "--format", "json", *extra)
        assert code == 0
        return {Path(r["name"]).name: r for r in json.loads(out)}

    base = probs()
    forced = probs("--domain", "photo")
    assert {r["head"] for r in forced.values()} == {"photo"}
    assert {r["domain_source"] for r in forced.values()} == {"forced"}
    small = probs("--batch-size", "2")
    tta = probs("--tta")
    on = probs("--runtime", "onnx")
    for name, r in base.items():
        for s in SLUGS:
            p = r["pathologies"][s]["prob"]
            assert small[name]["pathologies"][s]["prob"] == pytest.approx(p, abs=1e-5)
            assert on[name]["pathologies"][s]["prob"] == pytest.approx(p, abs=1e-4)
        assert tta[name]["tta"] and tta[name]["pathologies"] != r["pathologies"]
    code, _, err = _run("predict", routed_bundle, images, "--domain", "xray")
    assert code == 2 and "domain 'xray'" in err


def test_missing_bundle_is_a_clear_error(tmp_path: Path, images: Path) -> None:
    code, _, err = _run("predict", tmp_path / "nobundle", images)
    assert code == 2 and "nobundle" in err


@pytest.mark.parametrize("method", ["gradcam", "gradient"])
def test_explain_writes_overlays_a_grid_and_the_prediction(
    routed_bundle: Path, images: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "explain"
    image = images / "phone" / "IMG_0.JPG"
    code, stdout, _ = _run("explain", routed_bundle, image, "--out", out, "--method", method)
    assert code == 0 and "IMG_0_grid.png" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"IMG_0_{s}.png" for s in SLUGS] + ["IMG_0_grid.png", "IMG_0.json"])
    overlays = [np.asarray(Image.open(out / f"IMG_0_{s}.png")) for s in SLUGS]
    assert overlays[0].shape[2] == 3 and not np.array_equal(overlays[0], overlays[1])
    result = json.loads((out / "IMG_0.json").read_text())
    assert result["method"] == method and result["head"] == "photo"


def test_explain_errors(routed_bundle: Path, images: Path, tmp_path: Path) -> None:
    code, _, err = _run("explain", routed_bundle, images / "a.jpg", "--out", tmp_path, "--method", "lime")
    assert code == 2 and "lime" in err
    code, _, err = _run("explain", routed_bundle, images / "labels.csv", "--out", tmp_path)
    assert code == 1 and "labels.csv" in err


def test_export_then_predict_with_the_onnx_file(routed_bundle: Path, images: Path, tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    code, out, _ = _run("export", routed_bundle, "--onnx", target)
    assert code == 0 and target.is_file() and "max |probability difference|" in out
    code, out, _ = _run(
        "predict", routed_bundle, images / "a.jpg", "--runtime", "onnx", "--onnx", target, "--format", "json"
    )
    assert code == 0 and json.loads(out)[0]["head"] == "digital"
    code, _, err = _run("export", tmp_path / "missing", "--onnx", target)
    assert code == 2 and "missing" in err


def test_serve_binds_loopback_by_default(plain_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    code, _, err = _run("serve", plain_bundle)
    assert code == 0 and calls[-1][1]["host"] == "127.0.0.1" and calls[-1][1]["port"] == 8000
    assert "warning" not in err
    code, _, err = _run("serve", plain_bundle, "--host", "0.0.0.0", "--port", "9001")
    assert code == 0 and calls[-1][1]["host"] == "0.0.0.0" and calls[-1][1]["port"] == 9001
    assert "reachable from other machines" in err
    assert {r.path for r in calls[-1][0].routes} >= {"/", "/api/predict", "/api/explain", "/api/health"}


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("predict", "router picks the head"),
        ("explain", "saliency"),
        ("serve", "web page"),
        ("export", "ONNX"),
    ],
)
def test_help(command: str, says: str) -> None:
    code, out, _ = _run(command, "--help")
    assert code == 0 and f"{command} [OPTIONS]" in out and says in out
    assert ("--domain" in out) == (command != "export")


USE_COMMANDS_SCRIPT = """
import json, sys
import uvicorn
from typer.testing import CliRunner
from chextrain.cli import build_app

uvicorn.run = lambda app, **kw: None  # serve builds its app and would serve it here
bundle, image, out = sys.argv[1:4]
codes = [CliRunner().invoke(build_app(), args).exit_code for args in (
    ["predict", bundle, image, "--format", "json"],
    ["explain", bundle, image, "--out", out],
    ["serve", bundle],
)]
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_predict_explain_and_serve_never_import_lightning_or_torchvision(
    plain_bundle: Path, images: Path, tmp_path: Path
) -> None:
    """In a fresh interpreter: the three commands on a tiny bundle import neither (a densenet121
    bundle does import torchvision, whose __init__ imports torchvision.ops and torch._dynamo)."""
    import subprocess
    import sys

    args = [str(plain_bundle), str(images / "a.jpg"), str(tmp_path / "explain")]
    done = subprocess.run(
        [sys.executable, "-c", USE_COMMANDS_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["codes"] == [0, 0, 0]
    modules = set(found["modules"])
    assert {"torch", "captum", "fastapi"} <= modules  # the commands did their work
    assert not {m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "torchvision")}


def test_table_fits_80_columns_and_says_what_shaped_the_scores(
    routed_bundle: Path, images: Path, tmp_path: Path
) -> None:
    deep = images / "a_folder_with_a_rather_long_name" / "and_another_one_below_it"
    deep.mkdir(parents=True)
    shutil.copy(images / "a.jpg", deep / "chest_xray_of_patient_00042_frontal.jpg")
    result = runner.invoke(
        build_app(), ["predict", str(routed_bundle), str(images), "--tta"], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(line.lstrip().startswith("...") and "tal.jpg" in line for line in lines)  # cut from the left
    assert any(line.startswith("+ at or above, head digital: eff. ") for line in lines)
    assert "scores changed by: --tta" in " ".join(result.stdout.split())
    forced = runner.invoke(
        build_app(), ["predict", str(routed_bundle), str(images / "a.jpg"), "--domain", "photo"]
    )
    assert "--domain photo" in forced.stdout and "--tta" not in forced.stdout
    target = tmp_path / "new" / "p.json"
    written = runner.invoke(
        build_app(),
        ["predict", str(routed_bundle), str(images / "a.jpg"), "--format", "json", "--out", str(target)],
    )
    assert (
        written.exit_code == 0 and written.stdout == "" and f"to {target}" in " ".join(written.stderr.split())
    )
    assert json.loads(target.read_text())[0]["head"] == "digital"


def test_predict_applies_the_bundle_temperatures_unless_told_not_to(
    routed_bundle: Path, images: Path, tmp_path: Path
) -> None:
    from chextrain.models.bundle import load_bundle, save_bundle

    model, meta = load_bundle(routed_bundle)
    folder = save_bundle(model, tmp_path / "t", {**meta, "temperature": {"digital": 2.0, "photo": 2.0}})

    def probs(bundle: Path, *extra: str) -> dict[str, list[float]]:
        code, out, _ = _run("predict", bundle, images, "--format", "json", *extra)
        assert code == 0
        return {Path(r["name"]).name: [r["pathologies"][s]["prob"] for s in SLUGS] for r in json.loads(out)}

    raw, on, off = probs(routed_bundle), probs(folder), probs(folder, "--no-calibration")
    assert off == raw and set(on) == set(raw)
    for name, p in raw.items():  # T = 2 pulls every probability towards 0.5
        assert all(abs(b - 0.5) < abs(a - 0.5) for a, b in zip(p, on[name], strict=True))
    table = runner.invoke(build_app(), ["predict", str(folder), str(images / "a.jpg"), "--no-calibration"])
    assert "--no-calibration" in " ".join(table.stdout.split())


def _document(path: Path) -> Path:
    """A text document saved as PNG: not a chest x-ray, so the OOD check flags it."""
    doc = np.full((120, 90), 245, np.uint8)
    doc[10:110:8, 8:80] = 20
    Image.fromarray(doc).save(path)
    return path


def test_flagged_images_are_not_scored_in_the_table_json_and_csv(routed_bundle: Path, images: Path) -> None:
    doc = _document(images / "letter.png")
    code, out, _ = _run("predict", routed_bundle, images / "a.jpg", doc)
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("letter.png"))
    assert "FLAG" in row and not re.search(r"\d\.\d\d[+ ]", row.split("FLAG")[1])  # no probability
    assert "letter.png: not scored: out-of-distribution" in " ".join(out.split()) and "--score-anyway" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("a.jpg"))
    assert len(re.findall(r"\d\.\d\d[+ ]", row)) == 6 and "not scored" not in row

    code, out, _ = _run("predict", routed_bundle, doc, "--format", "json")
    (r,) = json.loads(out)
    assert r["withheld"] is True and r["withheld_reason"].startswith("out-of-distribution")
    assert "pathologies" not in r and list(r["withheld_pathologies"]) == list(SLUGS)

    code, out, _ = _run("predict", routed_bundle, doc, images / "a.jpg", "--format", "csv")
    rows = {Path(r["name"]).name: r for r in csv.DictReader(io.StringIO(out))}
    flagged, fine = rows["letter.png"], rows["a.jpg"]
    assert flagged["withheld"] == "1" and flagged["withheld_reason"].startswith("out-of-distribution")
    assert all(flagged[f"{s}_prob"] == "" and flagged[f"{s}_positive"] == "" for s in SLUGS)
    assert all(0 <= float(flagged[f"withheld_{s}_prob"]) <= 1 for s in SLUGS)
    assert fine["withheld"] == "0" and all(fine[f"withheld_{s}_prob"] == "" for s in SLUGS)

    code, out, _ = _run("predict", routed_bundle, doc, "--format", "json", "--score-anyway")
    (anyway,) = json.loads(out)
    assert not anyway["withheld"] and anyway["scored_anyway"] and anyway["flagged"]
    assert {s: p["prob"] for s, p in anyway["pathologies"].items()} == {
        s: p["prob"] for s, p in r["withheld_pathologies"].items()
    }
    code, out, _ = _run("predict", routed_bundle, doc, "--score-anyway")
    row = next(line for line in out.splitlines() if line.strip().startswith("letter.png"))
    assert len(re.findall(r"\d\.\d\d[+ ]", row)) == 6 and "not scored" not in out
    assert "scored anyway" in " ".join(out.split()) or "--score-anyway" in out


def test_quality_calibrate_prints_the_table_and_writes_the_bundles_thresholds(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps({"backbone": "tiny", "kept": True}))
    (bundle / "model.safetensors").write_bytes(b"weights")  # only model.json is changed
    code, out, _ = _run("quality", "calibrate", "--images", "2", "--seed", "1", "--bundle", bundle)
    assert code == 0 and "levels 0, 1 must pass, 3, 4 must fail" in out and "tilt" in out
    assert (bundle / "model.safetensors").read_bytes() == b"weights"
    meta = json.loads((bundle / "model.json").read_text())
    assert meta["kept"] is True and set(meta["quality"]["thresholds"]) >= {"blur_min", "tilt_max"}
    assert meta["quality"]["calibration"] == {
        "images": 2,
        "seed": 1,
        "pass_levels": [0, 1],
        "fail_levels": [3, 4],
        "max_false_fail": 0.02,
    }
    code, _, err = _run("quality", "calibrate", "--images", "2", "--bundle", tmp_path / "missing")
    assert code == 2 and "missing" in err and "Traceback" not in err
