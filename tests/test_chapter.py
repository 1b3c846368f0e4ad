"""Chapter opening: device and dtype choices, a chapter that fails leaves the book as it was, and every chapter
follows the chapter contract (a registered module with a frozen `Config`, `run` and `findings`)."""

import ast
import dataclasses
import importlib
import inspect
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import weightscope.chapters as chapters
from weightscope.chapters.context import resolve_device, resolve_dtype
from weightscope.config.params import NOTEBOOK_PARAMETERS
from weightscope.publish.book import BOOK, REPO_ROOT, chapter_sources, notebook_defaults


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_request_without_gpu_is_refused_clearly():
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible.*`device: auto`"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_half_precision_falls_back_to_float32_on_cpu():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert "using float32 instead" in str(caught[0].message)


@pytest.mark.slow
def test_failing_chapter_exits_nonzero_and_leaves_no_partial_notebook(tmp_path):
    """An impossible chapter parameter (k larger than the vocabulary) is refused before any work (exit 2)."""
    params = tmp_path / "broken-demo.yaml"
    text = (REPO_ROOT / "params" / "demo.yaml").read_text()
    params.write_text(text.replace("target: demo", "target: broken-demo")
                      .replace("chapters: {}", "chapters: {01_output_tokens: {k: 100000}}"))
    out = BOOK / "broken-demo"
    try:
        proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", str(params), "--chapters", "01",
                               "--no-html"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "chapters.01_output_tokens: need 1 <= k <= d_vocab (512); got k=100000" in proc.stderr
        assert "nothing was run" in proc.stderr
        assert not (out / "01_output_tokens.ipynb").exists()
        assert "without encryption" not in proc.stderr  # ipykernel's TCP notice is filtered in the kernel
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --- the chapter contract: every chapter notebook has a registered module with Config, run and findings ---


OPENING = "00_demo_model"  # the book's opening: introduces the model and its SAEs, measures nothing
CROSS_MODEL = "90_cross_model"  # reads every target's tables and the atlas summary, measures nothing
CHAPTER_STEMS = [s.stem for s in chapter_sources() if s.stem not in (OPENING, CROSS_MODEL)]


def contract_problems(stem: str, declared: dict, registry: dict[str, str]) -> list[str]:
    """What keeps the chapter `stem` (its notebook declaring the parameters `declared`) off the contract."""
    if stem not in registry:
        return [f"{stem} is not registered in weightscope.chapters.CHAPTERS"]
    module = importlib.import_module(registry[stem])
    out = []
    config = getattr(module, "Config", None)
    if not (dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        out.append(f"{module.__name__}.Config is not a frozen dataclass")
    elif not callable(getattr(config, "problems", None)):
        out.append(f"{module.__name__}.Config has no problems(dims)")
    else:
        fields = {f.name for f in dataclasses.fields(config)}
        unchecked = sorted(set(declared) - fields - set(NOTEBOOK_PARAMETERS))
        if unchecked:
            out.append(f"{stem}'s parameters {unchecked} are not fields of its Config (the pre-flight "
                       "cannot check them)")
        try:
            config(**{k: v for k, v in declared.items() if k in fields})  # the notebook's defaults pass
        except Exception as err:  # noqa: BLE001 - any failure is the finding
            out.append(f"{module.__name__}.Config refuses the notebook's defaults: {err}")
    for name, arity in (("run", 2), ("findings", 1)):
        fn = getattr(module, name, None)
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)] \
            if callable(fn) else None
        if required is None or len(required) != arity:
            out.append(f"{module.__name__}.{name} is missing or does not take {arity} argument(s)")
    return out


@pytest.mark.parametrize("stem", CHAPTER_STEMS)
def test_every_chapter_follows_the_contract(stem):
    source = next(s for s in chapter_sources() if s.stem == stem)
    problems = contract_problems(stem, notebook_defaults(source), chapters.CHAPTERS)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stem", CHAPTER_STEMS)
def test_every_input_a_chapter_reads_is_checked_by_the_preflight(stem):
    """A chapter that reads held-out text or an earlier chapter's table names it in `Config.inputs()`, so a
    missing corpus or table stops the run before any chapter works (not minutes into this one)."""
    from weightscope.chapters.context import HELD_OUT_TEXT, TableInput

    module = importlib.import_module(chapters.CHAPTERS[stem])
    text = inspect.getsource(module)
    inputs = set(module.Config().inputs()) if hasattr(module.Config, "inputs") else set()
    if "held_out_rows(" in text:
        assert set(HELD_OUT_TEXT) <= inputs, f"{stem} reads held-out stories without declaring them"
    for name, producer in re.findall(r'require_table\([^,]+, "(\w+)", produced_by="(\w+)"\)', text):
        assert TableInput(name, producer) in inputs, f"{stem} reads {name} without declaring it"


def test_every_registered_chapter_has_a_notebook():
    stems = {s.stem for s in chapter_sources()}
    assert not sorted(set(chapters.CHAPTERS) - stems)


def test_the_contract_check_can_fail(tmp_path, monkeypatch):
    (tmp_path / "loose_chapter.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Config:\n    k: int = 1\n\n"
        "def run(ctx):\n    pass\n")
    (tmp_path / "good_chapter.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass(frozen=True)\nclass Config:\n    k: int = 1\n\n"
        "    def problems(self, dims):\n        return []\n\n"
        "def run(ctx, config, *, model=None):\n    pass\n\n"
        "def findings(tables):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = {"01_loose": "loose_chapter", "02_good": "good_chapter"}
    assert contract_problems("01_loose", {"k": 1}, {}) == [
        "01_loose is not registered in weightscope.chapters.CHAPTERS"]
    assert contract_problems("01_loose", {"k": 1}, registry) == [
        "loose_chapter.Config is not a frozen dataclass",
        "loose_chapter.run is missing or does not take 2 argument(s)",
        "loose_chapter.findings is missing or does not take 1 argument(s)"]
    assert contract_problems("02_good", {"params_file": "demo", "k": 1}, registry) == []
    assert contract_problems("02_good", {"k": 1, "q": 0.5}, registry) == [
        "02_good's parameters ['q'] are not fields of its Config (the pre-flight cannot check them)"]


def skip_reason_callers(root: Path) -> list[str]:
    """Files under `root` whose code calls a chapter's skip rule `skip_reason(...)` (library modules, and the
    code cells of notebooks)."""
    out = []
    for path in sorted(root.rglob("*.py")) + sorted(root.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        cells = [block.split("\n", 1)[-1].split("```", 1)[0] for block in text.split("```{code-cell}")[1:]]
        code = text if path.suffix == ".py" else "\n".join(
            line for cell in cells for line in cell.splitlines() if not line.startswith((":", "%", "!")))
        # a chapter module's `run` may refuse by its own rule (a bare call): that is the rule's one place
        own = path.suffix == ".py" and path.parent.name == "chapters"
        calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
                 and getattr(node.func, "attr", None if own else getattr(node.func, "id", None)) == "skip_reason"]
        if calls:
            out.append(path.relative_to(root).as_posix())
    return out


def test_the_skip_rule_is_consulted_in_one_place(tmp_path):
    found = skip_reason_callers(REPO_ROOT / "lib") + skip_reason_callers(REPO_ROOT / "notebooks")
    assert found == ["weightscope/publish/preflight.py"], found
    (tmp_path / "nb.md").write_text("Prose on `skip_reason(target, dims)`.\n\n```{code-cell} ipython3\n"
                                    "if chapter.skip_reason(params, dims):\n    pass\n```\n")
    (tmp_path / "doc.md").write_text("Prose on `skip_reason(target, dims)` only.\n")
    (tmp_path / "mod.py").write_text("def skip_reason(target, dims):\n    return None\n")
    assert skip_reason_callers(tmp_path) == ["nb.md"]


def _notebook(path: Path, parameters: str) -> Path:
    path.write_text("# Title\n\n## Setup\n\n```{code-cell} ipython3\n:tags: [parameters]\n\n"
                    f"{parameters}\n```\n", encoding="utf-8")
    return path


def test_the_params_file_is_injected_as_params_file(tmp_path):
    from weightscope.config.params import load_target
    from weightscope.publish.book import chapter_parameters

    demo = load_target("demo")
    new = _notebook(tmp_path / "01_new.md", 'params_file = "demo"\nk = 10')
    assert chapter_parameters(demo, new) == {"params_file": "demo", "k": 10}
    copied = tmp_path / "copy.yaml"  # a parameters file outside params/ is passed by its path
    copied.write_text((REPO_ROOT / "params" / "demo.yaml").read_text().replace("target: demo", "target: copy"))
    assert chapter_parameters(load_target(copied), new, extra={"k": 3}) == {"params_file": str(copied), "k": 3}
