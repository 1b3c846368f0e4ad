"""Positional kernels of attention heads: what a head's pattern looks like once the content is averaged out.

Windows of text all start at position 0 (BOS), so the mean pattern over windows, `K[h, i, j]`, is the head's
*positional kernel*: its expected attention from query position i to key position j. It is measured from
patterns, so it holds for learned absolute positions (GPT-2) and for rotary queries and keys (Llama) alike.

    acc = KernelAccumulator(n_heads, n)     # then acc.add(pattern) per batch of windows
    K = acc.kernel()                        # [n_heads, n, n], rows sum to 1 below the diagonal
    relative_kernel(K)                      # [n_heads, n]: mean attention at distance d = i - j
    effective_tokens(pattern), content_tv(pattern, K), log_denominators(scores)
    split_half_tv(pattern)                  # [n_heads]: the kernel's own sampling noise (a null for the TVs)
"""

from __future__ import annotations

import torch


class KernelAccumulator:
    """Running mean of attention patterns [batch, n_heads, n, n] over batches of windows."""

    def __init__(self, n_heads: int, n: int):
        self.sum = torch.zeros(n_heads, n, n, dtype=torch.float64)
        self.count = 0

    def add(self, pattern: torch.Tensor) -> None:
        self.sum += pattern.to(torch.float64).sum(0).cpu()
        self.count += pattern.shape[0]

    def kernel(self) -> torch.Tensor:
        """K: [n_heads, n, n] float32, the mean pattern."""
        if self.count == 0:
            raise ValueError("no patterns were added to the kernel accumulator.")
        return (self.sum / self.count).float()


def relative_kernel(K: torch.Tensor, *, min_query: int = 0) -> torch.Tensor:
    """[n_heads, n]: mean of K[h, i, i - d] over query positions i >= max(d, min_query); 0 where none."""
    n = K.shape[-1]
    out = torch.zeros(K.shape[0], n, dtype=K.dtype)
    for d in range(n):
        diag = torch.diagonal(K, offset=-d, dim1=-2, dim2=-1)  # [n_heads, n - d]: K[h, d + m, m]
        first = max(min_query - d, 0)  # query i = d + m >= min_query
        if first < diag.shape[-1]:
            out[:, d] = diag[:, first:].mean(-1)
    return out


def _cut_rows(K: torch.Tensor, m: int) -> list[torch.Tensor]:
    """Rows i = 1..n-1 of K [n_heads, n, n], each cut to the distances 0..min(i, m) and renormalised."""
    dist = torch.arange(m + 1)
    rows = []
    for i in range(1, K.shape[-1]):
        row = K[:, i, i - dist[: min(i, m) + 1]]
        rows.append(row / row.sum(-1, keepdim=True).clamp_min(1e-12))
    return rows


def _distance_profile(K: torch.Tensor, m: int) -> torch.Tensor:
    """[n_heads, m + 1]: the rows i >= m cut to the distances 0..m, renormalised, averaged."""
    return torch.stack(_cut_rows(K, m)[m - 1:]).mean(0)


def translation_tv(K: torch.Tensor) -> torch.Tensor:
    """[n_heads]: how far K is from depending on the distance i - j alone.

    Reference: the rows i >= m = n // 2, each cut to the distances 0..m and renormalised, averaged (f[h, d]).
    Every row i, cut to the distances 0..min(i, m) and renormalised, is compared with f cut the same way; the
    mean total-variation distance is returned. It is 0 for any K[h, i, j] proportional to a function of i - j
    (rows renormalised over j <= i), and grows as absolute positions matter.
    """
    m = K.shape[-1] // 2
    f = _distance_profile(K, m)
    tvs = []
    for row in _cut_rows(K, m):
        ref = f[:, : row.shape[-1]] / f[:, : row.shape[-1]].sum(-1, keepdim=True).clamp_min(1e-12)
        tvs.append(0.5 * (row - ref).abs().sum(-1))
    return torch.stack(tvs, -1).mean(-1)


def halves(pattern: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels [n_heads, n, n] of the even and the odd windows of `pattern` [batch, n_heads, n, n]."""
    return pattern[0::2].double().mean(0).float(), pattern[1::2].double().mean(0).float()


def split_half_tv(pattern: torch.Tensor, *, min_query: int = 1) -> torch.Tensor:
    """[n_heads]: the kernel's sampling noise, the mean TV between the rows of the kernels of two halves of
    the windows (queries i >= min_query). A content TV at or below it cannot be told from the kernel's own
    noise. `pattern`: [batch >= 2, n_heads, n, n]."""
    a, b = halves(pattern)
    return (0.5 * (a - b).abs().sum(-1))[:, min_query:].mean(-1)


def split_half_translation_tv(pattern: torch.Tensor) -> torch.Tensor:
    """[n_heads]: the translation check's sampling noise in its own metric: the mean TV between the two
    halves' kernels row by row, each row cut to the distances 0..min(i, n // 2) and renormalised as
    `translation_tv` cuts them. A translation TV at or below it cannot be told from the kernel's noise."""
    a, b = halves(pattern)
    m = a.shape[-1] // 2
    tvs = [0.5 * (ra - rb).abs().sum(-1) for ra, rb in zip(_cut_rows(a, m), _cut_rows(b, m))]
    return torch.stack(tvs, -1).mean(-1)


def effective_tokens(pattern: torch.Tensor, *, min_query: int = 1) -> torch.Tensor:
    """[n_heads]: the spread of a head, exp(entropy) of its attention row (1 = one token, i + 1 = uniform),
    averaged over windows and query positions i >= min_query. `pattern`: [batch, n_heads, n, n]."""
    p = pattern[..., min_query:, :].to(torch.float64)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [batch, n_heads, n - min_query]
    return entropy.exp().mean((0, 2)).float()


def content_tv(pattern: torch.Tensor, K: torch.Tensor, *, min_query: int = 1) -> torch.Tensor:
    """[n_heads]: content dependence, the mean total-variation distance between each true attention row and
    the kernel-only row K[h, i, :] (queries i >= min_query). `pattern`: [batch, n_heads, n, n] (held-out)."""
    tv = 0.5 * (pattern.float() - K[None].to(pattern.device)).abs().sum(-1)  # [batch, n_heads, n]
    return tv[..., min_query:].mean((0, 2)).cpu()


def log_denominators(scores: torch.Tensor) -> torch.Tensor:
    """[batch, n_heads, n]: log of each attention row's softmax denominator, log sum_j exp(score_ij).

    `scores`: [batch, n_heads, n, n] pre-softmax attention scores with the causal mask as -inf
    (TransformerLens `hook_attn_scores`)."""
    return torch.logsumexp(scores.float(), dim=-1)


def relative_log_denominators(scores: torch.Tensor) -> torch.Tensor:
    """[batch, n_heads, n]: log sum_j exp(s_ij) - mean_{j <= i} s_ij, the log denominator relative to the
    row's mean score. A constant added to a row of scores leaves the pattern and this quantity unchanged, so
    it can be compared with the same quantity of any other pattern's scores (`log_kernel_scores`)."""
    s = scores.float()
    keep = torch.isfinite(s)
    mean = torch.where(keep, s, 0.0).sum(-1) / keep.sum(-1).clamp_min(1)
    return torch.logsumexp(s, dim=-1) - mean


def log_kernel_scores(K: torch.Tensor, weights_at: torch.Tensor) -> torch.Tensor:
    """[batch, n_heads, n, n]: the scores implied by the summary's pattern, log(K[h, i, j] w[h, t_j]), -inf
    above the diagonal. weights_at: [batch, n_heads, n], each key's token weight."""
    n = K.shape[-1]
    s = torch.log((K[None] * weights_at[:, :, None, :]).clamp_min(1e-30))
    return s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
