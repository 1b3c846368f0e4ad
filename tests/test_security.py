"""Security checks: the library never unpickles or runs remote code, and no secret reaches the book.

(a) No module under lib/weightscope calls `pickle.load(s)`, `torch.load` without `weights_only=True`,
    `numpy.load` without `allow_pickle=False`, or passes `trust_remote_code=True` (read with `ast`: comments,
    docstrings and strings do not count; import aliases such as `import numpy as np` are followed).
(b) The built book (book/_build/html) and the executed notebooks (book/<target>/*.ipynb) contain neither the
    value of $HF_TOKEN (or $HUGGING_FACE_HUB_TOKEN) nor anything shaped like a Hugging Face token, and no
    notebook's papermill parameters have a token- or secret-like name.
(c) A secret cannot travel as a papermill parameter: a chapter override such as `hf_token` is refused as an
    unknown parameter, and no chapter declares a token- or secret-like parameter that would accept one.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

import weightscope
from weightscope.publish.book import BOOK, chapter_parameters, chapter_sources, notebook_defaults
from weightscope.config.params import ParamsError, load_target

LIB = Path(weightscope.__file__).parent  # the library's sources

HF_TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
# A secret-like name: `..._token` at the end (hf_token, auth_token, token) or a secret word as a `_` segment.
# Not every "token" (this book is about text tokens: story_tokens, token_scores are ordinary parameters).
SECRET_NAME = re.compile(r"(^|_)token$|(^|_)(secret|password|passwd|credentials?|api_?key|auth)(_|$)",
                         re.IGNORECASE)
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# --- (a) dangerous loads, found with ast ---

UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
              "dill.loads", "joblib.load", "pandas.read_pickle", "cloudpickle.load", "cloudpickle.loads"}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (`import numpy as np` gives np -> numpy)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:  # import numpy.linalg as la: la -> numpy.linalg
                    names[alias.asname] = alias.name
                else:  # import os.path binds os
                    names[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(func: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def dangerous_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every call in `source` that can unpickle or run remote code, as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        where = f"{filename}:{node.lineno}"
        if name in UNPICKLERS:
            found.append(f"{where}: {name}() unpickles")
        elif name == "torch.load" and not _keyword_is(node, "weights_only", True):
            found.append(f"{where}: torch.load() without weights_only=True")
        elif name == "numpy.load" and not _keyword_is(node, "allow_pickle", False):
            found.append(f"{where}: numpy.load() without allow_pickle=False")
        for keyword in node.keywords:
            trusted = keyword.arg == "trust_remote_code" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value in (False, None))
            if trusted:
                found.append(f"{where}: trust_remote_code={ast.unparse(keyword.value)}")
            if keyword.arg is None and isinstance(keyword.value, ast.Dict):  # f(**{"trust_remote_code": 1})
                for key, value in zip(keyword.value.keys, keyword.value.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not (
                            isinstance(value, ast.Constant) and value.value in (False, None)):
                        found.append(f"{where}: trust_remote_code={ast.unparse(value)}")
    return found


def test_the_scanner_finds_what_it_should_and_ignores_comments():
    bad = '''
import pickle, torch
import numpy as np
from numpy import load as npload
from transformers import AutoModel
# torch.load("x.pt") in a comment, and "pickle.load" in a string, do not count
pickle.load(open("x", "rb"))
torch.load("a.pt")
torch.load("b.pt", weights_only=False)
np.load("c.npy")
npload("d.npy", allow_pickle=True)
AutoModel.from_pretrained("m", trust_remote_code=True)
AutoModel.from_pretrained("m", **{"trust_remote_code": True})
'''
    assert len(dangerous_calls(bad)) == 7, dangerous_calls(bad)
    good = '''
import torch, numpy
torch.load("a.pt", weights_only=True)
numpy.load("c.npy", allow_pickle=False)
model.load("x")  # some other object's load
f(trust_remote_code=False)
"""pickle.load(x) in a docstring"""
'''
    assert dangerous_calls(good) == []


def test_library_never_unpickles_or_trusts_remote_code():
    modules = sorted(LIB.rglob("*.py"))
    assert modules, f"no modules under {LIB}"
    found = [hit for path in modules
             for hit in dangerous_calls(path.read_text(), str(path.relative_to(LIB.parent)))]
    assert not found, "\n".join(found)


# --- (b) no secret in the built book ---


def _built_files() -> list[Path]:
    html = BOOK / "_build" / "html"
    files = [p for p in html.rglob("*") if p.is_file()] if html.is_dir() else []
    files += sorted(BOOK.glob("*/[0-9][0-9]_*.ipynb"))
    return files


def test_no_token_in_the_built_book():
    files = _built_files()
    if not files:
        pytest.skip("the book has not been built (no book/_build/html, no executed notebooks)")
    markers = {v: os.environ[v].encode() for v in TOKEN_VARIABLES if len(os.environ.get(v, "")) >= 8}
    leaks = []
    for path in files:
        data = path.read_bytes()
        leaks += [f"{path.relative_to(BOOK)}: the value of ${v}"
                  for v, value in markers.items() if value in data]
        leaks += [f"{path.relative_to(BOOK)}: {m.group()[:6].decode()}... looks like a Hugging Face token"
                  for m in HF_TOKEN_SHAPE.finditer(data)]
    assert not leaks, "\n".join(leaks)


def test_no_notebook_parameter_is_named_like_a_secret():
    notebooks = sorted(BOOK.glob("*/[0-9][0-9]_*.ipynb"))
    if not notebooks:
        pytest.skip("no executed notebooks under book/<target>/ (the book has not been run)")
    bad = []
    for path in notebooks:
        nb = json.loads(path.read_text())
        names = set(nb["metadata"].get("papermill", {}).get("parameters", {}))
        names |= set(nb["metadata"].get("weightscope", {}).get("parameters", {}))
        for cell in nb["cells"]:
            if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
                source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                names |= {t.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
                          for t in node.targets if isinstance(t, ast.Name)}
        bad += [f"{path.relative_to(BOOK)}: {name}" for name in sorted(names) if SECRET_NAME.search(name)]
    assert not bad, "\n".join(bad)


# --- (c) a secret cannot be passed as a papermill parameter ---


def test_chapters_declare_no_secret_parameters():
    declared = {source.stem: sorted(notebook_defaults(source)) for source in chapter_sources()}
    bad = {stem: [n for n in names if SECRET_NAME.search(n)] for stem, names in declared.items()}
    assert not any(bad.values()), bad


@pytest.mark.parametrize("name", ["hf_token", "HF_TOKEN", "api_secret"])
def test_a_token_override_is_refused_as_an_unknown_parameter(name):
    demo = load_target("demo")
    for source in chapter_sources():
        target = dataclasses.replace(demo, chapters={source.stem: {name: "hf_" + "x" * 34}})
        with pytest.raises(ParamsError, match=rf"unknown parameter\(s\) \['{name}'\]"):
            chapter_parameters(target, source)
        with pytest.raises(ParamsError, match="unknown parameter"):
            chapter_parameters(demo, source, extra={name: "hf_" + "x" * 34})
