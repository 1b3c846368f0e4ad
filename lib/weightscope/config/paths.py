"""Where weightscope finds its inputs and writes its outputs.

Inputs that are never committed (the demo model, corpora) are found through environment variables that the
Makefile and `.ci/run` point at `../shared` when it exists; outputs go under the repository's `data/` folder
(or `WEIGHTSCOPE_DATA`).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def _env_dir(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else None


def progress_enabled() -> bool:
    """Whether the library prints progress lines (`WEIGHTSCOPE_PROGRESS=0` turns them off, e.g. under nbval,
    which compares a chapter's printed output and would see lines that appear only when work is not cached)."""
    return os.environ.get("WEIGHTSCOPE_PROGRESS", "1") != "0"


def models_dir() -> Path | None:
    """Folder holding offline model checkpoints such as `stories260K/` (`WEIGHTSCOPE_MODELS`), or None."""
    return _env_dir("WEIGHTSCOPE_MODELS")


def corpora_dir() -> Path | None:
    """Folder holding the text corpora (`WEIGHTSCOPE_CORPORA`), or None."""
    return _env_dir("WEIGHTSCOPE_CORPORA")


def data_dir() -> Path:
    """Root of everything weightscope writes: `WEIGHTSCOPE_DATA`, else `<repo>/data`."""
    return _env_dir("WEIGHTSCOPE_DATA") or REPO_ROOT / "data"


def cache_dir() -> Path:
    """Downloads and trained demo SAEs (gitignored)."""
    return data_dir() / "cache"


def results_dir(target: str) -> Path:
    """Tidy result tables of one target, e.g. `data/results/demo/`."""
    return data_dir() / "results" / target
