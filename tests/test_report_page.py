"""The report as a reader sees it: flagged cells, footnotes, figures and a page that fits the window.

The page checks run in headless Chromium (Playwright, /usr/bin/chromium) at 1,280 px and at a
390 px phone width: no sideways scrolling, every table collapsible.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from chextrain.evaluation import figures, tables
from chextrain.evaluation.document import DIFFERENCE_NOTE, FIGURE5_MISSING
from chextrain.evaluation.report import write_report
from tests.test_report import make_study, predictions

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]


def study_without_positives(root: Path) -> Path:
    """make_study's study, with Baseline never predicting Edema at 0.5 on Standard, and no budget stages."""
    out = make_study(root)
    folder = out / "stages" / "baseline"
    for split in ("val", "test"):
        file = folder / f"predictions_{split}.parquet"
        table = pd.read_parquet(file)
        digital = table["dataset"] == "chexpert"
        table.loc[digital, "prob_edema"] = (table.loc[digital, "prob_edema"] * 0.49).astype(np.float32)
        table.to_parquet(file, index=False)
    meta = out / "stages" / "mixed" / "model.json"  # as if initialised from CovidPrognosis MoCo weights
    meta.write_text(
        json.dumps({**json.loads(meta.read_text()), "image_size": 224, "preprocessing": {"name": "histeq"}})
    )
    study = json.loads((out / "study.json").read_text())
    study["stages"] = [s for s in study["stages"] if not s["name"].startswith("budget_")]
    (out / "study.json").write_text(json.dumps(study))
    return out


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = study_without_positives(tmp_path_factory.mktemp("page"))
    write_report(out, n_boot=50, seed=1)
    return out


def test_no_positive_cells_say_so_next_to_the_tuned_thresholds(reported: Path) -> None:
    md = (reported / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| Baseline | Standard |") and "no positives" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == tables.NO_POSITIVE  # the Edema column, MCC at 0.5
    assert "0.000 [0.000, 0.000]" not in md
    table2 = md.index("**Table 2 (test): MCC per pathology**")
    tuned = md.index("MCC at 0.5 vs at tuned thresholds (test)")
    auc = md.index("**Table 2 (test): AUC per pathology**")
    assert table2 < tuned < auc  # the tuned-threshold table sits right after MCC at 0.5
    assert "no positive case at threshold 0.5" in md


def test_difference_footnote_figure5_sentence_and_file_list(reported: Path) -> None:
    md = (reported / "report.md").read_text()
    assert md.count(DIFFERENCE_NOTE) >= 4  # under every Table 1 / Table 2 metric
    assert FIGURE5_MISSING in md  # no budget stages: the command that makes Figure 5
    assert "budget.csv" not in md.split("## Files")[1]  # no file described that holds only a header


def test_roc_figures_one_curve_per_strategy_and_the_legend_outside() -> None:
    rng = np.random.default_rng(0)
    series = []
    for strategy in ("A", "B", "C"):
        for panel in ("Edema", "Atelectasis", "Consolidation", "Cardiomegaly", "Pleural Effusion"):
            y = (rng.random(80) < 0.4).astype(int)
            series.append(figures.RocSeries(strategy, panel, y, rng.random(80)))
    fig = figures.roc_grid(series, "ROC curves: Photos")
    renderer = FigureCanvasAgg(fig).get_renderer()
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 5 and all(len(ax.lines) == 3 + 1 for ax in axes)  # 3 strategies + the diagonal
    legend = fig.legends[0].get_window_extent(renderer)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["A", "B", "C"]
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in axes)


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.parametrize("width", [1280, 390])
def test_page_fits_the_window_without_sideways_scrolling(reported: Path, width: int, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto((reported / "report.html").as_uri())
            shot = tmp_path / f"report_{width}.png"
            page.screenshot(path=str(shot), full_page=True)
            scroll = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
            tables_n = page.eval_on_selector_all("table", "els => els.length")
            details_n = page.eval_on_selector_all("details > .scroll > table", "els => els.length")
            first = page.locator("details").first
            first.locator("summary").click()
            hidden = not first.locator("table").is_visible()
            widest = page.eval_on_selector_all(
                "img", "els => Math.max(...els.map(e => e.getBoundingClientRect().right))"
            )
        finally:
            browser.close()
    assert scroll[0] <= scroll[1], f"page is {scroll[0]} px wide in a {scroll[1]} px window"
    assert tables_n == details_n > 0 and hidden  # every table collapsible
    assert widest <= width
    assert shot.stat().st_size > 10_000


def test_only_saved_files_are_read(reported: Path, tmp_path: Path) -> None:
    """Regenerating a copy gives byte-identical report.md, report.html and tables."""
    copy = tmp_path / "copy"
    shutil.copytree(reported, copy)
    write_report(copy, n_boot=50, seed=1)
    for name in [
        "report.md",
        "report.html",
        *(f"tables/{p.name}" for p in (reported / "tables").glob("*.csv")),
    ]:
        assert (copy / name).read_bytes() == (reported / name).read_bytes(), name
    assert predictions  # the canned tables come from test_report's generator


def test_difference_row_is_standard_minus_photos_as_shown_even_when_some_photos_are_missing() -> None:
    """Defect: the difference computed on paired images only (0.076 shown under 0.333 - 0.176)."""
    table = predictions(np.random.default_rng(5), n_patients=40, skill=1.5, photo_skill=0.7)
    odd = table["patient"].str[-1].astype(int) % 2 == 1
    table = table.loc[~(odd & (table["dataset"] == "chexphoto"))].reset_index(drop=True)  # half lack photos
    found = tables.evaluate_table(table, "toy", n_boot=100, seed=0, kinds=False)
    rows = tables.frame(found.main, tables.COLUMNS).set_index(["comparison", "pathology", "metric"])
    assert found.pairs == (table["dataset"] == "chexphoto").sum()
    for key in ("edema", "cardiomegaly", "average"):
        for metric in ("mcc", "auc"):
            std, photo = rows.loc[("Standard", key, metric)], rows.loc[("Photos", key, metric)]
            diff = rows.loc[("Standard - Photos", key, metric)]
            assert diff["value"] == pytest.approx(std["value"] - photo["value"], abs=1e-12)
            assert diff["ci_low"] <= diff["value"] <= diff["ci_high"]


def test_the_stage_table_says_which_input_each_model_used(reported: Path) -> None:
    md = (reported / "report.md").read_text()
    assert "| Input |" in md
    line = next(x for x in md.splitlines() if x.startswith("| mixed |"))
    assert "| 224 px, histeq |" in line


def test_unfinished_stages_without_a_reason_say_where_they_are() -> None:
    from types import SimpleNamespace

    from chextrain.evaluation.document import stage_rows

    stages = [
        SimpleNamespace(name=n, strategy=n, state=st, reason="", seconds=None, kind="supervised")
        for n, st in (("a", "running"), ("b", "queued"), ("c", "pending"), ("d", "failed"))
    ]
    why = {row[0]: row[-1] for row in stage_rows(stages, {})}
    assert why == {
        "a": "running (still running)",
        "b": "queued (waiting in the scheduler's queue)",
        "c": "pending (not started yet)",
        "d": "failed (no reason recorded)",
    }
