"""The report's figures as PNG files: ROC small multiples per comparison and Figure 5 (MCC vs digital images).

Drawn on matplotlib `Figure` objects with the Agg canvas (no pyplot, so no global figure state
and no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

LINE_STYLES: dict[str, str] = {"Standard": "-", "Photos": "--"}
DPI = 110


@dataclass(frozen=True)
class RocSeries:
    """One ROC line: a strategy on one panel (a pathology) of one comparison."""

    strategy: str
    panel: str
    y_true: np.ndarray  # N, 0/1
    y_prob: np.ndarray  # N


@dataclass(frozen=True)
class BudgetPoint:
    """Figure 5's data: average MCC (with CI) of one budget stage on one side."""

    digital: int
    comparison: str
    value: float
    ci_low: float
    ci_high: float


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_roc_grid(series: Sequence[RocSeries], title: str, path: Path, columns: int = 3) -> Path:
    """roc_grid drawn into the PNG file `path`."""
    return _save(roc_grid(series, title, columns), path)


def roc_grid(series: Sequence[RocSeries], title: str, columns: int = 3) -> Figure:
    """Small multiples: a panel per `panel` value, a curve per strategy, one legend outside the axes.

    Series with a single class (ROC undefined) are left out; the legend lists every strategy once,
    below the panels, so no curve is hidden behind it.
    """
    panels = list(dict.fromkeys(s.panel for s in series))
    strategies = list(dict.fromkeys(s.strategy for s in series))
    colours = _colours(len(strategies))
    rows = max(1, -(-len(panels) // columns))
    legend_rows = -(-len(strategies) // 2)
    fig = Figure(figsize=(3.0 * columns, 2.9 * rows + 0.25 * legend_rows + 0.6))
    axes = fig.subplots(rows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for i, ax in enumerate(axes.ravel()):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        for s in (s for s in series if s.panel == panels[i]):
            if len(np.unique(s.y_true)) < 2:
                continue
            fpr, tpr, _ = roc_curve(s.y_true, s.y_prob)
            colour = colours[strategies.index(s.strategy)]
            (handles[s.strategy],) = ax.plot(fpr, tpr, color=colour, linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="0.75", linewidth=0.8)
        _style_panel(ax, panels[i], i, len(panels), columns, "False positive rate", "True positive rate")
    fig.suptitle(title, fontsize=10)
    shown = [k for k in strategies if k in handles]
    bottom = (0.25 * legend_rows + 0.3) / fig.get_figheight()
    if shown:
        fig.legend([handles[k] for k in shown], shown, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    return fig


def plot_budget(points: Sequence[BudgetPoint], total: int | None, path: Path) -> Path:
    """Figure 5: average MCC against the number of digital training images, a line per side."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for comparison, style in LINE_STYLES.items():
        mine = sorted((p for p in points if p.comparison == comparison), key=lambda p: p.digital)
        if not mine:
            continue
        x = np.array([p.digital for p in mine])
        y = np.array([p.value for p in mine])
        (line,) = ax.plot(x, y, style, marker="o", label=comparison)
        low, high = np.array([p.ci_low for p in mine]), np.array([p.ci_high for p in mine])
        if np.isfinite(low).all() and np.isfinite(high).all():
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    suffix = f" (of {total} training images)" if total else ""
    ax.set(
        xlabel=f"Digital x-rays in the training set{suffix}",
        ylabel="Average MCC (test)",
        title="MCC vs number of digital images",
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _colours(n: int) -> list[tuple[float, ...]]:
    """n distinguishable colours (tab10, then tab20 for bigger studies)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [tuple(cmap(i % cmap.N)) for i in range(max(n, 1))]


@dataclass(frozen=True)
class ReliabilitySeries:
    """One reliability curve: a strategy's side (Standard, Photos, Film), raw or temperature-scaled."""

    strategy: str
    comparison: str
    scaled: bool
    bins: Any  # evaluation.calibration.Bins: mean_prob, frac_pos, count per bin


def plot_reliability(series: Sequence[ReliabilitySeries], title: str, path: Path, columns: int = 3) -> Path:
    """reliability_grid drawn into the PNG file `path`."""
    return _save(reliability_grid(series, title, columns), path)


def reliability_grid(series: Sequence[ReliabilitySeries], title: str, columns: int = 3) -> Figure:
    """A panel per strategy: observed positive rate against mean predicted probability per bin.

    A colour per comparison; solid as trained, dotted after temperature scaling; the diagonal is
    perfect calibration. Empty bins are skipped. The legend sits below the panels.
    """
    panels = list(dict.fromkeys(s.strategy for s in series))
    sides = list(dict.fromkeys(s.comparison for s in series))
    colours = _colours(len(sides))
    columns = max(1, min(columns, len(panels)))
    rows = max(1, -(-len(panels) // columns))
    fig = Figure(figsize=(3.0 * columns, 2.9 * rows + 0.9))
    axes = fig.subplots(rows, columns, squeeze=False)
    handles: dict[str, object] = {}
    for i, ax in enumerate(axes.ravel()):
        if i >= len(panels):
            ax.set_axis_off()
            continue
        ax.plot([0, 1], [0, 1], color="0.75", linewidth=0.8)
        for s in (s for s in series if s.strategy == panels[i]):
            full = np.asarray(s.bins.count) > 0
            label = f"{s.comparison}{', temperature-scaled' if s.scaled else ''}"
            (handles[label],) = ax.plot(
                np.asarray(s.bins.mean_prob)[full],
                np.asarray(s.bins.frac_pos)[full],
                linestyle=":" if s.scaled else "-",
                marker="o",
                markersize=2.5,
                linewidth=1.2,
                color=colours[sides.index(s.comparison)],
            )
        _style_panel(
            ax, panels[i], i, len(panels), columns, "Mean predicted probability", "Observed positive rate"
        )
    fig.suptitle(title, fontsize=10)
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, frameon=False
        )
    fig.tight_layout(rect=(0, 0.7 / fig.get_figheight(), 1, 0.97))
    return fig


def _style_panel(ax: Any, title: str, i: int, n: int, columns: int, xlabel: str, ylabel: str) -> None:
    """A unit-square panel of a grid: its title, small ticks, y label on the first column and x
    label on the last row (the ROC and reliability figures share this look)."""
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.title.set_fontsize(9)
    ax.tick_params(labelsize=7)
    if i % columns == 0:
        ax.set_ylabel(ylabel, fontsize=8)
    if i >= n - columns:
        ax.set_xlabel(xlabel, fontsize=8)
