"""A study of four independent tiny stages: inline (one after another) against local slots, in one run.

    python benchmarks/study_parallel.py [--slots 2] [--rounds 1] [--steps 1200]

Each stage trains the tiny backbone for `--steps` steps on a generated demo tree, then is evaluated.
Both are timed as the command a user runs, `chextrain study run STUDY --no-report`, from its start
to its exit: inline (the default executor: the four in that process, one after another) against
`--executor local --slots N` (up to N at once, each slot a process of its own that imports torch
and Lightning while the command reads the study, then runs its stages in turn). The start (imports,
the catalog) is a few seconds in both; real stages run for hours, so the default stage is long
enough (about 20-45 s inline on 2 cores) that it does not decide the figure. Rounds alternate the
two and the medians are compared. Target on 2 cores: slots 2 wall time <= 0.65x inline. Inline
uses every core for its one stage at a time; each of N slots gets cores / N threads. Last, it
measures what the machine itself allows: N single-threaded CPU-bound processes at once against one
alone (on a shared host two vCPUs can give much less than twice the work of one), which bounds
the ratio from below.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from chextrain.data.demo import write_demo

STAGE = {
    "backbone": "tiny",
    "init": "random",
    "image_size": 48,
    "batch_size": 16,
    "num_workers": 0,
    "max_steps": 25,
    "optimizer": {"name": "adam", "lr": 1.0e-3},
    "evaluate": ["test"],
}
STUDY = {
    "name": "parallel",
    "defaults": STAGE,
    "stages": [{"name": f"s{i}", "seed": i, "data": {"train": ["chexpert", "chexphoto"]}} for i in range(4)],
}


def _spin(n: int = 20_000_000) -> float:
    """Seconds of a single-threaded CPU-bound loop (what a slot's process does, without torch)."""
    t0, x = time.perf_counter(), 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def parallel_ceiling(slots: int, rounds: int = 3) -> float:
    """How much more work `slots` processes do at once than one alone, on this machine (median).

    Two vCPUs are not always two cores' worth: on a shared host, two busy processes each run
    slower than one alone. 1 / this is the best slots / inline ratio any scheduler could reach here.
    """
    import multiprocessing

    gains = []
    with multiprocessing.get_context("spawn").Pool(slots) as pool:
        for _ in range(rounds):
            alone = pool.apply(_spin)
            t0 = time.perf_counter()
            pool.map(_spin, [20_000_000] * slots)
            gains.append(slots * alone / (time.perf_counter() - t0))
    return statistics.median(gains)


def timed_command(study_file: Path, data: Path, out: Path, options: list[str]) -> tuple[float, dict]:
    """Seconds from the start of `chextrain study run` to its exit, and its study.json."""
    command = [sys.executable, "-m", "chextrain.cli", "study", "run", str(study_file)]
    command += ["--data", str(data), "--out", str(out), "--no-report", "--no-progress", *options]
    t0 = time.time()
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.time() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    state = json.loads((out / "study.json").read_text())
    assert all(s["state"] == "done" for s in state["stages"]), state["stages"]
    state["t0"] = t0
    return seconds, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1200, help="training steps per stage")
    args = parser.parse_args()
    study = {**STUDY, "defaults": {**STAGE, "max_steps": args.steps}}
    modes = {"inline": [], "slots": ["--executor", "local", "--slots", str(args.slots)]}
    with tempfile.TemporaryDirectory() as tmp:
        data, study_file = Path(tmp) / "data", Path(tmp) / "study.yaml"
        write_demo(data, digital=80, photos=80, valid=12, size=48, seed=0)
        study_file.write_text(yaml.safe_dump(study, sort_keys=False))
        times: dict[str, list[float]] = {"inline": [], "slots": []}
        inside: dict[str, list[float]] = {"inline": [], "slots": []}  # seconds inside the stages
        starts: dict[str, list[float]] = {"inline": [], "slots": []}  # command start -> first stage
        for r in range(args.rounds):
            for mode in ("inline", "slots") if r % 2 == 0 else ("slots", "inline"):
                wall, state = timed_command(study_file, data, Path(tmp) / f"{mode}-{r}", modes[mode])
                times[mode].append(wall)
                inside[mode].append(sum(s["seconds"] for s in state["stages"]))
                starts[mode].append(min(s["started"] for s in state["stages"]) - state["t0"])
                print(
                    f"round {r} {mode:6s}: {wall:6.1f} s wall, first stage after {starts[mode][-1]:4.1f} s, "
                    f"stages {inside[mode][-1]:6.1f} s inside their lifecycles (summed)"
                )
    inline, slots = statistics.median(times["inline"]), statistics.median(times["slots"])
    ratio = slots / inline
    print(
        f"four independent tiny stages of {args.steps} steps on {os.cpu_count()} cores: "
        f"inline {inline:.1f} s, "
        f"--slots {args.slots} {slots:.1f} s, ratio {ratio:.2f} (target <= 0.65: "
        f"{'met' if ratio <= 0.65 else 'NOT met'})"
    )
    # What the slots cost besides their stages: the wait for their processes' imports beyond what
    # inline waits for its own, the scheduler's poll and any imbalance between the slots.
    waves = -(-len(STUDY["stages"]) // args.slots)
    n = len(STUDY["stages"])
    per_stage, per_inline = statistics.median(inside["slots"]) / n, statistics.median(inside["inline"]) / n
    fixed = slots - waves * per_stage - (inline - n * per_inline)
    print(
        f"  per stage: {per_inline:.1f} s inline (all cores), {per_stage:.1f} s in a slot "
        f"(cores / {args.slots}); the first stage starts after {statistics.median(starts['inline']):.1f} s "
        f"inline, {statistics.median(starts['slots']):.1f} s with slots; the slots' cost beyond "
        f"inline's outside the stages: {fixed:.1f} s"
    )
    print(
        f"  were both free of any cost outside the stages, the slots would take "
        f"{waves * per_stage / (n * per_inline):.2f}x inline: "
        f"a stage on cores / {args.slots} threads is {per_stage / per_inline:.2f}x slower than on all cores"
    )
    gain = parallel_ceiling(args.slots)
    print(
        f"  this machine runs {args.slots} single-threaded processes at once at {gain:.2f}x the work of one "
        f"(a pure-Python loop): no scheduler can go below a ratio of about {1 / gain:.2f} here; "
        f"the slots reach {ratio * gain:.2f}x that floor"
    )


if __name__ == "__main__":
    main()
