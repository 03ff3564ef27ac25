"""The effect of rectification: Photos MCC and AUC of a rectified strategy against its plain twin.

A strategy is rectified when its stage's resolved config (config.yaml) has `preprocessing.rectify`
(data/transforms.Rectify); its twin is the stage whose config is the same once the rectify setting,
the name, the label and the keys that change no result (stage.HASH_EXCLUDE) are set aside, e.g.
"Mixed + Rectified Photos" against "Mixed Training". Both are scored on the SAME photos (the Photos
side, tables.side_rows, matched by path): the two tables' rows are stacked into one
bootstrap.Bootstrap, whose patient resamples draw a patient's rows of both strategies together, so
the difference (rectified - plain) is paired resample by resample; its CI is the percentile
interval of those differences. Threshold 0.5, as Tables 1-2.

A study without a rectified stage gets no section and no CSV (its report is unchanged).

tables/rectify_effect.csv: `strategy, reference, split, row, n, patients, pathology, metric, value,
ci_low, ci_high` (row: rectified | plain | rectified - plain).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from chextrain.evaluation import render as R
from chextrain.evaluation import tables
from chextrain.evaluation.bootstrap import Bootstrap, difference, estimates
from chextrain.evaluation.document import SPLITS, cell
from chextrain.evaluation.metrics import AVERAGE, MetricsError
from chextrain.evaluation.predict import arrays
from chextrain.training.stage import HASH_EXCLUDE

METRICS: tuple[str, ...] = ("mcc", "auc")
RECTIFIED, PLAIN, EFFECT = "rectified", "plain", "rectified - plain"
IGNORED: frozenset[str] = frozenset({"name", "label", *HASH_EXCLUDE})
COLUMNS: tuple[str, ...] = (
    "strategy",
    "reference",
    "split",
    "row",
    "n",
    "patients",
    "pathology",
    "metric",
    "value",
    "ci_low",
    "ci_high",
)
Section = tuple[dict[str, pd.DataFrame], list[R.Block]]


def stage_config(folder: Path) -> dict[str, Any] | None:
    """A stage folder's resolved config (config.yaml), None when absent; ReportError when unreadable."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return None
    try:
        found = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise tables.ReportError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(found, dict):
        raise tables.ReportError(f"{path}: expected a mapping of stage keys")
    return found


def rectify_of(config: Mapping[str, Any]) -> Any:
    """The config's `preprocessing.rectify` (None when off or absent)."""
    pre = config.get("preprocessing")
    return pre.get("rectify") if isinstance(pre, Mapping) else None


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without what the twin may differ in (rectify, name, label, HASH_EXCLUDE keys)."""
    out = {k: v for k, v in config.items() if k not in IGNORED}
    if isinstance(out.get("preprocessing"), Mapping):
        out["preprocessing"] = {k: v for k, v in out["preprocessing"].items() if k != "rectify"}
    return out


def twins(stages: Sequence[Any]) -> list[tuple[Any, Any | None]]:
    """(rectified stage, its plain twin or None) for every stage whose config rectifies photos."""
    configs = {s.name: stage_config(s.dir) for s in stages}
    out = []
    for s in stages:
        config = configs[s.name]
        if config is None or rectify_of(config) is None:
            continue
        want = _comparable(config)
        twin = next(
            (
                t
                for t in stages
                if t.name != s.name
                and configs[t.name] is not None
                and rectify_of(configs[t.name]) is None
                and _comparable(configs[t.name]) == want
            ),
            None,
        )
        out.append((s, twin))
    return out


def effect_rows(
    rectified: pd.DataFrame,
    plain: pd.DataFrame,
    strategy: str,
    reference: str,
    split: str,
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> list[dict[str, Any]]:
    """Long rows (COLUMNS) of both strategies' Photos MCC and AUC on their shared photos and the
    paired difference, all on one set of patient resamples ([] when they share no photo)."""
    a = rectified.iloc[tables.side_rows(rectified, tables.PHOTOS, pool_film)]
    b = plain.iloc[tables.side_rows(plain, tables.PHOTOS, pool_film)]
    a = a.loc[~a["path"].duplicated()]
    where = pd.Index(b["path"]).get_indexer(a["path"])  # the same photo in the plain table
    a, b = a.iloc[np.flatnonzero(where >= 0)], b.iloc[where[where >= 0]]
    if not len(a):
        return []
    both = pd.concat([a, b], ignore_index=True)  # rows 0..n-1 rectified, n..2n-1 plain, same order
    boot = Bootstrap(arrays(both), both["patient"].astype(str).to_numpy(), n_boot, seed)
    n = len(a)
    ours = boot.values(np.arange(n), metrics=METRICS)
    theirs = boot.values(np.arange(n, 2 * n), metrics=METRICS)
    fixed = {
        "strategy": strategy,
        "reference": reference,
        "split": split,
        "n": n,
        "patients": int(a["patient"].astype(str).nunique()),
    }
    out: list[dict[str, Any]] = []
    for row, found in (
        (RECTIFIED, estimates(ours)),
        (PLAIN, estimates(theirs)),
        (EFFECT, difference(ours, theirs)),
    ):
        out += tables.long_rows(found, **fixed, row=row)
    return out


def section(
    predictions: Mapping[str, Mapping[str, pd.DataFrame]],
    stages: Sequence[Any],
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> Section:
    """The rectification section: tables/rectify_effect.csv and its blocks; nothing without a
    rectified stage. Test split, else validation."""
    pairs = twins(stages)
    if not pairs:
        return {}, []
    split = "test" if any("test" in p for p in predictions.values()) else "val"
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for ours, twin in pairs:
        if twin is None:
            notes.append(
                f"{ours.strategy}: no stage (with its config.yaml written) trains the same way "
                "without rectification yet."
            )
            continue
        a, b = (predictions.get(s.name, {}).get(split) for s in (ours, twin))
        if a is None or b is None:
            missing = ours if a is None else twin
            notes.append(f"{ours.strategy}: {missing.strategy} has no {split} predictions yet.")
            continue
        try:
            found = effect_rows(
                a, b, ours.strategy, twin.strategy, split, n_boot=n_boot, seed=seed, pool_film=pool_film
            )
        except MetricsError as err:
            raise tables.ReportError(f"{ours.dir}, {twin.dir}: predictions_{split}.parquet: {err}") from err
        if not found:
            notes.append(f"{ours.strategy} and {twin.strategy} share no photos in {split}.")
        rows += found
    df = tables.frame(rows, COLUMNS)
    blocks: list[R.Block] = [R.Heading(f"Effect of rectification ({split})")]
    blocks.append(
        R.Paragraph(
            f"Photos MCC (threshold 0.5) and AUC, {SPLITS[split]}, of each strategy that flattens photos "
            "(preprocessing rectify) and of the same training without it, on the same photos; "
            "'rectified - plain' is the paired difference, its 95% CI from the same patient resamples. "
            "Cells are the average over the five pathologies; tables/rectify_effect.csv has each pathology."
        )
    )
    blocks += [R.Paragraph(n) for n in notes]
    if not df.empty:
        blocks.append(_table(df, split))
    return {"rectify_effect": df}, blocks


def _table(df: pd.DataFrame, split: str) -> R.Table:
    """A row per rectified strategy and row kind: photos, patients, average MCC and AUC."""
    avg = df.loc[df["pathology"] == AVERAGE]
    out = []
    for (strategy, row), part in avg.groupby(["strategy", "row"], sort=False):
        first = part.iloc[0]
        name = strategy if row == RECTIFIED else (first["reference"] if row == PLAIN else "difference")
        cells = [cell(*tables.pick(part, metric=m)) for m in METRICS]
        out.append([name, row, str(first["patients"]), str(first["n"]), *cells])
    return R.Table(
        f"Rectification ({split}): Photos, average over the five pathologies",
        ["Strategy", "Row", "Patients", "Photos", "MCC", "AUC"],
        out,
        numeric_from=2,
    )
