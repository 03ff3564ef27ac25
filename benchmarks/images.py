"""Image benchmark: decoding + preprocessing throughput, and the photo recipes' cost.

Usage: python benchmarks/images.py [--n 200] [--size 320] [--data DIR] [--full 2048]

(a) images/s on ONE core (torch limited to one thread) for `load_image` alone and for
    `load_image` + the paper's preprocessing (`chextrain.data.transforms.preprocess`) on JPEG
    files: the first N *.jpg under --data, else N generated 390 x 320 grey JPEGs (noise +
    smooth anatomy-like structure, like CheXpert-small).
(b) ms/image of each `simulate_photo` recipe at levels 1 and 4, at --size px and at --full px
    (a full-size x-ray). Targets at 320 px: digital < 2 ms, photographic < 15 ms, phone < 25 ms.
(c) `load_resized` at --size px reading the file whole and decoding it from memory in one piece
    (files up to decoding.IN_MEMORY bytes) against streaming it in Pillow's 64 kB steps (what
    larger files get), both through Image.open, for a small, a full-size and a 12 MP phone JPEG:
    the ratio of their rates, median of 25 rounds in which the two take turns (same pixels:
    tests/test_images.py).
(d) The same files read whole, through the direct route plain JPEGs take (data/jpeg.py: Pillow's
    libjpeg decoder without Image.open) against Image.open + load (same pixels:
    tests/test_images_jpeg.py).
Each figure is the best of three rounds of CPU time of this (single-threaded) process, which is
what one free core would take; `--clock wall` uses wall time instead (on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from chextrain.data.images import load_image
from chextrain.data.photo import RECIPES, simulate_photo

ROUNDS = 3
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def synthetic_xray(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 H x W: a bright body with two dark lungs, smooth shading and film noise."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    body = np.exp(-(((x - 0.5) / 0.42) ** 2) - ((y - 0.55) / 0.6) ** 2)
    lungs = sum(np.exp(-(((x - cx) / 0.14) ** 2) - ((y - 0.45) / 0.25) ** 2) for cx in (0.33, 0.67))
    ribs = 0.08 * np.sin(y * 60 + rng.uniform(0, 6)) * lungs
    image = 40 + 170 * body - 90 * lungs + 255 * ribs + rng.normal(0, 6, (h, w))
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_files(data: Path | None, n: int, folder: Path) -> list[Path]:
    """N JPEGs from --data, or N generated 390 x 320 ones written to `folder`."""
    if data is not None:
        files = sorted(data.rglob("*.jpg"))[:n]
        if not files:
            raise SystemExit(f"no *.jpg files under {data}")
        return files
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = folder / f"view{i}_frontal.jpg"
        Image.fromarray(synthetic_xray(rng, 390, 320)).save(path, "JPEG", quality=95)
        files.append(path)
    return files


def best_rate(fn: Callable[[Path], object], files: list[Path], clock: Callable[[], float]) -> float:
    """Images per second, best of ROUNDS passes over `files`."""
    fn(files[0])  # warm up (imports, caches)
    best = float("inf")
    for _ in range(ROUNDS):
        t = clock()
        for path in files:
            fn(path)
        best = min(best, clock() - t)
    return len(files) / best


def best_ms(recipe: str, level: int, image: np.ndarray, reps: int, clock: Callable[[], float]) -> float:
    """ms per simulated photo, best of ROUNDS means over `reps` seeds."""
    simulate_photo(image, recipe, level, np.random.default_rng(0))
    best = float("inf")
    for r in range(ROUNDS):
        t = clock()
        for s in range(reps):
            simulate_photo(image, recipe, level, np.random.default_rng([r, s]))
        best = min(best, (clock() - t) / reps)
    return 1000 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="JPEG files to decode (default 200)")
    parser.add_argument("--size", type=int, default=320, help="training image size (default 320)")
    parser.add_argument("--full", type=int, default=2048, help="full-size side for recipes (default 2048)")
    parser.add_argument("--data", type=Path, default=None, help="folder of *.jpg (e.g. a demo tree)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu (default) or wall time")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]

    import torch

    torch.set_num_threads(1)  # per-core figures
    source = f"from {args.data}" if args.data else "(390x320 generated)"
    print(f"(a) decoding on one core ({args.clock} time), {args.n} JPEGs {source}")
    with tempfile.TemporaryDirectory() as tmp:
        files = jpeg_files(args.data, args.n, Path(tmp))
        rows = [("load_image", best_rate(load_image, files, clock))]
        try:
            from chextrain.data.transforms import preprocess
        except ImportError as e:
            print(f"    chextrain.data.transforms.preprocess not importable ({e}): timing load only")
        else:
            rate = best_rate(lambda p: preprocess(load_image(p), args.size), files, clock)
            rows.append((f"load_image + preprocess({args.size})", rate))
    for name, rate in rows:
        print(f"    {name:<32} {rate:8.0f} images/s  ({1000 / rate:.2f} ms/image)")

    print(f"\n(b) simulate_photo, ms/image on one core ({args.clock} time, best of {ROUNDS})")
    rng = np.random.default_rng(1)
    sizes = [(args.size, 30), (args.full, 3)]
    images = {side: synthetic_xray(rng, side, side) for side, _ in sizes}
    print("    recipe        " + "".join(f"{f'L{lv} @ {side}px':>14}" for side, _ in sizes for lv in (1, 4)))
    for recipe in RECIPES:
        cells = [best_ms(recipe, lv, images[side], reps, clock) for side, reps in sizes for lv in (1, 4)]
        print(f"    {recipe:<14}" + "".join(f"{ms:>14.1f}" for ms in cells))
    reader_duels(args.size)


def reader_duels(size: int, rounds: int = 25) -> None:
    """(c) and (d): load_resized under two settings taking turns round by round, and their ratio."""
    from chextrain.data import decoding, images
    from imagepool import FULL, PHONE, SMALL, write_jpegs

    limit, direct = decoding.IN_MEMORY, images.decode_plain

    def setting(in_memory: int, route: bool) -> Callable[[], None]:
        def apply() -> None:
            decoding.IN_MEMORY = in_memory
            images.decode_plain = direct if route else (lambda *args: None)

        return apply

    kinds = {"small JPEG 390x320": (SMALL, 48, {}), "full JPEG 2320x2828": (FULL, 6, {})}
    kinds["phone JPEG 4000x3000"] = (PHONE, 4, {"rgb": True, "quality": 90})
    duels = {
        "(c) file read whole vs streamed (the direct route off on both sides)": {
            "streamed": setting(0, False),
            "whole": setting(limit, False),
        },
        "(d) read whole: the direct route (data/jpeg.py) vs Image.open + load": {
            "Image.open": setting(limit, False),
            "direct": setting(limit, True),
        },
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pools = {
                name: (write_jpegs(Path(tmp) / name.split()[0], n, shape, **kw))
                for name, (shape, n, kw) in kinds.items()
            }
            for title, sides in duels.items():
                print(f"\n{title}, load_resized at {size} px (CPU time, median of {rounds})")
                a, b = sides
                print(f"    {'source':<24}{a:>12}{b:>12}{'ratio':>8}")
                for name, files in pools.items():
                    rates = duel_rounds(sides, files, size, rounds)
                    ratio = statistics.median(y / x for x, y in zip(rates[a], rates[b], strict=True))
                    print(
                        f"    {name:<24}{statistics.median(rates[a]):>12.0f}"
                        f"{statistics.median(rates[b]):>12.0f}{ratio:>8.3f}"
                    )
    finally:
        setting(limit, True)()


def duel_rounds(
    sides: dict[str, Callable[[], None]], files: list[Path], size: int, rounds: int
) -> dict[str, list[float]]:
    """img/s of load_resized over `files` under each setting, per round; the order alternates."""
    from chextrain.data.images import load_resized

    rates: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds + 1):  # round 0 warms up
        for name in list(sides) if r % 2 else list(sides)[::-1]:
            sides[name]()
            t = time.process_time()
            for f in files:
                load_resized(f, size)
            if r:
                rates[name].append(len(files) / (time.process_time() - t))
    return rates


if __name__ == "__main__":
    main()
