"""Write a demo CheXpert + CheXphoto tree, laid out exactly like the official releases.

`write_demo(out, digital=..., photos=..., valid=...)` writes

    out/CheXpert-v1.0-small/{train,valid}.csv + train/patientNNNNN/studyK/viewJ_{frontal,lateral}.jpg
    out/CheXphoto-v1.0/{train,valid}.csv + train/natural/{nokia,iphone}/..., train/synthetic/{digital,
        photographic}/..., valid/natural/oneplus/..., valid/synthetic/{digital,photographic}/...

with the official 19-column header and cell encodings (docs: shared/DATASETS.md sections 1-2).
Labels and metadata are sampled from the real CheXpert train.csv statistics
(resources/chexpert_label_stats.json, plus the per-column rates in OTHER_LABELS); the x-rays are
drawn by `phantom.render_xray` so the pathology signs follow the labels, and every CheXphoto
image is a photo (`photo.simulate_photo`) of the CheXpert image with the same patient, study
and view. Choices where the real release is unknown or too big to copy:

- the Nokia folder is named `nokia`; natural photos are small (width `size`, 3:4 portrait)
  instead of 3456 x 4608, with the phone's EXIF Make/Model;
- some natural photos (10 % Nokia on its tripod, 30 % hand-held iPhone / OnePlus) carry
  EXIF Orientation 6 and store their pixels turned 90 degrees counter-clockwise (landscape),
  as phones do: a loader that ignores EXIF sees them sideways;
- valid labels are independent draws at the real valid prevalences;
- every natural photo (train and valid; the release labels valid ones only) has the x-ray's
  four corners in a labelme file at labels/CheXphoto-v1.1/<split>/natural/<phone>/.../viewN.json,
  in the v1.1 layout and point order (data/corners.py).

Everything is a function of `seed`: the CSVs are sampled in one process, and each image gets
its own generator from (seed, its path), so any number of workers writes identical bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from chextrain.data.corners import label_path, write_labelme
from chextrain.data.demo_labels import CHEXPERT_DIR, CHEXPHOTO_DIR, DemoError, Photo, Sampler, Xray, patients
from chextrain.data.phantom import render_xray
from chextrain.data.photo import simulate_photo, simulate_photo_with_corners
from chextrain.fileio import atomic_write_bytes
from chextrain.labels import CHEXPERT_COLUMNS

FIRST_VALID_PATIENT = 64541
PHOTO_SHARE = 10507 / 32521  # each of Nokia, synthetic digital, synthetic photographic; iPhone the rest
PHONES = {
    "nokia": ("HMD Global", "Nokia 6.1", 0.1),
    "iphone": ("Apple", "iPhone 8", 0.3),
    "oneplus": ("OnePlus", "ONEPLUS A6003", 0.3),
}  # Make, Model, P(EXIF-rotated)
PHOTO_FOLDERS = (
    "natural/nokia",
    "natural/iphone",
    "natural/oneplus",
    "synthetic/digital",
    "synthetic/photographic",
)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoSummary:
    """What write_demo wrote. Keys are 'chexpert/train', 'chexphoto/valid', ...; kinds keys
    add the image folder: 'chexphoto/train/natural/nokia', 'chexpert/train/frontal'."""

    root: Path
    csvs: dict[str, Path]
    rows: dict[str, int]
    patients: dict[str, int]
    kinds: dict[str, int]
    images: int
    seconds: float
    workers: int


def _photo_rel(xray_rel: str, split: str, folder: str) -> str:
    inner = xray_rel.split(f"/{split}/", 1)[1]
    return f"{CHEXPHOTO_DIR}/{split}/{folder}/{inner}"


def _orientation(rng: np.random.Generator, device: str) -> int:
    return 6 if rng.random() < PHONES[device][2] else 1


def _plan(digital: int, photos: int, valid: int, size: int, seed: int) -> tuple[list[list[Xray]], list[Xray]]:
    """Sample every CSV row and attach the photos to the x-rays they show."""
    if digital < 1 or photos < 0 or valid < 0:
        raise DemoError(
            f"counts must be digital >= 1, photos >= 0, valid >= 0; got {digital}, {photos}, {valid}"
        )
    if not 32 <= size <= 2048:
        raise DemoError(f"size {size} must be 32..2048 px")
    if seed < 0:
        raise DemoError(f"seed {seed} must be >= 0")
    n_each = min(int(round(photos * PHOTO_SHARE)), photos // 3)
    n_iphone = photos - 3 * n_each
    n_sources = max(n_each, n_iphone)
    if n_sources > digital:
        raise DemoError(
            f"{photos} photos need {n_sources} CheXpert train x-rays to photograph; "
            f"digital is {digital} (raise --digital or lower --photos)"
        )
    rng = np.random.default_rng(seed)
    sampler = Sampler(rng, size)
    train = patients(sampler, digital, 1, "train", valid=False)
    test = [x for p in patients(sampler, valid, FIRST_VALID_PATIENT, "valid", valid=True) for x in p]
    sources: list[Xray] = []
    for i in rng.permutation(len(train)):  # whole patients, as CheXphoto sampled them
        sources.extend(train[i])
        if len(sources) >= n_sources:
            break
    order = {x.rel: j for j, x in enumerate(x for p in train for x in p)}
    sources = sorted(sources[:n_sources], key=lambda x: order[x.rel])
    iphone = {sources[j].rel for j in rng.choice(len(sources), size=n_iphone, replace=False)}
    for j, x in enumerate(sources):
        if j < n_each:
            x.photos.append(
                Photo(
                    _photo_rel(x.rel, "train", "natural/nokia"), "phone", "nokia", _orientation(rng, "nokia")
                )
            )
            x.photos.append(Photo(_photo_rel(x.rel, "train", "synthetic/digital"), "digital"))
            x.photos.append(Photo(_photo_rel(x.rel, "train", "synthetic/photographic"), "photographic"))
        if x.rel in iphone:
            x.photos.append(
                Photo(
                    _photo_rel(x.rel, "train", "natural/iphone"),
                    "phone",
                    "iphone",
                    _orientation(rng, "iphone"),
                )
            )
    for x in test:
        x.photos.extend(
            [
                Photo(
                    _photo_rel(x.rel, "valid", "natural/oneplus"),
                    "phone",
                    "oneplus",
                    _orientation(rng, "oneplus"),
                ),
                Photo(_photo_rel(x.rel, "valid", "synthetic/digital"), "digital"),
                Photo(_photo_rel(x.rel, "valid", "synthetic/photographic"), "photographic"),
            ]
        )
    return train, test


def _rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one image: a function of (seed, its path) only."""
    words = np.frombuffer(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest(), dtype="<u4")
    return np.random.default_rng(np.random.SeedSequence([seed, *words.tolist()]))


def _save(image: np.ndarray, path: Path, exif: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(
        buf, "JPEG", quality=JPEG_QUALITY, **({"exif": exif} if exif else {})
    )
    path.write_bytes(buf.getvalue())


def _exif(device: str, orientation: int) -> bytes:
    make, model, _ = PHONES[device]
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = make, model, orientation  # Make, Model, Orientation
    return exif.tobytes()


def _natural(image: np.ndarray, photo: Photo, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A phone photo of the x-ray shown on a black screen: 3:4 portrait, RGB, maybe stored turned.

    Returns the stored pixels and the x-ray's corners (TL, TR, BR, BL) in the photo as a viewer
    shows it (EXIF orientation applied: the un-turned frame).
    """
    h, w = image.shape
    canvas = np.zeros((max(h, round(w * 4 / 3)), w), dtype=np.uint8)  # H x W
    top = (canvas.shape[0] - h) // 2
    canvas[top : top + h] = image
    out, corners = simulate_photo_with_corners(canvas, "phone", 1, rng, region=(0, top, w, top + h))
    stored = np.rot90(out, 1) if photo.orientation == 6 else out  # Orientation 6: viewers turn it back
    return stored, corners


def _render(x: Xray, root: str, seed: int) -> int:
    """Draw one x-ray and every photo of it (natural ones with their corner labels); returns the
    number of images written."""
    image, _ = render_xray(x.labels, x.view, _rng(seed, x.rel), x.shape)
    _save(image, Path(root, x.rel))
    for photo in x.photos:
        rng = _rng(seed, photo.rel)
        if photo.recipe == "phone":
            pixels, corners = _natural(image, photo, rng)
            _save(pixels, Path(root, photo.rel), _exif(photo.device, photo.orientation))
            height, width = pixels.shape[:2] if photo.orientation == 1 else pixels.shape[1::-1]
            name = Path(photo.rel).name
            write_labelme(label_path(Path(root), photo.rel), corners, width, height, name)
        else:
            _save(simulate_photo(image, photo.recipe, 1, rng), Path(root, photo.rel))
    return 1 + len(x.photos)


def _render_chunk(chunk: list[Xray], root: str, seed: int) -> int:
    return sum(_render(x, root, seed) for x in chunk)


def _run(xrays: list[Xray], root: Path, seed: int, workers: int, progress: bool) -> None:
    """Render every image, in `workers` processes (1: in this one), with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = sum(1 + len(x.photos) for x in xrays)
    step = max(1, min(32, math.ceil(len(xrays) / (8 * workers))))
    chunks = [xrays[i : i + step] for i in range(0, len(xrays), step)]
    columns = (TextColumn("writing demo images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if workers == 1 or len(chunks) == 1:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("images", total=total)
            for chunk in chunks:
                bar.advance(task, _render_chunk(chunk, str(root), seed))
        return
    # The platform's start method (fork on Linux): works from notebooks and stdin; the workers
    # start at the first submit, before the progress bar's thread exists.
    with ProcessPoolExecutor(min(workers, len(chunks))) as pool:
        futures = [pool.submit(_render_chunk, chunk, str(root), seed) for chunk in chunks]
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("images", total=total)
            for future in as_completed(futures):
                bar.advance(task, future.result())


def _write_csv(path: Path, rows: list[tuple[str, ...]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CHEXPERT_COLUMNS)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))  # a CSV is never seen half-written


def _int_cells(cells: tuple[str, ...]) -> tuple[str, ...]:
    """CheXphoto valid.csv writes labels as integers: '1.0' -> '1'."""
    return cells[:4] + tuple(c[:-2] if c.endswith(".0") else c for c in cells[4:])


def write_demo(
    out: Path,
    *,
    digital: int,
    photos: int,
    valid: int = 234,
    size: int = 320,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
) -> DemoSummary:
    """Write CheXpert-v1.0-small/ and CheXphoto-v1.0/ under `out` in the official layouts.

    Args:
        out: folder to write into (created; existing files with the same names are replaced).
        digital: CheXpert train x-rays (whole patients of 1-10 studies of 1-3 views).
        photos: CheXphoto train photos, split like the release: about 32 % each Nokia, synthetic
            digital and synthetic photographic (all of the same x-rays), the rest iPhone.
        valid: CheXpert valid x-rays (patients from 64541, study1); CheXphoto valid has 3 photos
            of each (natural/oneplus, synthetic/digital, synthetic/photographic). 0 writes no valid.
        size: image width in px; x-rays are 1.12-1.3x as tall, natural photos 4:3 portrait.
        seed: everything written is a function of the seed (not of `workers`).
        workers: processes rendering images (default: os.cpu_count()).
        progress: show a rich progress bar.
    """
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise DemoError(f"workers {workers} must be >= 1 (or None for every CPU core)")
    out = Path(out)
    train, test = _plan(digital, photos, valid, size, seed)
    flat = [x for p in train for x in p]
    files: dict[str, list[tuple[str, ...]]] = {
        "chexpert/train": [(x.rel, *x.cells) for x in flat],
        "chexpert/valid": [(x.rel, *x.cells) for x in test],
        "chexphoto/train": [(p.rel, *x.cells) for x in flat for p in x.photos],
        "chexphoto/valid": [(p.rel, *_int_cells(x.cells)) for x in test for p in x.photos],
    }
    for key in ("chexphoto/train", "chexphoto/valid"):  # grouped by folder, in x-ray order within
        files[key].sort(key=lambda row: PHOTO_FOLDERS.index(_folder(row[0])))
    n_workers = workers or os.cpu_count() or 1
    _run(flat + test, out, seed, n_workers, progress)
    csvs, rows, patients, kinds = {}, {}, {}, {}
    for key, lines in files.items():
        if not lines:
            continue
        dataset, split = key.split("/")
        csvs[key] = out / (CHEXPERT_DIR if dataset == "chexpert" else CHEXPHOTO_DIR) / f"{split}.csv"
        rows[key] = len(lines)
        patients[key] = len({r[0].split("/")[-3] for r in lines})
        for r in lines:
            kind = r[3].lower() if dataset == "chexpert" else _folder(r[0])
            kinds[f"{key}/{kind}"] = kinds.get(f"{key}/{kind}", 0) + 1
    for key in sorted(csvs, key=lambda k: k == "chexpert/train"):  # CSVs after images, CheXpert train
        _write_csv(csvs[key], files[key])  # last: a tree with its train.csv is complete
    return DemoSummary(
        root=out,
        csvs=csvs,
        rows=rows,
        patients=patients,
        kinds=kinds,
        images=sum(rows.values()),
        seconds=time.perf_counter() - t0,
        workers=n_workers,
    )


def _folder(rel: str) -> str:
    """'natural/nokia', 'synthetic/digital', ... from a CheXphoto path."""
    return "/".join(rel.split("/")[2:4])
