"""The book end to end: the chapters execute for the demo target and Jupyter Book builds them with -W.

This is what `make book` does (it reuses the demo SAEs and results cached under data/, so a later `make book`
is quick). Marked slow: the first run on a machine trains the demo SAEs.
"""

import json
import re
import subprocess
import sys

import pytest

from weightscope.publish.book import BOOK, chapter_sources

pytestmark = pytest.mark.slow


def _run_book(*args):
    return subprocess.run([sys.executable, "-m", "weightscope.publish.book", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def built():
    proc = _run_book("--target", "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_summary_line(built):
    last = built.stdout.strip().splitlines()[-1]
    assert re.match(r"book: target demo: \d+ chapter\(s\) executed, \d+ reused, \d+ skipped, in \d+ s; HTML: book/_build/html", last)


def test_every_chapter_executed_without_errors(built):
    for source in chapter_sources():
        nb = json.loads((BOOK / "demo" / f"{source.stem}.ipynb").read_text())
        parameters = nb["metadata"]["weightscope"]["parameters"]
        assert parameters.get("params_file") == "demo"
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                assert out.get("output_type") != "error", (source.stem, out.get("ename"), out.get("evalue"))


def test_every_chapter_page_has_its_figures(built):
    html_dir = BOOK / "_build" / "html"
    assert (html_dir / "index.html").is_file()
    for source in chapter_sources():
        page = (html_dir / "demo" / f"{source.stem}.html").read_text()
        # every figure the page draws unconditionally (an indented one sits under a rule, e.g. chapter 5's
        # `if t.applies:`, and is drawn only where the method applies)
        n_figs = len(re.findall(r"^figures\.show\(", source.read_text(), re.M))
        assert page.count('class="plotly-graph-div"') >= n_figs, source.stem
        external = re.findall(r'<script[^>]+src="(https?://[^"]+)"', page)
        assert not external, f"{source.stem} loads scripts from the network: {external}"  # plotly.js, MathJax are local


def test_second_run_reuses_everything(built):
    proc = _run_book("--target", "demo", "--no-html")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"0 chapter(s) executed, {len(chapter_sources())} reused" in proc.stdout


def test_bad_params_fail_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((BOOK.parent / "params" / "demo.yaml").read_text().replace("dtype: float32", "dtype: float64"))
    proc = _run_book("--target", str(bad))
    assert proc.returncode == 2
    assert "`dtype` is 'float64'" in proc.stderr and "Traceback" not in proc.stderr
    assert "[book" not in proc.stdout  # nothing was executed
