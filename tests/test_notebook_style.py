"""Notebook style: the rules chapters 1–3 follow, for every chapter notebook.

- Every line of a code cell fits the book's code width: the book's stylesheet (`book/_css/weightscope.css`)
  shows about 97 characters of code per line on a 1400-pixel window; longer lines scroll sideways.
- A code cell is short enough to read aloud (`MAX_CELL_LINES` non-blank lines): analysis longer than that
  belongs in the chapter's module, where it is unit-tested.
- A `## Setup` section holds the parameters cell and the opening (`open_chapter`), in cells whose code is
  hidden on the page (`hide-input`), so that the page reads as an article.

This reads the MyST sources directly (no kernel, no jupytext), so it is fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MAX_CODE_WIDTH = 97
PAGES = {"90_cross_model"}  # pages that read every target's tables and open no chapter
MAX_CELL_LINES = 15  # the longest code cell of chapters 1-3
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def _marked(paths):
    return [pytest.param(p, id=p.name) for p in paths]


def long_code_lines(path: Path, limit: int = MAX_CODE_WIDTH) -> list[tuple[int, int]]:
    """(line number, length) of every line inside a ```{code-cell} block that is longer than `limit`."""
    found = []
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```{code-cell}"):
            in_code = True
            continue
        if line.startswith("```"):
            in_code = False
            continue
        if in_code and len(line) > limit:
            found.append((number, len(line)))
    return found


def _report(path: Path, found: list[tuple[int, int]]) -> str:
    where = "\n".join(f"  {path.name}:{n}: {length} characters" for n, length in found)
    return f"code-cell lines longer than {MAX_CODE_WIDTH} characters in {path.name}:\n{where}"


def test_chapters_found():
    assert CHAPTERS, f"no notebooks/[0-9][0-9]_*.md under {NOTEBOOKS}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_code_cells_fit_the_book_width(path: Path):
    found = long_code_lines(path)
    assert not found, _report(path, found)


def test_the_check_sees_long_lines(tmp_path: Path):
    nb = tmp_path / "99_probe.md"
    nb.write_text(
        "# Title\n\n" + "prose " * 30 + "\n\n"  # long markdown prose is not checked
        "```{code-cell} ipython3\n"
        "x = 1\n"
        + "y = " + "1" * (MAX_CODE_WIDTH - 4) + "\n"  # exactly the limit: fine
        + "z = " + "2" * (MAX_CODE_WIDTH - 3) + "\n"  # one over
        "```\n\n" + "after " * 30 + "\n",
        encoding="utf-8",
    )
    assert long_code_lines(nb) == [(8, MAX_CODE_WIDTH + 1)]


# --- cell length and the hidden setup section ---


def cells(path: Path) -> list[dict]:
    """The notebook's code cells in order: {"line", "tags", "code" (lines), "section" (the `## ` heading
    above it, "" before the first)}."""
    out, section, cell = [], "", None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if cell is None and line.startswith("## "):
            section = line[3:].strip()
        elif cell is None and line.startswith("```{code-cell}"):
            cell = {"line": number, "tags": [], "code": [], "section": section}
        elif cell is not None and line.startswith("```"):
            out.append(cell)
            cell = None
        elif cell is not None and line.startswith(":tags:"):
            cell["tags"] = [t.strip() for t in line.partition(":tags:")[2].strip(" []").split(",")]
        elif cell is not None:
            cell["code"].append(line)
    return out


def style_problems(path: Path) -> list[str]:
    """Where `path` breaks the cell-length or setup rules, one line each."""
    out = []
    for cell in cells(path):
        n = sum(1 for line in cell["code"] if line.strip())
        if n > MAX_CELL_LINES and "parameters" not in cell["tags"]:  # parameters: one line each, any number
            out.append(f"{path.name}:{cell['line']}: code cell of {n} lines (at most {MAX_CELL_LINES}); move "
                       "the analysis into the chapter's module")
    setup = [c for c in cells(path) if c["section"] == "Setup"]
    if not setup:
        return out + [f"{path.name}: no `## Setup` section"]
    if not any("parameters" in c["tags"] for c in setup):
        out.append(f"{path.name}: the parameters cell is not in the Setup section")
    out += [f"{path.name}:{c['line']}: a Setup cell whose code is shown (tag it hide-input)"
            for c in setup if "parameters" not in c["tags"] and "hide-input" not in c["tags"]]
    opening = [c for c in cells(path) if any("open_chapter(" in line for line in c["code"])]
    if (not opening and path.stem not in PAGES) or any(c not in setup for c in opening):
        out.append(f"{path.name}: open_chapter is not called in the hidden Setup section")
    return out


@pytest.mark.parametrize("path", _marked(CHAPTERS))
def test_cells_are_short_and_setup_is_hidden(path: Path):
    problems = style_problems(path)
    assert not problems, "\n".join(problems)


def test_the_style_check_sees_long_cells_and_shown_setup(tmp_path: Path):
    def notebook(setup_tags: str, body_lines: int) -> Path:
        nb = tmp_path / "99_probe.md"
        nb.write_text(
            "# Title\n\n## Setup\n\n```{code-cell} ipython3\n:tags: [parameters]\n\nparams_file = 'demo'\n```\n\n"
            f"```{{code-cell}} ipython3\n{setup_tags}\nctx = open_chapter(params_file)\n```\n\n## Results\n\n"
            "```{code-cell} ipython3\n" + "x = 1\n\n" * body_lines + "```\n", encoding="utf-8")
        return nb

    assert style_problems(notebook(":tags: [hide-input]", MAX_CELL_LINES)) == []
    assert style_problems(notebook("", MAX_CELL_LINES + 1)) == [
        f"99_probe.md:18: code cell of {MAX_CELL_LINES + 1} lines (at most {MAX_CELL_LINES}); move the "
        "analysis into the chapter's module",
        "99_probe.md:11: a Setup cell whose code is shown (tag it hide-input)"]
    no_setup = tmp_path / "98_probe.md"
    no_setup.write_text("# Title\n\n```{code-cell} ipython3\nctx = open_chapter(params_file)\n```\n")
    assert style_problems(no_setup) == ["98_probe.md: no `## Setup` section"]
