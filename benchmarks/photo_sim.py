"""The grey phone recipe for training (data/phone_grey.py) against the RGB one, and where its time goes.

    python benchmarks/photo_sim.py [--size 320] [--n 400] [--rounds 5]

One core (torch and OpenCV limited to one thread), x-ray-like 320 x 320 images (imagepool), the
same seeds for both. Rounds alternate the two call by call; printed: ms per photo of
`phone_grey(image, rng)` and of `to_grey(phone(image, rng))` (what PhotoSim would run without
phone_grey), medians of the rounds and their ratio; then phone_grey's steps timed one by one in
its own order (screen, room and warp, light, blur, noise window, JPEG round trip; the rest is the
draws and the one pass of noise, cast, exposure and rounding), so that the next change knows
where the time is. The figure that counts
for training is benchmarks/feed.py (b): a mixed stage's items with PhotoSim p = 0.5.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from chextrain.data import phone_grey as pg
from chextrain.data.phone import phone
from chextrain.data.transforms import to_grey
from imagepool import synthetic_xray

STEPS = {  # phone_grey's steps, by the module function that does each
    "_screen": "screen",
    "_room": "room and warp",
    "_light": "light",
    "_defocus": "blur",
    "_motion": "blur",
    "_noise_window": "noise window",
    "_jpeg": "JPEG round trip",
}


def steps(images: list[np.ndarray], n: int) -> dict[str, float]:
    """Seconds in each of phone_grey's steps over n photos: its module functions wrapped in timers
    while it runs (what is left is the draws and the one pass of noise, cast, exposure, uint8)."""
    t: dict[str, float] = {}

    def timer(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            t0 = time.perf_counter()
            out = f(*args)
            t[name] = t.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapped

    saved = {attr: getattr(pg, attr) for attr in STEPS}
    try:
        for attr, name in STEPS.items():
            setattr(pg, attr, timer(name, saved[attr]))
        t0 = time.perf_counter()
        for i in range(n):
            pg.phone_grey(images[i % len(images)], np.random.default_rng(i))
        total = time.perf_counter() - t0
    finally:
        for attr, f in saved.items():
            setattr(pg, attr, f)
    t["the rest: draws; noise, cast, exposure, uint8 in one pass"] = total - sum(t.values())
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--n", type=int, default=400, help="photos per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    images = [synthetic_xray(np.random.default_rng(i), args.size, args.size) for i in range(16)]
    fns = {
        "phone_grey": lambda im, s: pg.phone_grey(im, np.random.default_rng(s)),
        "to_grey(phone)": lambda im, s: to_grey(phone(im, np.random.default_rng(s))),
    }
    for fn in fns.values():  # first use: the noise bank, OpenCV's and Pillow's set-up
        fn(images[0], 0)
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds):
        spent = dict.fromkeys(fns, 0.0)
        for i in range(args.n):
            order = list(fns) if (i + r) % 2 == 0 else list(fns)[::-1]
            for name in order:
                t0 = time.perf_counter()
                fns[name](images[i % len(images)], r * args.n + i)
                spent[name] += time.perf_counter() - t0
        for name in fns:
            per_round[name].append(1e3 * spent[name] / args.n)
    grey, rgb = (statistics.median(per_round[n]) for n in fns)
    ratios = [a / b for a, b in zip(per_round["phone_grey"], per_round["to_grey(phone)"], strict=True)]
    print(f"photo simulation at {args.size} px, ms per photo on one core (median of {args.rounds} rounds)")
    print(f"    phone_grey          {grey:7.2f} ms")
    print(f"    to_grey(phone)      {rgb:7.2f} ms")
    print(f"    ratio {statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    t = steps(images, args.n)
    total = sum(t.values())
    print("phone_grey's steps, ms per photo (share)")
    for name, seconds in t.items():
        print(f"    {name:<58}{1e3 * seconds / args.n:7.3f}  ({seconds / total:4.0%})")


if __name__ == "__main__":
    main()
