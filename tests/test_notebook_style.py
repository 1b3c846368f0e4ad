"""Notebook style: every line of a code cell fits the book's code width.

The book's stylesheet (`book/_css/weightscope.css`) shows about 97 characters of code per line on a
1400-pixel window; longer lines scroll sideways. This reads the MyST sources directly (no kernel, no
jupytext), so it is fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

MAX_CODE_WIDTH = 97
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


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
