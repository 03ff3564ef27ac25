"""The report's text: tables laid out like the paper, the generated summary, notes and stage list.

Builds a list of render blocks from the long-format CSV tables; render.py turns it into
Markdown and HTML. No numbers are computed here beyond picking and ranking rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from chextrain.evaluation import render as R
from chextrain.evaluation import tables
from chextrain.evaluation.metrics import AVERAGE
from chextrain.evaluation.tables import AT_THRESHOLD, COMPARISONS, DIFFERENCE, NO_POSITIVE, PHOTOS, STANDARD
from chextrain.labels import NAME_OF, SLUGS

SPLITS: dict[str, str] = {"val": "validation (patient-level holdout)", "test": "test (official valid sets)"}
BUDGET_NOTE = (
    "Figure 5 scores every budget model on both official validation sets (CheXpert valid "
    "and CheXphoto valid); the paper's code scored its internal holdout instead, so the numbers "
    "are not directly comparable with the paper's figure."
)
METHOD = (
    "Standard = CheXpert x-rays; Photos = CheXphoto photos of the paper's kinds (natural, synthetic "
    "digital, synthetic photographic); Film = CheXphoto v1.1 photos of physical films, shown apart "
    "unless the study pools them. MCC, precision, recall, F1 and accuracy at threshold 0.5 (the "
    "paper's). Validation = the patient-level holdout; test = the official valid sets."
)
POOLED = "Film photos are pooled into Photos in this study (pool_film)."
DIFFERENCE_NOTE = (
    "Standard - Photos = the Standard value minus the Photos value above it. Its 95% CI is paired by "
    "patient: each bootstrap resample draws patients, with all their x-rays and the photos of them, and "
    "the difference is taken on that same resample."
)
NO_POSITIVE_NOTE = (
    f"'{NO_POSITIVE}': the model predicted no positive case at threshold 0.5, so MCC (and precision, "
    "recall, F1) say nothing about ranking; see MCC at the thresholds tuned on validation just below, "
    "and AUC."
)
ROUTING_NOTE = (
    "A routed model is scored through its router, as a user gets it: each image goes to the head the "
    f"router picks. The row '...{tables.ORACLE_ROUTING}' scores the same model with each image's head "
    "picked from its known domain; the gap between the two rows is what router mistakes cost."
)
FIGURE5_MISSING = (
    "Figure 5 (MCC against the number of digital training images) needs the fixed-budget study: "
    "`chextrain study run configs/studies/fixed_budget.yaml --data ROOT --out DIR`, then "
    "`chextrain study report DIR`."
)
FILES = [
    "tables/table1_val.csv, tables/table2_test.csv: strategy, comparison, pathology, metric, value, ci_low, "
    "ci_high",
    "tables/appendix.csv: split + the same columns (precision, recall, f1, accuracy)",
    "tables/kinds.csv: Photos by kind (split, strategy, kind, n, pathology, metric, value, ci_low, ci_high)",
    "tables/thresholds.csv: MCC at 0.5 and at tuned thresholds (threshold, cutoff), test split",
    "figures/*.png: the figures above. An empty CSV value means undefined (e.g. AUC with one class).",
]


def cell(value: float, low: float, high: float) -> str:
    """`0.512 [0.430, 0.590]`, `0.512` without a CI, `n/a` when undefined."""
    if not math.isfinite(value):
        return "n/a"
    if math.isfinite(low) and math.isfinite(high):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.3f}"


def pivot(
    df: pd.DataFrame,
    metric: str,
    group: str,
    order: Sequence[str],
    caption: str,
    flags: set[tuple[str, str, str]] | frozenset = frozenset(),
    notes: Sequence[str] = (),
) -> R.Table:
    """Paper layout: a row per (strategy, value of `group`), a column per pathology and the average.

    flags: (strategy, group value, slug) cells with no positive prediction at 0.5; for metrics at
    that threshold they read NO_POSITIVE instead of a number.
    """
    header = ["Strategy", group.capitalize(), *(NAME_OF[s] for s in SLUGS), "Average"]
    part = df.loc[df["metric"] == metric, ["strategy", group, "pathology", "value", "ci_low", "ci_high"]]
    found = {tuple(r[:3]): r[3:] for r in part.itertuples(index=False, name=None)}
    nan = (math.nan, math.nan, math.nan)
    rows = []
    for strategy in dict.fromkeys(part["strategy"]):
        mine = set(part.loc[part["strategy"] == strategy, group])
        present = [g for g in order if g in mine] + sorted(mine - set(order))
        for i, g in enumerate(present):
            cells = [
                NO_POSITIVE
                if metric in AT_THRESHOLD and (strategy, g, k) in flags
                else cell(*found.get((strategy, g, k), nan))
                for k in (*SLUGS, AVERAGE)
            ]
            rows.append([strategy if i == 0 else "", g, *cells])
    return R.Table(caption, header, rows, numeric_from=2, notes=notes)


def _ci(row: Any) -> str:
    return cell(row.value, row.ci_low, row.ci_high)


def summary(df: pd.DataFrame, split: str) -> list[str]:
    """Which strategy is best on Standard, on Photos, and has the smallest gap, by average MCC."""
    avg = df.loc[(df["metric"] == "mcc") & (df["pathology"] == AVERAGE) & df["value"].notna()]
    avg = avg.loc[~avg["strategy"].str.endswith(tables.ORACLE_ROUTING)]  # the deployed models only
    lines = []
    for side in (STANDARD, PHOTOS):
        ranked = avg.loc[avg["comparison"] == side].sort_values("value", ascending=False, kind="stable")
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        line = f"Best on {side} ({split}, average MCC): {best.strategy}, {_ci(best)}"
        if len(ranked) > 1:
            second = ranked.iloc[1]
            known = math.isfinite(best.ci_low) and math.isfinite(second.ci_high)
            verdict = (
                "no CIs computed"
                if not known
                else "the 95% CIs overlap, so the ranking is uncertain"
                if best.ci_low <= second.ci_high
                else "the 95% CIs do not overlap"
            )
            line += f"; runner-up {second.strategy}, {_ci(second)} ({verdict})"
        lines.append(line + ".")
    gaps = avg.loc[avg["comparison"] == DIFFERENCE]
    if len(gaps):
        g = gaps.iloc[int(gaps["value"].abs().to_numpy().argmin())]
        verdict = (
            "no CI computed"
            if not math.isfinite(g.ci_low)
            else "its CI includes 0"
            if g.ci_low <= 0 <= g.ci_high
            else "its CI excludes 0"
        )
        lines.append(f"Smallest Standard - Photos gap in average MCC: {g.strategy}, {_ci(g)} ({verdict}).")
    return lines or ["No strategy has predictions to compare yet."]


def stage_rows(
    stages: Sequence[Any], has: Mapping[str, Sequence[str]], inputs: Mapping[str, str] | None = None
) -> list[list[str]]:
    """A row per stage: name, strategy, state, time, input (size, preprocessing), predictions or why none.

    inputs: model.json's image size and preprocessing per stage: those its init weights brought
    (e.g. 224 px histeq for CovidPrognosis MoCo) unless the stage set its own.
    """
    rows = []
    for s in stages:
        if s.state != "done":
            what = s.reason or f"{s.state} ({_unfinished(s.state)})"
        elif s.kind == "moco":
            what = "pre-training stage (no classifier to score)"
        else:
            found = has.get(s.name) or []
            what = f"predictions: {', '.join(found)}" if found else "no predictions tables"
        seconds = f"{s.seconds:.0f} s" if isinstance(s.seconds, int | float) else ""
        rows.append([s.name, s.strategy, s.state, seconds, (inputs or {}).get(s.name, ""), what])
    return rows


def notes_of(study: Mapping[str, Any], stages: Sequence[Any]) -> list[str]:
    """The study's notes, each with the stages it concerns (e.g. random init replaced ImageNet)."""
    where: dict[str, list[str]] = {str(n): [] for n in study.get("notes") or []}
    for s in stages:
        for n in s.notes:
            where.setdefault(str(n), []).append(s.name)
    return [f"{n} (stages: {', '.join(names)})" if names else n for n, names in where.items()]


def build_document(
    study: Mapping[str, Any],
    stages: Sequence[Any],
    has: Mapping[str, Sequence[str]],
    csv: Mapping[str, pd.DataFrame],
    images: Sequence[R.Image],
    notes: Sequence[str],
    *,
    n_boot: int,
    seed: int,
    no_positive: set[tuple[str, str, str, str]] | frozenset = frozenset(),
    pool_film: bool = False,
    inputs: Mapping[str, str] | None = None,
) -> list[R.Block]:
    """The report's blocks: notes, summary, stages, Tables 1-2, kinds, thresholds, ROC, Figure 5, appendix."""
    notes_in = notes
    warn = notes_of(study, stages)
    not_run = [s for s in stages if s.state != "done"]
    if not_run:
        warn.append(
            f"{len(not_run)} stage(s) did not finish and have no numbers: "
            + "; ".join(f"{s.name} ({s.state}: {s.reason or _unfinished(s.state)})" for s in not_run)
        )
    ci = (
        f"95% percentile intervals of {n_boot} patient-level bootstrap resamples (seed {seed})"
        if n_boot
        else "none (n_boot = 0)"
    )
    split = "test" if len(csv["table2_test"]) else "val"
    main = csv["table2_test"] if split == "test" else csv["table1_val"]
    blocks: list[R.Block] = [R.Callout("Read this first", warn)] if warn else []
    blocks += [
        R.Heading("Summary"),
        R.Bullets(summary(main, split)),
        R.Paragraph(
            f"Study {study.get('name', '?')!r} ({study.get('source') or 'unknown source'}, "
            f"profile {study.get('profile') or 'none'}). {METHOD}{' ' + POOLED if pool_film else ''} "
            f"CIs: {ci}."
        ),
        R.Heading("Stages"),
        R.Table(
            "Stages of the study",
            ["Stage", "Strategy", "State", "Time", "Input", "Predictions / reason"],
            stage_rows(stages, has, inputs),
            numeric_from=6,
        ),
    ]
    for name, sp, number in (("table1_val", "val", 1), ("table2_test", "test", 2)):
        blocks.append(R.Heading(f"Table {number}: {SPLITS[sp]}"))
        if csv[name].empty:
            blocks.append(R.Paragraph(f"No stage has {sp} predictions."))
        flags = {k[1:] for k in no_positive if k[0] == sp}
        for metric in tables.MAIN_METRICS if len(csv[name]) else ():
            notes = [DIFFERENCE_NOTE] + ([NO_POSITIVE_NOTE] if metric == "mcc" and flags else [])
            caption = f"Table {number} ({sp}): {metric.upper()} per pathology"
            blocks.append(pivot(csv[name], metric, "comparison", COMPARISONS, caption, flags, notes))
            if sp == "test" and metric == "mcc":  # the tuned-threshold table next to MCC at 0.5
                blocks += _thresholds(csv["thresholds"], notes_in, flags)
        blocks += routing_blocks(csv["router"], sp)
    kinds = csv["kinds"].loc[csv["kinds"]["split"] == "test"]
    blocks.append(R.Heading("Photos by kind (test)"))
    for metric in tables.MAIN_METRICS if len(kinds) else ():
        blocks.append(
            pivot(kinds, metric, "kind", tables.PHOTO_KINDS, f"Photos by kind (test): {metric.upper()}")
        )
    if kinds.empty:
        blocks.append(R.Paragraph("No test predictions with photos."))
    blocks.append(R.Heading("ROC curves"))
    rocs = [i for i in images if i.path.name.startswith("roc_")]
    blocks += rocs or [R.Paragraph("No predictions to plot.")]
    blocks += _budget(csv["budget"], images)
    blocks.append(R.Heading("Appendix: precision, recall, F1, accuracy"))
    appendix = csv["appendix"]
    for sp in SPLITS:
        part = appendix.loc[appendix["split"] == sp]
        flags = {k[1:] for k in no_positive if k[0] == sp}
        for metric in tables.APPENDIX_METRICS if len(part) else ():
            caption = f"{SPLITS[sp]}: {metric}"
            blocks.append(pivot(part, metric, "comparison", COMPARISONS, caption, flags))
    files = FILES[:2] + (
        ["tables/budget.csv: Table 2's columns + digital, total"] if len(csv["budget"]) else []
    )
    if len(csv["router"]):
        files.append("tables/router.csv: router accuracy (split, strategy, kind, n, accuracy)")
    return [*blocks, R.Heading("Files"), R.Bullets(files + FILES[2:])]


def routing_blocks(df: pd.DataFrame, split: str) -> list[R.Block]:
    """The router's accuracy per kind on one split (tables/router.csv) and how to read the oracle rows."""
    part = df.loc[df["split"] == split]
    if part.empty:
        return []
    kinds = list(dict.fromkeys(part["kind"]))
    found = {(r.strategy, r.kind): (r.accuracy, r.n) for r in part.itertuples()}
    rows = [
        [
            strategy,
            *(
                f"{found[(strategy, k)][0]:.3f} (n={found[(strategy, k)][1]})"
                if (strategy, k) in found
                else ""
                for k in kinds
            ),
        ]
        for strategy in dict.fromkeys(part["strategy"])
    ]
    caption = f"Router accuracy ({split}): share of images the router sends to their domain's head"
    return [R.Table(caption, ["Strategy", *kinds], rows, notes=[ROUTING_NOTE])]


def _thresholds(
    df: pd.DataFrame, notes: Sequence[str], flags: set[tuple[str, str, str]] | frozenset = frozenset()
) -> list[R.Block]:
    blocks: list[R.Block] = [R.Heading("MCC at 0.5 vs at tuned thresholds (test)", level=3)]
    if len(df):
        df = df.assign(comparison=df["comparison"] + " @ " + df["threshold"])
        order = [f"{c} @ {t}" for c in (STANDARD, PHOTOS) for t in ("0.5", "tuned")]
        blocks.append(
            pivot(
                df,
                "mcc",
                "comparison",
                order,
                "MCC at 0.5 vs at the thresholds tuned on validation (per head, maximising MCC)",
                {(s, f"{c} @ 0.5", k) for s, c, k in flags},
            )
        )
    else:
        blocks.append(R.Paragraph("No tuned thresholds to compare."))
    return blocks + [R.Paragraph(n) for n in notes]


def _budget(df: pd.DataFrame, images: Sequence[R.Image]) -> list[R.Block]:
    if df.empty:
        return [R.Heading("Figure 5: fixed budget"), R.Paragraph(FIGURE5_MISSING)]
    rows = []
    for (strategy, digital, total), part in df.groupby(["strategy", "digital", "total"], sort=False):
        rows.append(
            [
                strategy,
                str(digital),
                str(total),
                *(
                    cell(*tables.pick(part, comparison=c, metric=m, pathology=AVERAGE))
                    for m in tables.MAIN_METRICS
                    for c in (STANDARD, PHOTOS)
                ),
            ]
        )
    return [
        R.Heading("Figure 5: fixed budget"),
        R.Paragraph(BUDGET_NOTE),
        *(i for i in images if i.path.name.startswith("figure5")),
        R.Table(
            "Fixed-budget stages (test, average over pathologies)",
            ["Strategy", "Digital", "Total", "MCC Standard", "MCC Photos", "AUC Standard", "AUC Photos"],
            rows,
        ),
    ]


def _unfinished(state: str) -> str:
    """Why a stage without a recorded reason has no numbers yet, from its state."""
    return {
        "pending": "not started yet",
        "queued": "waiting in the scheduler's queue",
        "running": "still running",
    }.get(state, "no reason recorded")
