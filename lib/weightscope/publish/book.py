"""Execute the chapter notebooks for a target with papermill and build the Jupyter Book.

    python -m weightscope.publish.book --target demo            # prepare, execute every chapter, build HTML
    python -m weightscope.publish.book --target demo --no-html  # execute only

Executed notebooks land in `book/<target>/`; a notebook whose source, parameters, library code and package versions
are unchanged since its last successful run, and whose cached artefacts (result tables, demo SAEs) still have
the checksums it saw, is reused, not re-executed. A failing notebook never replaces the last good one: it is
kept under `data/cache/failed/` for inspection.

Before any work the pre-flight (`weightscope.publish.preflight`) lists every problem with the target at once.
One run per target at a time (a second one is refused); the HTML build and the demo-SAE cache are shared, so a
second run waits for them. Exit codes (the last line printed is the project's one-line message):

    0  done                             4  jupyter-book reported warnings or errors
    2  bad parameters or inputs          5  another run of this target is in progress
    3  a chapter failed (or its kernel died)  6  cannot write: no space left, or no permission
    130  interrupted (Ctrl-C): finished work is kept, a rerun resumes

`WEIGHTSCOPE_NOTEBOOKS` and `WEIGHTSCOPE_BOOK` point the runner at another notebook folder or book folder.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from weightscope.config.params import (NOTEBOOK_PARAMETERS, PARAMS_DIR, PARAMS_FILE, ParamsError, Target,
                                       check_overrides, load_target)
from weightscope.chapters.context import input_files
from weightscope.compute.streaming import LINES
from weightscope.config.paths import REPO_ROOT, cache_dir, corpora_dir, data_dir, models_dir, progress_enabled
from weightscope.io import (ARTIFACT_LOG, Busy, CacheError, StorageError, atomic_write_bytes,
                            atomic_write_json, code_fingerprint, file_lock, file_sha256, read_artifact_log,
                            stale_artifacts, versions)
from weightscope.load.llama2c import Llama2cFileError
from weightscope.load.saes import SAEError, demo_sae_folder
from weightscope.prepare.demo_saes import DemoSAEError, ensure_demo_saes
from weightscope.publish.figures import PLOTLYJS_ENV
from weightscope.publish.preflight import PreflightError, preflight, resolve_target, skipped_chapters

NOTEBOOKS = Path(os.environ.get("WEIGHTSCOPE_NOTEBOOKS") or REPO_ROOT / "notebooks")
BOOK = Path(os.environ.get("WEIGHTSCOPE_BOOK") or REPO_ROOT / "book")
# glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), so freed activations and
# score blocks of a few to 32 MB stay in the heap, fragmented, and the kernel's resident set keeps what it no
# longer uses; a fixed threshold returns them (appendix "Benchmarks", section 13). Fixing it also stops glibc
# adjusting its trim threshold, left at 128 kB: every freed block at the heap's top went back to the system
# and was faulted in again at the next allocation (chapter 3's bootstraps at 12 blocks: 99 s without either
# setting, 160 s with the mmap threshold alone, 91 s with both); the trim threshold glibc's own adjustment
# would set, twice the mmap threshold, keeps that slack. A value the user set wins, for each of the two.
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(32 << 20)}
BUILD_STAMP = ".weightscope-complete.json"  # in book/_build: written last by a build that finished
RUN_STATUS = ".run.json"  # in book/<target>: how the target's last run ended ("ok" or "failed")


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


def chapter_parameters(params: Target, source: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parameters injected into one chapter: the parameters file (`params_file`) plus validated overrides."""
    defaults = notebook_defaults(source)
    overrides = {**params.chapter_params(source.stem), **(extra or {})}
    for n in NOTEBOOK_PARAMETERS:  # the parameters file is injected below, never overridden
        defaults.pop(n, None)
    merged = check_overrides(defaults, overrides, where=f"{params.path}: chapters.{source.stem}")
    # a params file outside params/ is passed by path; the notebooks resolve it to the target's name
    shipped_file = (PARAMS_DIR / f"{params.target}.yaml").resolve()
    shipped = params.path is not None and params.path.resolve() == shipped_file
    merged[PARAMS_FILE] = params.target if shipped or params.path is None else str(params.path)
    return merged


def run_key(source: Path, params: dict[str, Any], target: Target) -> str:
    """What a cached execution depends on: the notebook, its parameters, the target file, its local input files,
    code and versions."""
    blob = json.dumps(
        {
            "source": source.read_text(),
            "params": params,
            "target": target.as_dict(),
            "input_files": input_files(target),
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

    from nbclient.exceptions import DeadKernelError

    params = chapter_parameters(target, source, extra)
    out = BOOK / target.target / f"{source.stem}.ipynb"
    key = run_key(source, params, target)
    if not force and _stored_key(out) == key:
        stale = stale_artifacts({_expand_path(p): digest for p, digest in _stored_artifacts(out).items()})
        if not stale:
            return "reused"
        print(f"[book] {source.stem}: cached artefact(s) missing or damaged since its last run: "
              f"{', '.join(_display_path(p) for p in stale)}; re-executing", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="weightscope-") as tmp:
        src_nb = Path(tmp) / f"{source.stem}.ipynb"
        nbformat.write(_to_ipynb(source), src_nb)
        done = Path(tmp) / "out.ipynb"
        kernel_config = Path(tmp) / "kernel_config.json"
        kernel_config.write_text(json.dumps(_KERNEL_CONFIG))
        log = Path(tmp) / "artifacts.jsonl"
        os.environ[ARTIFACT_LOG] = str(log)  # the kernel inherits it: io notes every table it reads or writes
        os.environ[PLOTLYJS_ENV] = "book"  # and its figures leave plotly.js to the book (`_install_plotlyjs`)
        set_malloc = {k: v for k, v in MALLOC_SETTINGS.items() if k not in os.environ}
        os.environ.update(set_malloc)  # read by the kernel's C library when it starts
        if progress_enabled():  # a kernel's bars are widgets, which never reach this terminal: lines instead
            os.environ["WEIGHTSCOPE_PROGRESS"] = LINES
        where = f"chapter {source.stem} failed for target {target.target}"
        kernel_log = cache_dir() / "logs" / target.target / f"{source.stem}.kernel.log"
        kernel_log.parent.mkdir(parents=True, exist_ok=True)
        heard = _Heard()
        # papermill adds a cell with the parameters: one more code cell than the chapter's own
        n_cells = sum(c.cell_type == "code" for c in nbformat.read(src_nb, as_version=4).cells) + 1
        beat = _PageHeartbeat(source.stem, n_cells, heard) if progress_enabled() else None
        try:
            papermill.execute_notebook(
                str(src_nb), str(done), parameters=params, cwd=str(NOTEBOOKS), progress_bar=False,
                kernel_name="python3", log_output=False, extra_arguments=[f"--config={kernel_config}"],
                kernel_manager_class=_kernel_manager_class(kernel_log), on_cell_executed=beat,
                stdout_file=_ProgressRelay(source.stem, heard),
                stderr_file=_ProgressRelay(source.stem, heard),
            )
        except papermill.PapermillExecutionError as err:
            kept = _keep_failed(done, target, source)
            if err.ename == "KeyboardInterrupt":
                raise KeyboardInterrupt from None
            raise ChapterFailed(
                f"{where}: {err.ename}: {err.evalue}\n"
                f"  The last good executed notebook (if any) is unchanged; the failed one is kept at {kept}.",
                ename=err.ename,
            ) from None
        except DeadKernelError:
            _keep_failed(done, target, source)
            raise ChapterFailed(
                f"{where}: its kernel died (most often the out-of-memory killer; its log: {kernel_log}). "
                f"Free memory, analyse fewer `layers:`, or use a GPU; a rerun resumes at the first layer "
                f"without a result.",
                ename="DeadKernelError",
            ) from None
        except BaseException:
            _keep_failed(done, target, source)
            raise
        finally:
            os.environ.pop(ARTIFACT_LOG, None)
            os.environ.pop(PLOTLYJS_ENV, None)
            for name in set_malloc:
                os.environ.pop(name, None)
        nb = nbformat.read(done, as_version=4)
        _drop_progress_bars(nb)
        _fold_injected_parameters(nb)
        scrub_local_paths(nb)
        used = {**read_artifact_log(log), **_demo_sae_artifacts(target)}
        artifacts = {_display_path(path): digest for path, digest in used.items()}
        nb.metadata["weightscope"] = {"run_key": key, "parameters": _scrubbed(params), "versions": versions(),
                                      "artifacts": artifacts}
        atomic_write_bytes(out, nbformat.writes(nb).encode())
    return "executed"


# What of a chapter's output reaches the terminal while it runs: the library's progress lines ("[weights] 3/26
# [block 2] read", "[saes] ...", "01_token_lens: layer 3 (16384 features) ...", waits and warnings)
_PROGRESS_START = r"\[(weights|saes|model|progress)\] |\d\d_[a-z0-9_]+: |\S+: layer \d+ \("
_RELAYED = re.compile(rf"^({_PROGRESS_START}|waiting: |warning: )")
_PROGRESS_LINE = re.compile(rf"^({_PROGRESS_START}).*\n?", re.M)  # dropped from pages


class _Heard:
    """When the runner last printed one of a chapter's lines (its relays and its page heartbeat share one)."""

    def __init__(self, clock=time.monotonic):
        self.clock, self.at = clock, clock()

    def say(self, stem: str, line: str) -> None:
        print(f"  {stem} | {line}", flush=True)
        self.at = self.clock()


class _ProgressRelay:
    """A stream papermill writes a chapter's stdout or stderr to as it runs: prints the progress lines of
    `_RELAYED`, prefixed with the chapter, so a long chapter is not silent until it ends; the rest stays in the
    notebook (progress bars are dropped from the page later)."""

    def __init__(self, stem: str, heard: _Heard | None = None):
        self.stem, self.pending, self.heard = stem, "", heard or _Heard()

    def write(self, text: str) -> None:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]
            if _RELAYED.match(line):
                self.heard.say(self.stem, line)

    def flush(self) -> None:
        pass


PAGE_BEAT_S = 5.0  # a quiet terminal this long gets a line after the next code cell


class _PageHeartbeat:
    """nbclient's `on_cell_executed` hook: after a code cell, when the terminal has been quiet for
    `PAGE_BEAT_S`, one line `[page] n/m code cells run`. The cells that draw a page's tables and figures print
    nothing, each a second or two, and together they left a chapter's last 10-15 s silent at a real width."""

    def __init__(self, stem: str, n_cells: int, heard: _Heard):
        self.stem, self.n_cells, self.heard, self.done = stem, n_cells, heard, 0

    def __call__(self, **cell) -> None:
        self.done += 1
        if self.heard.clock() - self.heard.at >= PAGE_BEAT_S:
            self.heard.say(self.stem, f"[page] {self.done}/{self.n_cells} code cells run")


def _kernel_manager_class(log: Path):
    """A kernel manager whose kernel writes its own stderr (ipykernel's log, e.g. its report of a Ctrl-C) to
    `log` instead of the terminal, so that the runner's one-line message stays the last thing printed."""
    from jupyter_client.manager import AsyncKernelManager

    class KernelWithLog(AsyncKernelManager):
        async def start_kernel(self, **kw):
            with open(log, "ab") as handle:  # the kernel process keeps its own copy of the descriptor
                await self._async_start_kernel(stderr=handle, **kw)

    return KernelWithLog


def _stored_artifacts(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())["metadata"]["weightscope"].get("artifacts", {})
    except (OSError, ValueError, KeyError):
        return {}


def _demo_sae_artifacts(target: Target) -> dict[str, str]:
    """{file: sha256} of the demo SAEs that a demo target's chapters read (checked when one is reused)."""
    if target.sae_source != "demo":
        return {}
    try:
        folder = demo_sae_folder()
    except SAEError:
        return {}
    return {str(f.resolve()): file_sha256(f) for f in sorted(folder.glob("layer_*/sae_weights.safetensors"))}


def _local_roots() -> list[tuple[str, str]]:
    """(absolute folder, what a page shows instead), longest first: pages never carry this machine's paths."""
    roots = [(data_dir(), "$WEIGHTSCOPE_DATA"), (models_dir(), "$WEIGHTSCOPE_MODELS"),
             (corpora_dir(), "$WEIGHTSCOPE_CORPORA"), (REPO_ROOT, "<repo>"), (Path.home(), "~"),
             (Path(tempfile.gettempdir()), "<tmp>")]
    pairs = {str(Path(p).resolve()): label for p, label in roots if p is not None}
    pairs.update({str(p): label for p, label in roots if p is not None})
    return sorted(((p, label) for p, label in pairs.items() if len(p) > 1), key=lambda x: -len(x[0]))


def _display_path(path: str) -> str:
    for root, label in _local_roots():
        path = path.replace(root, label)
    return path


def _expand_path(path: str) -> str:
    """The inverse of `_display_path` for a path that starts with one of its labels."""
    for root, label in _local_roots():
        if path == label or path.startswith(label + "/"):
            return root + path[len(label):]
    return path


def _scrubbed(value):
    """`value` (str, list or dict, nested) with this machine's folders replaced as on pages."""
    if isinstance(value, str):
        return _display_path(value)
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


def scrub_local_paths(nb) -> None:
    """Replace this machine's folders (data, models, corpora, repository, home) in outputs, in the injected
    parameters and in papermill's metadata with neutral names, in place (the book serves the notebook too)."""
    clean = _scrubbed
    if "papermill" in nb.metadata:
        nb.metadata["papermill"] = clean(nb.metadata["papermill"])
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = clean(cell.source)
        for output in cell.get("outputs", []):
            for field in ("text", "data", "traceback", "evalue"):
                if field in output:
                    output[field] = clean(output[field])


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
        if cell.get("cell_type") != "code":
            continue
        cell.outputs = _joined_streams(cell.outputs)
        for o in cell.outputs:  # the library's progress lines were relayed to the terminal live
            if o.get("output_type") == "stream":
                o["text"] = _PROGRESS_LINE.sub("", o["text"])
        cell.outputs = [o for o in cell.outputs if not is_progress(o)
                        and not (o.get("output_type") == "stream" and not o["text"])]
    nb.metadata.pop("widgets", None)


def _joined_streams(outputs: list) -> list:
    """Consecutive outputs of one stream joined, as Jupyter shows them: a kernel may send a line and its
    newline as two messages, and a progress line removed from the first would leave the newline alone on
    the page (an output that a run without progress lines does not have)."""
    joined = []
    for o in outputs:
        if o.get("output_type") == "stream":
            o["text"] = "".join(o.get("text", ""))
            last = joined[-1] if joined else {}
            if last.get("output_type") == "stream" and last.get("name") == o.get("name"):
                last["text"] += o["text"]
                continue
        joined.append(o)
    return joined


def _fold_injected_parameters(nb) -> None:
    """Papermill's injected-parameters cell shows the values used; fold it on the page (the defaults cell stays)."""
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            tags.append("hide-input")


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the chapter, the error and where the notebook is."""

    def __init__(self, message: str, *, ename: str = ""):
        super().__init__(message)
        self.ename = ename  # the exception's class name inside the kernel


def _keep_failed(done: Path, target: Target, source: Path) -> Path | None:
    """Keep a failed execution under data/cache/failed/<target>/ for inspection (never in the book)."""
    if not done.is_file():
        return None
    failed = cache_dir() / "failed" / target.target / f"{source.stem}.ipynb"
    atomic_write_bytes(failed, done.read_bytes())
    return failed


def write_toc() -> Path:
    """Write `book/_toc.yml`: the intro, one part per target with executed chapters, then the appendix."""
    import yaml

    parts = []
    for folder in sorted(p for p in BOOK.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        chapters = [{"file": f"{folder.name}/{nb.stem}"} for nb in sorted(folder.glob("[0-9][0-9]_*.ipynb"))]
        if folder.name == "appendix":
            chapters = [{"file": f"appendix/{p.stem}"} for p in sorted(folder.glob("*.md"))]
        elif chapters and (run_status(folder.name) != "ok" or not all(map(_readable, folder.glob("*.ipynb")))):
            print(f"[book] part {folder.name} left out of the table of contents: its last run did not "
                  f"finish, or one of its notebooks is damaged (make book TARGET={folder.name} adds it back)",
                  flush=True)
            continue
        if not chapters:
            continue
        caption = "Appendix" if folder.name == "appendix" else _target_title(folder.name)
        parts.append({"caption": caption, "chapters": chapters})
    parts.sort(key=lambda p: (p["caption"] == "Appendix", p["caption"] != _target_title("demo")))
    toc = {"format": "jb-book", "root": "intro", "parts": parts}
    path = BOOK / "_toc.yml"
    atomic_write_bytes(path, ("# Generated by weightscope.publish.book; do not edit.\n" + yaml.safe_dump(toc, sort_keys=False)).encode())
    return path


def _readable(notebook: Path) -> bool:
    try:
        return isinstance(json.loads(notebook.read_text()).get("cells"), list)
    except (OSError, ValueError, AttributeError):
        return False


def run_status(target: str) -> str | None:
    """How the target's last run ended: "ok", "failed", or None when unknown."""
    try:
        return json.loads((BOOK / target / RUN_STATUS).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _set_run_status(target: str, status: str) -> None:
    stamp = {"status": status, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(BOOK / target / RUN_STATUS, stamp)


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


def _install_plotlyjs() -> None:
    """Copy the installed plotly's plotly.min.js into book/_plotly, a static path the book's configuration loads
    on every page (`html_js_files`): the chapters' figures, executed with `WEIGHTSCOPE_PLOTLYJS=book`, do not
    embed the library, so it is fetched once for the whole book, from the book itself (no CDN)."""
    import plotly

    src = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    dest = BOOK / "_plotly" / "plotly.min.js"
    if not dest.is_file() or dest.read_bytes() != src.read_bytes():  # the version that wrote the figures
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, src.read_bytes())


def build_html() -> Path:
    """`jupyter-book build` with warnings as errors; returns the index page.

    `book/_build` is reused (Sphinx's incremental build, which unpickles its `environment.pickle`) only when
    it carries the stamp a finished build of this runner writes last; a build that was killed or failed, or
    a folder of unknown origin, is cleared first, so every build starts from a state it can use.
    """
    _install_mathjax()
    _install_plotlyjs()
    build = BOOK / "_build"
    stamp = build / BUILD_STAMP
    with file_lock(cache_dir() / "locks" / "html.lock", what="the HTML build of the book", wait=True):
        if build.exists() and not stamp.is_file():
            print("[book] book/_build was left by an interrupted or failed build (or is of unknown origin): "
                  "cleared, building from scratch", flush=True)
            shutil.rmtree(build)
        toc = hashlib.sha256((BOOK / "_toc.yml").read_bytes()).hexdigest()
        rebuild_all = stamp.is_file() and json.loads(stamp.read_text()).get("toc") != toc
        if rebuild_all:  # Sphinx rebuilds only changed pages; every page's navigation lists the toc
            print("[book] the table of contents changed: rebuilding every page", flush=True)
        stamp.unlink(missing_ok=True)
        exe = Path(sys.executable).parent / "jupyter-book"
        cmd = [str(exe), "build", str(BOOK), "-W", "-n", "--keep-going", "--quiet"]
        subprocess.run(cmd + (["--all"] if rebuild_all else []), check=True)
        atomic_write_json(stamp, {"built_by": "weightscope.publish.book", "versions": versions(), "toc": toc})
    return build / "html" / "index.html"


def run(params_file: str, *, chapters: list[str] | None = None, extra: dict[str, Any] | None = None,
        html: bool = True, force: bool = False) -> None:
    """Validate, prepare, execute the chapters in order and build the book, printing progress.

    `params_file`: a parameters file name in params/ or a path; parsed and its model resolved once here,
    for the pre-flight and the skip rules (each chapter's kernel opens it itself: `open_chapter`)."""
    t0 = time.time()
    resolved = resolve_target(load_target(params_file))
    target = resolved.params
    sources = select_chapters(chapters)
    defaults = {source.stem: notebook_defaults(source) for source in chapter_sources()}
    problems = preflight(resolved, sources, defaults, extra=extra, book_dir=BOOK / target.target)
    if problems:  # every problem at once, before any work
        raise PreflightError(f"{len(problems)} problem(s) with target {target.target}; nothing was run:\n"
                             + "\n".join(f"  - {p}" for p in problems))
    lock = cache_dir() / "locks" / f"target-{target.target}.lock"
    with file_lock(lock, what=f"target {target.target}", wait=False):
        skipped = skipped_chapters(resolved, sources)
        for stem, reason in skipped.items():
            print(f"[book] {target.target}: {stem} skipped: {reason}", flush=True)
            sources = [s for s in sources if s.stem != stem]
            (BOOK / target.target / f"{stem}.ipynb").unlink(missing_ok=True)  # from an earlier setting
        counts = _run_chapters(target, sources, extra, force)
    write_toc()
    where = "not built (--no-html)"
    if html:
        print("[book] building HTML with jupyter-book (warnings are errors) ...", flush=True)
        where = _display_path(str(build_html())).removeprefix("<repo>/")
    print(
        f"book: target {target.target}: {counts['executed']} chapter(s) executed, {counts['reused']} reused, "
        f"{len(skipped)} skipped, in {time.time() - t0:.0f} s; HTML: {where}",
        flush=True,
    )


def select_chapters(chapters: list[str] | None) -> list[Path]:
    """The chapter sources named by `chapters` (numbers like 01, or stems); all when None; unknown raise."""
    sources = chapter_sources()
    if not chapters:
        return sources
    known = {s.stem[:2] for s in sources} | {s.stem for s in sources}
    unknown = [c for c in chapters if c not in known]
    if unknown:
        raise ParamsError(f"--chapters: no chapter {unknown}; the chapters are {[s.stem for s in sources]}.")
    return [s for s in sources if s.stem[:2] in chapters or s.stem in chapters]


def _run_chapters(target: Target, sources: list[Path], extra: dict[str, Any] | None, force: bool) -> dict:
    """Prepare the inputs and execute the chapters in order; the target's run status says how it ended."""
    _set_run_status(target.target, "failed")  # until every chapter is done (a kill leaves "failed" too)
    _prepare(target)
    counts = {"executed": 0, "reused": 0}
    for i, source in enumerate(sources, 1):
        print(f"[book {i}/{len(sources)}] {target.target}: {source.stem} ...", flush=True)
        t = time.time()
        status = execute_chapter(target, source, extra=extra, force=force)
        counts[status] += 1
        print(f"[book {i}/{len(sources)}] {target.target}: {source.stem} {status} ({time.time() - t:.0f} s)",
              flush=True)
    _set_run_status(target.target, "ok")
    return counts


def _prepare(target: Target) -> None:
    """Make sure the inputs exist before any notebook runs: the pinned demo SAEs, checked (trained here only
    when the training parameters differ from the pinned ones)."""
    if target.sae_source == "demo":
        print("[prepare] demo SAEs (pinned in data/demo_saes/; trained only for other parameters) ...",
              flush=True)
        ensure_demo_saes(progress=True)
    attn_source = (target.attn_saes or {}).get("source", "")
    if attn_source.startswith("demo:"):  # the demo attention-output SAEs of chapter 4 (pinned too)
        print(f"[prepare] demo attention SAEs ({attn_source}) ...", flush=True)
        ensure_demo_saes(attn_source.partition(":")[2], progress=True)


EXIT_CODES = {0: "done", 2: "bad parameters or inputs", 3: "a chapter failed", 4: "jupyter-book failed",
              5: "another run of this target is in progress",
              6: "cannot write (no space left, no permission)", 130: "interrupted"}


def main(argv: list[str] | None = None) -> int:
    """Run the book from the command line; every fault a user can cause ends in one `error:` line (the last
    line printed) and a documented exit code (`EXIT_CODES`)."""
    code, message = _main(argv)
    if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _main(argv: list[str] | None) -> tuple[int, str | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="demo", help="parameters file name in params/ (default: demo)")
    parser.add_argument("--chapters", nargs="*", help="only these chapters (numbers like 00 01, or stems)")
    parser.add_argument("--no-html", action="store_true", help="execute notebooks but do not build HTML")
    parser.add_argument("--force", action="store_true", help="re-execute even when a cached run matches")
    args = parser.parse_args(argv)
    try:
        run(args.target, chapters=args.chapters, html=not args.no_html, force=args.force)
    except KeyboardInterrupt:
        return 130, ("interrupted. Kept: every finished chapter, demo-SAE layer and per-layer result; the "
                     "step that was running was discarded (the last good notebook is unchanged). Rerun the "
                     "same command to resume.")
    except Busy as err:
        return 5, str(err)
    except (StorageError, PermissionError) as err:
        return 6, str(err)
    except (ParamsError, FileNotFoundError, DemoSAEError, SAEError, Llama2cFileError, CacheError) as err:
        return 2, str(err)
    except ChapterFailed as err:
        return (6 if err.ename == "StorageError" else 3), str(err)
    except subprocess.CalledProcessError:
        return 4, "jupyter-book reported warnings or errors (see above); the HTML is incomplete."
    except OSError as err:  # e.g. a read-only file system met after the pre-flight
        return 6, f"{err}. Check that the data and book folders are writable and have free space, then rerun."
    return 0, None


if __name__ == "__main__":
    sys.exit(main())
