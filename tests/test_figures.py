"""Page weight: figures keep a bounded sample of points and say so."""

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

from weightscope.publish import figures


def test_large_scatter_is_sampled_consistently_and_the_title_says_so():
    n = 12_000
    x = np.arange(n, dtype=float)
    fig = go.Figure(go.Scatter(x=x, y=2 * x, text=[f"t{i}" for i in range(n)], mode="markers",
                               marker={"color": x}))
    fig.update_layout(title_text="scores")
    shown, total = figures.sample_points(fig, 1000)
    trace = fig.data[0]
    assert (shown, total) == (1000, n)
    assert len(trace.x) == len(trace.y) == len(trace.text) == len(trace.marker.color) == 1000
    assert np.all(np.diff(trace.x) > 0)  # order kept
    assert np.array_equal(np.asarray(trace.y), 2 * np.asarray(trace.x))  # rows cut alike
    assert [f"t{int(v)}" for v in trace.x] == list(trace.text)
    assert "random sample of 1,000 of 12,000 points" in fig.layout.title.text


def test_small_figures_and_heatmaps_are_left_alone():
    fig = px.scatter(x=[1, 2, 3], y=[3, 2, 1], title="small")
    fig.add_trace(go.Heatmap(z=np.ones((200, 200))))
    assert figures.sample_points(fig, 2) == (2, 3) and fig.layout.title.text.endswith("of 3 points)")
    fig = px.scatter(x=[1, 2, 3], y=[3, 2, 1], title="small")
    assert figures.sample_points(fig, 10) == (3, 3) and fig.layout.title.text == "small"


def test_side_by_side_facets_show_their_x_title_once():
    """Five facets in a row repeat one x title five times (overlapping in narrow facets): kept once, in the
    middle; two facets, or one plot, keep theirs."""
    import pandas as pd
    import plotly.express as px

    from weightscope.publish.figures import one_axis_title

    df = pd.DataFrame({"x": range(40), "y": range(40), "f": [i % 5 for i in range(40)],
                       "r": [i % 2 for i in range(40)]})
    fig = px.scatter(df, x="x", y="y", facet_col="f", facet_row="r", labels={"x": "base rate"})
    one_axis_title(fig)
    titles = [a.title.text for a in fig.select_xaxes()]
    assert titles.count("base rate") == 1 and titles[2] == "base rate"  # the bottom row's middle facet
    two = px.scatter(df, x="x", y="y", facet_col="r")
    one_axis_title(two)
    assert [a.title.text for a in two.select_xaxes()] == ["x", "x"]


def test_figures_leave_plotly_js_to_the_book_when_the_runner_says_so(monkeypatch, capsys):
    """A notebook of its own embeds plotly.js in its first figure; the book's kernels (WEIGHTSCOPE_PLOTLYJS=book)
    embed it nowhere, because the book serves it once."""
    import plotly.express as px
    from IPython.core.interactiveshell import InteractiveShell  # noqa: F401  (display needs IPython only)

    shown = []
    monkeypatch.setattr(figures, "display", lambda obj: shown.append(obj.data))
    for env in (None, "book"):
        monkeypatch.setattr(figures, "_plotlyjs_sent", False)
        if env:
            monkeypatch.setenv(figures.PLOTLYJS_ENV, env)
        figures.show(px.scatter(x=[1, 2], y=[2, 1]))
        figures.show(px.scatter(x=[1, 2], y=[2, 1]))
    embedded = ["plotly.js v" in html for html in shown]
    assert embedded == [True, False, False, False]


def test_the_budget_is_per_figure_over_facets_colours_and_boxes():
    """Facets and colours that grow with the layers share one budget, in proportion to their sizes; box
    traces (one value per point) are sampled too."""
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.random(9000), "y": rng.random(9000),
                       "layer": np.repeat([0, 1, 2], 3000), "kind": np.tile(["a", "b", "b"], 3000)})
    fig = px.scatter(df, x="x", y="y", facet_col="layer", color="kind", title="facets")
    shown, total = figures.sample_points(fig, 900)
    sizes = sorted(len(t.x) for t in fig.data)
    assert total == 9000 and shown == sum(sizes) == 900
    assert sizes == [100, 100, 100, 200, 200, 200]  # each trace its share: "b" is twice "a"
    box = px.box(df, x="kind", y="y", points=False, title="box")
    assert figures.sample_points(box, 900) == (900, 9000) and len(box.data[0].y) == 900
    assert len(box.data[0].x) == 900 and "of 9,000 points" in box.layout.title.text
    # a histogram embeds every value (the browser bins them): chapter 6's weighed 3.4 MB at 12 blocks
    hist = px.histogram(df, x="x", color="kind", facet_col="layer", histnorm="probability")
    assert figures.sample_points(hist, 900) == (900, 9000) and sum(len(t.x) for t in hist.data) == 900
