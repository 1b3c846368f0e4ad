"""Plain text from the corpora folder (`WEIGHTSCOPE_CORPORA`), cut into token windows for forward passes.

    text = corpus_text("gutenberg/11-0.txt")         # Gutenberg header and licence stripped
    ids = token_windows(tokenizer, text, n=32, length=128, bos=1)   # [32, 128], BOS first in every row
    rows = held_out_windows(encode, n_tokens=64_000, row_len=128)   # the stories no demo SAE was trained on

The held-out TinyStories split lives here, not with the SAE training that respects it: every chapter that
measures activations on held-out text reads it through `held_out_windows`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from weightscope.config.paths import corpora_dir

_GUTENBERG = re.compile(r"\*\*\* ?START OF.*?\*\*\*(.*?)\*\*\* ?END OF", re.S)
_WIKI_TAG = re.compile(r"</?doc[^>]*>")
STORIES_CASED = "tinystories/tinystories_cased.txt"
STORIES_LOWER = "tinystories/tinystories_lowercase.txt"
HOLDOUT_FRACTION = 0.05  # the last 5% of each TinyStories file is held out of demo-SAE training


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


# ------------------------------------------------------------------------------------------------------------
# TinyStories: the train / held-out split of the demo SAEs, and held-out rows for every chapter


def split_stories(lower_text: str, cased_text: str) -> tuple[list[str], list[str]]:
    """(lowercased stories, cased stories): `cased[i]` is the cased text of `lower[i]`.

    In the lowercased file stories are separated by a single newline and paragraphs by a blank line. The cased
    file is a prefix of it (up to whitespace), so its story boundaries are carried over by counting
    non-whitespace characters. A single newline inside a story splits it in two (rare in TinyStories).
    """
    lower = [s.strip() for s in re.split(r"(?<!\n)\n(?!\n)", lower_text) if s.strip()]
    nonspace = [m.start() for m in re.finditer(r"\S", cased_text)]
    starts, count = [], 0
    for story in lower:
        if count >= len(nonspace):
            break
        starts.append(nonspace[count])
        count += len(re.sub(r"\s", "", story))
    cased = [cased_text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(cased_text)])]
    for i, story in enumerate(cased[:-1]):  # the last cased story may be cut short
        if story.lower().split() != lower[i].split():
            raise CorpusError(
                f"the cased corpus is not the cased prefix of the lowercased one (story {i} differs); "
                "the demo corpus files look changed."
            )
    return lower, cased


def story_split(holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(training stories, held-out stories) of TinyStories: the last `holdout_fraction` of each file is held
    out (cased first, then lowercased), and the lowercased twins of held-out cased stories stay out of training.
    """
    lower, cased = split_stories(corpus_path(STORIES_LOWER).read_text(encoding="utf-8"),
                                 corpus_path(STORIES_CASED).read_text(encoding="utf-8"))
    n_lower_eval = max(1, math.ceil(holdout_fraction * len(lower)))
    n_cased_eval = max(1, math.ceil(holdout_fraction * len(cased)))
    cased_train, cased_eval = cased[:-n_cased_eval], cased[-n_cased_eval:]
    lower_train = [s for i, s in enumerate(lower[:-n_lower_eval]) if not len(cased_train) <= i < len(cased)]
    return cased_train + lower_train, cased_eval + lower[-n_lower_eval:]


def held_out_stories(holdout_fraction: float = HOLDOUT_FRACTION) -> list[str]:
    """The stories no demo SAE is trained on (held-out cased stories, then held-out lowercased ones)."""
    return story_split(holdout_fraction)[1]


def pack_rows(stories: Iterable[str], encode: Callable[[str], list[int]], row_len: int,
              max_tokens: int | None = None) -> np.ndarray:
    """int64 [n_rows, row_len]: each story encoded (`encode` adds BOS where the model wants one), concatenated
    and cut into rows; encoding stops once `max_tokens` ids are collected (None: every story)."""
    ids: list[int] = []
    for story in stories:
        ids.extend(encode(story))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    n_rows = len(ids) // row_len
    return np.asarray(ids[: n_rows * row_len], dtype=np.int64).reshape(n_rows, row_len)


def held_out_windows(encode: Callable[[str], list[int]], *, n_tokens: int, row_len: int) -> torch.Tensor:
    """LongTensor [rows, row_len] of about `n_tokens` held-out story tokens (at least one row): the text on
    which chapters measure activations. The rows are a prefix of the demo SAEs' own held-out evaluation rows
    when `encode` and `row_len` are theirs.

    Raises CorpusError when the held-out stories hold fewer than `row_len` tokens.
    """
    n_rows = max(1, n_tokens // row_len)
    rows = pack_rows(held_out_stories(), encode, row_len, max_tokens=n_rows * row_len)[:n_rows]
    if len(rows) == 0:
        raise CorpusError(f"the held-out stories hold fewer than {row_len} tokens; use a shorter row length.")
    return torch.from_numpy(rows)
