"""What `chextrain predict` prints or writes: one CSV row per image, or a table that fits 80 columns.

The table names each file relative to the files' common folder and, when a name is still too
long, cuts it from the left so that its distinguishing end (the file name) stays; the `+` marks
come with the thresholds they use, and the options that changed the scores (--tta, --domain) are
named under the table. A withheld image (decisions.withhold) shows `-` for each finding and a
line "not scored: REASON" under the table; in the CSV its `{slug}_prob` cells are empty and its
probabilities sit in the `withheld_{slug}_prob` columns (research use only). The photo quality
checks close each CSV row (QUALITY_COLUMNS); in the table a failed one is a warning with its
advice. Standard library and rich only (rich imported inside).
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

TABLE_HEADERS = ("eff.", "edema", "atel.", "cons.", "card.")  # SLUGS, shortened for 80 columns


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def csv_text(results: list[dict[str, Any]]) -> str:
    """One CSV row per image: routing, OOD, withholding, then probability and decision per pathology,
    the warnings, and the withheld probabilities (filled only for withheld rows)."""
    from chextrain.labels import SLUGS

    buf = io.StringIO()
    head = [
        "name",
        "error",
        "head",
        "domain",
        "domain_source",
        "p_photo",
        "router_uncertain",
        "ood_status",
        "ood_score",
        "ood_threshold",
        "flagged",
        "withheld",
        "withheld_reason",
    ]
    writer = csv.writer(buf, lineterminator="\n")
    per = [f"{s}_{k}" for s in SLUGS for k in ("prob", "threshold", "positive")]
    research = [f"withheld_{s}_prob" for s in SLUGS]
    writer.writerow(head + per + ["warnings"] + research + QUALITY_COLUMNS)
    for r in results:
        if "error" in r:
            blanks = len(head) - 2 + len(per) + 1 + len(research) + len(QUALITY_COLUMNS)
            writer.writerow([r["name"], r["error"]] + [""] * blanks)
            continue
        ood = r["ood"]
        row = [
            r["name"],
            "",
            r["head"],
            r["domain"] or "",
            r["domain_source"],
            _fmt(r["p_photo"], 6),
            int(r["router_uncertain"]),
            ood["status"],
            _fmt(ood["score"], 6),
            _fmt(ood["threshold"], 6),
            int(r["flagged"]),
            int(r["withheld"]),
            r["withheld_reason"] or "",
        ]
        for s in SLUGS:
            if r["withheld"]:
                row += ["", _fmt(r["withheld_pathologies"][s]["threshold"], 6), ""]
            else:
                p = r["pathologies"][s]
                row += [_fmt(p["prob"], 6), _fmt(p["threshold"], 6), int(p["positive"])]
        row.append("; ".join(r["warnings"]))
        withheld = r.get("withheld_pathologies", {})
        row += [_fmt(withheld[s]["prob"], 6) if withheld else "" for s in SLUGS]
        writer.writerow(row + quality_cells(r.get("quality")))
    return buf.getvalue()


QUALITY_COLUMNS = [
    "quality",
    "retake",
    "quality_blur",
    "quality_glare",
    "quality_exposure_p10",
    "quality_exposure_p90",
    "quality_size",
    "quality_tilt",
]


def quality_cells(quality: dict[str, Any] | None) -> list[str]:
    """The QUALITY_COLUMNS of one result: pass / fail (empty: not a photo, no checks), the retake
    advice, then each check's value."""
    if not quality:
        return [""] * len(QUALITY_COLUMNS)
    c = quality["checks"]
    low, high = c["exposure"]["value"]["p10"], c["exposure"]["value"]["p90"]
    values = [c["blur"]["value"], c["glare"]["value"], low, high, c["size"]["value"], c["tilt"]["value"]]
    return ["pass" if quality["passed"] else "fail", quality["retake"] or ""] + [_fmt(v, 6) for v in values]


def _short_names(names: list[str]) -> tuple[str, list[str]]:
    """(common folder, names relative to it) so that a table of long paths stays readable."""
    folders = [os.path.dirname(n) for n in names]
    common = os.path.commonpath(folders) if names and all(folders) else ""
    try:
        return common, [os.path.relpath(n, common) if common else n for n in names]
    except ValueError:  # mixed absolute and relative paths
        return "", names


def short_name(name: str, width: int) -> str:
    """`name` cut from the left to `width` characters (a leading "..."), keeping its distinguishing end."""
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def thresholds_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per head used: the threshold at or above which a probability gets its `+`."""
    seen: dict[str, list[float]] = {}
    for r in results:
        if "pathologies" in r and r["head"] not in seen:  # withheld rows have no `+` marks
            seen[r["head"]] = [p["threshold"] for p in r["pathologies"].values()]
    return [
        f"+ at or above, head {head}: "
        + ", ".join(f"{h} {_fmt(v, 2)}" for h, v in zip(TABLE_HEADERS, values, strict=True))
        for head, values in seen.items()
    ]


def print_table(results: list[dict[str, Any]], console: Console, options: list[str] | None = None) -> None:
    """A rich table: file, head, P(photo), OOD, then each pathology's probability (+ = positive),
    followed by the thresholds of the `+` marks, the options that changed the scores and the
    failures and warnings per file."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    common, names = _short_names([r["name"] for r in results])
    rows: list[list[str]] = []  # plain text cells after the file name (markup added below)
    for r in results:
        if "error" in r:
            rows.append(["failed", "", "", *[""] * len(TABLE_HEADERS)])
            continue
        ood = {"uncalibrated": "n/a", "in-distribution": "ok"}.get(r["ood"]["status"], "FLAG")
        p_photo = _fmt(r["p_photo"], 2) + (" ?" if r["router_uncertain"] else "")
        if r["withheld"]:
            cells = ["- "] * len(TABLE_HEADERS)
        else:
            cells = [f"{p['prob']:.2f}{'+' if p['positive'] else ' '}" for p in r["pathologies"].values()]
        rows.append([r["head"], p_photo, ood, *cells])
    headers = ("head", "P(ph)", "OOD", *TABLE_HEADERS)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    # the file column gets what the others leave (each column: its cells, 2 of padding, 1 rule; 2 edges)
    width = max(12, console.width - sum(widths) - 3 * len(widths) - 2)
    table = Table(
        title="chextrain predict",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        caption=f"files under {escape(common)}" if common else None,
    )
    table.add_column("file", no_wrap=True)
    for header, w in zip(headers, widths, strict=True):
        table.add_column(
            header, no_wrap=True, min_width=w, justify="right" if header in TABLE_HEADERS else "left"
        )
    style = {"failed": "red", "FLAG": "red"}
    for name, row in zip(names, rows, strict=True):
        cells = [f"[{style[c]}]{c}[/{style[c]}]" if c in style else escape(c) for c in row]
        cells[1] = cells[1].replace(" ?", " [red]?[/red]")
        table.add_row(escape(short_name(name, width)), *cells)
    console.print(table)
    for line in thresholds_lines(results):
        console.print(escape(line), highlight=False)
    if options:
        console.print("scores changed by: " + escape("; ".join(options)), highlight=False)
    withheld = [(r, name) for r, name in zip(results, names, strict=True) if r.get("withheld")]
    for r, name in withheld:
        console.print(f"{escape(name)}: [yellow]not scored: {escape(r['withheld_reason'])}[/yellow]")
    if withheld:
        console.print("(--score-anyway shows the findings of images that are not scored)", highlight=False)
    for r, name in zip(results, names, strict=True):
        if "error" in r:
            console.print(f"[red]failed[/red] {escape(name)}: {escape(r['error'])}")
        for w in r.get("warnings", []):
            console.print(f"[yellow]warning[/yellow] {escape(name)}: {escape(w)}")
    if any(r.get("ood", {}).get("status") == "uncalibrated" for r in results):
        console.print(
            "note: this bundle has no OOD calibration, so out-of-distribution images are not flagged"
        )
