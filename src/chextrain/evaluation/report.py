"""A study's report: the paper's Table 1 / Table 2 / Figure 5 (and more) from saved predictions.

`write_report(DIR)` reads DIR/study.json and, for each finished stage, its predictions tables
(`predictions_val.parquet`: the patient-level holdout; `predictions_test.parquet`: the official
valid sets) and model.json (the input size and preprocessing, the splits the stage evaluates). It
never trains or scores a model: tuned thresholds are tuned again on the saved validation
predictions, and a second run over the same files writes byte-identical outputs. It writes, under DIR:

- tables/table1_val.csv, tables/table2_test.csv: `strategy, comparison, pathology, metric, value,
  ci_low, ci_high`; metric mcc / auc at threshold 0.5; comparison Standard / Photos /
  Standard - Photos; pathology = the five slugs + average; an empty value = undefined (AUC of a
  single class).
- tables/appendix.csv: `split` + those columns; metrics precision / recall / f1 / accuracy.
- tables/budget.csv: those columns + `digital, total` (test split; stages with a fixed budget).
- tables/kinds.csv: `split, strategy, kind, n, pathology, metric, value, ci_low, ci_high`.
- tables/thresholds.csv: `strategy, comparison, threshold (0.5 | tuned), cutoff, pathology,
  metric, value, ci_low, ci_high` (test split; thresholds tuned on the saved validation predictions).
- tables/router.csv: `split, strategy, kind (all | digital | a photo kind), n, accuracy`: how often
  a routed model's router sends an image to its domain's head.
- figures/roc_<comparison>.png (one panel per pathology, a curve per strategy),
  figures/figure5_budget.png, report.md and a self-contained report.html.
- tables/calibration.csv, tables/subgroups.csv and figures/reliability.png: the calibration and
  subgroup sections (evaluation/sections.py).

A routed model (its router picks between two heads) is scored through its router, as deployed;
its oracle routing (predictions_<split>_oracle.parquet: each image's head from its known domain)
is the row "<strategy> (oracle routing)" next to it in Tables 1 and 2.

The study folder (study.json, each stage's model.json and saved validation predictions) is read
by evaluation/study_files.py.

Film photos (CheXphoto v1.1) are their own comparison, Film; study.json's `pool_film: true` (or
write_report's pool_film) counts them in Photos instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from chextrain.evaluation import figures, render, tables
from chextrain.evaluation.document import SPLITS, build_document, cell
from chextrain.evaluation.metrics import AVERAGE, MetricsError
from chextrain.evaluation.predict import ORACLE
from chextrain.evaluation.sections import add_sections
from chextrain.evaluation.study_files import (
    StageInfo,
    read_study,
    reported_splits,
    stage_input,
    tuned_thresholds,
)
from chextrain.evaluation.tables import COLUMNS, DIFFERENCE, FILM, PHOTOS, STANDARD, ReportError
from chextrain.fileio import atomic_write_text
from chextrain.labels import NAME_OF, SLUGS

__all__ = [
    "ReportError",
    "ReportPaths",
    "StageInfo",
    "headline_rows",
    "headline_table",
    "read_study",
    "write_report",
]


@dataclass(frozen=True)
class ReportPaths:
    """Where write_report put its outputs."""

    md: Path
    html: Path
    tables: Path
    figures: Path


@dataclass
class Results:
    """Every row computed from the predictions tables, before writing."""

    main: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # split -> long rows
    kinds: list[dict[str, Any]] = field(default_factory=list)  # with split
    thresholds: list[dict[str, Any]] = field(default_factory=list)  # test split
    predictions: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)  # stage -> split -> table
    notes: list[str] = field(default_factory=list)
    no_positive: set[tuple[str, str, str, str]] = field(default_factory=set)  # split, strategy, side, slug
    router: list[dict[str, Any]] = field(default_factory=list)  # tables.ROUTER_COLUMNS


def evaluate_study(
    stages: Sequence[StageInfo],
    *,
    n_boot: int,
    seed: int,
    splits: Sequence[str] = tuple(SPLITS),
    extras: bool = True,
    pool_film: bool = False,
) -> Results:
    """Metric rows of every finished stage's predictions (extras: photo kinds and tuned thresholds)."""
    out = Results(main={s: [] for s in splits})
    for stage in stages:
        if stage.state != "done":
            continue
        reported = reported_splits(stage)
        tuned = tuned_thresholds(stage) if extras and "test" in splits else None
        for split in splits:
            file = stage.dir / f"predictions_{split}.parquet"
            if not file.is_file() or split not in reported:
                continue
            table = tables.read_predictions(file)
            out.predictions.setdefault(stage.name, {})[split] = table
            thresholds = tuned if extras and split == "test" else None
            if extras and split == "test" and tuned is None:
                out.notes.append(f"{stage.strategy}: no saved validation predictions to tune thresholds on")
            try:
                found = tables.evaluate_table(
                    table,
                    stage.strategy,
                    n_boot=n_boot,
                    seed=seed,
                    kinds=extras,
                    thresholds=thresholds,
                    pool_film=pool_film,
                )
            except MetricsError as err:
                raise ReportError(f"{file}: {err}") from err
            out.main[split] += found.main
            oracle = (
                oracle_rows(stage, split, n_boot=n_boot, seed=seed, pool_film=pool_film) if extras else None
            )
            if oracle is not None:
                out.main[split] += oracle.main
                out.no_positive |= {(split, *key) for key in oracle.no_positive}
            if extras:
                out.router += tables.router_rows(table, stage.strategy, split)
            out.kinds += [{"split": split, **r} for r in found.kinds]
            out.thresholds += found.thresholds
            out.notes += found.notes
            out.no_positive |= {(split, *key) for key in found.no_positive}
    return out


def oracle_rows(
    stage: StageInfo, split: str, *, n_boot: int, seed: int, pool_film: bool
) -> tables.TableRows | None:
    """The rows of a routed stage's oracle routing (predictions_<split>_oracle.parquet), None unsaved.

    Strategy "<strategy> (oracle routing)": each image through its known domain's head, the line
    to read the routed row (through the router, as deployed) against.
    """
    file = stage.dir / f"predictions_{split}_{ORACLE}.parquet"
    if not file.is_file():
        return None
    table = tables.read_predictions(file)
    strategy = stage.strategy + tables.ORACLE_ROUTING
    try:
        found = tables.evaluate_table(
            table, strategy, n_boot=n_boot, seed=seed, kinds=False, pool_film=pool_film
        )
    except MetricsError as err:
        raise ReportError(f"{file}: {err}") from err
    return found


def write_report(
    study_dir: Path, *, n_boot: int = 1000, seed: int = 0, pool_film: bool | None = None
) -> ReportPaths:
    """Write DIR/report.md, DIR/report.html, DIR/tables/*.csv and DIR/figures/*.png from saved predictions.

    Every number comes from the stage folders' predictions tables; confidence intervals are 95%
    percentile intervals of `n_boot` patient-level bootstrap resamples drawn from `seed`, so a
    re-run gives identical numbers. n_boot=0 skips the intervals. pool_film: count film photos
    in Photos (None: study.json's `pool_film`, default False).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ReportError(f"n_boot must be an integer >= 0; got {n_boot!r}")
    study_dir = Path(study_dir)
    study, stages = read_study(study_dir)
    pool = bool(study.get("pool_film", False)) if pool_film is None else pool_film
    results = evaluate_study(stages, n_boot=n_boot, seed=seed, pool_film=pool)
    paths = ReportPaths(
        md=study_dir / "report.md",
        html=study_dir / "report.html",
        tables=study_dir / "tables",
        figures=study_dir / "figures",
    )
    paths.tables.mkdir(parents=True, exist_ok=True)
    paths.figures.mkdir(parents=True, exist_ok=True)
    csv = csv_tables(results, stages)
    for name, df in csv.items():
        atomic_write_text(paths.tables / f"{name}.csv", df.to_csv(index=False))
    images = _write_figures(results, stages, csv["budget"], paths.figures, pool)
    has = {s.name: sorted(results.predictions.get(s.name, {})) for s in stages}
    inputs = {s.name: stage_input(s) for s in stages if s.state == "done"}
    blocks = build_document(
        study,
        stages,
        has,
        csv,
        images,
        results.notes,
        n_boot=n_boot,
        seed=seed,
        no_positive=results.no_positive,
        pool_film=pool,
        inputs=inputs,
    )
    main = csv["table2_test"] if len(csv["table2_test"]) else csv["table1_val"]
    blocks = add_sections(  # calibration and subgroups (their own CSVs and figure), before the appendix
        blocks,
        results.predictions,
        stages,
        main,
        paths.tables,
        paths.figures,
        n_boot=n_boot,
        seed=seed,
        pool_film=pool,
    )
    title = f"chextrain study report: {study.get('name') or study_dir.name}"
    atomic_write_text(paths.md, render.to_markdown(title, blocks, study_dir))
    atomic_write_text(paths.html, render.to_html(title, blocks))
    return paths


def csv_tables(results: Results, stages: Sequence[StageInfo]) -> dict[str, pd.DataFrame]:
    """The CSV tables by file stem (see the module docstring for their columns)."""

    def main(split: str, metrics: Sequence[str]) -> pd.DataFrame:
        return tables.frame([r for r in results.main.get(split, []) if r["metric"] in metrics], COLUMNS)

    budgets = {s.strategy: s.budget for s in stages if s.budget}
    budget_rows = [
        {**r, "digital": int(b["digital"]), "total": int(b["total"])}
        for r in results.main.get("test", [])
        if (b := budgets.get(r["strategy"]))
        and r["metric"] in tables.MAIN_METRICS
        and r["comparison"] != DIFFERENCE
    ]
    appendix = [
        {"split": s, **r}
        for s in SPLITS
        for r in results.main.get(s, [])
        if r["metric"] in tables.APPENDIX_METRICS
    ]
    return {
        "table1_val": main("val", tables.MAIN_METRICS),
        "table2_test": main("test", tables.MAIN_METRICS),
        "appendix": tables.frame(appendix, ("split", *COLUMNS)),
        "budget": tables.frame(
            sorted(budget_rows, key=lambda r: r["digital"]), (*COLUMNS, "digital", "total")
        ),
        "kinds": tables.frame(results.kinds, ("split", "strategy", "kind", "n", *COLUMNS[2:])),
        "thresholds": tables.frame(
            results.thresholds, ("strategy", "comparison", "threshold", "cutoff", *COLUMNS[2:])
        ),
        "router": tables.frame(results.router, tables.ROUTER_COLUMNS),
    }


def _write_figures(
    results: Results, stages: Sequence[StageInfo], budget: pd.DataFrame, folder: Path, pool_film: bool
) -> list[render.Image]:
    """ROC small multiples per comparison (test, else validation); Figure 5 when budget stages have numbers.

    One figure per comparison (Standard, Photos, Film), a panel per pathology, a curve per strategy;
    budget stages are left out of the ROC figures (Figure 5 shows them).
    """
    images: list[render.Image] = []
    split = "test" if any("test" in p for p in results.predictions.values()) else "val"
    done = [s for s in stages if split in results.predictions.get(s.name, {}) and not s.budget]
    for side in (STANDARD, PHOTOS, FILM) if done else ():
        series = []
        for s in done:
            for slug in SLUGS:
                y, p = tables.roc_inputs(results.predictions[s.name][split], side, slug, pool_film)
                if len(y):
                    series.append(figures.RocSeries(s.strategy, NAME_OF[slug], y, p))
        if series:
            title = f"ROC curves: {side}, {SPLITS[split]}"
            path = figures.plot_roc_grid(series, title, folder / f"roc_{side.lower()}.png")
            images.append(render.Image(title, path))
    avg = budget.loc[(budget["metric"] == "mcc") & (budget["pathology"] == AVERAGE)]
    if len(avg):
        points = [
            figures.BudgetPoint(
                int(r.digital), str(r.comparison), float(r.value), float(r.ci_low), float(r.ci_high)
            )
            for r in avg.itertuples()
        ]
        totals = sorted(set(avg["total"].astype(int)))
        total = totals[0] if len(totals) == 1 else None
        path = figures.plot_budget(points, total, folder / "figure5_budget.png")
        images.append(render.Image("Figure 5: average MCC vs number of digital training images (test)", path))
    return images


def headline_rows(study_dir: Path) -> list[dict[str, Any]]:
    """Per strategy with test predictions: average MCC and AUC on Standard and Photos (point estimates).

    Keys: strategy, standard_mcc, photos_mcc, standard_auc, photos_auc (NaN when a side is absent).
    """
    _, stages = read_study(Path(study_dir))
    found = evaluate_study(stages, n_boot=0, seed=0, splits=("test",), extras=False)
    df = tables.frame(found.main["test"], COLUMNS)
    out = []
    for strategy in dict.fromkeys(df["strategy"]):
        mine = df.loc[(df["strategy"] == strategy) & (df["pathology"] == AVERAGE)]
        out.append(
            {
                "strategy": strategy,
                **{
                    f"{c.lower()}_{m}": tables.pick(mine, comparison=c, metric=m)[0]
                    for c in (STANDARD, PHOTOS)
                    for m in tables.MAIN_METRICS
                },
            }
        )
    return out


def headline_table(study_dir: Path) -> Any:
    """A rich Table of headline_rows, for the CLI to print."""
    from rich.table import Table

    table = Table(title="Headline: test, average over the five pathologies, threshold 0.5")
    for column in ("strategy", "MCC Standard", "MCC Photos", "AUC Standard", "AUC Photos"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for row in headline_rows(study_dir):
        keys = ("standard_mcc", "photos_mcc", "standard_auc", "photos_auc")
        table.add_row(row["strategy"], *(cell(row[k], math.nan, math.nan) for k in keys))
    return table
