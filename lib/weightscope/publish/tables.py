"""Tables a reader can sort and export, rendered as plain HTML that needs no network.

`show(df)` writes an HTML table whose column headers sort on click, with a link that downloads the table as CSV.
"""

from __future__ import annotations

import base64
import html
import itertools

import numpy as np
import pandas as pd
from IPython.display import HTML, display

_ids = itertools.count()

_SORT_JS = """
<script>
function wsSort(th){const t=th.closest('table'),b=t.tBodies[0],i=[...th.parentNode.children].indexOf(th);
const asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
const v=r=>{const s=r.children[i].dataset.v??r.children[i].innerText;const n=parseFloat(s);return isNaN(n)?s:n;};
[...b.rows].sort((x,y)=>{const a=v(x),c=v(y);return (a>c?1:a<c?-1:0)*(asc?1:-1);}).forEach(r=>b.appendChild(r));}
</script>
"""


def to_html(df: pd.DataFrame, *, name: str = "table", max_rows: int = 200, float_digits: int = 3) -> str:
    """HTML for `df` (first `max_rows` rows shown; the CSV link carries them all)."""
    uid = next(_ids)
    csv = base64.b64encode(df.to_csv(index=False).encode()).decode()
    # a long column name may break after its underscores, so a wide table fits the page
    head = "".join(f'<th onclick="wsSort(this)" title="click to sort">{_header(c)} &#8645;</th>' for c in df.columns)
    rows = []
    for row in df.head(max_rows).itertuples(index=False):  # keeps each column's dtype (iterrows upcasts ints)
        cells = "".join(_cell(v, float_digits) for v in row)
        rows.append(f"<tr>{cells}</tr>")
    more = f" (first {max_rows} of {len(df)} rows shown)" if len(df) > max_rows else ""
    return (
        f'{_SORT_JS}<div class="ws-table" id="ws-table-{uid}" style="overflow-x:auto">'
        f'<table class="dataframe"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p><a download="{html.escape(name)}.csv" href="data:text/csv;base64,{csv}">Download as CSV</a>'
        f" &middot; click a column header to sort{more}</p></div>"
    )


def _header(name) -> str:
    return html.escape(str(name)).replace("_", "_<wbr>")


def _cell(value, digits: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return f"<td>{bool(value)}</td>"
    if isinstance(value, (int, np.integer)):
        return f'<td data-v="{int(value)}">{int(value):,}</td>'
    if isinstance(value, (float, np.floating)):
        return f'<td data-v="{float(value)!r}">{human_number(float(value), digits)}</td>'
    text = str(value)
    if text.startswith("<a ") and text.endswith("</a>"):  # links made by the library are already HTML
        return f"<td>{text}</td>"
    return f"<td>{html.escape(text)}</td>"


def human_number(x: float, digits: int = 3) -> str:
    """1500000.0 -> '1,500,000'; 0.91234 -> '0.912'; 3.0 -> '3'; tiny values keep an exponent; NaN -> ''."""
    if x != x:
        return ""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if x != 0 and abs(x) < 1e-3:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def show(df: pd.DataFrame, *, name: str = "table", max_rows: int = 200) -> None:
    """Display `df` as a sortable, exportable table."""
    display(HTML(to_html(df, name=name, max_rows=max_rows)))
