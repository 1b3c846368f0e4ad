"""Chapter 3: label features semantic / non-semantic / unclear by their top tokens; compare the populations.

The label of one side (`dec`: decoder-unembedding, output tokens; `enc`: encoder-embedding, input
tokens) reads two things chapter 1 wrote: the side's top tokens (`<side>_top_tokens`) and whether they
are coherent (`<side>_coherent`: string similarity or embedding cosine of the top tokens above a null
quantile). With the first `m` top tokens sorted into kinds by `token_kind`:

* **non-semantic**: non-word kinds (punct, space, digit, byte_special) make up >= `min_nonword_share` of them,
  or the top tokens are not coherent on either measure;
* **semantic**: otherwise, when words make up >= `min_word_share` of them and they are coherent (by more than
  `coherence_margin` above a null threshold, when that margin is > 0);
* **unclear**: everything else (coherent, but a mix of kinds or mostly fragments; coherent only within the
  margin; coherence missing).

Then the statistics chapter 3 compares the populations with: summaries (n, mean, median, P75), the share of
each population above the pooled P75, Mann-Whitney U, Cliff's delta, bootstrap confidence intervals
(`scipy.stats`) and Holm's correction (`statsmodels`). Introduced in chapter 3.
"""

from __future__ import annotations

import functools
import math
import os
import re
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats
from statsmodels.stats.multitest import multipletests

SIDES = ("dec", "enc")
LABELS = ("semantic", "non-semantic", "unclear")
KINDS = ("word", "fragment", "punct", "space", "digit", "byte_special")
NONWORD_KINDS = ("punct", "space", "digit", "byte_special")
LABEL_DEFAULTS = {"m": 5, "min_word_share": 0.6, "min_nonword_share": 0.6, "min_letters": 2,
                  "coherence_margin": 0.0}
BOOTSTRAP_STATS = ("mean_diff", "median_diff", "cliffs_delta")


def label_columns(sides=SIDES) -> list[str]:
    """The columns of chapter 1's `01_features` that `label_features` reads (with any coherence margin): a
    caller reads only these, since the table's other list columns cost far more memory than they weigh."""
    per_side = ("top_tokens", "coherent", "string_sim", "thr_string_sim", "emb_cos", "thr_emb_cos")
    return ["layer", "feature"] + [f"{side}_{c}" for side in sides for c in per_side]

_CHAPTER_1 = "chapter 1 (notebooks/01_output_tokens.md, table 01_features)"
_CHAPTER_2 = "chapter 2 (notebooks/02_attention.md, table 02_features)"


# ----------------------------------------------------------------------------------------------------------
# Token kinds


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE's character for each byte (its `bytes_to_unicode`), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + i  # bytes without a printable Latin-1 char are moved to U+0100..U+0143
    return {chr(c): b for b, c in chars.items()}


_BYTE_OF = _gpt2_byte_alphabet()
_REMAPPED = {c for c, b in _BYTE_OF.items() if ord(c) >= 256}  # 'Ġ' (space), 'Ċ' (newline), 'Ģ' (0x80) ...
# <s>, </s>, <unk>, <0x0A>, <|endoftext|>, <unused0>, and markup tags like <br>
_TAG = re.compile(r"<[/|]?\w[^<>\s]*>")
_INVALID_CATEGORIES = {"Cc", "Cs", "Co", "Cn"}  # control, surrogate, private-use, unassigned


def _read_back_gpt2(token: str) -> str | None:
    """The text behind a GPT-2/Llama-3 byte-level piece ('Ġthe' -> ' the'); any other token unchanged.

    None when the token is such a piece whose bytes are not valid UTF-8 (a partial character, e.g. 'âĢ').
    """
    if not token or not any(c in _REMAPPED for c in token) or not all(c in _BYTE_OF for c in token):
        return token  # ordinary decoded text: no byte-level marker, or characters outside that alphabet
    try:
        return bytes(_BYTE_OF[c] for c in token).decode("utf-8")
    except UnicodeDecodeError:
        return None


@functools.lru_cache(maxsize=1 << 20)  # a vocabulary has at most a few 100k distinct strings
def _token_kind(token: str, min_letters: int) -> str:
    text = _read_back_gpt2(token)
    if text is None or "\ufffd" in text:
        return "byte_special"
    if any(unicodedata.category(c) in _INVALID_CATEGORIES and not c.isspace() for c in text):
        return "byte_special"
    # '▁' is sentencepiece's space; format characters (zero-width space, ...) are invisible: both are spaces
    text = "".join(" " if c == "▁" or unicodedata.category(c) == "Cf" else c for c in text)
    core = text.lstrip(" Ġ").strip()
    if not core:
        return "space"
    if _TAG.fullmatch(core):
        return "byte_special"
    visible = [c for c in core if not c.isspace()]
    # combining marks (Devanagari vowel signs, ...) belong to the letters they sit on
    letters = sum(c.isalpha() or unicodedata.category(c).startswith("M") for c in visible)
    digits = sum(c.isnumeric() and not c.isalpha() for c in visible)
    if letters == 0:
        return "digit" if digits else "punct"
    if letters >= min_letters and 2 * letters >= len(visible):
        return "word"
    return "fragment"


def token_kind(token: str, min_letters: int = 2) -> str:
    """The kind of one token string: word, fragment, punct, space, digit or byte_special.

    Rule, in order:
    1. A GPT-2/Llama-3 byte-level piece (spelled only in that tokenizer's 256-character byte alphabet and
       using at least one of its remapped-byte characters U+0100..U+0143, e.g. 'Ġthe', 'Ċ', 'âĢ') is read back
       to its text: ' the', '\\n'. If its bytes are not valid UTF-8 (a partial character): **byte_special**.
       (A non-English token spelled with those letters and no leading space, e.g. Polish 'ło', can be misread
       this way: the price of recognising byte pieces from the text alone.)
    2. **byte_special**: the replacement character U+FFFD or a control / private-use / unassigned character
       (whitespace excepted); or, after stripping, an angle-bracketed name: '<0x0A>', '<s>', '</s>', '<unk>',
       '<|endoftext|>', '<unused0>' (HTML-like tags such as '<br>' land here too: markup, not words).
    3. **space**: nothing left after stripping whitespace, '▁' (sentencepiece's space), a leading 'Ġ' and
       invisible format characters (' ', '', '\\n', '▁▁').
    4. Otherwise count the visible characters of the stripped text: letters (str.isalpha, plus combining
       marks) and digits (str.isnumeric, not letters). No letters: **digit** if any digit (' 42', '3.14'),
       else **punct** ('...', ',"'). At least `min_letters` letters making up at least half of the visible
       characters: **word** (' Lily', 'ing', '▁the', "n't"). Anything else: **fragment** ('x', "'s", ' A1').
    """
    if not isinstance(token, str):
        raise TypeError(f"token_kind expects a token string; got {type(token).__name__} {token!r}.")
    if min_letters < 1:
        raise ValueError(f"min_letters must be >= 1; got {min_letters}.")
    return _token_kind(token, int(min_letters))


# ----------------------------------------------------------------------------------------------------------
# Labels


def _producer(column: str) -> str:
    """Which chapter (or function) writes a column, for error messages."""
    if column.endswith(("_label", "_word_share", "_nonword_share")):
        return "populations.label_features (chapter 3)"
    if column.startswith(("dec_", "enc_")):
        return _CHAPTER_1
    if column.startswith(("q_", "k_", "v_")) or column == "n_heads":
        return _CHAPTER_2
    return "the table you passed"


def _require(df: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        where = "; ".join(f"{c!r} (written by {_producer(c)})" for c in missing)
        raise ValueError(f"Missing column(s): {where}. Merge that table in first.")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} ('dec': output tokens, 'enc': input tokens); "
                         f"got {side!r}.")


def _check_label_params(m, min_word_share, min_nonword_share, min_letters, coherence_margin) -> None:
    if int(m) != m or m < 1:
        raise ValueError(f"m (top tokens classified) must be a positive integer; got {m!r}.")
    for name, value in (("min_word_share", min_word_share), ("min_nonword_share", min_nonword_share)):
        if not 0 < value <= 1:
            raise ValueError(f"{name} is a share of the top tokens and must be in (0, 1]; got {value!r}.")
    if int(min_letters) != min_letters or min_letters < 1:
        raise ValueError(f"min_letters must be a positive integer; got {min_letters!r}.")
    if coherence_margin < 0:
        raise ValueError(f"coherence_margin must be >= 0; got {coherence_margin!r}.")


def _token_list(value, m: int) -> list[str]:
    """First m tokens of one `<side>_top_tokens` cell (a list, as chapter 1's Arrow list columns read back; a
    numpy array in tables written before them)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        raise ValueError(f"Expected a list of token strings in `<side>_top_tokens`; got the string "
                         f"{value!r}.")
    return [str(t) for t in list(value)[:m]]


def _token_lists(column: pd.Series, m: int) -> tuple[np.ndarray, pa.Array]:
    """(counts [n]: how many tokens each row keeps, tokens: the first m tokens of every row, concatenated) of
    a `<side>_top_tokens` column, in Arrow's buffers: no Python string per token (some 3M of them for 12
    layers x 24,576 features at m = 10, a quarter of a GB as Python objects)."""
    if isinstance(column.dtype, pd.ArrowDtype) and pa.types.is_list(column.dtype.pyarrow_dtype):
        lists = pa.array(column)  # chapter 1's list columns, as `io.read_parquet` reads them back
    else:  # lists or numpy arrays per cell: tables written before the Arrow columns, or built by hand
        lists = pa.array([_token_list(value, m) for value in column], type=pa.list_(pa.string()))
    if not pa.types.is_string(lists.type.value_type) and not pa.types.is_large_string(lists.type.value_type):
        raise ValueError(f"Expected lists of token strings in `{column.name}`; got {lists.type}.")
    kept = pc.list_slice(lists, 0, m)
    counts = pc.list_value_length(kept).fill_null(0).to_numpy().astype(np.int64)
    tokens = pc.list_flatten(kept)
    tokens = tokens.combine_chunks() if isinstance(tokens, pa.ChunkedArray) else tokens
    return counts, pc.fill_null(tokens, "None")  # a missing token reads as str(None), as a Python list's did


def kind_shares(df: pd.DataFrame, side: str, *, m: int = 5, min_letters: int = 2) -> pd.DataFrame:
    """Shares of word and non-word kinds among each row's first m `<side>_top_tokens`.

    Returns (index of df): `word_share`, `nonword_share` (punct, space, digit, byte_special) and `n_tokens`
    (the tokens classified: m, or fewer when a row has fewer). Shares are NaN for rows without tokens.
    """
    _check_side(side)
    _require(df, [f"{side}_top_tokens"])
    counts, tokens = _token_lists(df[f"{side}_top_tokens"], int(m))
    # each distinct token is classified once (features share most of their top tokens), then counted per row
    encoded = pc.dictionary_encode(tokens)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    kinds = np.array([_token_kind(t, int(min_letters)) for t in encoded.dictionary.to_pylist()], dtype=object)
    row = np.repeat(np.arange(len(counts), dtype=np.int32), counts)  # [n_tokens]: each token's row

    def per_row(flags: np.ndarray) -> np.ndarray:  # flags [n_distinct] -> count per row
        return np.bincount(row[flags[codes]], minlength=len(counts))  # no [n_tokens] float weights

    n = counts.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame({"word_share": per_row(kinds == "word") / n,
                            "nonword_share": per_row(np.isin(kinds, list(NONWORD_KINDS))) / n,
                            "n_tokens": counts.astype(int)}, index=df.index)
    del tokens, encoded, codes, per_row  # codes is a view of Arrow's buffer
    pa.default_memory_pool().release_unused()  # else Arrow keeps the pages (0.05 GB at 12 x 24,576 features)
    return out


def _coherence(df: pd.DataFrame, side: str, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(incoherent, clearly coherent) boolean arrays; a missing `<side>_coherent` value is neither."""
    _require(df, [f"{side}_coherent"])
    coherent = df[f"{side}_coherent"].astype("boolean")
    incoherent = (~coherent).fillna(False).to_numpy(dtype=bool)
    clear = coherent.fillna(False).to_numpy(dtype=bool)
    if margin > 0:
        cols = [f"{side}_{s}" for s in ("string_sim", "thr_string_sim", "emb_cos", "thr_emb_cos")]
        _require(df, cols)
        sim, thr_sim, cos, thr_cos = (df[c].to_numpy(dtype=float) for c in cols)
        with np.errstate(invalid="ignore"):
            clear &= (sim - thr_sim > margin) | (cos - thr_cos > margin)
    return incoherent, clear


def label_side(df: pd.DataFrame, side: str, *, m: int = 5, min_word_share: float = 0.6,
               min_nonword_share: float = 0.6, min_letters: int = 2,
               coherence_margin: float = 0.0, cache: dict | None = None) -> pd.Series:
    """Label each row's side semantic / non-semantic / unclear (categorical Series named `<side>_label`).

    Reads `<side>_top_tokens` and `<side>_coherent` (chapter 1; with coherence_margin > 0 also
    `<side>_string_sim`, `<side>_emb_cos` and their `<side>_thr_*` thresholds). Of the first m top tokens:
    non-semantic if non-word kinds are >= min_nonword_share of them or the tokens are not coherent; else
    semantic if words are >= min_word_share and the tokens are coherent (each similarity against its
    threshold: one must exceed it by more than coherence_margin); else unclear. `token_kind` gives the kinds.
    cache: a dict the caller keeps for this df, so relabelling it reuses the token kinds (`cached_shares`).
    """
    _check_label_params(m, min_word_share, min_nonword_share, min_letters, coherence_margin)
    shares = cached_shares(df, side, m=m, min_letters=min_letters, cache=cache)
    incoherent, clear = _coherence(df, side, coherence_margin)
    nonword = (shares["nonword_share"] >= min_nonword_share).to_numpy()  # NaN (no tokens) compares False
    words = (shares["word_share"] >= min_word_share).to_numpy()
    label = np.select([nonword | incoherent, words & clear], ["non-semantic", "semantic"], "unclear")
    return pd.Series(pd.Categorical(label, categories=LABELS), index=df.index, name=f"{side}_label")


def cached_shares(df: pd.DataFrame, side: str, *, m: int, min_letters: int,
                  cache: dict | None = None) -> pd.DataFrame:
    """`kind_shares`, computed once per (side, m, min_letters) when a cache dict (kept by the caller for this
    df) is given: the labelling grid relabels the same rows dozens of times, and only these three change the
    shares."""
    if cache is None:
        return kind_shares(df, side, m=m, min_letters=min_letters)
    key = (side, int(m), int(min_letters))
    if key not in cache:
        cache[key] = kind_shares(df, side, m=m, min_letters=min_letters)
    return cache[key]


def label_features(df: pd.DataFrame, *, sides=SIDES, cache: dict | None = None, **params) -> pd.DataFrame:
    """A copy of df with `<side>_label`, `<side>_word_share` and `<side>_nonword_share` for each side.

    params: the keyword parameters of `label_side` (m, min_word_share, min_nonword_share, min_letters,
    coherence_margin); the shares are of the first m top tokens, so a reader sees why each label was given.
    cache: as in `label_side`.
    """
    unknown = set(params) - set(LABEL_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown labelling parameter(s) {sorted(unknown)}; "
                         f"known: {sorted(LABEL_DEFAULTS)}.")
    full = {**LABEL_DEFAULTS, **params}
    cache = {} if cache is None else cache
    out = df.copy()
    for side in sides:
        shares = cached_shares(df, side, m=full["m"], min_letters=full["min_letters"], cache=cache)
        out[f"{side}_word_share"] = shares["word_share"]
        out[f"{side}_nonword_share"] = shares["nonword_share"]
        out[f"{side}_label"] = label_side(df, side, **full, cache=cache)
    return out


def label_sensitivity(df: pd.DataFrame, grid: dict[str, list], *, sides=SIDES,
                      cache: dict | None = None) -> pd.DataFrame:
    """How many rows get each label as one labelling parameter varies (the others at their defaults).

    grid: {parameter: values}, parameters of `label_side`, e.g. {"min_word_share": [0.4, 0.6, 0.8]}.
    cache: as in `label_side`. Returns tidy rows: parameter, value, side, label, n (rows with that label),
    share (n / rows).
    """
    unknown = set(grid) - set(LABEL_DEFAULTS)
    if unknown:
        raise ValueError(f"Unknown labelling parameter(s) {sorted(unknown)}; "
                         f"known: {sorted(LABEL_DEFAULTS)}.")
    rows, cache = [], {} if cache is None else cache
    for parameter, values in grid.items():
        for value in values:
            params = {**LABEL_DEFAULTS, parameter: value}
            for side in sides:
                counts = label_side(df, side, **params, cache=cache).value_counts().reindex(list(LABELS), fill_value=0)
                for label, n in counts.items():
                    rows.append({"parameter": parameter, "value": value, "side": side, "label": label,
                                 "n": int(n), "share": n / len(df) if len(df) else math.nan})
    return pd.DataFrame(rows, columns=["parameter", "value", "side", "label", "n", "share"])


# ----------------------------------------------------------------------------------------------------------
# Statistics


def _values(x) -> np.ndarray:
    """1-D float array without NaNs."""
    x = np.asarray(x, dtype=float).ravel()
    return x[~np.isnan(x)]


def population_values(df: pd.DataFrame, col: str, label_col: str, a: str = "semantic",
                      b: str = "non-semantic") -> tuple[np.ndarray, np.ndarray]:
    """(values of col where label_col == a, where label_col == b): each 1-D float without NaNs."""
    label = df[label_col].to_numpy()
    return _values(df.loc[label == a, col]), _values(df.loc[label == b, col])


def _describe(v: np.ndarray) -> dict[str, float]:
    if len(v) == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "p75": math.nan}
    return {"n": len(v), "mean": float(v.mean()), "median": float(np.median(v)),
            "p75": float(np.quantile(v, 0.75))}


def summary_by_population(df: pd.DataFrame, value_cols, by=("label",)) -> pd.DataFrame:
    """n, mean, median and P75 of each value column in each population (tidy, long).

    by: the column(s) that define a population (e.g. "dec_label", or ["layer", "dec_label"]); empty
    categories of a categorical label appear with n = 0 and NaN statistics. Returns the `by` columns,
    `population` (their values joined by ' / '), `column`, `n` (non-NaN values), `mean`, `median`, `p75`.
    NaN values are left out.
    """
    by = [by] if isinstance(by, str) else list(by)
    value_cols = [value_cols] if isinstance(value_cols, str) else list(value_cols)
    _require(df, [*by, *value_cols])
    rows = []
    for key, group in df.groupby(by, observed=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for col in value_cols:
            rows.append({**dict(zip(by, key)), "population": " / ".join(map(str, key)), "column": col,
                         **_describe(_values(group[col]))})
    return pd.DataFrame(rows, columns=[*by, "population", "column", "n", "mean", "median", "p75"])


def share_above_pooled_p75(df: pd.DataFrame, col: str, label_col: str) -> pd.DataFrame:
    """Share of each population strictly above the 75th percentile of all populations pooled.

    With no difference between populations every share is about 0.25. Rows without a label or a value are
    left out. Returns: population, n, n_above, share_above, pooled_p75.
    """
    _require(df, [col, label_col])
    data = df[[label_col, col]].dropna()
    pooled = float(np.quantile(data[col].to_numpy(dtype=float), 0.75)) if len(data) else math.nan
    rows = []
    for population, group in data.groupby(label_col, observed=False, sort=True):
        n, above = len(group), int((group[col].to_numpy(dtype=float) > pooled).sum())
        rows.append({"population": population, "n": n, "n_above": above,
                     "share_above": above / n if n else math.nan, "pooled_p75": pooled})
    return pd.DataFrame(rows, columns=["population", "n", "n_above", "share_above", "pooled_p75"])


def mann_whitney(x, y) -> tuple[float, float, float]:
    """Mann-Whitney U of x against y: (U, two-sided p, rank-biserial correlation).

    U counts the pairs (x_i, y_j) with x_i > y_j, ties counting one half (U near n_x n_y / 2: no shift).
    p: `scipy.stats.mannwhitneyu` with method="asymptotic" (normal approximation with tie and continuity
    corrections); 1.0 when all values are tied. Rank-biserial = 2U / (n_x n_y) - 1, in [-1, 1], positive
    when x tends to be larger (it equals Cliff's delta). NaNs are dropped; all NaN when x or y is empty.
    """
    x, y = _values(x), _values(y)
    if len(x) == 0 or len(y) == 0:
        return math.nan, math.nan, math.nan
    result = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic", use_continuity=True)
    u = float(result.statistic)
    p = 1.0 if np.isnan(result.pvalue) else float(result.pvalue)  # all tied: no evidence of a shift
    return u, p, 2.0 * u / (len(x) * len(y)) - 1.0


def cliffs_delta(x, y) -> float:
    """Cliff's delta: (#pairs x_i > y_j - #pairs x_i < y_j) / (n_x n_y), in [-1, 1]; NaN if x or y is empty.

    Counted with a sort and binary searches, O(n log n), never the [n_x, n_y] pair matrix. NaNs are dropped.
    """
    x, y = _values(x), _values(y)
    if len(x) == 0 or len(y) == 0:
        return math.nan
    ys = np.sort(y)
    less = np.searchsorted(ys, x, side="left")  # y values below each x
    greater = len(ys) - np.searchsorted(ys, x, side="right")  # y values above each x
    return float((less - greater).sum() / (len(x) * len(y)))


def _draw_counts(i: np.ndarray, n: int) -> np.ndarray:
    """[b, n]: how often each of n values is drawn in each row of the indices i: [b, draws]."""
    rows = np.arange(len(i))[:, None] * n
    return np.bincount((i + rows).ravel(), minlength=len(i) * n).reshape(len(i), n)


def _median_from_counts(counts: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """[b]: median of each resample drawing sorted_values[j] counts[r, j] times (mean of the middle two)."""
    cum = np.cumsum(counts, axis=1)
    n = int(cum[0, -1])
    lower = (cum < (n + 1) // 2).sum(axis=1)  # position of the ((n + 1) // 2)-th smallest draw
    upper = (cum < n // 2 + 1).sum(axis=1)
    return (sorted_values[lower] + sorted_values[upper]) / 2


def _resample_statistics(ix: np.ndarray, iy: np.ndarray, *, xs: np.ndarray, ys: np.ndarray, names,
                         below: np.ndarray, above: np.ndarray, axis: int = -1) -> np.ndarray:
    """The statistics `names` of the resamples xs[ix] versus ys[iy]: [len(names), *batch].

    xs, ys: the samples, sorted ascending; ix: [*batch, n_x] and iy: [*batch, n_y], the drawn indices
    (what `scipy.stats.bootstrap` resamples here); below / above: searchsorted(ys, xs, "left" / "right"),
    the original y below / not above each x. Works on draw counts: O(n) per resample, no sort and no
    [n_x, n_y] pair matrix.
    """
    batch, n1, n2 = ix.shape[:-1], len(xs), len(ys)
    ix, iy = np.moveaxis(ix, axis, -1).reshape(-1, n1), np.moveaxis(iy, axis, -1).reshape(-1, n2)
    if {"median_diff", "cliffs_delta"} & set(names):
        w = _draw_counts(ix, n1).astype(float)  # [b, n_x]
        v = _draw_counts(iy, n2).astype(float)  # [b, n_y]
    out = []
    for name in names:
        if name == "mean_diff":  # a gather: cheaper than counting the draws when only the means are needed
            out.append(np.take(xs, ix).mean(axis=1) - np.take(ys, iy).mean(axis=1))
        elif name == "median_diff":
            out.append(_median_from_counts(w, xs) - _median_from_counts(v, ys))
        else:  # per original x: (drawn y below it) - (drawn y above it) = cum[below] - (n_y - cum[above])
            cum = np.concatenate([np.zeros((len(v), 1)), np.cumsum(v, axis=1)], axis=1)  # [b, n_y + 1]
            # np.take: several times faster than cum[:, below] here
            reach = np.take(cum, below, axis=1) + np.take(cum, above, axis=1) - n2  # [b, n_x]
            out.append(np.einsum("bi,bi->b", w, reach) / (n1 * n2))
    return np.stack(out).reshape(len(out), *batch)


def _estimate(xs: np.ndarray, ys: np.ndarray, stat: str) -> float:
    if stat == "mean_diff":
        return float(xs.mean() - ys.mean())
    if stat == "median_diff":
        return float(np.median(xs) - np.median(ys))
    return cliffs_delta(xs, ys)


def _check_resampling(n_boot, ci) -> None:
    if not 0 < ci < 1:
        raise ValueError(f"ci is a coverage probability in (0, 1); got {ci!r}.")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer; got {n_boot!r}.")


def _counted(statistic, bar):
    """`statistic` that also counts on `bar` the resamples of each batch scipy hands it (the [*batch, n]
    draws along `axis`); scipy's first call, on the data themselves (1-D), counts none."""
    def counted(ix, iy, axis=-1):
        out = statistic(ix, iy, axis=axis)
        if ix.ndim > 1:
            bar.update(ix.size // ix.shape[axis])
        return out
    return counted


def _bootstrap(x, y, names, *, n_boot: int, ci: float, seed: int,
               bar=None) -> dict[str, tuple[float, float, float]]:
    """(estimate, lo, hi) of each statistic from the same resamples; NaN CIs when x or y has < 2 values.

    `scipy.stats.bootstrap`: x and y resampled independently, percentile intervals, in batches of about
    260,000 draws (memory stays small whatever n_boot; small batches stay in cache). bar: a progress bar
    (`streaming.progress_bar`) that counts the resamples, shared by the bootstraps of one step.
    """
    bad = [s for s in names if s not in BOOTSTRAP_STATS]
    if bad:
        raise ValueError(f"Unknown bootstrap statistic(s) {bad}; use one of {BOOTSTRAP_STATS}.")
    _check_resampling(n_boot, ci)
    xs, ys = np.sort(_values(x)), np.sort(_values(y))
    if len(xs) == 0 or len(ys) == 0:
        return {s: (math.nan, math.nan, math.nan) for s in names}
    estimates = {s: _estimate(xs, ys, s) for s in names}
    if len(xs) < 2 or len(ys) < 2:
        return {s: (estimates[s], math.nan, math.nan) for s in names}
    below, above = np.searchsorted(ys, xs, side="left"), np.searchsorted(ys, xs, side="right")
    statistic = functools.partial(_resample_statistics, xs=xs, ys=ys, names=list(names), below=below,
                                  above=above)
    statistic = statistic if bar is None else _counted(statistic, bar)
    result = stats.bootstrap(  # resamples the indices of x and y; the statistic counts the draws
        (np.arange(len(xs)), np.arange(len(ys))), statistic, n_resamples=int(n_boot),
        batch=max(1, (1 << 18) // (len(xs) + len(ys))), vectorized=True, paired=False,
        confidence_level=ci, method="percentile", rng=np.random.default_rng(seed))
    low, high = (np.atleast_1d(v) for v in result.confidence_interval)
    return {s: (estimates[s], float(low[i]), float(high[i])) for i, s in enumerate(names)}


_POOLS: dict[int, ThreadPoolExecutor] = {}  # by size, kept: new threads would each take a new malloc arena
_WORKER = threading.local()


def in_threads(fn, items, workers: int | None = None) -> list:
    """[fn(item) for item in items], on up to `workers` threads (default: the CPUs this process may use).

    For independent bootstraps: their numpy passes (drawing, take, cumsum) release the GIL, so they run side
    by side (1.8-2x on 2 cores; chapter 3 is otherwise one core's work). Each call keeps its own seed, so the
    results equal a sequential run's, in the same order. The threads are kept for the next call: glibc gives
    each new thread its own malloc arena, which keeps what it freed (at 12 GPT-2 blocks chapter 3's kernel
    grew by 0.3 GB with a new pool per call). Called from one of these threads, it runs sequentially.
    """
    items = list(items)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(len(items), workers or cpus)
    if workers <= 1 or getattr(_WORKER, "busy", False):
        return [fn(item) for item in items]
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="weightscope-bootstrap",
                                             initializer=setattr, initargs=(_WORKER, "busy", True))
    return list(_POOLS[workers].map(fn, items))


def bootstrap_ci(x, y, stat: str = "mean_diff", *, n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0, bar=None) -> tuple[float, float, float]:
    """(estimate, lo, hi): a statistic of x versus y with its percentile bootstrap confidence interval.

    stat: "mean_diff" (mean x - mean y), "median_diff" (median x - median y) or "cliffs_delta". x and y are
    resampled independently with replacement n_boot times (`scipy.stats.bootstrap`, method="percentile");
    the same seed gives the same interval. NaNs are dropped; all NaN when x or y is empty, NaN lo/hi when
    either has fewer than 2 values. Cost: n_boot passes over x and y. bar: counts the resamples
    (`_bootstrap`).
    """
    return _bootstrap(x, y, [stat], n_boot=n_boot, ci=ci, seed=seed, bar=bar)[stat]


ONE_SAMPLE_STATS = {"mean": np.mean, "median": np.median}


def bootstrap_one(x, stat: str = "mean", *, n_boot: int = 2000, ci: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi): the mean or median of one sample with its percentile bootstrap interval.

    `bootstrap_ci`'s conventions for one sample: NaNs dropped, all NaN when x is empty, NaN lo/hi under 2
    values; `scipy.stats.bootstrap` in batches of about 260,000 draws.
    """
    if stat not in ONE_SAMPLE_STATS:
        raise ValueError(f"Unknown one-sample statistic {stat!r}; use one of {sorted(ONE_SAMPLE_STATS)}.")
    _check_resampling(n_boot, ci)
    xs, fn = _values(x), ONE_SAMPLE_STATS[stat]
    if len(xs) < 2:
        return (float(fn(xs)) if len(xs) else math.nan), math.nan, math.nan
    result = stats.bootstrap((xs,), fn, n_resamples=int(n_boot), batch=max(1, (1 << 18) // len(xs)),
                             vectorized=True, confidence_level=ci, method="percentile",
                             rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return float(fn(xs)), float(low), float(high)


def holm(p) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error over the given tests); NaNs stay NaN.

    `statsmodels.stats.multitest.multipletests(method="holm")` over the non-NaN values.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, math.nan)
    valid = ~np.isnan(p)
    if valid.any():
        out[valid] = multipletests(p[valid], method="holm")[1]
    return out


def compare_populations(df: pd.DataFrame, value_cols, label_col: str, a: str = "semantic",
                        b: str = "non-semantic", *, n_boot: int = 2000, ci: float = 0.95,
                        seed: int = 0, bar=None) -> pd.DataFrame:
    """One row per value column comparing population a with population b (rows with label_col == a, == b).

    Columns: column, a, b, n_a, n_b, mean_a, mean_b, median_a, median_b, p75_a, p75_b; mean_diff (mean a -
    mean b) with mean_diff_lo/hi (bootstrap CI); cliffs_delta (> 0: a tends to be larger) with
    cliffs_delta_lo/hi (bootstrap CI, same resamples); U (Mann-Whitney, pairs a > b), p_value (two-sided) and
    p_holm (Holm-adjusted over the columns compared). NaNs in a column are left out of that column. A
    population with fewer than 2 values gives NaN comparisons instead of an error. bar: counts the resamples
    (`_bootstrap`).
    """
    value_cols = [value_cols] if isinstance(value_cols, str) else list(value_cols)
    _require(df, [label_col, *value_cols])

    def compare_column(col: str) -> dict:
        x, y = population_values(df, col, label_col, a, b)
        da, db = _describe(x), _describe(y)
        row = {"column": col, "a": a, "b": b, "n_a": da["n"], "n_b": db["n"]}
        for name in ("mean", "median", "p75"):
            row[f"{name}_a"], row[f"{name}_b"] = da[name], db[name]
        if len(x) >= 2 and len(y) >= 2:
            boot = _bootstrap(x, y, ["mean_diff", "cliffs_delta"], n_boot=n_boot, ci=ci, seed=seed, bar=bar)
            u, p, _ = mann_whitney(x, y)
        else:
            boot = {s: (math.nan, math.nan, math.nan) for s in ("mean_diff", "cliffs_delta")}
            u = p = math.nan
        for s, (estimate, lo, hi) in boot.items():
            row[s], row[f"{s}_lo"], row[f"{s}_hi"] = estimate, lo, hi
        row["U"], row["p_value"] = u, p
        return row

    out = pd.DataFrame(in_threads(compare_column, value_cols))  # the columns' bootstraps side by side
    out["p_holm"] = holm(out["p_value"]) if len(out) else []
    return out


# ----------------------------------------------------------------------------------------------------------
# Within-layer comparisons: layer is a confounder (label shares and reads both change with depth)
# ----------------------------------------------------------------------------------------------------------


def _u_and_variance(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mann-Whitney U (pairs x > y, ties count 1/2) and its variance under no difference, tie-corrected."""
    from scipy.stats import rankdata

    n_x, n_y = len(x), len(y)
    both = np.concatenate([x, y])
    ranks = rankdata(both)
    u = float(ranks[:n_x].sum() - n_x * (n_x + 1) / 2)
    n = n_x + n_y
    _, ties = np.unique(both, return_counts=True)
    tie_term = float((ties**3 - ties).sum()) / (n * (n - 1)) if n > 1 else 0.0
    return u, n_x * n_y / 12.0 * ((n + 1) - tie_term)


def stratified_rank_test(values, is_a, strata) -> dict[str, float]:
    """van Elteren's stratified rank test of population a against b, and its weighted Cliff's delta.

    values: [n] floats; is_a: [n] bool (True: population a, False: b); strata: [n] stratum of each row (the
    layer). Within each stratum l with n_a, n_b >= 1 and N = n_a + n_b: U_l (pairs a > b), E_l = n_a n_b / 2
    and the tie-corrected variance V_l; weights w_l = 1 / (N + 1) (van Elteren). T = sum w_l (U_l - E_l),
    z = T / sqrt(sum w_l^2 V_l), two-sided normal p. Only comparisons inside a stratum enter, so a difference
    between strata (e.g. semantic features sitting in layers read more) cannot make it significant.
    Returns {"statistic": T, "z", "p_value", "cliffs_delta": sum w_l (2 U_l - n_a n_b) / sum w_l n_a n_b,
    "n_strata": strata with both populations}. NaN values are left out.
    """
    from scipy.stats import norm

    values, is_a, strata = np.asarray(values, dtype=float), np.asarray(is_a, dtype=bool), np.asarray(strata)
    keep = ~np.isnan(values)
    T = var = num = den = 0.0
    used = 0
    for s in np.unique(strata[keep]):
        rows = keep & (strata == s)
        x, y = values[rows & is_a], values[rows & ~is_a]
        if len(x) == 0 or len(y) == 0:
            continue
        u, v = _u_and_variance(x, y)
        w = 1.0 / (len(x) + len(y) + 1)
        T += w * (u - len(x) * len(y) / 2)
        var += w * w * v
        num += w * (2 * u - len(x) * len(y))
        den += w * len(x) * len(y)
        used += 1
    if used == 0 or var <= 0:
        return {"statistic": math.nan, "z": math.nan, "p_value": math.nan, "cliffs_delta": math.nan,
                "n_strata": used}
    z = T / math.sqrt(var)
    return {"statistic": T, "z": z, "p_value": float(2 * norm.sf(abs(z))), "cliffs_delta": num / den,
            "n_strata": used}


def within_layer_effects(df: pd.DataFrame, value_cols, label_col: str, a: str = "semantic",
                         b: str = "non-semantic", *, by: str = "layer") -> pd.DataFrame:
    """Per stratum (layer) and value column: n_a, n_b, mean_a, mean_b and Cliff's delta of a against b.

    Strata where either population has no value give NaN effects (kept, so the reader sees them).
    """
    value_cols = [value_cols] if isinstance(value_cols, str) else list(value_cols)
    _require(df, [by, label_col, *value_cols])
    rows = []
    for stratum, group in df.groupby(by, sort=True):
        for col in value_cols:
            x, y = _values(group.loc[group[label_col] == a, col]), _values(group.loc[group[label_col] == b, col])
            delta = math.nan
            if len(x) and len(y):
                u, _ = _u_and_variance(x, y)
                delta = (2 * u - len(x) * len(y)) / (len(x) * len(y))
            rows.append({by: stratum, "column": col, "n_a": len(x), "n_b": len(y),
                         "mean_a": float(x.mean()) if len(x) else math.nan,
                         "mean_b": float(y.mean()) if len(y) else math.nan, "cliffs_delta": delta})
    return pd.DataFrame(rows, columns=[by, "column", "n_a", "n_b", "mean_a", "mean_b", "cliffs_delta"])


def ecdf_points(values: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF of `values` [n] at no more than `points` of its own values, evenly spaced in rank,
    the lowest and highest always in: (x [k], F(x) [k]), F(x) = share of values <= x, exact at each x (ties
    counted); NaNs left out. Drawn as steps (`line_shape="hv"`) the curve is within 1 / (points - 1) of the
    full ECDF everywhere, at a fixed page weight whatever n is."""
    v = np.sort(np.asarray(values, dtype=float))
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return v, v
    ranks = np.linspace(0, len(v) - 1, min(max(points, 2), len(v))).round().astype(int)
    x = np.unique(v[ranks])
    return x, np.searchsorted(v, x, side="right") / len(v)
