"""Execute the chapter notebooks for a target with papermill and build the Jupyter Book.

    python -m weightscope.publish.book --target demo            # prepare, execute every chapter, build HTML
    python -m weightscope.publish.book --target demo --no-html  # execute only

Executed notebooks land in `book/<target>/`; a notebook whose source, parameters, library code and package versions
are unchanged since its last successful run is reused, not re-executed. A failing notebook never replaces the
last good one: it is kept under `data/cache/failed/` for inspection.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from weightscope.config.params import ParamsError, Target, check_overrides, load_target
from weightscope.config.paths import REPO_ROOT, cache_dir
from weightscope.io import atomic_write_bytes, code_fingerprint, versions

NOTEBOOKS = REPO_ROOT / "notebooks"
BOOK = REPO_ROOT / "book"


class _TcpEncryptionNotice(logging.Filter):
    """Drops ipykernel's "Kernel is running over TCP without encryption ..." warning, and nothing else.

    ipykernel (>= 7) logs it on its "IPKernelApp" logger, inside the kernel process, whenever the kernel
    listens on TCP (papermill's default: localhost), so once per chapter. Neither `warnings` nor a logging
    filter in this process can reach it: `_KERNEL_CONFIG` installs this filter in the kernel's own logging.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Kernel is running over TCP without encryption")


# traitlets config for the kernel (`--config`), merged into IPKernelApp's default logging setup; the kernel
# imports the filter by name (not `__name__`, which is "__main__" under `python -m weightscope.publish.book`)
_KERNEL_CONFIG = {"IPKernelApp": {"logging_config": {
    "filters": {"tcp_encryption_notice": {"()": "weightscope.publish.book._TcpEncryptionNotice"}},
    "loggers": {"IPKernelApp": {"filters": ["tcp_encryption_notice"]}},
}}}


def chapter_sources() -> list[Path]:
    """Notebook sources in reading order (`notebooks/NN_*.md`)."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.md"))


def _to_ipynb(source: Path) -> Any:
    import jupytext

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def notebook_defaults(source: Path) -> dict[str, Any]:
    """The parameters a chapter declares (its `parameters` cell), with their default values."""
    nb = _to_ipynb(source)
    for cell in nb.cells:
        if "parameters" in cell.metadata.get("tags", []):
            return _literal_assignments(cell.source, where=source.name)
    return {}


def _literal_assignments(code: str, *, where: str) -> dict[str, Any]:
    out = {}
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                raise ParamsError(f"{where}: parameter `{node.targets[0].id}` must have a literal default.") from None
    return out


def chapter_parameters(target: Target, source: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters injected into one chapter: the target name plus validated overrides."""
    defaults = notebook_defaults(source)
    overrides = {**target.chapter_params(source.stem), **(extra or {})}
    defaults.pop("target", None)  # injected below, never overridden
    merged = check_overrides(defaults, overrides, where=f"{target.path}: chapters.{source.stem}")
    # a params file outside params/ is passed by path; the notebooks resolve it to the target's name
    shipped = target.path is not None and target.path.resolve() == (REPO_ROOT / "params" / f"{target.target}.yaml").resolve()
    merged["target"] = target.target if shipped or target.path is None else str(target.path)
    return merged


def run_key(source: Path, params: dict[str, Any], target: Target) -> str:
    """What a cached execution depends on: the notebook, its parameters, the target file, code and versions."""
    blob = json.dumps(
        {
            "source": source.read_text(),
            "params": params,
            "target": target.as_dict(),
            "code": code_fingerprint(),
            "versions": versions(),
            "env": {k: os.environ.get(k) for k in ("WEIGHTSCOPE_MODELS", "WEIGHTSCOPE_CORPORA", "WEIGHTSCOPE_DATA")},
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stored_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["metadata"].get("weightscope", {}).get("run_key")
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def execute_chapter(target: Target, source: Path, *, extra: dict[str, Any] | None = None, force: bool = False) -> str:
    """Execute one chapter into `book/<target>/<stem>.ipynb`; returns "reused" or "executed"."""
    import nbformat
    import papermill

    params = chapter_parameters(target, source, extra)
    out = BOOK / target.target / f"{source.stem}.ipynb"
    key = run_key(source, params, target)
    if not force and _stored_key(out) == key:
        return "reused"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weightscope-") as tmp:
        src_nb = Path(tmp) / f"{source.stem}.ipynb"
        nbformat.write(_to_ipynb(source), src_nb)
        done = Path(tmp) / "out.ipynb"
        kernel_config = Path(tmp) / "kernel_config.json"
        kernel_config.write_text(json.dumps(_KERNEL_CONFIG))
        try:
            papermill.execute_notebook(
                str(src_nb), str(done), parameters=params, cwd=str(NOTEBOOKS), progress_bar=False,
                kernel_name="python3", log_output=False, extra_arguments=[f"--config={kernel_config}"],
            )
        except papermill.PapermillExecutionError as err:
            kept = _keep_failed(done, target, source)
            raise ChapterFailed(
                f"chapter {source.stem} failed for target {target.target}: {err.ename}: {err.evalue}\n"
                f"  The last good executed notebook (if any) is unchanged; the failed one is kept at {kept}."
            ) from None
        except BaseException:
            _keep_failed(done, target, source)
            raise
        nb = nbformat.read(done, as_version=4)
        _drop_progress_bars(nb)
        _fold_injected_parameters(nb)
        nb.metadata["weightscope"] = {"run_key": key, "parameters": params, "versions": versions()}
        atomic_write_bytes(out, nbformat.writes(nb).encode())
    return "executed"


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|\d+\w* \[\d\d:\d\d")


def _drop_progress_bars(nb) -> None:
    """Remove progress bars from an executed notebook: useful live, noise on a page. They are tqdm's stderr
    text, or (tqdm.auto with ipywidgets) widget outputs, whose saved state would make the page fetch the widget
    manager from a CDN."""
    def is_progress(o) -> bool:
        if o.get("output_type") == "stream":
            return o.get("name") == "stderr" and bool(_PROGRESS.search(o.get("text", "")))
        return "application/vnd.jupyter.widget-view+json" in o.get("data", {})

    for cell in nb.cells:
        if cell.get("cell_type") == "code":
            cell.outputs = [o for o in cell.outputs if not is_progress(o)]
    nb.metadata.pop("widgets", None)


def _fold_injected_parameters(nb) -> None:
    """Papermill's injected-parameters cell shows the values used; fold it on the page (the defaults cell stays)."""
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the chapter, the error and where the notebook is."""


def _keep_failed(done: Path, target: Target, source: Path) -> Path | None:
    """Keep a failed execution under data/cache/failed/<target>/ for inspection (never in the book)."""
    if not done.is_file():
        return None
    failed = cache_dir() / "failed" / target.target / f"{source.stem}.ipynb"
    failed.parent.mkdir(parents=True, exist_ok=True)
    failed.write_bytes(done.read_bytes())
    return failed


def write_toc() -> Path:
    """Write `book/_toc.yml`: the intro, one part per target with executed chapters, then the appendix."""
    import yaml

    parts = []
    for folder in sorted(p for p in BOOK.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        chapters = [{"file": f"{folder.name}/{nb.stem}"} for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb"))]
        if folder.name == "appendix":
            chapters = [{"file": f"appendix/{p.stem}"} for p in sorted(folder.glob("*.md"))]
        if not chapters:
            continue
        caption = "Appendix" if folder.name == "appendix" else _target_title(folder.name)
        parts.append({"caption": caption, "chapters": chapters})
    parts.sort(key=lambda p: (p["caption"] == "Appendix", p["caption"] != _target_title("demo")))
    toc = {"format": "jb-book", "root": "intro", "parts": parts}
    path = BOOK / "_toc.yml"
    atomic_write_bytes(path, ("# Generated by weightscope.publish.book; do not edit.\n" + yaml.safe_dump(toc, sort_keys=False)).encode())
    return path


def _target_title(name: str) -> str:
    try:
        return load_target(name).title
    except ParamsError:
        return name


def _install_mathjax() -> None:
    """Copy MathJax 2.7 (from the jupyter-server-mathjax package) into book/_mathjax, a static path of the book:
    formulas render offline instead of fetching MathJax from a CDN. (Not book/_static: Jupyter Book would add
    every .js file there to every page.)"""
    import shutil

    import jupyter_server_mathjax

    dest = BOOK / "_mathjax" / "mathjax"
    if not (dest / "MathJax.js").is_file():
        src = Path(jupyter_server_mathjax.__file__).parent / "static"
        shutil.copytree(src, dest, dirs_exist_ok=True)


def build_html() -> Path:
    """`jupyter-book build` with warnings as errors; returns the index page."""
    _install_mathjax()
    exe = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(exe), "build", str(BOOK), "-W", "-n", "--keep-going", "--quiet"]
    subprocess.run(cmd, check=True)
    return BOOK / "_build" / "html" / "index.html"


def run(target_name: str, *, chapters: list[str] | None = None, extra: dict[str, Any] | None = None,
        html: bool = True, force: bool = False) -> None:
    """Validate, prepare, execute the chapters in order and build the book, printing progress."""
    t0 = time.time()
    target = load_target(target_name)
    sources = [s for s in chapter_sources() if not chapters or s.stem[:2] in chapters or s.stem in chapters]
    for source in sources:  # every parameter error surfaces before any work
        chapter_parameters(target, source, extra)
    _prepare(target)
    counts = {"executed": 0, "reused": 0}
    for i, source in enumerate(sources, 1):
        print(f"[book {i}/{len(sources)}] {target.target}: {source.stem} ...", flush=True)
        t = time.time()
        status = execute_chapter(target, source, extra=extra, force=force)
        counts[status] += 1
        print(f"[book {i}/{len(sources)}] {target.target}: {source.stem} {status} ({time.time() - t:.0f} s)", flush=True)
    write_toc()
    where = "not built (--no-html)"
    if html:
        print("[book] building HTML with jupyter-book (warnings are errors) ...", flush=True)
        where = str(build_html().relative_to(REPO_ROOT))
    print(
        f"book: target {target.target}: {counts['executed']} chapter(s) executed, {counts['reused']} reused, "
        f"in {time.time() - t0:.0f} s; HTML: {where}",
        flush=True,
    )


def _prepare(target: Target) -> None:
    """Make sure the inputs exist before any notebook runs (the demo SAEs are trained here, once)."""
    if target.sae_source == "demo":
        from weightscope.prepare.demo_saes import ensure_demo_saes

        print("[prepare] demo SAEs (trained once with sae-lens, then cached) ...", flush=True)
        ensure_demo_saes(progress=True)
    attn_source = (target.attn_saes or {}).get("source", "")
    if attn_source.startswith("demo:"):  # the demo attention-output SAEs of chapter 4 (a few minutes, once)
        from weightscope.prepare.demo_saes import ensure_demo_saes

        print(f"[prepare] demo attention SAEs ({attn_source}) ...", flush=True)
        ensure_demo_saes(attn_source.partition(":")[2], progress=True)


def main(argv: list[str] | None = None) -> int:
    from weightscope.prepare.demo_saes import DemoSAEError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="demo", help="parameters file name in params/ (default: demo)")
    parser.add_argument("--chapters", nargs="*", help="only these chapters (numbers like 00 01, or stems)")
    parser.add_argument("--no-html", action="store_true", help="execute notebooks but do not build HTML")
    parser.add_argument("--force", action="store_true", help="re-execute even when a cached run matches")
    args = parser.parse_args(argv)
    try:
        run(args.target, chapters=args.chapters, html=not args.no_html, force=args.force)
    except (ParamsError, FileNotFoundError, PermissionError, DemoSAEError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ChapterFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except subprocess.CalledProcessError:
        print("error: jupyter-book reported warnings or errors (see above); the HTML is incomplete.", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
