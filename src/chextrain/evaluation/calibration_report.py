"""The report's calibration section: ECE and Brier per pathology and comparison, before and after
temperature scaling, with patient-bootstrap CIs, and a reliability diagram per strategy.

Numbers come from the saved predictions tables (test split, else validation) of every finished
stage that is not a fixed-budget stage (like the ROC figures). The CIs use the one bootstrap
engine (bootstrap.Bootstrap: the same patient resamples, for the same seed, as the report's
other tables); ECE and Brier are scored on each resample's weights (calibration.ece / brier).
The temperatures are the bundle's (model.json `temperature`, fitted on validation when the stage
finished); a stage whose model.json predates them gets them fitted now on its saved validation
predictions (calibration.head_temperatures), and a stage with neither is shown unscaled.

tables/calibration.csv: `strategy, comparison, scaling (none | temperature), pathology, metric
(ece | brier), value, ci_low, ci_high`; pathology = the five slugs + average (the mean over them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chextrain.evaluation import calibration, figures, tables
from chextrain.evaluation import render as R
from chextrain.evaluation.bootstrap import PATHOLOGY_KEYS, Bootstrap, interval
from chextrain.evaluation.document import SPLITS, cell, pivot
from chextrain.evaluation.metrics import AVERAGE, nanmean
from chextrain.evaluation.predict import arrays
from chextrain.labels import SLUGS

METRICS: tuple[str, ...] = ("ece", "brier")
SCALINGS: tuple[str, ...] = ("none", "temperature")
COLUMNS: tuple[str, ...] = ("strategy", "comparison", "scaling", *tables.COLUMNS[2:])
NOTE = (
    f"ECE = expected calibration error over {calibration.N_BINS} equal-width bins of the predicted "
    "probability (the share of entries in a bin x |observed positive rate - mean probability|, summed); "
    "Brier = mean squared difference between probability and outcome. Lower is better for both; "
    "each pathology over its labelled entries, average = the mean over the five. Temperature scaling "
    "divides each head's logits by one temperature fitted on validation (stored in the bundle, applied "
    "by `chextrain predict` unless --no-calibration); it changes neither AUC nor any decision. ECE "
    "is biased upwards on few entries, so its bootstrap interval can lie above the estimate."
)


Section = tuple[dict[str, pd.DataFrame], list[R.Block]]  # CSV tables by file stem, the section's blocks


def stage_temperatures(stage: Any, val: pd.DataFrame | None) -> tuple[dict[str, float], str]:
    """({head: T}, where from): model.json's `temperature`, else fitted on `val`, else ({}, "none")."""
    path = Path(stage.dir) / "model.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text()).get("temperature")
        except (json.JSONDecodeError, AttributeError) as err:
            raise tables.ReportError(f"{path}: expected a JSON object ({err})") from err
        if isinstance(found, dict) and found:
            try:
                temps = {
                    str(h): calibration.check_temperature(t, f"{path}: temperature[{h!r}]")
                    for h, t in found.items()
                }
            except calibration.CalibrationError as err:
                raise tables.ReportError(str(err)) from err
            return temps, "model.json"
    if val is not None and len(val):
        return calibration.head_temperatures(val), "fitted on saved validation predictions"
    return {}, "none"


def calibration_rows(
    table: pd.DataFrame,
    strategy: str,
    temperatures: Mapping[str, float],
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> list[dict[str, Any]]:
    """Long rows (COLUMNS) of ECE and Brier per side, pathology and scaling, with bootstrap CIs."""
    targets, probs, mask = arrays(table)  # N x 5 each
    boot = Bootstrap((targets, probs, mask), table["patient"].to_numpy(), n_boot, seed)
    scaled = {
        "none": probs,
        "temperature": calibration.scale_rows(probs, table["head"].to_numpy(), temperatures),
    }
    out = []
    for side in tables.SIDES:
        rows = tables.side_rows(table, side, pool_film)
        if not len(rows):
            continue
        for scaling in SCALINGS if temperatures else SCALINGS[:1]:
            point = {m: np.full(len(PATHOLOGY_KEYS), np.nan) for m in METRICS}
            boot_v = {m: np.full((n_boot, len(PATHOLOGY_KEYS)), np.nan) for m in METRICS}
            for j in range(len(SLUGS)):
                keep = rows[mask[rows, j] > 0]
                if not len(keep):
                    continue
                y, p = targets[keep, j], scaled[scaling][keep, j]
                point["ece"][j], point["brier"][j] = calibration.ece(y, p), calibration.brier(y, p)
                if n_boot:
                    w = np.concatenate(list(boot.weights(keep)))  # B x len(keep)
                    boot_v["ece"][:, j] = calibration.ece(y, p, weights=w)
                    boot_v["brier"][:, j] = calibration.brier(y, p, weights=w)
            for m in METRICS:
                point[m][-1] = nanmean(point[m][None, :-1], 1)[0]
                boot_v[m][:, -1] = nanmean(boot_v[m][:, :-1], 1)
                for j, key in enumerate(PATHOLOGY_KEYS):
                    low, high = interval(boot_v[m][:, j])
                    out.append(
                        {
                            "strategy": strategy,
                            "comparison": side,
                            "scaling": scaling,
                            "pathology": key,
                            "metric": m,
                            "value": float(point[m][j]),
                            "ci_low": low,
                            "ci_high": high,
                        }
                    )
    return out


def reliability_series(
    table: pd.DataFrame, strategy: str, temperatures: Mapping[str, float], pool_film: bool = False
) -> list[figures.ReliabilitySeries]:
    """Reliability curves of one strategy: per side, every labelled entry of the five pathologies pooled."""
    targets, probs, mask = arrays(table)
    scaled = calibration.scale_rows(probs, table["head"].to_numpy(), temperatures) if temperatures else None
    out = []
    for side in tables.SIDES:
        rows = tables.side_rows(table, side, pool_film)
        keep = mask[rows] > 0  # n x 5
        if not keep.any():
            continue
        y = targets[rows][keep]
        for name, p in (("none", probs), ("temperature", scaled)):
            if p is not None:
                bins = calibration.reliability_bins(y, p[rows][keep])
                out.append(figures.ReliabilitySeries(strategy, side, name == "temperature", bins))
    return out


def section(
    predictions: Mapping[str, Mapping[str, pd.DataFrame]],
    stages: Sequence[Any],
    folder: Path,
    *,
    n_boot: int,
    seed: int,
    pool_film: bool = False,
) -> Section:
    """The calibration section: tables/calibration.csv, figures/reliability.png and its blocks."""
    split = "test" if any("test" in p for p in predictions.values()) else "val"
    done = [s for s in stages if split in predictions.get(s.name, {}) and not s.budget]
    rows: list[dict[str, Any]] = []
    series: list[figures.ReliabilitySeries] = []
    temps: list[list[str]] = []
    for s in done:
        found, source = stage_temperatures(s, predictions[s.name].get("val"))
        table = predictions[s.name][split]
        try:
            rows += calibration_rows(table, s.strategy, found, n_boot=n_boot, seed=seed, pool_film=pool_film)
        except calibration.CalibrationError as err:
            raise tables.ReportError(f"{s.dir}: predictions_{split}.parquet: {err}") from err
        series += reliability_series(table, s.strategy, found, pool_film)
        shown = ", ".join(f"{h} {t:.2f}" for h, t in sorted(found.items())) or "none (T = 1)"
        temps.append([s.strategy, shown, source])
    df = tables.frame(rows, COLUMNS)
    blocks: list[R.Block] = [R.Heading(f"Calibration ({split})")]
    if df.empty:
        return {"calibration": df}, blocks + [R.Paragraph("No predictions to assess.")]
    blocks.append(R.Paragraph(NOTE))
    raw = df.loc[df["scaling"] == "none"]
    for metric in METRICS:
        caption = (
            f"Calibration ({split}): {metric.upper() if metric == 'ece' else 'Brier score'} per pathology"
        )
        blocks.append(pivot(raw, metric, "comparison", tables.SIDES, caption))
    blocks.append(_before_after(df, temps))
    if series:
        title = f"Reliability diagrams, {SPLITS[split]}: the five pathologies pooled"
        path = figures.plot_reliability(series, title, folder / "reliability.png")
        blocks.append(R.Image(title + "; solid: as trained, dotted: temperature-scaled", path))
    blocks.append(R.Paragraph("tables/calibration.csv: " + ", ".join(COLUMNS) + "."))
    return {"calibration": df}, blocks


def _before_after(df: pd.DataFrame, temps: Sequence[Sequence[str]]) -> R.Table:
    """Average ECE and Brier before and after temperature scaling, per strategy and comparison."""
    where = {t[0]: t[1:] for t in temps}
    out = []
    for strategy in dict.fromkeys(df["strategy"]):
        mine = df.loc[(df["strategy"] == strategy) & (df["pathology"] == AVERAGE)]
        for i, side in enumerate(c for c in tables.SIDES if c in set(mine["comparison"])):
            cells = [
                cell(*tables.pick(mine, comparison=side, scaling=sc, metric=m))
                for m in METRICS
                for sc in SCALINGS
            ]
            first = [strategy, *where.get(strategy, ("", ""))] if i == 0 else ["", "", ""]
            out.append([*first, side, *cells])
    return R.Table(
        "Before and after temperature scaling (average over the five pathologies)",
        [
            "Strategy",
            "Temperature per head",
            "From",
            "Comparison",
            "ECE",
            "ECE scaled",
            "Brier",
            "Brier scaled",
        ],
        out,
        numeric_from=4,
    )
