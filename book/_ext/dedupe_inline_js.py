"""Sphinx extension: drop duplicate <script> entries from every HTML page.

Sphinx 7.4 (the series Jupyter Book 1.0.4 uses) adds an inline script registered by an extension *after* the
HTML builder was initialised twice: `Sphinx.add_js_file(None, body=...)` hands the builder a `None` filename,
while `StandaloneHTMLBuilder.prepare_writing` re-adds the same registry entry with `''`, and `None != ''`
defeats the builder's de-duplication (sphinx-doc/sphinx#13402, fixed in Sphinx 8.2). sphinx-thebe 0.3.1
registers `const THEBE_JS_URL = ...` that way, so every page threw
`Uncaught SyntaxError: Identifier 'THEBE_JS_URL' has already been declared` (sphinx-togglebutton's
`var togglebuttonSelector` is doubled the same way, harmlessly). Harmless to keep once Sphinx is fixed.
"""

from __future__ import annotations

from typing import Any


def _dedupe_scripts(app, pagename: str, templatename: str, context: dict[str, Any], doctree) -> None:
    """Keep the first of any scripts that differ only by a `None`/`''` filename (in place: the builder
    restores its list before each page, so this runs per page)."""
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen: set[tuple] = set()
    unique = []
    for js in scripts:
        if isinstance(js, str):  # a template may hand plain file names; keep them as they are
            unique.append(js)
            continue
        key = (js.filename or "", js.priority, tuple(sorted(js.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", _dedupe_scripts, priority=900)  # after extensions that add page scripts
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
