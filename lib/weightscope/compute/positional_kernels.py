"""Positional kernels of attention heads: what a head's pattern looks like once the content is averaged out.

Windows of text all start at position 0 (BOS), so the mean pattern over windows, `K[h, i, j]`, is the head's
*positional kernel*: its expected attention from query position i to key position j. It is measured from
patterns, so it holds for learned absolute positions (GPT-2) and for rotary queries and keys (Llama) alike.

    acc = KernelAccumulator(n_heads, n)     # then acc.add(pattern) per batch of windows
    K = acc.kernel()                        # [n_heads, n, n], rows sum to 1 below the diagonal
    relative_kernel(K)                      # [n_heads, n]: mean attention at distance d = i - j
    effective_tokens(pattern), content_tv(pattern, K), log_denominators(scores)
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


def translation_tv(K: torch.Tensor) -> torch.Tensor:
    """[n_heads]: how far K is from depending on the distance i - j alone.

    Reference: the rows i >= m = n // 2, each cut to the distances 0..m and renormalised, averaged (f[h, d]).
    Every row i, cut to the distances 0..min(i, m) and renormalised, is compared with f cut the same way; the
    mean total-variation distance is returned. It is 0 for any K[h, i, j] proportional to a function of i - j
    (rows renormalised over j <= i), and grows as absolute positions matter.
    """
    n = K.shape[-1]
    m = n // 2
    dist = torch.arange(m + 1)

    def cut(i: int, width: int) -> torch.Tensor:  # [n_heads, width + 1]: row i at distances 0..width
        row = K[:, i, i - dist[: width + 1]]
        return row / row.sum(-1, keepdim=True).clamp_min(1e-12)

    f = torch.stack([cut(i, m) for i in range(m, n)]).mean(0)  # [n_heads, m + 1]
    tvs = []
    for i in range(1, n):
        width = min(i, m)
        ref = f[:, : width + 1] / f[:, : width + 1].sum(-1, keepdim=True).clamp_min(1e-12)
        tvs.append(0.5 * (cut(i, width) - ref).abs().sum(-1))
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
