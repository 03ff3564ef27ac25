"""The main job's targets: `make demo` on a fresh clone in <= 15 minutes, and demo models that learn.

Usage: python benchmarks/demo.py [--repo PATH] [--keep]

Clones the repository (committed state) into a temporary folder, runs `make demo` there (which
creates a new virtual environment, installs, generates the demo data, runs the study and writes
the report), and prints the wall time against the 15-minute target and the baseline's average
AUC on the demo digital test set against the 0.75 target.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

TARGET_MINUTES = 15.0
TARGET_AUC = 0.75


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--keep", action="store_true", help="keep the clone (and its report)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="chextrain-demo-"))
    clone = tmp / "chextrain"
    subprocess.run(["git", "clone", "--quiet", str(args.repo), str(clone)], check=True)
    t0 = time.perf_counter()
    subprocess.run(["make", "demo"], cwd=clone, check=True)
    minutes = (time.perf_counter() - t0) / 60
    metrics = json.loads((clone / "demo/chextraining/stages/baseline/metrics_test.json").read_text())
    auc = metrics["groups"]["Standard"]["at_0.5"]["average"]["auc"]
    print(f"make demo on a fresh clone: {minutes:.1f} min (target <= {TARGET_MINUTES:.0f} min)")
    print(f"baseline average AUC, demo digital test set: {auc:.3f} (target >= {TARGET_AUC})")
    print(f"report: {clone / 'demo/chextraining/report.html'}" if args.keep else f"(removing {tmp})")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(tmp)], check=True)


if __name__ == "__main__":
    main()
