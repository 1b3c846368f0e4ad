"""Plain text from the corpora folder (`WEIGHTSCOPE_CORPORA`), cut into token windows for forward passes.

    text = corpus_text("gutenberg/11-0.txt")         # Gutenberg header and licence stripped
    ids = token_windows(tokenizer, text, n=32, length=128, bos=1)   # [32, 128], BOS first in every row
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from weightscope.config.paths import corpora_dir

_GUTENBERG = re.compile(r"\*\*\* ?START OF.*?\*\*\*(.*?)\*\*\* ?END OF", re.S)
_WIKI_TAG = re.compile(r"</?doc[^>]*>")


class CorpusError(FileNotFoundError):
    """A named corpus file cannot be found or holds too little text."""


def corpus_path(name: str) -> Path:
    """`WEIGHTSCOPE_CORPORA/<name>`, checked to exist."""
    root = corpora_dir()
    if root is None:
        raise CorpusError(
            "WEIGHTSCOPE_CORPORA is not set: point it at the folder holding tinystories/, gutenberg/, "
            "wikipedia/ (the Makefile sets it to ../shared/corpora when that folder exists)."
        )
    path = root / name
    if not path.is_file():
        known = sorted(str(p.relative_to(root)) for p in root.rglob("*.txt"))
        raise CorpusError(f"no corpus file {name!r} under {root}. Known files: {known}.")
    return path


def corpus_text(name: str) -> str:
    """The text of one corpus file, without Project Gutenberg's header and licence or Wikipedia's doc tags."""
    text = corpus_path(name).read_text(encoding="utf-8", errors="replace")
    body = _GUTENBERG.search(text)
    if body:
        text = body.group(1)
    return _WIKI_TAG.sub("", text)


def encode_text(tokenizer, text: str, n_tokens: int, *, start_fraction: float = 0.0) -> list[int]:
    """At least `n_tokens` token ids (no special tokens) of `text`, starting `start_fraction` of the way in.

    Encodes paragraph by paragraph (blank-line separated) and stops once enough ids are collected, so a
    large file costs only what is used. Fewer ids come back when the text runs out.
    """
    start = int(len(text) * start_fraction)
    ids: list[int] = []
    for para in re.split(r"\n\s*\n", text[start:]):
        para = " ".join(para.split())
        if para:
            ids += tokenizer.encode(para, add_special_tokens=False)
        if len(ids) >= n_tokens:
            break
    return ids


def token_windows(tokenizer, text: str, *, n: int, length: int, bos: int | None,
                  start_fraction: float = 0.0, name: str = "text") -> torch.Tensor:
    """[n, length] token ids: consecutive stretches of `text`, each led by `bos` (when not None).

    Raises CorpusError when the text (from `start_fraction` on) holds fewer than n windows.
    """
    body = length - (bos is not None)
    ids = encode_text(tokenizer, text, n * body, start_fraction=start_fraction)
    if len(ids) < n * body:
        raise CorpusError(
            f"{name} holds {len(ids):,} tokens from {start_fraction:.0%} on, fewer than the {n * body:,} "
            f"needed for {n} windows of {length}; ask for fewer or shorter windows, or name a longer file."
        )
    rows = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is None:
        return rows
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
