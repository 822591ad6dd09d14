"""The HTML page that ``report.html`` and ``compare.html`` share: one skeleton, plotly.js once.

A page is self-contained: plotly.js is embedded with the first figure and the others reuse it,
so the file opens offline and can be copied or mailed alone. Every page carries
:data:`GENERATOR_MARK`, by which a later command knows a page as its own to replace.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

import plotly.graph_objects as go

from sofim_tune.errors import UserInputError
from sofim_tune.files import read_head

__all__ = ["FIGURE_HEIGHT", "GENERATOR_MARK", "figure_page", "figure_sections", "html_page", "is_our_page"]

FIGURE_HEIGHT = 460  # px, every figure of every page
GENERATOR_MARK = '<meta name="generator" content="sofim-tune">'
# Pages written before the mark existed: report.html, compare.html and compare-summary.html by
# their title, the single-figure pages under plots/ by the plotly.js beside them that they load.
_EARLIER_MARKS = ("<title>sofim-tune ", '<script charset="utf-8" src="plotly.min.js"></script>')
_HEAD_BYTES = 64 * 1024  # the mark is in the head; a plotly page loads plotly.js within its first KiB

_STYLE = """body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.8em; }
.small { font-size: 0.85em; color: #555; }
section { margin-top: 2em; }"""


def html_page(title: str, body: str, *, style: str = "") -> str:
    """A whole HTML document: ``title`` (plain text, escaped here), ``body`` (HTML) and CSS rules of the page's own after the shared ones."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{GENERATOR_MARK}
<title>{html.escape(title)}</title>
<style>
{_STYLE}
{style}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def figure_sections(figures: Iterable[tuple[str, go.Figure, str]]) -> str:
    """One ``<section id=NAME>`` per ``(name, figure, explanation)``: the explanation (plain text) above the figure ``fig-NAME``."""
    parts = []
    for i, (name, fig, explain) in enumerate(figures):
        fig.update_layout(height=FIGURE_HEIGHT)
        # plotly.js goes in once, with the first figure; the rest reuse it.
        div = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"fig-{name}", default_height=f"{FIGURE_HEIGHT}px")
        parts.append(f'<section id="{name}"><p class="small">{html.escape(explain)}</p>{div}</section>')
    return "\n".join(parts)


def figure_page(fig: go.Figure) -> str:
    """One figure as a whole page that loads ``plotly.min.js`` from its own folder (``plots/``)."""
    page = fig.to_html(include_plotlyjs="directory", full_html=True)
    return page.replace("<head>", f"<head>\n    {GENERATOR_MARK}", 1)


def is_our_page(path: str | Path) -> bool:
    """Whether ``path`` is an HTML page sofim-tune wrote (a regular file carrying its mark).

    False for anything else, a missing or unreadable file included: the caller decides.
    """
    try:
        data = read_head(path, _HEAD_BYTES)
    except UserInputError:
        return False
    if data is None:
        return False
    head = data.decode("utf-8", errors="replace")
    return GENERATOR_MARK in head or any(mark in head for mark in _EARLIER_MARKS)
