"""The report sections added after Tables 1-2, kinds, ROC and Figure 5: calibration, subgroups and
the effect of rectification.

`add_sections` computes them (evaluation/calibration_report.py, evaluation/subgroups.py,
evaluation/effects.py: only for a study with a rectified stage), writes their CSV tables next to
the others, and places their blocks before the appendix, so report.py needs one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from chextrain.evaluation import calibration_report, effects, subgroups
from chextrain.evaluation import render as R
from chextrain.fileio import atomic_write_text

BEFORE: tuple[str, ...] = ("Appendix", "Files")  # the sections go before the first heading starting so


def add_sections(
    blocks: Sequence[R.Block],
    predictions: Mapping[str, Mapping[str, pd.DataFrame]],
    stages: Sequence[Any],
    main: pd.DataFrame,
    tables_dir: Path,
    figures_dir: Path,
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> list[R.Block]:
    """`blocks` with the calibration, subgroup (and rectification) sections inserted; writes
    calibration.csv, subgroups.csv (and rectify_effect.csv).

    main: the long rows the summary ranks (Table 2, or Table 1 without test predictions).
    """
    parts = [
        calibration_report.section(
            predictions, stages, figures_dir, n_boot=n_boot, seed=seed, pool_film=pool_film
        ),
        subgroups.section(predictions, stages, main, n_boot=n_boot, seed=seed, pool_film=pool_film),
        effects.section(predictions, stages, n_boot=n_boot, seed=seed, pool_film=pool_film),
    ]
    added: list[R.Block] = []
    for csv, part in parts:
        for name, df in csv.items():
            atomic_write_text(Path(tables_dir) / f"{name}.csv", df.to_csv(index=False))
        added += part
    out = list(blocks)
    for prefix in BEFORE:
        at = next(
            (i for i, b in enumerate(out) if isinstance(b, R.Heading) and b.text.startswith(prefix)), None
        )
        if at is not None:
            return out[:at] + added + out[at:]
    return out + added
