"""Dataset items, head routing indices, and the resumable sampler/loader pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset, DatasetError, head_indices
from chextrain.data.images import load_image
from chextrain.data.loader import EpochSampler, ResumableLoader, make_loader
from chextrain.data.packed import PackedStrings
from chextrain.data.transforms import Decoding, StandardAugment, preprocess, to_network_input
from chextrain.labels import apply_policy


@pytest.fixture(scope="module")
def catalog(demo_root: Path) -> pd.DataFrame:
    return read_catalog(demo_root)


def test_head_indices() -> None:
    domains = ["digital", "photo", "digital"]
    mapping = {"digital": "a", "photo": "b"}
    assert head_indices(domains, ["a", "b"], mapping).tolist() == [0, 1, 0]
    assert head_indices(domains, ["a", "b"], mapping, head="b").tolist() == [1, 1, 1]
    assert head_indices(domains, ["only"]).tolist() == [0, 0, 0]
    with pytest.raises(DatasetError, match="unknown head 'c'"):
        head_indices(domains, ["a", "b"], head="c")
    with pytest.raises(DatasetError, match="no head for domain"):
        head_indices(domains, ["a", "b"], {"digital": "a"})
    with pytest.raises(DatasetError, match="not one of the heads"):
        head_indices(domains, ["a", "b"], {"digital": "a", "photo": "z"})
    with pytest.raises(DatasetError, match="give domain_heads or a head"):
        head_indices(domains, ["a", "b"])


def test_item_contents(catalog: pd.DataFrame) -> None:
    rows = catalog.iloc[[0, 1, len(catalog) - 1]]
    ds = CatalogDataset(
        rows,
        image_size=24,
        policy="ignore",
        head_names=["x", "p"],
        domain_heads={"digital": "x", "photo": "p"},
    )
    targets, mask = apply_policy(rows, "ignore")
    for i in range(len(rows)):
        item = ds[i]
        assert item["image"].shape == (1, 24, 24) and item["image"].dtype == torch.uint8
        assert torch.equal(item["target"], torch.from_numpy(targets[i]))
        assert torch.equal(item["mask"], torch.from_numpy(mask[i]))
        domain = rows.iloc[i]["domain"]
        assert int(item["domain"]) == (domain == "photo") and int(item["head"]) == (domain == "photo")
        assert item["index"] == i
    # Without augmentation the image is the file decoded at the size needed; on the device it
    # becomes what preprocessing the decoded file gives.
    assert np.array_equal(ds[0]["image"][0].numpy(), Decoding(24).load(rows.iloc[0]["path"]))
    x = to_network_input(ds[0]["image"][None])[0]
    assert torch.equal(x, preprocess(load_image(rows.iloc[0]["path"], draft=24), 24))


def test_augmentation_depends_on_seed_epoch_index_only(catalog: pd.DataFrame) -> None:
    rows = catalog.iloc[:4]
    ds = CatalogDataset(rows, image_size=24, augment=[StandardAugment()], seed=3)
    again = CatalogDataset(rows, image_size=24, augment=[StandardAugment()], seed=3)
    assert torch.equal(ds[(2, 1)]["image"], again[(2, 1)]["image"])
    assert not torch.equal(ds[(2, 1)]["image"], ds[(2, 0)]["image"])
    other_seed = CatalogDataset(rows, image_size=24, augment=[StandardAugment()], seed=4)
    assert not torch.equal(ds[(2, 1)]["image"], other_seed[(2, 1)]["image"])


def test_unreadable_image_names_the_file(catalog: pd.DataFrame, tmp_path: Path) -> None:
    bad = tmp_path / "view1_frontal.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    rows = catalog.iloc[:2].copy()
    rows.loc[rows.index[1], "path"] = str(bad)
    ds = CatalogDataset(rows, image_size=16)
    ds[0]  # the good one loads
    with pytest.raises(DatasetError, match=f"catalog row 1 \\(CSV line {rows.iloc[1]['row']}\\).*{bad}"):
        ds[1]
    rows.loc[rows.index[1], "path"] = str(tmp_path / "missing.jpg")
    with pytest.raises(DatasetError, match="missing.jpg"):
        CatalogDataset(rows, image_size=16)[1]


def test_bad_rows_are_refused(catalog: pd.DataFrame) -> None:
    rows = catalog.iloc[:2].copy()
    rows["domain"] = ["digital", "screen"]
    with pytest.raises(DatasetError, match="unknown domain"):
        CatalogDataset(rows, image_size=16)
    with pytest.raises(DatasetError, match="images holds 3 rows for 2 catalog rows"):
        CatalogDataset(catalog.iloc[:2], image_size=16, images=np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(DatasetError, match=r"\(20, 20\) px; the dataset needs 16 x 16"):
        CatalogDataset(catalog.iloc[:2], image_size=16, images=np.zeros((2, 20, 20), np.uint8))


def test_given_images_replace_decoding_and_augment_at_their_size(catalog: pd.DataFrame) -> None:
    images = np.full((2, 20, 20), 77, np.uint8)
    ds = CatalogDataset(catalog.iloc[:2], image_size=20, images=images)
    assert torch.equal(ds[1]["image"], torch.full((1, 20, 20), 77, dtype=torch.uint8))
    aug = CatalogDataset(catalog.iloc[:2], image_size=20, images=images, augment=[StandardAugment()])
    assert aug[(1, 0)]["image"].shape == (1, 20, 20) and images[1].min() == 77  # the source is untouched


def test_dataset_holds_no_python_lists_of_rows(catalog: pd.DataFrame) -> None:
    # A forked loader worker copies every Python object it touches (reference counts): per-row
    # state lives in numpy arrays, tensors and one packed buffer of paths.
    ds = CatalogDataset(catalog, image_size=8)
    for name, value in vars(ds).items():
        assert not (isinstance(value, list | tuple) and len(value) == len(catalog)), name
    assert isinstance(ds.paths, PackedStrings) and ds.paths.tolist() == catalog["path"].tolist()
    assert ds.path(3) == catalog["path"].iloc[3] and ds.csv_rows.dtype == np.int64


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = EpochSampler(10, seed=1), EpochSampler(10, seed=1)
    first = list(a)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    assert first == list(b)
    a.set_epoch(1)
    second = list(a)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}
    assert [i for i, _ in EpochSampler(10, shuffle=False)] == list(range(10))


def test_sampler_shards_are_disjoint_and_padded() -> None:
    shards = [[i for i, _ in EpochSampler(11, seed=0, rank=r, world_size=3)] for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert [len(EpochSampler(11, rank=r, world_size=3)) for r in range(3)] == [4, 4, 4]
    flat = sum(shards, [])
    assert sorted(set(flat)) == list(range(11)) and len(flat) - len(set(flat)) == 1  # one repeat pads
    with pytest.raises(ValueError, match="rank 2"):
        EpochSampler(4, rank=2, world_size=2)


def test_sampler_resume_skips_once_and_only_that_epoch() -> None:
    s = EpochSampler(8, seed=2)
    s.set_epoch(3)
    full = list(s)
    s.resume(3, 5)
    assert list(s) == full[5:]
    assert list(s) == full  # the skip applied once
    s.resume(3, 5)
    s.set_epoch(4)  # Lightning moved on to the next epoch: no skip there
    assert len(list(s)) == 8


def _indices(loader: ResumableLoader) -> list[list[int]]:
    return [batch["index"].tolist() for batch in loader]


def test_loader_state_resumes_mid_epoch(catalog: pd.DataFrame) -> None:
    ds = CatalogDataset(catalog.iloc[:10], image_size=8)
    loader = make_loader(ds, batch_size=3, shuffle=True, seed=0)
    loader.epoch_sampler.set_epoch(2)
    full = _indices(loader)
    assert len(full) == 4 == len(loader)
    seen = []
    for batch in loader:  # "killed" after two batches, as a checkpoint would record
        seen.append(batch["index"].tolist())
        if len(seen) == 2:
            break
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    fresh = make_loader(CatalogDataset(catalog.iloc[:10], image_size=8), batch_size=3, shuffle=True, seed=0)
    fresh.load_state_dict(state)
    assert seen + _indices(fresh) == full
    assert fresh.state_dict() == {"epoch": 2, "batches": 4}


def test_loader_iterator_is_created_lazily_after_set_epoch(catalog: pd.DataFrame) -> None:
    # Lightning calls iter() before set_epoch() when it resumes: the order must still be the new epoch's.
    ds = CatalogDataset(catalog.iloc[:6], image_size=8)
    loader = make_loader(ds, batch_size=6, shuffle=True, seed=0)
    expected = EpochSampler(6, seed=0).order(5).tolist()
    it = iter(loader)
    loader.epoch_sampler.set_epoch(5)
    assert next(it)["index"].tolist() == expected


def test_loader_workers_with_photo_simulation_start_after_opencvs_pool(
    demo_root: Path, tmp_path: Path
) -> None:
    """A process that has run OpenCV on several threads forks loader workers that run the phone
    recipe (OpenCV): they must not hang (a forked worker that changes OpenCV's thread count does)."""
    import subprocess
    import sys

    code = f"""
import cv2, numpy as np
from chextrain.data.catalog import read_catalog
from chextrain.data.dataset import CatalogDataset
from chextrain.data.loader import make_loader
from chextrain.data.transforms import PhotoSim
cv2.setNumThreads(2)
x = np.random.rand(1500, 1500).astype(np.float32)
cv2.warpPerspective(x, np.eye(3), (1500, 1500))  # this process's OpenCV pool is running
rows = read_catalog({str(demo_root)!r}).head(8)
ds = CatalogDataset(rows, image_size=48, augment=[PhotoSim(p=1.0, recipe="phone")])
loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2)
print(sum(len(b["image"]) for b in loader), cv2.getNumThreads())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["8", "1"]  # every image, and OpenCV on one thread for the workers
