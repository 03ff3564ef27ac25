"""Subgroups: MCC and AUC by sex, age band, AP/PA and frontal/lateral view, with patient-bootstrap CIs.

A subgroup is drawn from the predictions table's columns (predict.DESCRIBE_COLUMNS carries them
from the catalog): `sex` (as in the CSV: Male, Female, Unknown), `age` in AGE_BANDS (<40, 40-59,
60-79, 80+; a blank age is in no band), `ap_pa` (AP, PA, and LL/RL where the CSV says so) and
`view` (frontal, lateral). Each side (Standard, Photos, Film: tables.side_rows) is split on its
own. A subgroup with fewer than MIN_PATIENTS patients is marked "too small" and given no numbers:
its interval would say little and its point estimate would invite over-reading.

The CIs use the one bootstrap engine: bootstrap.Bootstrap over the whole table (the same patient
resamples, for the same seed, as the report's other tables), each subgroup scored on its rows.
Only the best strategy (highest mean of its Standard and Photos average MCC, test split) and the
baseline (the stage named `baseline`, or labelled Baseline) are broken down, as the issue asks.

tables/subgroups.csv: `strategy, comparison, attribute, subgroup, n, patients, pathology, metric,
value, ci_low, ci_high, note` (note: "too small" where there are no numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from chextrain.evaluation import render as R
from chextrain.evaluation import tables
from chextrain.evaluation.bootstrap import PATHOLOGY_KEYS, Bootstrap, estimates
from chextrain.evaluation.document import SPLITS, cell
from chextrain.evaluation.metrics import AVERAGE, MetricsError
from chextrain.evaluation.predict import arrays

MIN_PATIENTS = 30
TOO_SMALL = "too small"
METRICS: tuple[str, ...] = ("mcc", "auc")
AGE_BANDS: tuple[tuple[float, float, str], ...] = (
    (0.0, 40.0, "<40"),
    (40.0, 60.0, "40-59"),
    (60.0, 80.0, "60-79"),
    (80.0, math.inf, "80+"),
)
ATTRIBUTES: dict[str, str] = {"sex": "Sex", "age": "Age band", "ap_pa": "AP/PA", "view": "View"}
ORDER: dict[str, tuple[str, ...]] = {
    "sex": ("Female", "Male", "Unknown"),
    "age": tuple(b[2] for b in AGE_BANDS),
    "ap_pa": ("AP", "PA", "LL", "RL"),
    "view": ("frontal", "lateral"),
}
COLUMNS: tuple[str, ...] = (
    "strategy",
    "comparison",
    "attribute",
    "subgroup",
    "n",
    "patients",
    *tables.COLUMNS[2:],
    "note",
)
Section = tuple[dict[str, pd.DataFrame], list[R.Block]]  # CSV tables by file stem, the section's blocks


def age_band(age: Any) -> str:
    """The AGE_BANDS label of an age in years ("" when blank or not a number >= 0)."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return ""
    for low, high, label in AGE_BANDS:
        if low <= value < high:
            return label
    return ""


def labels(table: pd.DataFrame, attribute: str) -> np.ndarray:
    """Each row's subgroup for `attribute` ("" when unknown or when the table lacks the column)."""
    if attribute not in ATTRIBUTES:
        raise tables.ReportError(f"subgroup attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")
    if attribute not in table.columns:
        return np.full(len(table), "", dtype=object)
    column = table[attribute]
    if attribute == "age":
        return np.array([age_band(a) for a in column], dtype=object)
    return np.array(["" if pd.isna(v) else str(v).strip() for v in column], dtype=object)


def subgroup_rows(
    table: pd.DataFrame,
    strategy: str,
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
    min_patients: int = MIN_PATIENTS,
) -> list[dict[str, Any]]:
    """Long rows (COLUMNS) of MCC and AUC (threshold 0.5) per side, attribute and subgroup."""
    boot = Bootstrap(arrays(table), table["patient"].to_numpy(), n_boot, seed)  # N x 5 arrays
    patients = table["patient"].astype(str).to_numpy()
    out: list[dict[str, Any]] = []
    for side in tables.SIDES:
        rows = tables.side_rows(table, side, pool_film)
        if not len(rows):
            continue
        for attribute in ATTRIBUTES:
            found = labels(table, attribute)[rows]
            present = set(found) - {""}
            for group in [g for g in ORDER[attribute] if g in present] + sorted(
                present - set(ORDER[attribute])
            ):
                chosen = rows[found == group]
                fixed = {
                    "strategy": strategy,
                    "comparison": side,
                    "attribute": attribute,
                    "subgroup": group,
                    "n": len(chosen),
                    "patients": len(set(patients[chosen])),
                }
                if fixed["patients"] < min_patients:
                    out += [
                        {**fixed, "pathology": k, "metric": m, "value": math.nan, "ci_low": math.nan}
                        | {"ci_high": math.nan, "note": TOO_SMALL}
                        for k in PATHOLOGY_KEYS
                        for m in METRICS
                    ]
                    continue
                values = estimates(boot.values(chosen, metrics=METRICS))
                out += [{**r, "note": ""} for r in tables.long_rows(values, **fixed)]
    return out


def chosen_strategies(main: pd.DataFrame, stages: Sequence[Any]) -> list[str]:
    """[best, baseline] strategies (one when they coincide; none when nothing was scored).

    best: the highest mean of the Standard and Photos average MCC (a strategy with one side only
    is ranked by it); baseline: the stage named `baseline` or labelled Baseline.
    """
    avg = main.loc[(main["metric"] == "mcc") & (main["pathology"] == AVERAGE)]
    avg = avg.loc[avg["comparison"].isin([tables.STANDARD, tables.PHOTOS]) & avg["value"].notna()]
    out = []
    if len(avg):
        means = avg.groupby("strategy", sort=False)["value"].mean()
        out.append(str(means.index[int(np.argmax(means.to_numpy()))]))
    for s in stages:
        if (s.name == "baseline" or s.strategy.lower() == "baseline") and s.strategy not in out:
            out.append(s.strategy)
            break
    return out


def section(
    predictions: Mapping[str, Mapping[str, pd.DataFrame]],
    stages: Sequence[Any],
    main: pd.DataFrame,
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> Section:
    """The subgroup section: tables/subgroups.csv and its blocks (test split, else validation)."""
    split = "test" if any("test" in p for p in predictions.values()) else "val"
    by_strategy = {s.strategy: s for s in stages}
    rows: list[dict[str, Any]] = []
    picked = chosen_strategies(main, stages)
    for strategy in picked:
        stage = by_strategy.get(strategy)
        table = predictions.get(stage.name, {}).get(split) if stage else None
        if table is None:
            continue
        try:
            rows += subgroup_rows(table, strategy, n_boot=n_boot, seed=seed, pool_film=pool_film)
        except MetricsError as err:
            raise tables.ReportError(f"{stage.dir}: predictions_{split}.parquet: {err}") from err
    df = tables.frame(rows, COLUMNS)
    blocks: list[R.Block] = [R.Heading(f"Subgroups ({split})")]
    if df.empty:
        reason = (
            "no predictions table carries sex, age, AP/PA or view" if picked else "no strategy has numbers"
        )
        return {"subgroups": df}, blocks + [R.Paragraph(f"No subgroups to show: {reason}.")]
    who = _who(picked, stages)
    blocks.append(
        R.Paragraph(
            f"MCC (threshold 0.5) and AUC by subgroup, {SPLITS[split]}, for {who}. Age bands: "
            + ", ".join(b[2] for b in AGE_BANDS)
            + f" years. A subgroup with fewer than {MIN_PATIENTS} patients is marked '{TOO_SMALL}' and "
            "given no numbers. Cells are the average over the five pathologies with its 95% CI; "
            "tables/subgroups.csv has each pathology."
        )
    )
    blocks.append(_table(df, split))
    return {"subgroups": df}, blocks


def _who(picked: Sequence[str], stages: Sequence[Any]) -> str:
    """`A (best ...) and B (the baseline)`, or one strategy with both roles or only the first."""
    best = f"{picked[0]} (best by the mean of its Standard and Photos average MCC"
    if len(picked) == 2:
        return f"{best}) and {picked[1]} (the baseline)"
    base = any(
        s.strategy == picked[0] and (s.name == "baseline" or s.strategy.lower() == "baseline") for s in stages
    )
    return best + (", and the baseline)" if base else "; the study has no stage named baseline)")


def _table(df: pd.DataFrame, split: str) -> R.Table:
    """A row per strategy, side and subgroup: patients, images, average MCC and AUC (or 'too small')."""
    avg = df.loc[df["pathology"] == AVERAGE]
    out = []
    last = None
    for key, part in avg.groupby(["strategy", "comparison", "attribute", "subgroup"], sort=False):
        strategy, side, attribute, group = key
        first = part.iloc[0]
        if first["note"] == TOO_SMALL:
            cells = [TOO_SMALL] * len(METRICS)
        else:
            cells = [cell(*tables.pick(part, metric=m)) for m in METRICS]
        head = strategy if strategy != last else ""
        last = strategy
        label = f"{ATTRIBUTES[attribute]}: {group}"
        out.append([head, side, label, str(first["patients"]), str(first["n"]), *cells])
    return R.Table(
        f"Subgroups ({split}): average over the five pathologies",
        ["Strategy", "Comparison", "Subgroup", "Patients", "Images", "MCC", "AUC"],
        out,
        numeric_from=3,
    )
