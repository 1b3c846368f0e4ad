"""Text with per-token colours, as self-contained HTML (no network): DFA's view of which source tokens a
feature read. Introduced in chapter 4 (`notebooks/04_attention_saes.md`)."""

from __future__ import annotations

import html

from IPython.display import HTML, display


def attribution_html(tokens: list[str], values: list[float], *, dest: int, title: str = "") -> str:
    """Tokens coloured by value (red positive, blue negative, scaled by the largest |value|); the destination
    token is boxed; hovering a token shows its value."""
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values)):
        alpha = min(1.0, abs(v) / scale)
        colour = f"rgba(220,50,47,{alpha:.2f})" if v >= 0 else f"rgba(38,139,210,{alpha:.2f})"
        box = "outline:2px solid #333;" if i == dest else ""
        text = html.escape(tok).replace(" ", "&nbsp;") or "&#8203;"
        spans.append(
            f'<span title="position {i}: {v:+.3g}" style="background:{colour};{box}'
            f'padding:1px 0;font-family:monospace">{text}</span>'
        )
    head = f"<div style='font-weight:600;margin-top:.6em'>{html.escape(title)}</div>" if title else ""
    return (
        f"{head}<div style='line-height:1.9;white-space:normal;word-wrap:break-word'>{''.join(spans)}</div>"
    )


def show_attribution(tokens: list[str], values: list[float], *, dest: int, title: str = "") -> None:
    """Display `attribution_html` in a notebook."""
    display(HTML(attribution_html(tokens, values, dest=dest, title=title)))
