"""The demo chapters reproduce their stored outputs (nbval): a change that moves a printed result fails here.

`tests/nbval/NN_*.ipynb` are the demo chapters as the book executed them, outputs kept (sanitized, figures
reduced to a placeholder); `make nbval-refresh` (`tests/nbval_refresh.py`) regenerates them. nbval re-executes
each one in a kernel of this environment (`--nbval-current-env`) with the parameters papermill injected into
it, and compares every cell's outputs with the stored ones after `tests/nbval_sanitize.cfg` has masked what
legitimately varies (figures, durations, absolute paths, memory addresses, progress lines).

Cost, and why all four chapters: re-executing a chapter whose results are cached costs its imports, model
loading, tables and plots, not its analysis. The chapters cache their result tables under data/results/demo
by a key that includes the library's code and the parameters, so a change to the library recomputes them
here (and is checked), while an unchanged library reuses what the book test (test_book.py, which runs first
in `make test`) has just computed. On the shared 2-core development machine (load average above 10), nbval
over chapters 00-03 with the cache warm took 206 s and 372 s in two runs, the book run executing the same
four chapters from scratch 275 s: as much again as the book test, not a multiple of it. Chapter 3's
statistics are the printed results most likely to move silently, so every chapter is checked rather than
only 00-01. Run alone with a cold cache, this file costs a book run.

Two checks come first, each failing with what to do: the references were made from the current chapter sources
(nbval runs the cells stored in a reference, so a chapter edited since would otherwise go unchecked), and from
the demo SAEs the book reads. Those are the pinned ones in `data/demo_saes/`, the same bytes on every machine
(a training reproduces its bytes on one machine only), so the check runs on every fresh clone; it is skipped
only when an input is missing (the demo model or the corpora), and `make test` then says so in its last line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REFERENCES = TESTS / "nbval"
# A chapter's outputs as executed on another processor, where float rounding moved a printed digit: the
# chapter passes if it matches either. Made like a reference (`nbval_refresh.reference`), from the same
# source. None at present: the two pages that had one (chapter 4's DFA errors, chapter 7's kept firings)
# print nothing processor-dependent since.
OTHER = REFERENCES / "other-processors"
SANITIZE = TESTS / "nbval_sanitize.cfg"
sys.path.insert(0, str(TESTS))
from demo_checksums import missing_demo_inputs  # noqa: E402
from nbval_refresh import demo_sae_fingerprint, demo_sae_folders  # noqa: E402

from weightscope.publish.book import chapter_sources  # noqa: E402


def _code_sources(cells) -> list[str]:
    """Code cells' sources, without papermill's injected-parameters cell."""
    return ["".join(c["source"]).strip() for c in cells
            if c["cell_type"] == "code" and "injected-parameters" not in c["metadata"].get("tags", [])]


def _checked() -> list[Path]:
    """The chapter sources nbval checks (the cross-model page prints whatever this machine holds)."""
    from nbval_refresh import NOT_CHECKED

    return [source for source in chapter_sources() if source.stem not in NOT_CHECKED]


def _references() -> list[Path]:
    return [REFERENCES / f"{source.stem}.ipynb" for source in _checked()]


@pytest.mark.slow
def test_every_chapter_has_a_reference_made_from_its_current_source():
    import jupytext

    for source, path in zip(_checked(), _references()):
        assert path.is_file(), f"no nbval reference for {source.name}: run `make nbval-refresh` and commit it"
    sources = {s.stem: s for s in _checked()}
    for path in [*_references(), *sorted(OTHER.glob("*.ipynb"))]:
        source = sources[path.stem]
        stored = _code_sources(json.loads(path.read_text())["cells"])
        assert stored == _code_sources(jupytext.read(source).cells), (
            f"{source.name} changed since its nbval reference {path.relative_to(TESTS)} was made: if the "
            "change is meant, run `make nbval-refresh` and commit tests/nbval/ with it (a reference in "
            f"{OTHER.name}/ is remade only on its processor: delete it there)")


def test_sanitize_file_masks_what_varies_and_nothing_else():
    import re

    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(SANITIZE.read_text())
    assert len(patterns) >= 7

    def clean(text: str) -> str:
        for regex, replace in patterns:
            text = re.sub(regex, replace, text)
        return text

    figure = '<div>  <script>/* plotly.js */</script><div id="4f1c" class="plotly-graph-div"></div></div>'
    assert clean(figure) == "<plotly figure>"
    assert clean("<object at 0x7f3a2c1b9d60>") == "<object at 0xADDRESS>"
    assert clean("done in 12.4 s (3 s per layer)") == "done in DURATION (DURATION per layer)"
    assert clean("/home/someone/weightscope/data/cache/demo_saes/x") == "REPO/data/cache/demo_saes/x"
    computed = "01_token_lens: layer 0 (512 features) ...\n01_token_lens: layer 1 (512 features) ...\n"
    assert clean(computed + "2560 features over 5 layers\n") == "2560 features over 5 layers\n"
    assert clean("  3%|▎         | 1/30 [00:01<00:30]\nafter\n") == "after\n"
    # results are not masked: counts, shares, scores, and words that merely end in s
    kept = "512 features, 5 layers, 0.91 explained, 3.2% semantic, z = 4.5, 291 stories"
    assert clean(kept) == kept
    # sort keys and rounding-level exactness checks are masked; the shown number and a real error are not
    assert clean('<td data-v="0.68537012">0.685</td>') == '<td data-v="">0.685</td>'
    assert clean("largest |parts - act| = 4.6e-07 (fp32)") == "largest |parts - act| = ROUNDING (fp32)"
    for real in ("largest |parts - act| = 3.1e-05", "largest |parts - act| = 0.02", "p = 4.6e-07"):
        assert clean(real) == real
    # the references are stored sanitized, and sanitizing them again changes nothing
    for path in [*_references(), *sorted(OTHER.glob("*.ipynb"))]:
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                texts = [output.get("text", "")] + [v for k, v in output.get("data", {}).items()
                                                     if k.startswith("text/")]
                for text in texts:
                    text = "".join(text)
                    assert clean(text) == text, path.name


@pytest.mark.slow
def test_demo_chapters_reproduce_their_stored_outputs():
    missing = missing_demo_inputs()
    if missing:  # the only skip: without these inputs no chapter can run
        pytest.skip(f"input missing: {'; '.join(missing)}")
    stored = {json.loads(p.read_text())["metadata"]["weightscope"].get("demo_sae_fingerprint")
              for p in _references() if p.is_file()}
    current = demo_sae_fingerprint()
    assert stored == {current}, (
        f"the nbval references were made with other demo SAEs ({sorted(map(str, stored))}) than the book "
        f"reads ({current}: {', '.join(map(str, demo_sae_folders()))}). The shipped references are made from "
        "the pinned SAEs in data/demo_saes/: if those changed on purpose, run `make nbval-refresh` and "
        "commit tests/nbval/; if the book reads a training with other parameters "
        "(data/cache/demo_saes/<config>.json), that training moves the results")
    proc = _nbval(_references())
    # a chapter that differs may match the outputs stored from another processor instead (`OTHER`)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # without colour codes
    failed = sorted(set(re.findall(r"FAILED \S*?([\w.-]+\.ipynb)::", plain)))
    others = [OTHER / name for name in failed if (OTHER / name).is_file()]
    retry = _nbval(others) if proc.returncode != 0 and failed and len(others) == len(failed) else None
    assert proc.returncode == 0 or (retry is not None and retry.returncode == 0), (
        "an executed demo chapter no longer matches its stored outputs (a printed result moved, or new "
        "output). If the change is meant, run `make nbval-refresh` and commit tests/nbval/.\n"
        + proc.stdout[-6000:] + proc.stderr[-2000:]
        + (f"\nThe other processor's outputs ({', '.join(p.name for p in others)}):\n" + retry.stdout[-3000:]
           if retry is not None else ""))


def _nbval(references: list[Path]) -> subprocess.CompletedProcess:
    """nbval over `references`, each re-executed in this environment."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "--nbval-current-env",
         f"--nbval-sanitize-with={SANITIZE}", "-p", "no:cacheprovider", "-q", "--no-header",
         *map(str, references)],
        capture_output=True, text=True,
        # the library's progress lines appear only when work is not cached; the book drops them from pages
        env={**os.environ, "WEIGHTSCOPE_PROGRESS": "0"})
