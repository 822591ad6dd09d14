"""The HTML page that ``report.html`` and ``compare.html`` share: one skeleton, plotly.js once.

A page is self-contained: plotly.js is embedded with the first figure and the others reuse it,
so the file opens offline and can be copied or mailed alone.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

import plotly.graph_objects as go

__all__ = ["FIGURE_HEIGHT", "figure_sections", "html_page"]

FIGURE_HEIGHT = 460  # px, every figure of every page

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
