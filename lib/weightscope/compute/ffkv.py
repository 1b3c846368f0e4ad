"""Feed-forward blocks as dictionaries (FF-KV): MLP neurons as a baseline population beside SAE features.

Ye, Suzuki, Inaba and Kuribayashi (arXiv 2510.22332) read a feed-forward block as a sparse dictionary:

* **latents** `a` [n, d_mlp]: the input of the down-projection, after the nonlinearity and, for a gated MLP
  (SwiGLU, GeGLU), after gating: `a = act(x W_gate) * (x W_in) + b_in` (gated) or `a = act(x W_in + b_in)`;
* **decoder (value) vectors** [d_mlp, d_model]: the rows of the down-projection `W_out`, as they enter the
  residual stream (`value_vectors`: Gemma-2's post-feed-forward norm weight folded in);
* **encoder (key) vectors** [d_mlp, d_model]: the input rows that make a latent (`key_vectors`), folded
  with the pre-MLP norm so that they read the raw residual stream like an SAE's encoder. A gated block has
  two input rows per neuron; the book uses the gate's by default (see `key_vectors`).

Variants (`encode`, `decode`): `plain`; `normalized` (the rows of W_out scaled to unit norm, their norms
folded into the latents, so `a_i * ||W_out[i]||` is the size of neuron i's write); `topk` and
`topk_normalized` (of that variant's latents, the k largest by absolute value kept, the rest zeroed: the
paper's k = 10). `decode` rebuilds the block's output exactly from the `plain` and `normalized` latents.

Tensors use TransformerLens names and shapes (`blocks[l].mlp.W_in` [d_model, d_mlp], `W_gate`, `W_out`
[d_mlp, d_model], `ln2.w`, `ln2_post.w`), so `ff_block` reads a HookedTransformer or any object with those
attribute names. Introduced in chapter 6 (`notebooks/06_ffkv_baseline.md`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from weightscope.compute.folding import fold_pre_attention_norm
from weightscope.compute.streaming import auto_chunk_size, check_chunk_size, progress_bar, stream
from weightscope.load.models import tanh_gelu

VARIANTS = ("plain", "normalized", "topk", "topk_normalized")
KEYS = ("gate", "up")

# TransformerLens `cfg.act_fn` names -> the function (same formulas as transformer_lens.utilities)
_ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu_new": tanh_gelu,
    "gelu_fast": tanh_gelu,
    "gelu_pytorch_tanh": tanh_gelu,
}


@dataclass(frozen=True)
class FFBlock:
    """One layer's feed-forward block, TransformerLens conventions (d_mlp neurons).

    W_in: [d_model, d_mlp] the up-projection of a gated MLP, the input projection of a plain one;
    W_gate: [d_model, d_mlp] the gate projection (the one the nonlinearity acts on), None for a plain MLP;
    b_in: [d_mlp] or None; W_out: [d_mlp, d_model] the down-projection; b_out: [d_model] or None;
    ln2_w: [d_model] the pre-MLP norm weight as stored (the multiplier applied), None for a weightless norm;
    ln2_post_w: [d_model] Gemma-2's post-feed-forward RMSNorm weight (as stored), None elsewhere;
    act_fn: TransformerLens's name of the nonlinearity; normalization_type: "RMS", "LN", ...; eps: the norms'.
    """

    layer: int
    W_in: Tensor
    W_gate: Tensor | None
    b_in: Tensor | None
    W_out: Tensor
    b_out: Tensor | None
    ln2_w: Tensor | None
    ln2_post_w: Tensor | None
    act_fn: str
    normalization_type: str
    eps: float

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[0]

    @property
    def gated(self) -> bool:
        return self.W_gate is not None


def _weight(module, name: str) -> Tensor | None:
    value = getattr(module, name, None) if module is not None else None
    return value.detach() if isinstance(value, Tensor) else None


def ff_block(model, layer: int) -> FFBlock:
    """The feed-forward block of `model.blocks[layer]` (a HookedTransformer, or any object with its names).

    Raises a clear error for an attention-only block or an MLP kind this module does not read (mixture of
    experts, SoLU's extra norm).
    """
    block = model.blocks[layer]
    mlp = getattr(block, "mlp", None)
    cfg = model.cfg
    if mlp is None or _weight(mlp, "W_out") is None:
        raise ValueError(
            f"blocks[{layer}] has no feed-forward weights W_in/W_out (an attention-only model, or a mixture "
            "of experts): the FF-KV baseline needs one dense MLP per block."
        )
    act = str(cfg.act_fn)
    if act not in _ACTS:
        raise ValueError(f"activation {act!r} of blocks[{layer}].mlp is not supported; "
                         f"known: {sorted(_ACTS)}.")
    return FFBlock(
        layer=layer,
        W_in=_weight(mlp, "W_in"),
        W_gate=_weight(mlp, "W_gate"),
        b_in=_weight(mlp, "b_in"),
        W_out=_weight(mlp, "W_out"),
        b_out=_weight(mlp, "b_out"),
        ln2_w=_weight(getattr(block, "ln2", None), "w"),
        ln2_post_w=_weight(getattr(block, "ln2_post", None), "w"),
        act_fn=act,
        normalization_type=str(cfg.normalization_type),
        eps=float(cfg.eps),
    )


# ----------------------------------------------------------------------------------------------------------
# Directions (weights only)


def value_vectors(block: FFBlock) -> Tensor:
    """[d_mlp, d_model] what each neuron writes into the residual stream per unit of its latent.

    Rows of W_out; for Gemma-2 times the post-feed-forward norm's weight. That norm also divides the whole
    MLP output by its RMS, a positive factor common to every neuron at a token: it scales all writes of a
    token alike and changes no direction.
    """
    V = block.W_out
    if block.ln2_post_w is not None:
        V = fold_pre_attention_norm(V, block.ln2_post_w, center=False)  # V * w, elementwise per row
    return V


def key_vectors(block: FFBlock, key: str = "gate") -> Tensor:
    """[d_mlp, d_model] each neuron's encoder direction on the raw residual stream, the pre-MLP norm folded.

    key: for a gated MLP, which input row: "gate" (W_gate, the row the nonlinearity acts on, which decides
    whether the neuron fires: the default) or "up" (W_in, which scales the gated value linearly, and sets its
    sign). A plain MLP has one input row (W_in); `key` is then ignored. Pre-activation = (x / scale) . k for
    the raw stream x: k = g * w_i, centred over d_model for a LayerNorm.
    """
    if key not in KEYS:
        raise ValueError(f"key must be one of {KEYS} (the gate or the up projection); got {key!r}.")
    W = block.W_gate if (block.gated and key == "gate") else block.W_in
    K = fold_pre_attention_norm(W.T, block.ln2_w, center=False)  # [d_mlp, d_model]: w_i * g
    if block.normalization_type in ("LN", "LNPre"):
        # x . centre(k) = centre(x) . k: the centring moves onto the key after the weight (a reader of
        # directions centres before it, as `fold_pre_attention_norm` does)
        K = K - K.mean(1, keepdim=True)
    return K


# ----------------------------------------------------------------------------------------------------------
# Latents and reconstruction (activations)


def latents(block: FFBlock, x: Tensor) -> Tensor:
    """[n, d_mlp] the input of the down-projection for MLP inputs x [n, d_model] (after the pre-MLP norm).

    Gated: act(x W_gate) * (x W_in) + b_in (TransformerLens's GatedMLP, `hook_post`);
    plain: act(x W_in + b_in).
    """
    act = _ACTS[block.act_fn]
    if block.gated:
        a = act(x @ block.W_gate) * (x @ block.W_in)
        return a + block.b_in if block.b_in is not None else a
    pre = x @ block.W_in
    return act(pre + block.b_in if block.b_in is not None else pre)


def encode(block: FFBlock, a: Tensor, variant: str = "plain", *, k: int = 10) -> Tensor:
    """[n, d_mlp] the latents of a variant from the plain latents a [n, d_mlp] (`latents`).

    normalized: a_i * ||W_out[i]|| (the down-projection's rows made unit norm, their norms moved into the
    latents). topk / topk_normalized: of the plain / normalised latents, the k largest by absolute value in
    each row are kept, the others set to 0.
    """
    _check_variant(variant)
    if variant.endswith("normalized"):
        a = a * _row_norms(block.W_out).to(a.dtype)
    return topk_abs(a, k) if variant.startswith("topk") else a


def topk_abs(a: Tensor, k: int) -> Tensor:
    """a [n, m] with all but the k entries of largest absolute value in each row set to 0 (ties: torch's)."""
    if not 1 <= k <= a.shape[-1]:
        raise ValueError(f"k must be between 1 and {a.shape[-1]} (the number of latents); got k={k}.")
    idx = a.abs().topk(k, dim=-1).indices
    return torch.zeros_like(a).scatter_(-1, idx, a.gather(-1, idx))


def decode(block: FFBlock, z: Tensor, variant: str = "plain") -> Tensor:
    """[n, d_model] the block's output (`hook_mlp_out`) rebuilt from a variant's latents z [n, d_mlp].

    z @ W_dec + b_out, W_dec = W_out (plain, topk) or W_out with unit rows (the normalised variants); for
    Gemma-2 the post-feed-forward RMSNorm (with its weight) is then applied, on this decoder side.
    """
    _check_variant(variant)
    W = block.W_out
    if variant.endswith("normalized"):
        W = W / _row_norms(W).clamp_min(torch.finfo(torch.float32).tiny).to(W.dtype)[:, None]
    y = z @ W
    if block.b_out is not None:
        y = y + block.b_out
    if block.ln2_post_w is not None:
        rms = torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + block.eps)
        y = (y.float() * rms).to(y.dtype) * block.ln2_post_w
    return y


def _row_norms(W: Tensor) -> Tensor:
    return torch.linalg.vector_norm(W.float(), dim=1)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown FF-KV variant {variant!r}; choose one of {VARIANTS}.")


def explained_variance(y: Tensor, y_hat: Tensor) -> float:
    """1 - sum |y - y_hat|^2 / sum |y - mean(y)|^2 over rows [n, d] (the demo SAEs' held-out measure)."""
    y, y_hat = y.double(), y_hat.double()
    return 1.0 - float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


# ----------------------------------------------------------------------------------------------------------
# Alignment from weights: max cosine, streamed


@torch.no_grad()
def max_cosine(
    A: Tensor,
    B: Tensor,
    *,
    signed: bool = True,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """For each row of A [n, d], the largest cosine with any row of B [m, d], and which row.

    signed=False takes |cos| (a direction and its negative count as aligned). Zero rows have cosine 0 with
    everything. Streams over chunks of A (one [chunk, m] block of cosines at a time); computed in fp32 on
    `device` (default B's). Returns (max [n] fp32, argmax [n] int64) on the CPU.
    """
    best, which = torch.empty(A.shape[0]), torch.empty(A.shape[0], dtype=torch.long)
    for start, rows, (values, idx) in _cosine_blocks(A, B, lambda C: C.max(dim=1), signed, chunk_size, device,
                                                     progress):
        best[start : start + rows], which[start : start + rows] = values.cpu(), idx.cpu()
    return best, which


def max_cosine_both(
    A: Tensor, B: Tensor, *, signed: bool = True, chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """`max_cosine` both ways from one pass over the cosines: (max over B of each row of A [n], max over A of
    each row of B [m]), fp32 on the CPU. Half the products of `max_cosine(A, B)` and `max_cosine(B, A)`."""
    rows_best = torch.empty(A.shape[0])
    cols_best = None
    for start, rows, (r, c) in _cosine_blocks(A, B, lambda C: (C.max(dim=1).values, C.max(dim=0).values),
                                              signed, chunk_size, device, False):
        rows_best[start : start + rows] = r.cpu()
        cols_best = c if cols_best is None else torch.maximum(cols_best, c)
    if cols_best is None:  # A has no rows: no cosine to take a maximum of
        raise ValueError("max_cosine_both needs at least one row in A.")
    return rows_best, cols_best.cpu()


def _cosine_blocks(A: Tensor, B: Tensor, reduce, signed: bool, chunk_size: int | None, device, progress: bool):
    """Yield (start, rows, reduce(C)) for C [rows, m] the cosines of A's rows start.. with every row of B."""
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"max_cosine needs A [n, d] and B [m, d] with the same d; got {tuple(A.shape)}, "
                         f"{tuple(B.shape)}.")
    if B.shape[0] == 0:
        raise ValueError("max_cosine needs at least one row in B.")
    check_chunk_size(chunk_size)
    device = torch.device(device) if device is not None else B.device
    Bn = F.normalize(B.detach().to(device=device, dtype=torch.float32), dim=1)
    if chunk_size is None:
        chunk_size = auto_chunk_size(B.shape[0], torch.float32, device)

    def compute(start: int, rows: int):
        C = F.normalize(A[start : start + rows].detach().to(device=device, dtype=torch.float32), dim=1) @ Bn.T
        return reduce(C if signed else C.abs_())

    bar = progress_bar(A.shape[0], progress, "max cosine", unit="row")
    try:
        yield from stream(A.shape[0], max(1, chunk_size), compute, device, what="max_cosine", bar=bar)
    finally:
        bar.close()


def alignment_shares(max_cos: Tensor, *, aligned: float = 0.9, unaligned: float = 0.3) -> dict[str, float]:
    """Share of rows with max cosine >= `aligned` and < `unaligned` (the paper's two cut-offs)."""
    if not 0 <= unaligned <= aligned <= 1:
        raise ValueError(f"need 0 <= unaligned <= aligned <= 1; got unaligned={unaligned}, "
                         f"aligned={aligned}.")
    n = max(1, max_cos.numel())
    return {"aligned": float((max_cos >= aligned).sum()) / n,
            "unaligned": float((max_cos < unaligned).sum()) / n,
            "median": float(max_cos.median()) if max_cos.numel() else math.nan}


# ----------------------------------------------------------------------------------------------------------
# A null for the activation checks: a random dictionary of the same size, coding with the same k


def random_atoms(n_atoms: int, d: int, *, seed: int = 0) -> Tensor:
    """[n_atoms, d] Gaussian directions of unit norm (fp32, CPU): the null dictionary."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n_atoms, d, generator=g), dim=1)


CODE_ELEMENTS = 1 << 25  # at most this many floats (128 MB) in one chunk's gathered atoms [c, d, k]


@torch.no_grad()
def random_dictionary_code(y: Tensor, atoms: Tensor, k: int, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """A k-sparse reconstruction of activations y [n, d] in the dictionary `atoms` [m, d] (`random_atoms`).

    Per token the centred activation picks the k atoms of largest |cosine| with it, and takes its
    coefficients on them by least squares; the mean of y is added back (the null's bias). With optimal
    coefficients this null is generous: a dictionary that beats it codes better than chance directions can.
    Where k >= d, k random atoms span the space (almost surely) and the code is exact, so no least squares
    is solved. Tokens go in chunks of at most `chunk`, fewer where the gathered atoms [c, d, k] would exceed
    `CODE_ELEMENTS` (a dense code, k in the thousands, would otherwise need tens of GB).
    Computed on y's device (the atoms are moved there). Returns (y_hat [n, d] fp32, uses [m] int64: on how
    many tokens each atom is in the code), both on y's device.
    """
    if not 1 <= k <= atoms.shape[0]:
        raise ValueError(f"k must be between 1 and {atoms.shape[0]} (the number of atoms); got k={k}.")
    y = y.float()
    atoms = atoms.to(y.device)  # `random_atoms` draws them on the CPU
    mu = y.mean(0)
    out, uses = torch.empty_like(y), torch.zeros(atoms.shape[0], dtype=torch.long, device=y.device)
    exact = k >= y.shape[1]
    step = chunk if exact else max(1, min(chunk, CODE_ELEMENTS // (k * y.shape[1])))
    for start in range(0, len(y), step):
        x = y[start : start + step] - mu
        # an exact code only counts uses, in any order: unsorted, a top-12,000 of 24,576 costs a third
        idx = (x @ atoms.T).abs().topk(k, dim=1, sorted=not exact).indices  # [c, k]
        uses += torch.bincount(idx.reshape(-1), minlength=atoms.shape[0])
        if exact:
            out[start : start + step] = y[start : start + step]
            continue
        S = atoms[idx]  # [c, k, d]
        coef = _least_squares(S, x.unsqueeze(-1))  # [c, k, 1]
        out[start : start + step] = (S.transpose(1, 2) @ coef).squeeze(-1) + mu
    return out, uses


def _least_squares(S: Tensor, x: Tensor) -> Tensor:
    """[c, k, 1] the coefficients minimising |S^T coef - x| for atoms S [c, k, d] and targets x [c, d, 1], by
    the normal equations (S S^T) coef = S x: k random unit atoms in d > k dimensions are well conditioned, and
    a batched Cholesky solve of [k, k] systems costs a fraction of torch.linalg.lstsq's batched QR of [d, k]
    ones (5.3 against 6.5 s per 24,576-atom layer at GPT-2 width, with the selection). A system Cholesky
    cannot factor (dependent atoms) is solved by the pseudo-inverse."""
    G = S @ S.transpose(1, 2)  # [c, k, k]
    rhs = S @ x
    L, info = torch.linalg.cholesky_ex(G)
    coef = torch.cholesky_solve(rhs, L)
    bad = torch.nonzero(info).squeeze(1)
    if len(bad):
        # the pseudo-inverse (SVD), on every device: on a rank-deficient system lstsq's CPU default (gelsy)
        # can miss the least residual on its first calls in a process (seen with torch 2.13), and CUDA's gels
        # assumes full rank
        coef[bad] = torch.linalg.pinv(S[bad].transpose(1, 2)) @ x[bad]
    return coef


def alive_share(uses: Tensor, n_tokens: int, min_share: float) -> float:
    """Share of latents in the code on at least `min_share` of n_tokens tokens (uses: [m] token counts)."""
    return float((uses >= max(1.0, min_share * n_tokens)).float().mean())
