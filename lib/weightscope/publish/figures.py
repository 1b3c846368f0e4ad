"""Plotly figures that survive papermill and Jupyter Book, offline.

Plotly's default renderer writes only its own JSON mime type, which Jupyter Book 1 drops. `show` writes HTML
instead; the first figure in each kernel embeds plotly.js inline (no CDN), later ones reuse it.
"""

from __future__ import annotations

import plotly.graph_objects as go
from IPython.display import HTML, display

_plotlyjs_sent = False

TEMPLATE = "plotly_white"


def show(fig: go.Figure) -> None:
    """Display `fig` as self-contained HTML (plotly.js inline once per notebook)."""
    global _plotlyjs_sent
    fig.update_layout(template=TEMPLATE)
    html = fig.to_html(full_html=False, include_plotlyjs=not _plotlyjs_sent, config={"displaylogo": False})
    _plotlyjs_sent = True
    display(HTML(html))
