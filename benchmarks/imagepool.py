"""Generated images and catalog rows for the feed, scale and GPU benchmarks (not a benchmark itself).

`write_jpegs` writes N x-ray-like JPEGs of a given size (grey, or RGB like a phone photo);
`catalog_rows` makes the catalog rows a CatalogDataset reads for a list of files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from chextrain.labels import SLUGS

SMALL, FULL, PHONE = (390, 320), (2828, 2320), (3000, 4000)  # (H, W): CheXpert-small, full size, 12 MP


def synthetic_xray(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 H x W: a bright body with two dark lungs, rib shading and film noise (float32 maths)."""
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    x = (np.arange(w, dtype=np.float32) / w)[None, :]
    body = np.exp(-(((x - 0.5) / 0.42) ** 2)) * np.exp(-(((y - 0.55) / 0.6) ** 2))
    lungs = sum(
        np.exp(-(((x - cx) / 0.14) ** 2)) * np.exp(-(((y - 0.45) / 0.25) ** 2)) for cx in (0.33, 0.67)
    )
    ribs = 0.08 * np.sin(y * 60 + rng.uniform(0, 6)) * lungs
    image = 40 + 170 * body - 90 * lungs + 255 * ribs
    image += rng.normal(0, 6, (h, w)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_jpegs(
    folder: Path, n: int, shape: tuple[int, int], *, rgb: bool = False, quality: int = 95, seed: int = 0
) -> list[Path]:
    """N JPEGs of `shape` (H, W) in `folder`; `rgb` makes tinted colour photos (phone-like)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        grey = synthetic_xray(rng, *shape)
        image: np.ndarray = grey
        if rgb:
            tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
            image = np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)
        path = folder / f"image{i:05d}.jpg"
        Image.fromarray(image).save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def catalog_rows(paths: list[str] | list[Path], domain: str = "digital") -> pd.DataFrame:
    """Catalog rows (path, dataset, domain, kind, row, labels) for image files, all of one domain."""
    n = len(paths)
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "dataset": "chexpert" if domain == "digital" else "chexphoto",
            "domain": domain,
            "kind": "digital" if domain == "digital" else "natural",
            "row": np.arange(2, n + 2),
        }
    )
    for slug in SLUGS:
        rows[slug] = rng.choice(np.array([1.0, 0.0, -1.0, np.nan]), size=n)
    return rows
