"""Rectification: the learned corner model against OpenCV's classical finder, side by side.

    python benchmarks/rectify.py [--epochs 20] [--photos 100] [--bundle DIR] [--keep DIR]

Writes a demo tree (CheXpert x-rays, CheXphoto photos with v1.1 corner labels), trains a
`corners` stage on its train split (the tiny backbone at 96 px: simulated grey phone photos,
fresh each epoch, plus the labelled natural photos; its finish picks the confidence threshold on
64 simulated photos of the val x-rays) unless --bundle gives a trained one, then measures both
finders on

- held-out simulated photos: the test split's x-rays (never trained on) photographed by the
  RGB phone recipe the demo uses (training uses the grey one), half of them padded onto a 3:4
  screen, levels 1-3, fixed seeds;
- the test split's labelled natural photos (the demo's CheXphoto v1.1 polygons);
- photos of blank screens (no radiograph): does the confidence say so?

Prints per finder: mean corner error (fraction of the image diagonal), its median, mean
quadrilateral IoU and ms per photo, then the ratio learned / classical of the mean error, and
find_quad's (learned -> classical -> none = the whole frame) error, IoU and choices. About 5
minutes on 2 busy cores (most of it training; --bundle skips that).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from chextrain.data.catalog import read_catalog
from chextrain.data.corners import catalog_corners
from chextrain.data.demo import write_demo
from chextrain.data.images import load_image
from chextrain.rectify import CornerModel, classical_quad, corner_error, find_quad, quad_iou
from chextrain.training.lifecycle import train_stage
from chextrain.training.objectives.corners import held_out_photos
from chextrain.training.stage import CornersSpec, parse_stage


def measure(photos: list[tuple[np.ndarray, np.ndarray]], find) -> dict[str, float]:
    """Mean and median corner error, mean IoU and ms per photo of `find(photo) -> corners`."""
    errors, ious = [], []
    t0 = time.perf_counter()
    found = [find(photo) for photo, _ in photos]
    ms = 1000 * (time.perf_counter() - t0) / max(1, len(photos))
    for (photo, true), corners in zip(photos, found, strict=True):
        h, w = photo.shape[:2]
        errors.append(corner_error(corners, true, w, h))
        ious.append(quad_iou(corners, true))
    return {
        "error": float(np.mean(errors)),
        "median": float(np.median(errors)),
        "iou": float(np.mean(ious)),
        "ms": ms,
    }


def report(title: str, photos: list[tuple[np.ndarray, np.ndarray]], model: CornerModel) -> None:
    """Print both finders on `photos`, the ratio, and what find_quad chose."""
    learned = measure(photos, lambda p: model.predict(p)[0])
    classical = measure(photos, lambda p: classical_quad(p).corners)
    print(f"\n{title}: {len(photos)} photos")
    print(f"  {'finder':<10} {'corner error':>12} {'median':>8} {'IoU':>7} {'ms/photo':>9}")
    for name, m in (("learned", learned), ("classical", classical)):
        print(f"  {name:<10} {m['error']:>12.4f} {m['median']:>8.4f} {m['iou']:>7.3f} {m['ms']:>9.1f}")
    ratio = learned["error"] / classical["error"]
    verdict = "learned better" if ratio < 1 and learned["iou"] > classical["iou"] else "learned NOT better"
    print(f"  ratio learned / classical corner error: {ratio:.2f} ({verdict})")
    chosen: list[str] = []

    def pipeline(photo: np.ndarray) -> np.ndarray:
        found = find_quad(photo, model)
        chosen.append(found.method)
        return found.corners

    both = measure(photos, pipeline)
    print(
        f"  find_quad (learned -> classical -> none = whole frame): error {both['error']:.4f}, "
        f"IoU {both['iou']:.3f}; chose "
        + ", ".join(f"{m} {chosen.count(m)}" for m in ("learned", "classical", "none"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--photos", type=int, default=100, help="held-out simulated photos")
    parser.add_argument("--digital", type=int, default=300, help="demo x-rays to train on")
    parser.add_argument("--bundle", type=Path, help="a trained corners bundle (skips training)")
    parser.add_argument("--keep", type=Path, help="write the demo tree and the stage here (kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        root = work / "data"
        if not (root / "CheXpert-v1.0-small" / "train.csv").exists():
            write_demo(
                root, digital=args.digital, photos=60, valid=30, size=160, seed=args.seed, progress=False
            )
        bundle = args.bundle
        if bundle is None:
            stage = parse_stage(
                {
                    "name": "corners",
                    "objective": "corners",
                    "epochs": args.epochs,
                    "image_size": args.image_size,
                    "num_workers": 1,
                    "seed": args.seed,
                    "data": {"train": ["chexpert", "chexphoto"]},
                }
            )
            t0 = time.perf_counter()
            result = train_stage(stage, root, work / "corners", progress=False)
            bundle = result.out_dir
            print(f"trained the corners stage: {args.epochs} epochs in {time.perf_counter() - t0:.0f} s")
        model = CornerModel.load(bundle)
        catalog = read_catalog(root)
        test = catalog.loc[(catalog["split"] == "test") & (catalog["domain"] == "digital"), "path"]
        spec = CornersSpec(canvas=0.5, plain=0.0, levels=[1, 2, 3])
        report(
            "held-out simulated photos (test x-rays, RGB phone recipe)",
            held_out_photos(test.astype(str).tolist(), spec, args.photos, seed=12345),
            model,
        )
        blank = held_out_photos(test.astype(str).tolist(), spec, args.photos // 4, seed=12345, blank=True)
        said = [find_quad(p, model) for p, _ in blank]
        print(
            f"\n{len(blank)} photos of blank screens (no radiograph): learned confidence mean "
            f"{np.mean([model.predict(p)[1] for p, _ in blank]):.2f} (threshold {model.min_confidence:.2f}); "
            "find_quad chose "
            + ", ".join(f"{m} {sum(q.method == m for q in said)}" for m in ("learned", "classical", "none"))
        )
        labelled = catalog_corners(catalog.loc[catalog["split"] == "test"])
        if labelled:
            real = [(load_image(p), known.corners) for p, known in labelled.items()]
            report("labelled natural photos of the test split (v1.1 polygons)", real, model)


if __name__ == "__main__":
    main()
