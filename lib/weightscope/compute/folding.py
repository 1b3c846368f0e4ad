"""Norm folding: every norm weight that sits between a feature direction and the weights that read it.

Folded explicitly and visibly, never by a loader flag. Norm weights are the multiplier actually applied (the
loaders store Gemma's `1 + weight` already summed); LayerNorm's centring is folded as a mean subtraction.
"""

from __future__ import annotations

import torch
from torch import Tensor


def fold_norm(weight: Tensor, W: Tensor, *, plus_one: bool) -> Tensor:
    """Fold a final norm's elementwise weight into the matrix that follows it: `diag(scale) @ W`.

    weight: [d_model] the norm's weight; W: [d_model, d_vocab] (e.g. W_U). Returns [d_model, d_vocab] in
    W's dtype. `plus_one=True` for Gemma's RMSNorm, which multiplies by `1 + weight`; False for
    LayerNorm/Llama-style RMSNorm. The scale is formed in fp32 (as Gemma does) before the product.
    """
    if weight.ndim != 1 or W.ndim != 2 or weight.shape[0] != W.shape[0]:
        raise ValueError(
            f"fold_norm needs weight [d_model] and W [d_model, d_vocab]; got weight {tuple(weight.shape)} "
            f"and W {tuple(W.shape)}. Pass W_U (not W_U.T), or W_E.T for an embedding matrix."
        )
    scale = weight.to(device=W.device, dtype=torch.float32)
    if plus_one:
        scale = scale + 1.0
    return (scale[:, None] * W.float()).to(W.dtype)



def fold_final_norm(W_U: Tensor, weight: Tensor | None, normalization_type: str) -> Tensor:
    """[d_model, d_vocab]: diag(weight) @ W_U, then, for a LayerNorm ("LN"/"LNPre"), the centring it applies to its
    input, folded as subtracting each column's mean over d_model. `weight` None: a norm without weight."""
    M = W_U if weight is None else fold_norm(weight, W_U, plus_one=False)
    if normalization_type in ("LN", "LNPre"):
        M = M - M.mean(0, keepdim=True)
    return M



def fold_pre_attention_norm(D: Tensor, g: Tensor | None, *, center: bool) -> Tensor:
    """D~ = (D - mean(D, over d_model) if center else D) * g: directions as the heads' W_Q/W_K/W_V see them.

    D: [n, d_model]; g: [d_model] the norm weight exactly as TransformerLens stores it (the multiplier
    applied: its Gemma conversion already holds Gemma's `1 + weight`), or None for a weightless norm (LNPre,
    RMSPre).
    center=True for LayerNorm models ("LN", "LNPre"), whose norm subtracts the mean before scaling.
    Returns [n, d_model] in D's dtype and device, computed in fp32.
    """
    if D.ndim != 2 or (g is not None and (g.ndim != 1 or g.shape[0] != D.shape[1])):
        raise ValueError(
            f"fold_pre_attention_norm needs D [n, d_model] and g [d_model]; got D {tuple(D.shape)} and "
            f"g {None if g is None else tuple(g.shape)}."
        )
    X = D.float()
    if center:
        X = X - X.mean(1, keepdim=True)
    if g is not None:
        X = X * g.to(device=D.device, dtype=torch.float32)
    return X.to(D.dtype)


