"""Ranking activations the same way on every processor: by their first `RANK_BITS` significant bits, then by
position.

Near-equal activations (the same words in near-identical contexts, or identical contexts: stories that begin
alike) differ in their last bits, or not at all, and which of them a top-n keeps then follows the processor's
rounding and its top-k kernel's tie order. It moved chapter 7's means over kept firings between an AMD and an
Intel CPU, and chapter 4's feature families between this Intel CPU's AVX-512 and AVX2 kernels (which example
positions a feature's profile averaged). Ranked here, near-equal activations are equal and the earlier
position wins. Used by chapter 4 (`top_earliest`) and chapter 7 (`rank_key` in `TopFirings`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Relative steps of 2^-9 (about 0.2%). On the demo, with every activation moved by up to 2 units in its last
# place, 8 of 2,560 features kept other firings ranked on every bit, 1 with 12 bits, none with 10.
RANK_BITS = 10
MAX_INDEX = 1 << 28  # `top_earliest`'s tie-break stays below the key's step up to this many positions


def rank_key(act: Tensor) -> Tensor:
    """fp32 [same shape]: `act` (>= 0) with all but its first `RANK_BITS` significant bits cleared (rounded
    toward zero, so the order of activations is kept, and activations a few last bits apart become equal)."""
    mask = -(1 << (24 - RANK_BITS))  # fp32 has 24 significant bits; clear the low 24 - RANK_BITS
    return (act.float().contiguous().view(torch.int32) & mask).view(torch.float32)


def top_earliest(values: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The `n` largest of each column of `values` [m, k] (>= 0) by `rank_key`, equal keys to the smaller
    index: (values [n, k], exact, strongest first; indices int64 [n, k]).

    The key is fp64 `rank_key(v) x (1 - index x 2^-40)`: keys a step apart (at least 2^-11 of themselves)
    never swap for index < `MAX_INDEX`, and equal keys order by index.
    """
    m = values.shape[0]
    if m > MAX_INDEX:
        raise ValueError(f"top_earliest ranks at most {MAX_INDEX:,} positions per column, got {m:,}")
    index = torch.arange(m, device=values.device, dtype=torch.float64)
    key = rank_key(values).double().mul_((1 - index * 2.0**-40)[:, None])
    idx = key.topk(min(n, m), dim=0).indices
    return values.gather(0, idx), idx
