"""Attention kernels of chapter 2: how SAE features take part in later layers' attention, from weights alone.

A feature's decoder direction d = W_dec[f] [d_model] reaches a head h of a later layer through that layer's
pre-attention norm (weight g = `blocks[l].ln1.w`, plus centring for LayerNorm) and then the head's maps:

* query read  q = ||d~ W_Q[h]||         (how strongly the feature shapes what h looks for),
* key read    k = ||d~ W_K[kv(h)]||     (how strongly it shapes what h finds),
* value read  v = ||d~ W_V[kv(h)] W_O[h]||  (how much of it h can move, through its OV circuit),

with d~ = fold_pre_attention_norm(d, g). Norms are position-free: rotary embeddings rotate q and k
orthogonally, which keeps their norms. Biases are left out (a read is the direction's linear contribution),
and so is the norm's division by the residual's RMS, which scales every direction at a layer alike: compare
reads per unit norm against nulls (`null_directions`: isotropic, and the Gaussian fitted to the decoder rows;
`null_zscores`), not across layers in raw units.

The query-key score of two features does depend on position: `rotate_queries` applies the model's rotary
rotation for an offset (settings read from its cfg), and `qk_pairs` ranks pairs by a summary over offsets.

`head_reads` streams over chunks of features like `token_scores.token_score_stats` (chunk size from free memory,
halved on out-of-memory); `qk_pairs` streams the bilinear query-key scores of one head keeping a running top;
`sae_attention_reads` runs the lot over every reading layer of a TransformerLens model into a long table.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from weightscope.compute.folding import fold_pre_attention_norm
from weightscope.compute.streaming import (CPU_BLOCK_BYTES, auto_chunk_size, check_chunk_size,
                                           progress_bar, stream)

if TYPE_CHECKING:  # pandas is only needed by the table builders
    import pandas as pd

__all__ = [
    "NULL_KINDS",
    "READ_NAMES",
    "decoder_gaussian_like",
    "first_reading_layer",
    "group_code",
    "head_reads",
    "kv_head_index",
    "null_directions",
    "null_zscores",
    "qk_pairs",
    "reads_summary",
    "rotary_inverse_frequencies",
    "rotate_queries",
    "summarise_offsets",
    "sae_attention_reads",
]

READ_NAMES = ("q", "k", "v")

# How many layers after an SAE's own layer the first attention that reads its hook point sits.
_READ_OFFSET = {"resid_pre": 0, "resid_mid": 1, "resid_post": 1, "attn_out": 1, "mlp_out": 1}


# ----------------------------------------------------------------------------------------------------------
# Head bookkeeping
# ----------------------------------------------------------------------------------------------------------


def kv_head_index(n_heads: int, n_kv_heads: int) -> Tensor:
    """[n_heads] int64: the key/value head each query head uses under grouped-query attention.

    TransformerLens expands its [n_kv_heads, ...] `_W_K`/`_W_V` with `repeat_interleave(repeats=n_heads //
    n_kv_heads)`, so query heads 0..r-1 share kv head 0, r..2r-1 kv head 1, ...: kv(h) = h // r.
    """
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}.")
    return torch.arange(n_heads) // (n_heads // n_kv_heads)


def first_reading_layer(sae_layer: int, hook: str) -> int:
    """The first layer whose attention reads an SAE's hook point: sae_layer for resid_pre, else sae_layer + 1.

    hook: a hook kind ("hook_resid_pre", "resid_post", ...) or a full name ("blocks.5.hook_resid_post");
    resid_mid, attn_out and mlp_out at layer l are written after attention l, so layer l + 1 reads them first.
    """
    kind = re.sub(r"^hook_", "", hook.rsplit(".", 1)[-1])
    if kind not in _READ_OFFSET:
        raise ValueError(
            f"Cannot tell which attention layers read hook {hook!r}: expected one of "
            f"{sorted('hook_' + k for k in _READ_OFFSET)} (an SAE on the residual stream or a block output)."
        )
    return sae_layer + _READ_OFFSET[kind]


# ----------------------------------------------------------------------------------------------------------
# Per-head reads
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()  # weights-only analysis: never build an autograd graph (SAE weights are Parameters)
def head_reads(
    D: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_O: Tensor,
    *,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Query, key and value reads of every (already folded) direction by every head of one layer.

    D: [n, d_model] directions folded with the layer's pre-attention norm (`fold_pre_attention_norm`).
    W_Q: [n_heads, d_model, d_head]; W_O: [n_heads, d_head_v, d_model].
    W_K: [n_kv, d_model, d_head], W_V: [n_kv, d_model, d_head_v], with n_kv = n_heads (plain attention, or
        TransformerLens's expanded `attn.W_K`) or a divisor of it (grouped-query: the raw `attn._W_K`); query
        head h then uses kv head h // (n_heads // n_kv), TransformerLens's convention (`kv_head_index`).
    chunk_size, device, dtype, progress: as in `kernels.token_score_stats` (device defaults to W_Q's, dtype
        to the promotion of D's and W_Q's and sets the matrix products; norms are taken in fp32).

    Returns fp32 CPU tensors:
      q [n, n_heads] = ||D W_Q[h]||;  k [n, n_heads] = ||D W_K[kv(h)]||;
      v [n, n_heads] = ||D W_V[kv(h)] W_O[h]||, the OV circuit's output norm;
      k_kv [n, n_kv]: the key read counted once per kv head (`k` repeats it over the heads sharing it).
    All heads of a side go through one fused matmul. For v, with z = D W_V[kv(h)] [n, d_head] and the reduced
    QR W_O[h]^T = Q_h R_h (Q_h with orthonormal columns), ||z W_O[h]|| = ||z R_h^T||: d_head^2 flops per
    feature and head, against d_head * d_model for z @ W_O[h] and d_model^2 for D @ W_OV (which would also
    hold n_heads * d_model^2 numbers: 17 GB in fp32 for one Llama-70B layer).
    """
    n_heads, n_kv = _check_heads(D, W_Q, W_K, W_V, W_O)
    check_chunk_size(chunk_size)
    device = torch.device(device) if device is not None else W_Q.device
    dtype = dtype or torch.promote_types(D.dtype, W_Q.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"head_reads computes in a floating dtype; got dtype={dtype}.")

    weights = _fused_weights(W_Q, W_K, W_V, W_O, device, dtype)
    n, d_head = D.shape[0], W_Q.shape[2]
    out = {name: torch.empty(n, n_heads) for name in READ_NAMES}
    out["k_kv"] = torch.empty(n, n_kv)
    if chunk_size is None:  # one row's working set: D, q, k, v, v gathered per head, the R product
        width = D.shape[1] + (2 * n_heads + 2 * n_kv) * max(d_head, W_V.shape[2]) + n_heads * d_head
        chunk_size = auto_chunk_size(width, dtype, device)

    def compute(start: int, rows: int) -> dict[str, Tensor]:
        return _reads_chunk(D[start : start + rows].to(device=device, dtype=dtype), **weights)

    bar = progress_bar(n, progress, "head reads")
    try:
        for start, rows, chunk in stream(n, max(1, chunk_size), compute, device, what="head_reads", bar=bar):
            for name, value in chunk.items():
                out[name][start : start + rows] = value.cpu()
    finally:
        bar.close()
    return out


def _check_heads(D: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor) -> tuple[int, int]:
    if D.ndim != 2 or any(W.ndim != 3 for W in (W_Q, W_K, W_V, W_O)):
        raise ValueError(
            "Expected D [n, d_model], W_Q/W_K/W_V [heads, d_model, d_head] and W_O [n_heads, d_head, "
            "d_model] (one layer's weights, e.g. model.blocks[l].attn.W_Q); got "
            + ", ".join(f"{name} {tuple(W.shape)}" for name, W in zip("DQKVO", (D, W_Q, W_K, W_V, W_O)))
        )
    n_heads, d_model, d_head = W_Q.shape
    n_kv = W_K.shape[0]
    if D.shape[1] != d_model:
        raise ValueError(f"D has {D.shape[1]} columns but W_Q has d_model={d_model}; D must be [n, d_model].")
    if W_K.shape != (n_kv, d_model, d_head) or W_V.shape[:2] != (n_kv, d_model):
        raise ValueError(
            f"W_K {tuple(W_K.shape)} and W_V {tuple(W_V.shape)} must both be [n_kv_heads, d_model={d_model}, "
            f"d_head={d_head}] with the same number of heads."
        )
    if W_O.shape != (n_heads, W_V.shape[2], d_model):
        raise ValueError(
            f"W_O must be [n_heads={n_heads}, d_head={W_V.shape[2]}, d_model={d_model}]; got "
            f"{tuple(W_O.shape)}. TransformerLens's attn.W_O has this shape (d_head before d_model)."
        )
    kv_head_index(n_heads, n_kv)  # raises unless n_kv divides n_heads
    return n_heads, n_kv


def _fused_weights(W_Q, W_K, W_V, W_O, device, dtype) -> dict[str, Tensor]:
    """Per-layer operands of `_reads_chunk`: heads side by side as [d_model, heads * d_head], and R_h."""

    def flat(W: Tensor) -> Tensor:  # [heads, d_model, d_head] -> [d_model, heads * d_head], head-major
        return W.detach().to(device=device, dtype=dtype).permute(1, 0, 2).reshape(W.shape[1], -1)

    kv = kv_head_index(W_Q.shape[0], W_K.shape[0]).to(device)
    return {"W_Q": flat(W_Q), "W_K": flat(W_K), "W_V": flat(W_V), "R": ov_factor(W_O, device), "kv": kv}


_OV_FACTORS: dict[tuple, tuple[list[Tensor], Tensor]] = {}  # (W_O's address, layout, ...) -> (probe, R)
_OV_FACTORS_MAX = 128  # layers remembered (R is n_heads * d_head^2 numbers: 2 MB at Llama-3.1-8B)


def ov_factor(W_O: Tensor, device) -> Tensor:
    """R [n_heads, min(d_model, d_head), d_head] fp32, the triangular factor of W_O[h]^T = Q_h R_h, on device.

    Depends on the layer only, so it is computed once per layer and reused by every SAE the layer reads
    (remembered by W_O's storage address, shape, strides and in-place version, and checked against a probe
    of 64 of its values, so a freed and reused address is not taken for the same weights). An inference
    tensor (made under `torch.inference_mode()`) has no version counter and may still change in place inside
    inference mode: its probe adds the fp64 sum of all its values instead.
    """
    inference = W_O.is_inference()
    version = None if inference else W_O._version
    key = (W_O.data_ptr(), tuple(W_O.shape), W_O.stride(), version, W_O.dtype, str(W_O.device), str(device))
    flat = W_O.detach().reshape(-1)
    probe = [flat[:: max(1, flat.numel() // 64)][:64].clone()] + ([flat.double().sum()] if inference else [])
    hit = _OV_FACTORS.get(key)
    if hit is not None and all(torch.equal(a, b) for a, b in zip(hit[0], probe)):
        return hit[1]
    R = torch.linalg.qr(W_O.detach().to(device=device, dtype=torch.float32).transpose(1, 2)).R
    if len(_OV_FACTORS) >= _OV_FACTORS_MAX:
        _OV_FACTORS.pop(next(iter(_OV_FACTORS)))
    _OV_FACTORS[key] = (probe, R)
    return R


def _reads_chunk(
    D_chunk: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, R: Tensor, kv: Tensor
) -> dict[str, Tensor]:
    """Reads of one chunk D_chunk [c, d_model] (on the compute device and dtype): fp32 [c, heads] each."""
    c, n_heads = D_chunk.shape[0], len(kv)
    q = (D_chunk @ W_Q).view(c, n_heads, -1).float().norm(dim=2)
    k_kv = (D_chunk @ W_K).view(c, -1, W_Q.shape[1] // n_heads).float().norm(dim=2)
    z = (D_chunk @ W_V).view(c, -1, R.shape[2])[:, kv].float()  # [c, n_heads, d_head_v]: kv head of each head
    v = torch.bmm(z.transpose(0, 1), R.transpose(1, 2)).norm(dim=2).T  # ||z R_h^T|| = ||z W_O[h]||
    return {"q": q, "k": k_kv[:, kv], "v": v, "k_kv": k_kv}


# ----------------------------------------------------------------------------------------------------------
# Null baseline
# ----------------------------------------------------------------------------------------------------------


def null_zscores(reads: Tensor, null_reads: Tensor, *, q: float = 0.99) -> tuple[Tensor, Tensor]:
    """Per-head z-scores of reads against a null, and whether each read beats the null's q-quantile.

    reads: [n, n_heads]; null_reads: [n_null, n_heads] (n_null >= 2), e.g. `head_reads` of
    `null_directions(D, n, seed=...)` folded the same way. Per head (column):
    z = (read - mean_null) / std_null (sample std, ddof=1), exceeds = read > quantile_q(null) (linear
    interpolation, numpy's default). Under the null, a fraction of about 1 - q of directions exceeds.
    Returns z [n, n_heads] fp32 and exceeds [n, n_heads] bool, on reads' device.
    """
    if reads.ndim != 2 or null_reads.ndim != 2 or reads.shape[1] != null_reads.shape[1]:
        raise ValueError(
            f"Expected reads [n, n_heads] and null_reads [n_null, n_heads]; got {tuple(reads.shape)} and "
            f"{tuple(null_reads.shape)}."
        )
    if null_reads.shape[0] < 2:
        raise ValueError(f"The null needs at least 2 directions for a std; got {null_reads.shape[0]}.")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q is a quantile level strictly between 0 and 1; got q={q}.")
    null = null_reads.to(device=reads.device, dtype=torch.float64)
    X = reads.double()
    z = (X - null.mean(0)) / null.std(0)
    return z.float(), X > _quantile(null, q)


def _quantile(X: Tensor, q: float) -> Tensor:
    """Column quantiles of X [m, h] by linear interpolation (numpy's default); no torch.quantile size cap."""
    S = X.sort(0).values
    pos = q * (X.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, X.shape[0] - 1)
    return S[lo] + (pos - lo) * (S[hi] - S[lo])


NULL_KINDS = {"": "isotropic", "_cov": "decoder covariance"}  # column suffix -> null kind


def decoder_gaussian_like(D: Tensor, n: int, *, seed: int) -> Tensor:
    """n draws of the Gaussian fitted to the rows of D [n_rows, d]: mean and covariance of D's rows. [n, d].

    The "decoder-covariance" null: directions that look like the SAE's decoder rows taken together (their
    common offset and their anisotropy) without being any feature. Drawn through the eigendecomposition of the
    covariance (fp64, negative round-off eigenvalues clipped to 0), so a rank-deficient covariance is fine.
    Deterministic for a seed (drawn on CPU); returned in D's dtype and on D's device.
    """
    if D.ndim != 2 or D.shape[0] < 2:
        raise ValueError(f"decoder_gaussian_like needs D [n_rows >= 2, d]; got shape {tuple(D.shape)}.")
    X = D.detach().to(device="cpu", dtype=torch.float64)
    mean = X.mean(0)
    cov = torch.cov(X.T).reshape(X.shape[1], X.shape[1])  # [d, d], ddof = 1
    eigenvalues, V = torch.linalg.eigh(cov)
    G = torch.randn(n, X.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mean + (G * eigenvalues.clamp(min=0).sqrt()) @ V.T).to(device=D.device, dtype=D.dtype)


def null_directions(D: Tensor, n_null: int, *, seed: int) -> dict[str, Tensor]:
    """Unit-norm null directions for the reads of D's rows, by column suffix of `NULL_KINDS`: [n_null, d] each.

    "": isotropic Gaussian directions (answers: does a head read this feature more than a random direction?);
    "_cov": draws of the Gaussian fitted to D's rows (`decoder_gaussian_like`; answers: more than a typical
    direction of this SAE's decoder?). Both are unit norm: reads are linear in the direction, so dividing each
    feature's read by its own norm compares it with a null of exactly its norm.
    """
    iso = torch.randn(n_null, D.shape[1], generator=torch.Generator().manual_seed(seed))
    cov = decoder_gaussian_like(D.float(), n_null, seed=seed + 1).cpu()
    unit = {"": iso, "_cov": cov}
    return {k: torch.nn.functional.normalize(v, dim=1).to(device=D.device, dtype=D.dtype) for k, v in unit.items()}


# ----------------------------------------------------------------------------------------------------------
# Rotary positions: the query-key score as a function of the offset between the two positions
# ----------------------------------------------------------------------------------------------------------


def rotary_inverse_frequencies(cfg) -> Tensor | None:
    """[rotary_dim // 2] fp64 angles per position, one per rotary plane, or None without rotary positions.

    Reads `positional_embedding_type`, `rotary_dim`, `rotary_base`, `use_NTK_by_parts_rope` and the
    `NTK_by_parts_*` / `NTK_original_ctx_len` fields (Llama-3.1's scaling), as TransformerLens computes them.
    """
    if getattr(cfg, "positional_embedding_type", None) != "rotary":
        return None
    if getattr(cfg, "use_yarn_rope", False) or getattr(cfg, "use_dynamic_ntk_rope", False):
        raise NotImplementedError("YaRN and dynamic-NTK rotary scaling are not supported by the QK-pair score.")
    rd, base = int(cfg.rotary_dim), float(cfg.rotary_base)
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    if getattr(cfg, "use_NTK_by_parts_rope", False):
        factor, low, high = cfg.NTK_by_parts_factor, cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor
        old = cfg.NTK_original_ctx_len
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)  # 0 at the low-frequency edge, 1 at the high one
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv / float(getattr(cfg, "rotary_scaling_factor", 1.0) or 1.0)  # linear scaling (1: none)


def rotate_queries(Q: Tensor, offsets: Sequence[int], cfg) -> Tensor:
    """Q [n, d_head] rotated by each offset: [n, n_offsets, d_head], so that rot(q, i - j) . k is the score.

    For a query at position i and a key at position j, rotary gives (R_i q) . (R_j k) = (R_{i-j} q) . k: the
    score depends on the offset i - j only. The first `rotary_dim` dimensions are rotated, in planes of
    adjacent pairs (2p, 2p+1) when `rotary_adjacent_pairs`, else of halves (p, p + rotary_dim / 2); the rest
    pass through. Without rotary positions every offset gives Q itself.
    """
    offsets = torch.as_tensor(list(offsets), dtype=torch.float64)
    inv = rotary_inverse_frequencies(cfg)
    out = Q[:, None, :].expand(-1, len(offsets), -1).clone()
    if inv is None:
        return out
    rd = int(cfg.rotary_dim)
    angles = (offsets[:, None] * inv[None, :])  # [n_offsets, rd / 2]
    cos, sin = (f(angles).to(device=Q.device, dtype=Q.dtype) for f in (torch.cos, torch.sin))
    if getattr(cfg, "rotary_adjacent_pairs", False):
        a, b = Q[:, 0:rd:2], Q[:, 1:rd:2]
        out[:, :, 0:rd:2] = a[:, None] * cos - b[:, None] * sin
        out[:, :, 1:rd:2] = b[:, None] * cos + a[:, None] * sin
    else:
        a, b = Q[:, : rd // 2], Q[:, rd // 2 : rd]
        out[:, :, : rd // 2] = a[:, None] * cos - b[:, None] * sin
        out[:, :, rd // 2 : rd] = b[:, None] * cos + a[:, None] * sin
    return out


# ----------------------------------------------------------------------------------------------------------
# Query-key feature pairs of one head
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def qk_pairs(
    Dq: Tensor,
    Dk: Tensor,
    W_Q_h: Tensor,
    W_K_h: Tensor,
    *,
    top: int = 20,
    sign: str = "abs",
    offsets: Sequence[int] | None = None,
    cfg=None,
    summary: str = "mean",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The `top` (query feature, key feature) pairs of one head by score s_ij = (Dq_i W_Q_h) . (Dk_j W_K_h).

    Dq: [n_q, d_model], Dk: [n_k, d_model] directions folded with the head's layer's pre-attention norm (they
        may come from different SAEs: a query-side feature at the attending position, a key-side one at the
        attended position). W_Q_h, W_K_h: [d_model, d_head], one head (under GQA pass the raw W_K of
        kv head `kv_head_index(n_heads, n_kv)[h]`, or TransformerLens's expanded attn.W_K[h]).
    sign: "abs" ranks by |s| (scores keep their sign), "pos" by s (the pairs h attends to most), "neg" by -s
        (the pairs it avoids most).
    offsets, cfg, summary: with rotary positions the score depends on the offset i - j between the query's
        position i and the key's j: s_ij(o) = rot(Dq_i W_Q_h, o) . (Dk_j W_K_h) (`rotate_queries`, settings from
        the model's `cfg`). Pairs are then ranked by a summary over the given offsets: "mean" (the average
        logit over the range) or "max_abs" (the offset's score of largest magnitude, sign kept). None (or a
        model without rotary positions): the one position-free score, offset 0.
    chunk_size, device, dtype, progress: as in `head_reads`, over query features.

    s is the attention logit's weight part before its division by `cfg.attn_scale` (and any soft-capping).
    Biases are left out.
    Returns (scores [t] fp32, q_idx [t] int64, k_idx [t] int64) on CPU, best first, t = min(top, n_q * n_k);
    which of several tied pairs is kept is unspecified. Only one [chunk, n_k] block of scores exists at a
    time (plus the key side's projection Dk W_K_h [n_k, d_head]). The "mean" summary is linear in the query,
    so it is one product with the offsets' mean rotation of W_Q_h; "max_abs" forms every offset's scores.
    """
    if Dq.ndim != 2 or Dk.ndim != 2 or W_Q_h.ndim != 2 or W_Q_h.shape != W_K_h.shape:
        raise ValueError(
            f"Expected Dq [n_q, d_model], Dk [n_k, d_model], W_Q_h and W_K_h [d_model, d_head] (one head); "
            f"got {tuple(Dq.shape)}, {tuple(Dk.shape)}, {tuple(W_Q_h.shape)}, {tuple(W_K_h.shape)}."
        )
    if not Dq.shape[1] == Dk.shape[1] == W_Q_h.shape[0]:
        raise ValueError(
            f"Dq, Dk and W_Q_h must share d_model; got {Dq.shape[1]}, {Dk.shape[1]}, {W_Q_h.shape[0]}."
        )
    if sign not in ("abs", "pos", "neg"):
        raise ValueError(f"sign must be 'abs', 'pos' or 'neg'; got {sign!r}.")
    if top < 1:
        raise ValueError(f"top must be a positive number of pairs; got {top}.")
    if summary not in ("mean", "max_abs"):
        raise ValueError(f"summary must be 'mean' or 'max_abs'; got {summary!r}.")
    if offsets is not None and (cfg is None or len(list(offsets)) == 0):
        raise ValueError("pass the model's cfg and at least one offset to score pairs over rotary offsets.")
    check_chunk_size(chunk_size)
    device = torch.device(device) if device is not None else W_Q_h.device
    dtype = dtype or torch.promote_types(Dq.dtype, W_Q_h.dtype)

    W_Q_h, W_K_h = (W.detach().to(device=device, dtype=dtype) for W in (W_Q_h, W_K_h))
    Kp = Dk.detach().to(device=device, dtype=dtype) @ W_K_h  # [n_k, d_head], computed once
    n_q, n_k = Dq.shape[0], Dk.shape[0]
    rotary = offsets is not None and rotary_inverse_frequencies(cfg) is not None
    offsets = list(offsets) if rotary else [0]
    per_offset = rotary and summary == "max_abs"  # the mean is linear: one product with the mean rotation
    if rotary and not per_offset:  # mean_o rot(D W_Q, o) = D mean_o rot(W_Q, o): rotate W_Q's rows once
        W_Q_h = rotate_queries(W_Q_h.double(), offsets, cfg).mean(1).to(dtype)
    if chunk_size is None:
        width = (len(offsets) if per_offset else 1) * (n_k + W_Q_h.shape[1]) + n_k  # scores, rank keys
        chunk_size = auto_chunk_size(width, dtype, device)
        if device.type == "cpu":  # cache-sized score blocks: 30% faster at 24,576 x 24,576 than 1 GiB chunks
            scores_row = 4 * n_k * (len(offsets) if per_offset else 1)
            chunk_size = min(chunk_size, max(1, CPU_BLOCK_BYTES // scores_row))

    def compute(start: int, rows: int) -> Tensor:
        chunk = Dq[start : start + rows].to(device=device, dtype=dtype)
        if not per_offset:
            return _qk_chunk(chunk, W_Q_h, Kp)
        return summarise_offsets(rotate_queries(chunk @ W_Q_h, offsets, cfg) @ Kp.T, summary)  # [c, n_off, n_k] -> [c, n_k]

    empty = torch.empty(0, device=device)
    best = (empty, empty, torch.empty(0, dtype=torch.long, device=device))  # (rank keys, scores, flat ids)
    bar = progress_bar(n_q, progress, "qk pairs")
    try:
        for start, _rows, S in stream(n_q, max(1, chunk_size), compute, device, what="qk_pairs", bar=bar):
            best = _merge_top(best, S, start, n_k, top, sign)
    finally:
        bar.close()
    _key, scores, flat = best
    return scores.cpu(), (flat // n_k).cpu(), (flat % n_k).cpu()


def _qk_chunk(Dq_chunk: Tensor, W_Q_h: Tensor, Kp: Tensor) -> Tensor:
    """Scores of one chunk of query features against all key features: [c, n_k] fp32."""
    return ((Dq_chunk @ W_Q_h) @ Kp.T).float()


def summarise_offsets(S: Tensor, summary: str) -> Tensor:
    """S [c, n_offsets, n_k] -> [c, n_k] fp32: the mean over offsets, or the score of largest magnitude."""
    S = S.float()
    if summary == "mean":
        return S.mean(1)
    return S.gather(1, S.abs().argmax(1, keepdim=True)).squeeze(1)


def _merge_top(best, S: Tensor, start: int, n_k: int, top: int, sign: str):
    """Merge scores S [c, n_k] of query rows start.. into the running (keys, scores, flat ids), best first.

    Once `top` pairs are kept, only scores whose rank key beats the current last one can enter: rows whose
    max / min cannot are skipped after one read of the chunk (`amax` and `amin`, no copy), then a top-k over
    the few candidates of the other rows (not over all c * n_k scores).
    """
    if len(best[0]) >= top:
        found = _candidates_above(S, best[0][-1], n_k, top, sign)
        if found is None:
            return best
        key, pos = found
    else:  # each row's own top first: a top-k along the whole chunk copies it with its indices (12 B a score)
        row_key, row_pos = torch.topk(_rank_key(S, sign), min(top, n_k), dim=1)  # [c, top]
        key, sub = torch.topk(row_key.flatten(), min(top, row_key.numel()))
        rows = torch.arange(S.shape[0], device=S.device).unsqueeze(1) * n_k
        pos = (row_pos + rows).flatten()[sub]
    keys = torch.cat([best[0], key])
    order = torch.topk(keys, min(top, keys.numel())).indices  # sorted, best first
    merged_scores = torch.cat([best[1], S.flatten()[pos]])
    merged_flat = torch.cat([best[2], pos + start * n_k])
    return keys[order], merged_scores[order], merged_flat[order]


def _rank_key(S: Tensor, sign: str) -> Tensor:
    """What pairs are ranked by: |s|, s or -s (same shape as S)."""
    return S if sign == "pos" else S.abs() if sign == "abs" else -S


def _candidates_above(S: Tensor, bar: Tensor, n_k: int, top: int, sign: str):
    """(rank keys, flat positions in S) of S's best <= top scores whose key is above bar, best first; None if
    none is. Rows are screened by their max and min first: a full pass over a few rows, not the chunk."""
    hi, lo = S.amax(1), S.amin(1)  # two reductions: several times faster than aminmax or abs here
    reach = {"abs": torch.maximum(hi, -lo), "pos": hi, "neg": -lo}[sign]
    rows = torch.nonzero(reach > bar).squeeze(1)
    if len(rows) == 0:
        return None
    key = _rank_key(S[rows], sign).flatten()  # [r * n_k], r rows that hold a candidate
    hit = torch.nonzero(key > bar).squeeze(1)
    key, sub = torch.topk(key[hit], min(top, hit.numel()))
    hit = hit[sub]
    return key, rows[hit // n_k] * n_k + hit % n_k


# ----------------------------------------------------------------------------------------------------------
# The whole model: a long table of reads
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sae_attention_reads(
    model,
    W_dec: Tensor,
    sae_layer: int,
    hook: str,
    *,
    layers: Sequence[int] | None = None,
    q: float = 0.99,
    n_null: int = 4096,
    seed: int = 0,
    feature_ids: Sequence[int] | Tensor | None = None,
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> "pd.DataFrame":
    """Query/key/value reads of an SAE's features by every head of every later attention layer, with nulls.

    model: a TransformerLens HookedTransformer; W_dec: [n_features, d_model] the SAE's decoder (or some rows
    of it, labelled by `feature_ids`); sae_layer, hook: where the SAE sits ("hook_resid_post", ...), which
    sets the first reading layer (`first_reading_layer`). layers: the reading layers to use (default: all
    from the first one to the last).
    Per reading layer l', the directions are folded with `blocks[l'].ln1` (its stored weight; centred for LN
    models) and read with `blocks[l'].attn` weights (for GQA the raw `_W_K`/`_W_V`, so `kv_head` is exact).
    Two nulls of `n_null` unit directions each (`null_directions`: isotropic, and the Gaussian fitted to
    W_dec's rows; one set for all layers, folded per layer). Each feature's read is divided by its norm before
    it is compared (reads are linear in the direction), which matches the null's norm to every feature's even
    when decoder norms vary. `*_z` and `*_part` come from `null_zscores` with level q, per layer and head.
    Gemma-2's post-attention norm (ln1_post) is not folded into v.

    Returns a long DataFrame, one row per (feature, read_layer, head), ordered by read_layer, feature, head:
    feature (int32), layer, read_layer, head, kv_head, distance = read_layer - layer (int16), q, k, v (raw
    reads), q_z, k_z, v_z (float32), q_part, k_part, v_part (bool: the read per unit norm exceeds the
    isotropic null's q-quantile), and the same six with suffix `_cov` against the decoder-covariance null.
    """
    n_layers = model.cfg.n_layers
    first = first_reading_layer(sae_layer, hook)
    layers = list(range(first, n_layers)) if layers is None else [int(layer) for layer in layers]
    if any(not first <= layer < n_layers for layer in layers):
        raise ValueError(
            f"Reading layers must lie in [{first}, {n_layers}) for {hook} at layer {sae_layer}; got {layers}."
        )
    D = W_dec.detach()
    feature_ids = np.arange(D.shape[0]) if feature_ids is None else torch.as_tensor(feature_ids).cpu().numpy()
    if len(feature_ids) != D.shape[0]:
        raise ValueError(f"feature_ids has {len(feature_ids)} entries for {D.shape[0]} rows of W_dec.")
    nulls = null_directions(D, n_null, seed=seed)
    norms = torch.linalg.vector_norm(D.float(), dim=1).cpu()  # reads per unit norm: the null's norm is each feature's
    rows = torch.cat([D, *nulls.values()])  # one call a layer for features and nulls: one set-up (QR of W_O)
    options = dict(chunk_size=chunk_size, dtype=dtype, device=device, progress=False)

    parts = []
    bar = progress_bar(len(layers) * D.shape[0], progress, "attention reads")
    try:
        for layer in layers:
            both = head_reads(read_by_layer(model, rows, layer), *layer_weights(model, layer), **options)
            reads = {name: value[: len(D)] for name, value in both.items()}
            null_reads = {suffix: {name: value[len(D) + i * n_null : len(D) + (i + 1) * n_null]
                                   for name, value in both.items()} for i, suffix in enumerate(nulls)}
            parts.append(_layer_frame(reads, null_reads, norms, q, feature_ids, sae_layer, layer))
            bar.update(D.shape[0])
    finally:
        bar.close()
    return _concat(parts)


def read_by_layer(model, D: Tensor, layer: int) -> Tensor:
    """D [n, d_model] folded with `blocks[layer].ln1` as that layer's attention reads it (centred for LN models)."""
    g = getattr(model.blocks[layer].ln1, "w", None)
    center = model.cfg.normalization_type in ("LN", "LNPre")
    return fold_pre_attention_norm(D.detach(), None if g is None else g.detach(), center=center)


def layer_weights(model, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(W_Q, W_K, W_V, W_O) of `blocks[layer].attn`; the unexpanded [n_kv_heads, ...] kv weights under GQA."""
    attn = model.blocks[layer].attn
    W_K = attn._W_K if hasattr(attn, "_W_K") else attn.W_K  # GroupedQueryAttention's W_K repeats kv heads
    W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V
    return attn.W_Q.detach(), W_K.detach(), W_V.detach(), attn.W_O.detach()


def _layer_frame(reads, null_reads, norms, q, feature_ids, sae_layer, read_layer) -> dict[str, np.ndarray]:
    """Columns of one reading layer's rows, feature-major ([n, n_heads] arrays flattened row by row).

    null_reads: {column suffix: reads of that kind's unit-norm null}; norms: [n] the features' norms.
    """
    n, n_heads = reads["q"].shape
    kv = kv_head_index(n_heads, reads["k_kv"].shape[1]).numpy()
    cols = {
        "feature": np.repeat(feature_ids.astype(np.int32), n_heads),
        "layer": np.full(n * n_heads, sae_layer, dtype=np.int16),
        "read_layer": np.full(n * n_heads, read_layer, dtype=np.int16),
        "head": np.tile(np.arange(n_heads, dtype=np.int16), n),
        "kv_head": np.tile(kv.astype(np.int16), n),
        "distance": np.full(n * n_heads, read_layer - sae_layer, dtype=np.int16),
    }
    cols.update({name: reads[name].numpy().ravel() for name in READ_NAMES})
    for suffix, null in null_reads.items():
        for name in READ_NAMES:
            z, exceeds = null_zscores(reads[name] / norms[:, None], null[name], q=q)  # 0-norm rows: NaN, False
            cols[f"{name}_z{suffix}"] = z.numpy().ravel()
            cols[f"{name}_part{suffix}"] = exceeds.numpy().ravel()
    return cols


_COLUMN_DTYPES = {
    "feature": np.int32, **dict.fromkeys(("layer", "read_layer", "head", "kv_head", "distance"), np.int16),
    **dict.fromkeys(("q", "k", "v"), np.float32),
    **{f"{n}_z{s}": np.float32 for s in NULL_KINDS for n in READ_NAMES},
    **{f"{n}_part{s}": np.bool_ for s in NULL_KINDS for n in READ_NAMES},
}


def _concat(parts: list[dict[str, np.ndarray]]) -> "pd.DataFrame":
    """One frame of the layers' columns (parts emptied as it goes). Each column is joined as its parts are
    released, and the frame keeps the joined arrays (copy=False) rather than copying them into one block per
    dtype: the table (200 MB for a 24,576-feature SAE read by 12 layers x 12 heads) is held once, not three
    times over."""
    import pandas as pd

    cols = {name: np.concatenate([part.pop(name) for part in parts]).astype(dtype, copy=False)
            if parts else np.empty(0, dtype=dtype) for name, dtype in _COLUMN_DTYPES.items()}
    return pd.DataFrame(cols, copy=False)


def reads_summary(df: "pd.DataFrame") -> "pd.DataFrame":
    """Participation per (layer, read_layer, head) of a `sae_attention_reads` table.

    Columns: layer, read_layer, head, kv_head, distance, n_features, q_frac, k_frac, v_frac (fraction of
    features whose read exceeds the isotropic null's quantile: about 1 - q by chance), any_frac (any of the
    three), the medians q_z_median, k_z_median, v_z_median, and q_frac_cov, k_frac_cov, v_frac_cov (against
    the decoder-covariance null) when the table has them.
    """
    keys = ["layer", "read_layer", "head"]
    code = group_code(df, keys)
    grouped = df.assign(any_part=df["q_part"] | df["k_part"] | df["v_part"]).groupby(code, sort=True)
    cov = {f"{n}_frac_cov": (f"{n}_part_cov", "mean") for n in READ_NAMES if f"{n}_part_cov" in df}
    out = grouped.agg(**{key: (key, "first") for key in keys}, **cov,
        kv_head=("kv_head", "first"),
        distance=("distance", "first"),
        n_features=("feature", "size"),
        q_frac=("q_part", "mean"),
        k_frac=("k_part", "mean"),
        v_frac=("v_part", "mean"),
        any_frac=("any_part", "mean"),
        q_z_median=("q_z", "median"),
        k_z_median=("k_z", "median"),
        v_z_median=("v_z", "median"),
    )
    return out.reset_index(drop=True)


def group_code(df: "pd.DataFrame", keys: list[str]) -> np.ndarray:
    """[rows] int64: one code per distinct tuple of the integer columns `keys`, increasing in their
    lexicographic order. Grouping by it gives the groups (and order) of grouping by the columns, faster on
    tables of millions of rows (one integer factorised instead of a tuple of columns; `bench_reads_summary`)."""
    code = np.zeros(len(df), dtype=np.int64)
    for key in keys:
        col = df[key].to_numpy().astype(np.int64)
        low, high = (int(col.min()), int(col.max())) if len(col) else (0, 0)
        code = code * (high - low + 1) + (col - low)
    return code
