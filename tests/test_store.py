"""The prepared image store: rows equal decoding, keyed by path/size/mtime, resumable, shared by stages."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import chextrain.data.store as store_module
from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset, collate
from chextrain.data.store import ImageStore, StoredImages, StoreError, release_of
from chextrain.data.transforms import Decoding

SIZE = 24


def tree(tmp_path: Path, n: int = 6, side: int = 64) -> list[str]:
    """n grey JPEGs laid out like a release: tmp/rel/train/patientK/study1/view1_frontal.jpg."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = tmp_path / "rel" / "train" / f"patient{i:05d}" / "study1" / "view1_frontal.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (side + i, side), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def builds(root: Path) -> list[dict]:
    return [b for f in sorted(root.rglob("builds.json")) for b in json.loads(f.read_text())]


def test_rows_are_exactly_the_decoded_images_and_reused(tmp_path: Path) -> None:
    paths = tree(tmp_path)
    store = ImageStore(tmp_path / "store", Decoding(SIZE), workers=1, progress=False)
    first = store.build(paths)
    assert (first.decoded, first.reused, first.failed) == (len(paths), 0, {})
    images = store.images(paths[::-1])
    assert images.shape == (len(paths), SIZE, SIZE)
    for i, path in enumerate(paths[::-1]):
        assert np.array_equal(images[i], Decoding(SIZE).load(path))
    again = store.build(paths + paths[:2])  # duplicates are one image
    assert (again.decoded, again.reused) == (0, len(paths))
    assert [b["decoded"] for b in builds(tmp_path / "store")] == [len(paths), 0]
    assert (tmp_path / "store" / "rel" / Decoding(SIZE).tag / "images.u8").stat().st_size == len(
        paths
    ) * SIZE**2


def test_parallel_build_writes_the_same_bytes(tmp_path: Path) -> None:
    paths = tree(tmp_path, n=9)
    one = ImageStore(tmp_path / "one", Decoding(SIZE), workers=1, progress=False).prepare(paths)
    two = ImageStore(tmp_path / "two", Decoding(SIZE), workers=2, progress=False).prepare(paths)
    assert all(np.array_equal(one[i], two[i]) for i in range(len(paths)))


def test_a_changed_file_rebuilds_its_own_row_only(tmp_path: Path) -> None:
    paths = tree(tmp_path)
    store = ImageStore(tmp_path / "store", Decoding(SIZE), workers=1, progress=False)
    store.build(paths)
    Image.fromarray(np.full((50, 40), 200, np.uint8)).save(paths[2], quality=90)
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    report = store.build(paths)
    assert (report.decoded, report.reused) == (1, len(paths) - 1)
    assert np.array_equal(store.images(paths)[2], np.full((SIZE, SIZE), 200, np.uint8))


def test_unreadable_and_missing_files_are_named_and_the_rest_kept(tmp_path: Path) -> None:
    paths = tree(tmp_path)
    Path(paths[1]).write_bytes(b"\xff\xd8\xff not a jpeg")
    os.remove(paths[4])
    store = ImageStore(tmp_path / "store", Decoding(SIZE), workers=1, progress=False)
    with pytest.raises(StoreError, match=r"2 image\(s\) cannot be read") as err:
        store.prepare(paths)
    assert paths[1] in str(err.value) and "corrupt" in str(err.value) and paths[4] in str(err.value)
    good = [p for i, p in enumerate(paths) if i not in (1, 4)]
    assert len(store.images(good)) == 4
    with pytest.raises(StoreError, match="no row in the store") as missing:
        store.images([paths[1]])
    assert paths[1] in str(missing.value)
    again = store.build(paths)  # an unchanged unreadable file is reported again, not decoded again
    assert again.decoded == 0 and set(again.failed) == {paths[1], paths[4]}
    assert "corrupt" in again.failed[paths[1]]


def test_a_killed_build_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = tree(tmp_path, n=12)
    monkeypatch.setattr(store_module, "COMMIT_SECONDS", 0.0)  # commit after every chunk
    monkeypatch.setattr(store_module, "COMMIT_SHARE", float("inf"))
    real = store_module._decode_rows
    calls = []

    def dying(images: str, decoding: Decoding, jobs: list) -> list:
        calls.append(len(jobs))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is killed while decoding its third chunk
        return real(images, decoding, jobs)

    monkeypatch.setattr(store_module, "_decode_rows", dying)
    store = ImageStore(tmp_path / "store", Decoding(SIZE), workers=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        store.build(paths)
    done_before = sum(calls[:2])
    assert 0 < done_before < len(paths)
    monkeypatch.setattr(store_module, "_decode_rows", real)
    report = store.build(paths)
    assert (report.decoded, report.reused) == (len(paths) - done_before, done_before)
    fresh = ImageStore(tmp_path / "fresh", Decoding(SIZE), workers=1, progress=False).prepare(paths)
    resumed = store.images(paths)
    assert all(np.array_equal(fresh[i], resumed[i]) for i in range(len(paths)))


def test_reader_pickles_without_its_maps_and_releases_are_named(tmp_path: Path) -> None:
    paths = tree(tmp_path, n=3)
    images = ImageStore(tmp_path / "store", Decoding(SIZE), workers=1, progress=False).prepare(paths)
    first = images[0]
    copy = pickle.loads(pickle.dumps(images))
    assert isinstance(copy, StoredImages) and copy._maps is None and np.array_equal(copy[0], first)
    assert len(pickle.dumps(images)) < 2_000  # arrays of indices, never the pixels
    assert (
        release_of("/d/CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg") == "CheXpert-v1.0-small"
    )
    assert release_of("/d/CheXphoto-v1.0/valid/natural/oneplus/p/s/v.jpg") == "CheXphoto-v1.0"
    assert release_of("/somewhere/image.png") == "other"
    assert Decoding(SIZE).tag != Decoding(SIZE, draft=False).tag != Decoding(SIZE, resize="pad").tag


def test_dataset_reads_the_store_as_it_reads_the_files(demo_root: Path, tmp_path: Path) -> None:
    rows = read_catalog(demo_root).iloc[:8]
    images = ImageStore(tmp_path / "store", Decoding(SIZE), progress=False).prepare(rows["path"].tolist())
    files, stored = (
        CatalogDataset(rows, image_size=SIZE),
        CatalogDataset(rows, image_size=SIZE, images=images),
    )
    for i in range(len(rows)):
        assert torch.equal(files[i]["image"], stored[i]["image"])
    # A batch is read whole (one copy per image) and equals the samples collated one by one,
    # in this process and from a worker (shared memory).
    keys = [(5, 0), (1, 0), (7, 3)]
    whole = collate(stored.__getitems__(keys))
    one_by_one = default_collate([stored[k] for k in keys])
    assert whole.keys() == one_by_one.keys()
    for key, value in one_by_one.items():
        assert whole[key].dtype == value.dtype and torch.equal(whole[key], value), key
    assert all(torch.equal(default_collate(stored.__getitems__(keys))[k], v) for k, v in whole.items())
    worker = next(iter(DataLoader(stored, batch_size=8, num_workers=1, collate_fn=collate)))
    plain = next(iter(DataLoader(files, batch_size=8, num_workers=0)))
    assert all(torch.equal(worker[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match="images holds 3 rows for 8"):
        CatalogDataset(rows, image_size=SIZE, images=np.zeros((3, SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match=f"{SIZE + 1} px"):
        CatalogDataset(rows, image_size=SIZE + 1, images=images)


def _stage(name: str, store: Path, **extra: object) -> dict:
    return {
        "name": name,
        "backbone": "tiny",
        "init": "random",
        "image_size": 32,
        "batch_size": 8,
        "max_steps": 2,
        "num_workers": 0,
        "evaluate": ["val", "test"],
        "data": {"train": ["chexpert"], "store": str(store)},
        **extra,
    }


def test_two_stages_share_the_store_and_decode_each_image_once(
    demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chextrain.data.dataset as dataset_module
    from chextrain.training.lifecycle import train_stage
    from chextrain.training.stage import parse_stage

    def no_decoding(*args: object) -> None:
        raise AssertionError(f"a dataset decoded a file although the stage has a store: {args[-1]}")

    monkeypatch.setattr(dataset_module, "read_row", no_decoding)  # training and evaluation read the store
    store = tmp_path / "store"
    catalog = read_catalog(demo_root)
    first = train_stage(parse_stage(_stage("a", store)), demo_root, tmp_path / "a", progress=False)
    data = {"train": ["chexpert", "chexphoto"], "store": str(store)}
    train_stage(
        parse_stage(_stage("b", store, init=str(first.out_dir), data=data)),
        demo_root,
        tmp_path / "b",
        progress=False,
    )
    counts = builds(store)
    assert len(counts) >= 4  # each stage built (or checked) the store for each release
    assert sum(b["decoded"] for b in counts) == len(catalog)  # every image of the study, once
    assert sum(b["reused"] for b in counts) > len(catalog)  # the second stage found the first's rows
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["data"].get("store") is None
