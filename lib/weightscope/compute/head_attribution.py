"""Weights-only reading of attention-output (hook_z) SAE features: which heads they belong to, what they
write.

An SAE on `blocks.L.attn.hook_z` reads the heads' outputs before `W_O`, concatenated head-major: x = [z_0,
z_1, ..., z_{H-1}], each z_h of width d_head. A decoder row W_dec[f] : [H * d_head] therefore splits into
per-head slices W_dec[f, h] : [d_head] (`head_slices`).

- - Head attribution (Kissane et al. 2024, their code): share_h(f) = |W_dec[f, h]|_2 / sum_h' |W_dec[f, h']|_2
  (plain L2 norms, not squared), `head_shares`.
- - With grouped-query attention, query head h reads the value head `kv_heads(H, H_kv)[h]` (TransformerLens
  repeats each key/value head over consecutive query heads, `repeat_interleave`).
- - What a feature writes into the residual stream: sum_h W_dec[f, h] @ W_O[h] : [d_model]
  (`residual_writes`).
- - How many heads are polysemantic (`head_groups`, `polysemantic_heads`): a head's top features by share are
  grouped by their output-side token profiles (residual write through the folded unembedding, centred over the
  vocabulary): two features are linked when their profiles' cosine reaches `tau`; groups are the connected
  components. The null (`same_share_null`) replaces every slice of those features by a random direction of the
  same norm, so each null feature has exactly the real feature's shares but no content.
- - The head-level variant (`head_slice_similarities`) profiles each of head h's top features from head h's
  own slice only (W_dec[f, h] @ W_O[h]), against null slices of the same norm in head h's space.

Introduced in chapter 4 (`notebooks/04_attention_saes.md`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from weightscope.compute.streaming import progress_bar


def head_slices(W_dec: Tensor, n_heads: int, d_head: int) -> Tensor:
    """W_dec [d_sae, n_heads * d_head] -> [d_sae, n_heads, d_head] (a view; head-major layout of hook_z)."""
    if W_dec.shape[-1] != n_heads * d_head:
        raise ValueError(f"decoder width {W_dec.shape[-1]} is not n_heads * d_head = {n_heads} * {d_head}")
    return W_dec.reshape(W_dec.shape[0], n_heads, d_head)


def head_shares(W_dec: Tensor, n_heads: int, d_head: int) -> Tensor:
    """Head attribution [d_sae, n_heads]: each slice's L2 norm over the sum of the slices' norms (rows sum to
    1)."""
    norms = head_slices(W_dec.float(), n_heads, d_head).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def kv_heads(n_heads: int, n_kv_heads: int | None) -> Tensor:
    """[n_heads]: the key/value head each query head reads (TransformerLens's repeat_interleave grouping)."""
    n_kv = n_kv_heads or n_heads
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_key_value_heads={n_kv}")
    return torch.arange(n_heads) // (n_heads // n_kv)


def shares_table(shares: Tensor, layer: int, kv: Tensor) -> pd.DataFrame:
    """Long table, one row per (feature, head): layer, feature, head, kv_head, share."""
    d_sae, n_heads = shares.shape
    return pd.DataFrame(
        {
            "layer": layer,
            "feature": np.repeat(np.arange(d_sae), n_heads),
            "head": np.tile(np.arange(n_heads), d_sae),
            "kv_head": np.tile(kv.numpy(), d_sae),
            "share": shares.reshape(-1).cpu().numpy(),
        }
    )


def top_features(shares: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, indices), both [n_heads, k]: each head's k features with the largest share, largest first."""
    return shares.T.topk(min(k, shares.shape[0]), dim=-1)


def residual_writes(W_dec: Tensor, W_O: Tensor) -> Tensor:
    """[n, d_model]: what each decoder row writes through the output maps. W_dec [n, H * d_head], W_O [H,
    d_head, d_model]."""
    n_heads, d_head, _ = W_O.shape
    return torch.einsum("fhk,hkm->fm", head_slices(W_dec.to(W_O.dtype), n_heads, d_head), W_O)


PROFILE_COLUMNS = 8192  # vocabulary columns of the folded unembedding per step of `profile_gram`


def profile_gram(M_out: Tensor, keep: Tensor | None = None, *, progress: bool = True) -> Tensor:
    """[d_model, d_model] fp64: M_c M_c^T, for M_c the folded unembedding M_out [d_model, d_vocab] over the
    tokens `keep` (None: all) with each row centred over them.

    A write w [d_model] has the output-side token profile w M_c: its logits over those tokens, centred (a
    constant shift of every logit changes no prediction). Two profiles' dot product is then w G w'^T, so the
    cosines among any number of profiles cost one product with the vocabulary in all, not one per feature
    (at 12 GPT-2-width layers, [k (1 + n_null), d_model] x [d_model, d_vocab] per head: 31 s). Taken over
    PROFILE_COLUMNS columns at a time in fp64."""
    cols = torch.arange(M_out.shape[1]) if keep is None else torch.as_tensor(keep).cpu()
    mean = torch.zeros(M_out.shape[0], dtype=torch.float64, device=M_out.device)
    for part in cols.split(PROFILE_COLUMNS):
        mean += M_out[:, part.to(M_out.device)].double().sum(1)
    mean /= max(1, len(cols))
    gram = torch.zeros(M_out.shape[0], M_out.shape[0], dtype=torch.float64, device=M_out.device)
    bar = progress_bar(len(cols), progress, "token-profile Gram matrix", unit="token")
    try:
        for part in cols.split(PROFILE_COLUMNS):
            M = M_out[:, part.to(M_out.device)].double() - mean[:, None]
            gram += M @ M.T
            bar.update(len(part))
    finally:
        bar.close()
    return gram


def profile_cosines(writes: Tensor, gram: Tensor) -> Tensor:
    """[..., n, n] fp32: the cosines among the token profiles of writes [..., n, d_model] (`profile_gram`); 0
    with a zero profile."""
    W = writes.to(device=gram.device, dtype=torch.float64)
    dots = W @ gram @ W.transpose(-1, -2)
    norm = dots.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt().clamp_min(1e-12)
    return (dots / norm[..., :, None] / norm[..., None, :]).float()


def same_share_null(rows: Tensor, n_heads: int, d_head: int, generator: torch.Generator) -> Tensor:
    """Null decoder rows [n, H * d_head]: every head slice of `rows` replaced by a random direction of the
    same norm, so the null features have exactly the real ones' head shares."""
    slices = head_slices(rows.float(), n_heads, d_head)
    noise = torch.randn(slices.shape, generator=generator)
    noise = noise / noise.norm(dim=-1, keepdim=True) * slices.norm(dim=-1, keepdim=True)
    return noise.reshape(rows.shape)


def connected_groups(similarity: Tensor, tau: float) -> np.ndarray:
    """Group labels [n]: connected components of the graph linking i and j when similarity[i, j] >= tau."""
    n = similarity.shape[0]
    linked = (similarity >= tau).cpu().numpy() | np.eye(n, dtype=bool)
    labels = -np.ones(n, dtype=int)
    for start in range(n):
        if labels[start] >= 0:
            continue
        stack, labels[start] = [start], start
        while stack:
            i = stack.pop()
            for j in np.flatnonzero(linked[i] & (labels < 0)):
                labels[j] = start
                stack.append(j)
    return labels


def cosine_matrix(profiles: Tensor) -> Tensor:
    """[n, n] cosine similarity of the rows of `profiles`."""
    unit = profiles / profiles.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def group_stats(similarity: Tensor, tau: float) -> tuple[int, float]:
    """(number of groups, share of the features in the largest group) at link threshold tau."""
    labels = connected_groups(similarity, tau)
    sizes = np.bincount(np.unique(labels, return_inverse=True)[1])
    return len(sizes), float(sizes.max() / len(labels))


def head_similarities(
    W_dec: Tensor, W_O: Tensor, gram: Tensor, *, k: int, n_null: int, seed: int
) -> list[tuple[int, str, int, Tensor]]:
    """Per head: the profile cosine matrix [k, k] of its top-k features by share, and of `n_null` same-share
    null draws of them. W_dec [d_sae, H * d_head], W_O [H, d_head, d_model], gram: `profile_gram` of the
    folded unembedding over the profiled tokens. Returns [(head, "features" | "null", draw, similarity)]."""
    n_heads, d_head, _ = W_O.shape
    _, top = top_features(head_shares(W_dec, n_heads, d_head), k)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for head in range(n_heads):
        rows = W_dec[top[head]].float()
        stack = torch.cat([rows] + [same_share_null(rows, n_heads, d_head, gen) for _ in range(n_null)])
        sims = profile_cosines(residual_writes(stack, W_O.float()).reshape(1 + n_null, len(rows), -1), gram)
        out += [(head, "features" if i == 0 else "null", max(0, i - 1), sims[i]) for i in range(1 + n_null)]
    return out


def null_link_threshold(similarities: list[tuple[int, str, int, Tensor]], q: float) -> float:
    """The q-quantile of the pairwise profile cosines among the null draws of `head_similarities`: linking two
    features at this tau means their profiles agree more than a fraction q of content-free pairs do."""
    pairs = [
        sim[torch.triu_indices(len(sim), len(sim), 1).unbind()]
        for _, kind, _, sim in similarities
        if kind == "null"
    ]
    return float(torch.quantile(torch.cat(pairs), q))


def polysemantic_heads(
    similarities: list[tuple[int, str, int, Tensor]], *, layer: int, taus: list[float]
) -> pd.DataFrame:
    """Groups among each head's top features at each tau, for the features and the null draws of
    `head_similarities`. Columns: layer, head, tau, kind, draw, n_groups, largest_group_frac."""
    rows = []
    for head, kind, draw, sim in similarities:
        for tau in taus:
            n_groups, largest = group_stats(sim, tau)
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "tau": tau,
                    "kind": kind,
                    "draw": draw,
                    "n_groups": n_groups,
                    "largest_group_frac": largest,
                }
            )
    return pd.DataFrame(rows)


def head_slice_similarities(
    W_dec: Tensor, W_O: Tensor, gram: Tensor, *, k: int, n_null: int, seed: int
) -> list[tuple[int, str, int, Tensor]]:
    """Per head h: the profile cosine matrix [k, k] of its top-k features by share, each profiled from head
    h's own slice only (what head h writes for feature f: W_dec[f, h] @ W_O[h], through the unembedding of
    `gram`, `profile_gram`), and of `n_null` null draws (each slice replaced by a random direction of the same
    norm in head h's space, so the null has the same shares). Same return shape as `head_similarities`."""
    n_heads, d_head, _ = W_O.shape
    _, top = top_features(head_shares(W_dec, n_heads, d_head), k)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for head in range(n_heads):
        own = head_slices(W_dec[top[head]].float(), n_heads, d_head)[:, head]  # [k, d_head]
        noise = torch.randn((n_null,) + own.shape, generator=gen)
        noise = noise / noise.norm(dim=-1, keepdim=True) * own.norm(dim=-1, keepdim=True)
        stack = torch.cat([own[None], noise]).reshape(-1, d_head)  # [(1 + n_null) k, d_head]
        sims = profile_cosines((stack @ W_O[head].float()).reshape(1 + n_null, len(own), -1), gram)
        out += [(head, "features" if i == 0 else "null", max(0, i - 1), sims[i]) for i in range(1 + n_null)]
    return out
