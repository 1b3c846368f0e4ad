"""Plotly figures that survive papermill and Jupyter Book, offline, at a page weight that stays readable.

Plotly's default renderer writes only its own JSON mime type, which Jupyter Book 1 drops. `show` writes HTML
instead; the first figure in each kernel embeds plotly.js inline (no CDN), later ones reuse it. In the book
(the runner sets `WEIGHTSCOPE_PLOTLYJS=book` for its kernels) no figure embeds it: the book serves plotly.js
once from its static folder (`publish.book`), so a page carries its figures' data only, not 4.8 MB of
library.

Every point of a scatter or line is embedded in the page: at real width (24,576 features a layer, 12 layers)
that is megabytes per figure. `show` keeps at most `max_points` points per figure (a seeded random sample
kept in each trace's order, so a sorted curve stays sorted) and says so in the figure's title. A distribution
drawn as a cumulative curve need not be sampled: `compute.populations.ecdf_points` gives it exactly at a few
hundred points.
"""

from __future__ import annotations

import os

import numpy as np
import plotly.graph_objects as go
from IPython.display import HTML, display

_plotlyjs_sent = False
PLOTLYJS_ENV = "WEIGHTSCOPE_PLOTLYJS"  # "book": the page's site serves plotly.js, figures do not embed it

TEMPLATE = "plotly_white"
MAX_POINTS = 5000  # points kept per figure, over its scatter, line, box and histogram traces (page weight)
# traces that carry one entry per point (a histogram too: the browser bins the values it is given)
_SAMPLED = ("scatter", "scattergl", "box", "violin", "histogram")
_PER_POINT = ("x", "y", "text", "hovertext", "customdata", "ids")
_PER_POINT_MARKER = ("color", "size", "symbol", "opacity")


def show(fig: go.Figure, *, max_points: int = MAX_POINTS) -> None:
    """Display `fig` as HTML (plotly.js inline once per notebook, except in the book, which serves it), sampled
    to `max_points`."""
    global _plotlyjs_sent
    fig.update_layout(template=TEMPLATE)
    sample_points(fig, max_points)
    one_axis_title(fig)
    embed = not _plotlyjs_sent and os.environ.get(PLOTLYJS_ENV) != "book"
    html = fig.to_html(full_html=False, include_plotlyjs=embed, config={"displaylogo": False})
    _plotlyjs_sent = True
    display(HTML(html))


def sample_points(fig: go.Figure, max_points: int = MAX_POINTS, *, seed: int = 0) -> tuple[int, int]:
    """Keep at most `max_points` points in all of `fig`'s scatter, box and histogram traces (in place), each
    its share in proportion to its size (facets and colours that grow with the layers stay within one
    budget); returns (shown, total).

    The kept points are a seeded random sample in their original order; every per-point array of the trace
    (x, y, text, hover text, custom data, marker colour/size/...) is cut alike. When anything was left out, the
    title gains "(a random sample of <shown> of <total> points)".
    """
    traces = [t for t in fig.data if t.type in _SAMPLED and (t.x is not None or t.y is not None)]
    sizes = [len(t.x if t.x is not None else t.y) for t in traces]
    total = sum(sizes)
    if total <= max_points:
        return total, total
    rng = np.random.default_rng(seed)
    shown = 0
    for trace, n in zip(traces, sizes):
        k = min(n, max(1, round(n * max_points / total)))
        keep = np.sort(rng.choice(n, k, replace=False))
        for name in _PER_POINT:
            _cut(trace, name, n, keep)
        for name in _PER_POINT_MARKER:
            _cut(trace.marker, name, n, keep)
        shown += k
    title = fig.layout.title.text or ""
    fig.update_layout(title_text=f"{title} (a random sample of {shown:,} of {total:,} points)".strip())
    return shown, total


def _cut(obj, name: str, n: int, keep: np.ndarray) -> None:
    """obj.name[keep] when it is a per-point array of length n (a scalar setting is left alone)."""
    value = getattr(obj, name, None)
    if value is None or isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        return
    arr = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
    if len(arr) == n:
        setattr(obj, name, arr[keep])


def one_axis_title(fig: go.Figure, min_facets: int = 3) -> None:
    """Side-by-side facets each repeat the x-axis title, and in narrow facets the titles overlap: where at
    least `min_facets` x-axes of one row carry the same title, keep it on the middle one only (in place)."""
    rows: dict[tuple, list] = {}
    for axis in fig.select_xaxes():
        title, anchor = axis.title.text, axis.anchor or "y"
        if title and anchor.startswith("y"):  # a facet's row is its y-axis's vertical extent
            row = fig.layout["yaxis" + anchor[1:]].domain
            rows.setdefault((title, tuple(row or ())), []).append(axis)
    for axes in rows.values():
        if len(axes) >= min_facets:
            axes.sort(key=lambda a: a.domain[0] if a.domain else 0)
            for axis in axes[:len(axes) // 2] + axes[len(axes) // 2 + 1:]:
                axis.title.text = None
