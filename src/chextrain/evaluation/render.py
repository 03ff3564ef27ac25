"""A report as a list of blocks, rendered to Markdown and to one self-contained HTML page.

The HTML embeds every figure as a base64 PNG and carries its own CSS: it loads nothing from
anywhere (no scripts, fonts, stylesheets or favicon), so it opens offline and in a headless
browser without console errors. The page fits its window (1,280 px down to a 390 px phone)
without sideways scrolling: each table is a collapsible <details> whose own box scrolls when
it is wider than the window, and figures shrink to the page width.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    """A section title (level 2 = a section of the report)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    """Plain text (escaped in HTML)."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A bulleted list."""

    items: Sequence[str]


@dataclass(frozen=True)
class Callout:
    """A boxed list of notes the reader must not miss (e.g. random init replaced ImageNet)."""

    title: str
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """A table; rows whose first cell is non-empty start a new group (drawn with a rule above)."""

    caption: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric_from: int = 1  # columns from here on are right-aligned
    notes: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Image:
    """A figure: linked from Markdown, inlined as base64 in HTML."""

    caption: str
    path: Path  # a PNG file


Block = Heading | Paragraph | Bullets | Callout | Table | Image

CSS = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 76rem;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; overflow-wrap: anywhere; }
details { margin: 0.6rem 0 1rem; } summary { cursor: pointer; font-weight: 600; font-size: 0.9rem; }
.scroll { overflow-x: auto; max-width: 100%; }
h1 { font-size: 1.7rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: 0.6rem 0 0.3rem; font-size: 0.82rem; }
th, td { padding: 0.22rem 0.45rem; border-bottom: 1px solid #eee; white-space: nowrap;
         overflow-wrap: normal; }
th { background: #f4f4f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.group td { border-top: 2px solid #bbb; }
.callout { border-left: 5px solid #d97706; background: #fff7ed; padding: 0.5rem 1rem; margin: 1rem 0; }
.callout strong { display: block; margin-bottom: 0.2rem; }
.tnote { font-size: 0.78rem; color: #555; margin: 0 0 1rem; }
figure { margin: 0.5rem 0 1rem; max-width: 100%; }
figure img { max-width: min(100%, 62rem); height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85rem; color: #444; }
"""


def to_markdown(title: str, blocks: Sequence[Block], base: Path) -> str:
    """Markdown text; images are linked relative to `base` (the folder of report.md)."""
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Callout):
            out += [f"> **{block.title}**", ">"] + [f"> - {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            rule = ["---" if i < block.numeric_from else "---:" for i in range(len(block.header))]
            out += [f"**{block.caption}**", "", _md_row(block.header), "|" + "|".join(rule) + "|"]
            out += [_md_row(row) for row in block.rows] + [""]
            out += [f"_{note}_" for note in block.notes] + ([""] if block.notes else [])
        elif isinstance(block, Image):
            out += [f"![{block.caption}]({_relative(block.path, base)})", "", f"_{block.caption}_", ""]
    return "\n".join(out).rstrip() + "\n"


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """One self-contained HTML page (figures inlined as data: URIs, no scripts, no external links)."""
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Callout):
            items = "".join(f"<li>{esc(i)}</li>" for i in block.items)
            out.append(f'<div class="callout"><strong>{esc(block.title)}</strong><ul>{items}</ul></div>')
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Image):
            data = base64.b64encode(Path(block.path).read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _html_table(block: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
    body = []
    for row in block.rows:
        cls = ' class="group"' if row and row[0] else ""
        cells = "".join(
            f'<td class="num">{esc(c)}</td>' if i >= block.numeric_from else f"<td>{esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    notes = "".join(f'<p class="tnote">{esc(n)}</p>' for n in block.notes)
    return (
        f'<details open><summary>{esc(block.caption)}</summary><div class="scroll">'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{notes}</details>"
    )


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return Path(path).as_posix()
