"""Metric kernels of chapter 1: which SAE features directly predict (or are triggered by) vocabulary tokens.

Both sides of the chapter are the same computation, rows `D` [n_features, d_model] times a matrix
`M` [d_model, d_vocab], one score per (feature, token):

* decoder-unembedding: `D = W_dec` [n_features, d_model], `M = fold_norm(norm_w, W_U, plus_one=...)`;
* encoder-embedding: `D = W_enc.T` [n_features, d_model], `M = W_E.T` [d_model, d_vocab].

`token_score_stats` streams over chunks of features and never holds more than one chunk of scores
(a full 16,384 x 256,000 fp32 matrix would be 16 GB). The other helpers score how coherent a feature's top
tokens are (string similarity, embedding cosine) and build null baselines (random / shuffled directions).
"""

from __future__ import annotations

import itertools
import re
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from rapidfuzz.distance import Levenshtein
from torch import Tensor

from weightscope.compute.streaming import (CPU_BLOCK_BYTES, announce, auto_chunk_size, is_oom, progress_bar,
                                           release_cache, scores_buffer)

if TYPE_CHECKING:  # pandas is only needed by `stats_frame`
    import pandas as pd

__all__ = [
    "STAT_NAMES",
    "TOKEN_KINDS_EXCLUDABLE",
    "TokenScoreStats",
    "content_token_ids",
    "list_column",
    "mean_pairwise_cosine",
    "mean_pairwise_string_similarity",
    "normalize_token",
    "normalized_levenshtein",
    "random_directions_like",
    "shuffled_rows",
    "stats_frame",
    "token_categories",
    "token_score_stats",
    "topk_rows",
]

# Per-feature statistics of the full score distribution, in the order `stats_frame` lists them.
STAT_NAMES = ("max", "min", "mean", "std", "top_z", "skew", "kurtosis", "entropy")

_TOPK_GROUP = 64  # columns per group in the two-stage top-k (see `topk_rows`)
_EXP_FLOOR = -87.0  # exp(-87) ~ 1.6e-38, just above fp32's smallest normal number
_FUSE_MIN_SCORES = 1 << 26  # auto-fuse from ~67M scores a call: below, the compile (seconds) outweighs the gain


# ----------------------------------------------------------------------------------------------------------
# Streaming top-k + distribution statistics of D @ M
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenScoreStats:
    """Per-feature results of `token_score_stats`, all on CPU (scores fp32, ids int64).

    top_ids, top_scores: [n_features, k], highest score first.
    bottom_ids, bottom_scores: [n_features, k], lowest score first.
    max, min, mean, std, top_z, skew, kurtosis, entropy: [n_features] statistics of the feature's scores
    over the whole vocabulary (see `token_score_stats`).
    d_vocab: number of tokens scored (log(d_vocab) is the entropy of a flat distribution).
    """

    top_ids: Tensor
    top_scores: Tensor
    bottom_ids: Tensor
    bottom_scores: Tensor
    max: Tensor
    min: Tensor
    mean: Tensor
    std: Tensor
    top_z: Tensor
    skew: Tensor
    kurtosis: Tensor
    entropy: Tensor
    d_vocab: int

    def __len__(self) -> int:
        return self.top_ids.shape[0]

    def to_frame(self, feature_ids: Sequence[int] | Tensor | None = None) -> "pd.DataFrame":
        """Tidy table, one row per feature; see `stats_frame`."""
        return stats_frame(self, feature_ids)


@torch.no_grad()  # weights-only analysis: never build an autograd graph (SAE weights are Parameters)
def token_score_stats(
    D: Tensor,
    M: Tensor,
    *,
    k: int = 10,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    fused: bool | None = None,
    desc: str = "token scores",
    unit: str = "feature",
) -> TokenScoreStats:
    """Top/bottom-k tokens and distribution statistics of the scores `D @ M`, in one streaming pass.

    D: [n_features, d_model] feature directions (W_dec, or W_enc.T).
    M: [d_model, d_vocab] (W_U folded with the final norm, or W_E.T).
    k: tokens kept at each end, 1 <= k <= d_vocab.
    chunk_size: features scored at once; None sizes it from free memory (CUDA: torch.cuda.mem_get_info,
        CPU: psutil, capped at 1 GiB). On an out-of-memory error the chunk is halved and retried.
    device: where to compute; default M's device (the big matrix stays put, D moves chunk by chunk).
    dtype: dtype of the matrix product; default the promotion of D's and M's dtypes. Statistics are always
        accumulated in fp32, whatever the product's dtype. On a CPU without AVX-512-BF16/AMX a bf16 product
        is emulated and far slower than fp32 (about 35x on an AVX2 CPU): pass dtype=torch.float32 there.
    progress: show a progress bar over features (`streaming.progress_bar`), named `desc`, counting `unit`s.
    fused: compute the moments and the entropy with one `torch.compile`d reduction (two reads of the
        scores) instead of a dozen eager passes. None: fused when the call scores at least 2**26 values;
        below that the one-off compile (seconds, once per process and dtype) costs more than it saves. If
        compiling fails (no C++ compiler on CPU, no Triton on GPU), warns once and computes eagerly.

    Per feature, over the whole vocabulary (scores s_1..s_V, V = d_vocab):
      max, min, mean; std (population, ddof=0); top_z = (max - mean) / std;
      skew = m3 / m2^1.5 and kurtosis = m4 / m2^2 - 3 (excess) from the central moments m_p;
      entropy = H(softmax(s)) in nats, between 0 and log(V).
    A feature whose scores are all equal (e.g. a zero row) has std 0 and NaN top_z, skew and kurtosis.

    Ties: each end is a valid top-k (its scores are exactly the k largest/smallest, each id scores what is
    reported), but which of several tied tokens is kept, and their order, is unspecified (torch.topk's
    choice; it may differ between devices and chunk sizes).

    Returns a `TokenScoreStats` on CPU. Scores are never materialised beyond one chunk of features.
    """
    _check_operands(D, M, k)
    device = torch.device(device) if device is not None else M.device
    dtype = dtype or torch.promote_types(D.dtype, M.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"token_score_stats computes in a floating dtype; got dtype={dtype}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of features or None; got {chunk_size}.")

    M = M.to(device=device, dtype=dtype)
    n_features, d_vocab = D.shape[0], M.shape[1]
    out = _empty_results(n_features, k)
    if fused is None:
        fused = n_features * d_vocab >= _FUSE_MIN_SCORES
    if chunk_size is None:
        chunk_size = auto_chunk_size(d_vocab, dtype, device)
    chunk_size = max(1, min(chunk_size, n_features))

    bar = progress_bar(n_features, progress, desc, unit)
    # on a CPU one scores buffer serves every chunk: a fresh [chunk, d_vocab] tensor per chunk is mapped and
    # faulted in anew (7-10% of a 1 GiB chunk's product here), and its rows start on 64-byte lines
    # (`scores_buffer`); a GPU's caching allocator reuses memory itself
    buffer = None
    try:
        start = 0
        while start < n_features:
            rows = min(chunk_size, n_features - start)
            if device.type == "cpu" and (buffer is None or len(buffer) < rows):
                buffer = scores_buffer(rows, d_vocab, dtype)
            out_rows = None if buffer is None else buffer[:rows]
            chunk, oom = _try_chunk(D[start : start + rows], M, k, device, dtype, fused, out_rows)
            if oom:  # the failed chunk's tensors are released by now; retry the same features with half
                buffer = out_rows = None
                if rows == 1:
                    raise RuntimeError(
                        f"token_score_stats ran out of memory scoring a single feature against "
                        f"d_vocab={d_vocab} tokens on {device} in {dtype}. Free memory on that device, or "
                        "pass device='cpu' or a smaller dtype."
                    )
                chunk_size = rows // 2
                release_cache(device)
                continue
            for name, value in chunk.items():
                out[name][start : start + rows] = value.cpu()
            start += rows
            bar.update(rows)
    finally:
        bar.close()
    return TokenScoreStats(**out, d_vocab=d_vocab)


def stats_frame(stats: TokenScoreStats, feature_ids: Sequence[int] | Tensor | None = None) -> "pd.DataFrame":
    """One row per feature: `feature`, the `STAT_NAMES` columns, then top/bottom ids and scores as list
    columns (`list_column`: a cell reads back as a Python list).

    feature_ids: [n_features] ids to label the rows with (when D was a subset of an SAE); default 0..n-1.
    """
    import pandas as pd

    n = len(stats)
    if feature_ids is None:
        feature_ids = range(n)
    feature_ids = torch.as_tensor(feature_ids).tolist()
    if len(feature_ids) != n:
        raise ValueError(
            f"feature_ids has {len(feature_ids)} entries for {n} features; pass one id per row of D."
        )
    columns = {"feature": feature_ids}
    columns.update({name: getattr(stats, name).numpy() for name in STAT_NAMES})
    for name in ("top_ids", "top_scores", "bottom_ids", "bottom_scores"):
        columns[name] = list_column(getattr(stats, name).numpy())
    return pd.DataFrame(columns)


def list_column(rows) -> "pd.api.extensions.ExtensionArray":
    """An Arrow-backed list column from rows [n, k] (a 2-D numpy array, or n lists of strings).

    A column of Python lists (or numpy arrays) costs about 100 bytes per cell plus one object per entry:
    about 0.2 GB for the 12 list columns of one 24,576-feature layer, against some 30 MB here. Each cell
    still reads back as a Python list.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if isinstance(rows, np.ndarray):
        if rows.ndim != 2 and rows.size:
            raise ValueError(f"list_column takes rows [n, k]; got an array of shape {rows.shape}")
        n, k = rows.shape if rows.ndim == 2 else (0, 0)
        values, lengths = pa.array(rows.reshape(-1)), np.full(n, k)
    else:
        values = pa.array([v for row in rows for v in row], type=pa.string())
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    # the element field named as parquet names it, so computed and read-back columns have one dtype
    array = pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.field("element", values.type)))
    return pd.array(array, dtype=pd.ArrowDtype(array.type))


def token_column(vocab: Sequence[str], ids: Tensor) -> "pd.api.extensions.ExtensionArray":
    """`list_column` of the token strings of ids [n, k] (vocab[i] per id), gathered by Arrow: the column
    `list_column([[vocab[i] for i in row] for row in ids.tolist()])` gives, without a Python string per
    cell (0.6 s -> 0.01 s at 24,576 x 10; two per side of each SAE layer in chapter 1)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    n, k = ids.shape
    values = pa.array(vocab, type=pa.string()).take(pa.array(ids.reshape(-1).numpy()))
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    array = pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.field("element", pa.string())))
    return pd.array(array, dtype=pd.ArrowDtype(array.type))


def _check_operands(D: Tensor, M: Tensor, k: int) -> None:
    if D.ndim != 2 or M.ndim != 2:
        raise ValueError(
            f"Expected D [n_features, d_model] and M [d_model, d_vocab]; got D {tuple(D.shape)} and "
            f"M {tuple(M.shape)}."
        )
    if D.shape[1] != M.shape[0]:
        hint = " M looks transposed: pass W_E.T / W_U (d_model first)." if D.shape[1] == M.shape[1] else ""
        raise ValueError(
            f"D has d_model={D.shape[1]} columns but M has {M.shape[0]} rows; M must be [d_model, d_vocab]."
            + hint
        )
    if not 1 <= k <= M.shape[1]:
        raise ValueError(f"k must be between 1 and d_vocab={M.shape[1]}; got k={k}.")


def _empty_results(n_features: int, k: int) -> dict[str, Tensor]:
    out = {name: torch.empty(n_features, k, dtype=torch.int64) for name in ("top_ids", "bottom_ids")}
    out.update({name: torch.empty(n_features, k) for name in ("top_scores", "bottom_scores")})
    out.update({name: torch.empty(n_features) for name in STAT_NAMES})
    return out


def _try_chunk(D_rows: Tensor, M: Tensor, k: int, device, dtype, fused: bool,
               out: Tensor | None = None) -> tuple[dict | None, bool]:
    """Score one chunk (into `out` [rows, d_vocab] when given); (results, False), or (None, True) on
    out-of-memory so the caller can retry."""
    try:
        return _chunk_stats(D_rows.to(device=device, dtype=dtype), M, k, fused=fused, out=out), False
    except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(err):
            raise
    return None, True  # outside the except block, so the traceback (and the chunk's tensors) is gone


def _chunk_stats(D_chunk: Tensor, M: Tensor, k: int, *, fused: bool = False,
                 out: Tensor | None = None) -> dict[str, Tensor]:
    """All per-feature results for one chunk. D_chunk: [c, d_model], M: [d_model, d_vocab], same device/dtype;
    out: [c, d_vocab] of that dtype to write the scores into (rows contiguous, the row stride may exceed
    d_vocab: `scores_buffer`), or None for a new tensor.

    Returns [c, k] ids/scores and [c] statistics, on the compute device (scores and statistics fp32).
    On CPU the rows of the product go through in blocks of a few MiB, so that the reductions after the
    first read hit cache rather than DRAM; on a GPU one block is the whole chunk.
    """
    S = torch.matmul(D_chunk, M, out=out)  # [c, d_vocab]
    c, d_vocab = S.shape
    block = c if S.device.type != "cpu" else max(1, min(c, CPU_BLOCK_BYTES // (4 * d_vocab)))
    scratch = None if fused else torch.empty(block, d_vocab, device=S.device)  # fp32, reused by every block
    parts = [_block_stats(S[i : i + block], k, scratch) for i in range(0, c, block)]
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _block_stats(S: Tensor, k: int, scratch: Tensor | None) -> dict[str, Tensor]:
    """Results for the rows of S [b, V]. scratch: [>= b, V] fp32 for the eager passes (S is then
    overwritten), or None for the fused reduction (S is only read)."""
    top_scores, top_ids = topk_rows(S, k, largest=True)
    bottom_scores, bottom_ids = topk_rows(S, k, largest=False)
    smax, smin = top_scores[:, 0].float(), bottom_scores[:, 0].float()
    moments = _fused_moments_and_entropy(S, smax) if scratch is None else None
    if moments is None:  # eager by choice, or the compiled reduction is unavailable
        if scratch is None:
            scratch = torch.empty(S.shape, device=S.device)
        moments = _moments_and_entropy(S, smax, scratch[: S.shape[0]])
    mean, m2, m3, m4, entropy = moments
    std = m2.sqrt()
    return {
        "top_ids": top_ids,
        "top_scores": top_scores.float(),
        "bottom_ids": bottom_ids,
        "bottom_scores": bottom_scores.float(),
        "max": smax,
        "min": smin,
        "mean": mean,
        "std": std,
        "top_z": (smax - mean) / std,
        "skew": m3 / (m2 * std),
        "kurtosis": m4 / m2.square() - 3.0,
        "entropy": entropy,
    }


def _moments_and_entropy(S: Tensor, smax: Tensor, P: Tensor) -> tuple[Tensor, ...]:
    """Mean, central moments m2, m3, m4 and softmax entropy of each row of S [b, V]: fp32 [b] each.

    S is overwritten; P: [b, V] fp32 scratch; smax: [b] fp32 row maxima of S (from the top-k).
    """
    X = S.float()  # fp32 accumulation for bf16/fp16 products (a copy then; S itself when fp32)
    V = X.shape[1]
    mean = X.mean(1)
    C = X.sub_(mean[:, None])  # centre before taking powers: raw power sums cancel badly on large means
    # The fp32 mean is itself rounded (by up to half an ulp of the mean, which matters when the mean is
    # large against the spread), so correct the moments about it with the small residual mean d of C.
    d = C.mean(1)
    torch.mul(C, C, out=P)
    s2 = P.sum(1) / V
    s4 = torch.linalg.vector_norm(P, dim=1).square_() / V
    s3 = P.mul_(C).sum(1) / V
    # Entropy with A = s - max <= 0 (no overflow in exp): H = log Z - sum(e^A * A) / Z, Z = sum(e^A).
    # Every term is >= 0, so a peaked distribution (H near 0) loses no precision to cancellation.
    A = C.sub_((smax - mean)[:, None])  # same rounding as C's own maximum, so max(A) is exactly 0
    if A.device.type == "cpu":
        # Flooring A keeps e^A out of fp32's subnormal range, which is very slow on CPUs; the floored
        # terms are < 2e-38 each against Z >= 1, far below fp32 resolution.
        E = torch.clamp(A, min=_EXP_FLOOR, out=P).exp_()
    else:
        E = torch.exp(A, out=P)
    Z = E.sum(1)
    entropy = Z.log() - E.mul_(A).sum(1) / Z
    return (mean + d, *_central_moments(d, s2, s3, s4), entropy)


def _moments_and_entropy_functional(S: Tensor, smax: Tensor) -> tuple[Tensor, ...]:
    """`_moments_and_entropy` without scratch or in-place writes, for torch.compile to fuse into one or two
    reductions over S [b, V] (read-only, any float dtype; smax [b] fp32). Same formulas, same outputs."""
    X = S.float()
    V = X.shape[1]
    mean = X.sum(1) / V
    C = X - mean[:, None]
    d = C.sum(1) / V
    P = C * C
    s2, s3, s4 = P.sum(1) / V, (P * C).sum(1) / V, (P * P).sum(1) / V
    A = C - (smax - mean)[:, None]
    E = torch.exp(torch.clamp(A, min=_EXP_FLOOR))
    Z = E.sum(1)
    entropy = Z.log() - (E * A).sum(1) / Z
    return (mean + d, *_central_moments(d, s2, s3, s4), entropy)


def _central_moments(d: Tensor, s2: Tensor, s3: Tensor, s4: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """m2, m3, m4 about the true mean from the power means s_p about a mean that is off by d."""
    m2 = s2 - d * d
    m3 = s3 - 3 * d * s2 + 2 * d**3
    m4 = s4 - 4 * d * s3 + 6 * d * d * s2 - 3 * d**4
    return m2, m3, m4


_COMPILED: dict[str, object] = {}  # "moments": the compiled reduction, or None once compiling has failed


def _fused_moments_and_entropy(S: Tensor, smax: Tensor) -> tuple[Tensor, ...] | None:
    """The compiled `_moments_and_entropy_functional`; None when torch.compile is unavailable here."""
    if "moments" not in _COMPILED:
        _COMPILED["moments"] = torch.compile(_moments_and_entropy_functional, dynamic=True)
        announce("compiling the fused score statistics (once per process: tens of seconds on a small CPU)")
    compiled = _COMPILED["moments"]
    if compiled is None:
        return None
    try:
        return compiled(S, smax)
    except Exception as err:  # a backend failure (no compiler, no Triton, ...) falls back to eager
        if is_oom(err):
            raise
        _COMPILED["moments"] = None
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        warnings.warn(
            f"token_score_stats: torch.compile failed ({type(err).__name__}: {first_line}); computing the "
            "statistics eagerly instead (same results, slower). Pass fused=False to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def topk_rows(S: Tensor, k: int, *, largest: bool) -> tuple[Tensor, Tensor]:
    """torch.topk along dim 1 of S [b, V], in two cheap stages unless V < 8k.

    Stage 1 splits the columns into G >= 4k groups of g columns (group j = columns j, j + G, j + 2G, ...:
    a strided view, so the reduction is a vectorised elementwise max over g slices) and keeps the k groups
    with the best extreme. Every top-k score lies in one of them (a group holding one has an extreme at
    least as good as the k-th best score, and at most k groups can beat it; with ties, enough tied groups
    are kept), so stage 2 is a torch.topk over only k * g columns plus the < g leftover ones. This replaces
    torch.topk's per-row selection over all V columns, which is slow on CPU.
    """
    b, V = S.shape
    group = min(_TOPK_GROUP, V // (4 * k))
    if group < 2 or S.stride(1) != 1:  # rows may lie further apart than V (`scores_buffer`)
        return torch.topk(S, k, dim=1, largest=largest)
    groups = V // group
    body = S[:, : groups * group].view(b, group, groups)
    extreme = body.amax(1) if largest else body.amin(1)  # [b, groups]
    best_groups = torch.topk(extreme, k, dim=1, largest=largest).indices  # [b, k]
    offsets = torch.arange(group, device=S.device) * groups
    cols = (best_groups[:, :, None] + offsets).flatten(1)  # [b, k * group]
    if V > groups * group:
        tail = torch.arange(groups * group, V, device=S.device)
        cols = torch.cat([cols, tail.expand(b, -1)], dim=1)
    scores, pos = torch.topk(S.gather(1, cols), k, dim=1, largest=largest)
    return scores, cols.gather(1, pos)


# ----------------------------------------------------------------------------------------------------------
# Token coherence: do a feature's top tokens look alike?
# ----------------------------------------------------------------------------------------------------------


def normalized_levenshtein(a: str, b: str) -> float:
    """Edit distance (insertions, deletions, substitutions) divided by the longer length (rapidfuzz).

    0.0 = identical, 1.0 = nothing in common; two empty strings are identical (0.0).
    """
    return Levenshtein.normalized_distance(a, b)


# Leading markers of a word-initial token: a space (decoded text), sentencepiece's '▁', GPT-2 BPE's 'Ġ'.
_WORD_START_MARKERS = " ▁Ġ"


def normalize_token(token: str) -> str:
    """Token text as `mean_pairwise_string_similarity` compares it: leading markers stripped, lowercased."""
    return token.lstrip(_WORD_START_MARKERS).lower()


def mean_pairwise_string_similarity(tokens: Sequence[str]) -> float:
    """Mean over unordered pairs of 1 - normalized_levenshtein, after `normalize_token` on each token.

    So ' Paris', '▁paris' and 'Paris' count as identical (1.0). NaN for fewer than 2 tokens.
    """
    texts = [normalize_token(t) for t in tokens]
    pairs = list(itertools.combinations(texts, 2))
    if not pairs:
        return math.nan
    return sum(1.0 - normalized_levenshtein(a, b) for a, b in pairs) / len(pairs)


@torch.no_grad()
def mean_pairwise_cosine(ids: Tensor, E: Tensor, *, chunk_size: int = 4096) -> Tensor:
    """Mean cosine similarity between the embeddings of each feature's tokens, over distinct pairs.

    ids: [n_features, k] token ids (k >= 2), e.g. `TokenScoreStats.top_ids`; E: [d_vocab, d_model].
    Returns [n_features] fp32 on CPU. Zero embedding rows count as cosine 0 with everything.
    Uses sum_{a != b} <u_a, u_b> = |sum_a u_a|^2 - sum_a |u_a|^2 on the unit rows u: the sum of the
    off-diagonal Gram entries without forming the [k, k] Gram matrix (O(k d) instead of O(k^2 d)).
    """
    if ids.ndim != 2 or E.ndim != 2:
        raise ValueError(
            f"Expected ids [n_features, k] and E [d_vocab, d_model]; got {tuple(ids.shape)} and "
            f"{tuple(E.shape)}."
        )
    n, k = ids.shape
    if k < 2:
        raise ValueError(f"Need at least 2 tokens per feature for a pairwise mean; got k={k}.")
    if ids.is_floating_point() or (n and (ids.min() < 0 or ids.max() >= E.shape[0])):
        raise ValueError(f"ids must be integer token ids in [0, {E.shape[0]}) (rows of E).")
    out = torch.empty(n)
    for start in range(0, n, chunk_size):
        rows = ids[start : start + chunk_size].to(E.device)
        U = F.normalize(E[rows].float(), dim=-1)  # [c, k, d_model], unit rows (zero rows stay zero)
        total = U.sum(1).square().sum(1)  # |sum_a u_a|^2 = sum over all (a, b) of <u_a, u_b>
        diagonal = U.square().sum((1, 2))  # sum_a |u_a|^2 (k, less any zero rows)
        out[start : start + len(rows)] = ((total - diagonal) / (k * (k - 1))).cpu()
    return out


# ----------------------------------------------------------------------------------------------------------
# Null baselines
# ----------------------------------------------------------------------------------------------------------


def random_directions_like(D: Tensor, *, seed: int) -> Tensor:
    """Gaussian random directions with D's row norms: [n, d] like D (same dtype and device).

    Deterministic for a seed (drawn on CPU, so the same on every device).
    """
    generator = torch.Generator().manual_seed(seed)
    R = torch.randn(D.shape, generator=generator)
    norms = torch.linalg.vector_norm(D.float(), dim=-1, keepdim=True).cpu()
    return (F.normalize(R, dim=-1) * norms).to(device=D.device, dtype=D.dtype)


def shuffled_rows(D: Tensor, *, seed: int) -> Tensor:
    """D [n, d] with each row's entries permuted independently (the "shuffled decoder" null).

    Keeps every row's multiset of values (so its norm) and destroys its alignment with the model's basis.
    Deterministic for a seed (permutations drawn on CPU).
    """
    if D.ndim != 2:
        raise ValueError(f"shuffled_rows expects D [n_features, d_model]; got shape {tuple(D.shape)}.")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.rand(D.shape, generator=generator).argsort(dim=1)  # an independent permutation per row
    return D.gather(1, perm.to(D.device))


# ----------------------------------------------------------------------------------------------------------
# Content tokens: which vocabulary entries the statistics and coherence tests are computed over
# ----------------------------------------------------------------------------------------------------------

TOKEN_KINDS_EXCLUDABLE = ("byte", "special")
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_RESERVED = re.compile(r"^<unused\d+>$")  # Gemma's reserved slots, not always flagged special


def token_categories(tokenizer, d_vocab: int) -> list[str]:
    """[d_vocab] strings, one per token id: "special", "byte" or "content".

    special: the tokenizer's special tokens (`all_special_ids`) and added tokens marked special (Gemma's
        `<start_of_turn>`, ...), and reserved `<unusedNN>` slots; ids past the tokenizer's own vocabulary (padding rows of W_U)
        count as special too.
    byte: sentencepiece byte-fallback pieces `<0xNN>` (llama2.c, Llama-2, Gemma), and byte-level BPE pieces
        (GPT-2, Llama-3) whose text alone is not valid UTF-8 (a part of a multi-byte character).
    """
    special = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(i))
    n_tok = len(tokenizer)
    ids = list(range(min(d_vocab, n_tok)))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    out = []
    for i, piece, text in zip(ids, pieces, texts):
        if i in special or _RESERVED.match(str(piece)):
            out.append("special")
        elif _BYTE_FALLBACK.match(str(piece)) or "\ufffd" in text:
            out.append("byte")
        else:
            out.append("content")
    return out + ["special"] * (d_vocab - len(ids))


def content_token_ids(categories: Sequence[str], exclude: Sequence[str] = TOKEN_KINDS_EXCLUDABLE) -> Tensor:
    """int64 ids of the tokens whose category is not in `exclude` (see `token_categories`), ascending."""
    unknown = sorted(set(exclude) - set(TOKEN_KINDS_EXCLUDABLE))
    if unknown:
        raise ValueError(f"unknown token kinds {unknown} to exclude; use any of {list(TOKEN_KINDS_EXCLUDABLE)}.")
    keep = [i for i, c in enumerate(categories) if c not in set(exclude)]
    if len(keep) < 2:
        raise ValueError(f"excluding {list(exclude)} leaves {len(keep)} tokens; keep at least 2.")
    return torch.tensor(keep, dtype=torch.int64)
