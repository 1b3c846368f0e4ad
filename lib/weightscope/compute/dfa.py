"""Direct feature attribution (DFA) of attention-output SAE features, and its recursive step into the residual
stream.

With the attention pattern A frozen, head h's output at destination d is z[d, h] = sum_s A[h, d, s] v[s,
kv(h)], so an hook_z SAE feature's pre-activation is linear in the value vectors:

    pre_f(d) = scale_f * (sum_{h,s} A[h, d, s] v[s, kv(h)] . W_enc[h, :, f] + b_enc[f] - b_dec' . W_enc[:, f])

where W_enc[h, :, f] is head h's slice of the encoder column, b_dec' = b_dec when the SAE subtracts it from
its input (`apply_b_dec_to_input`), and scale_f = |W_dec[f]| for TopK SAEs that rescale by the decoder norm,
else 1. `dfa` returns the (h, s) parts; `encoder_affine` the effective W_enc and bias, so that parts + bias
equal the pre-activation exactly (Kissane et al.'s DFA leaves the bias terms out; here they are returned
separately).

Recursive DFA (`value_decomposition`, `rdfa`): the value vector at a source position, v = LN(x) W_V + b_V, is
linear in the residual stream x once the norm's scale is frozen, and x = sum_g a_g W_dec_res[g] + b_dec_res +
error by a residual SAE reading that stream. So each part A[h, d, s] v[s] . W_enc[h, :, f] splits further over
the residual SAE's active features, its bias, its error term and the value bias.

Introduced in chapter 4 (`notebooks/04_attention_saes.md`)."""

from __future__ import annotations

import torch
from torch import Tensor

from weightscope.compute.passes import BlockStream
from weightscope.load.saes import sae_decode


class DFAError(ValueError):
    """An SAE whose encoder is not affine followed by an activation (e.g. gated SAEs) cannot be decomposed."""


def encoder_affine(sae) -> tuple[Tensor, Tensor]:
    """(W_eff [d_in, d_sae], b_eff [d_sae]) with pre-activation = x @ W_eff + b_eff for input x [.., d_in].

    `sae` is a `LoadedSAE` (or a sae-lens SAE). The pre-activation is what the activation function (ReLU,
    TopK, JumpReLU) receives, so a feature is active where it is positive (ReLU, TopK) or above its threshold
    (JumpReLU)."""
    inner = getattr(sae, "sae", sae)
    cfg = inner.cfg
    arch = cfg.architecture()
    if arch not in ("standard", "topk", "jumprelu", "batchtopk"):
        raise DFAError(f"DFA needs an affine encoder; architecture {arch!r} (e.g. gated) is not supported.")
    if getattr(cfg, "normalize_activations", "none") not in ("none", None):
        raise DFAError(
            f"the SAE normalises its input at run time ({cfg.normalize_activations!r}); fold it first."
        )
    W_enc, b_enc, b_dec = inner.W_enc.detach(), inner.b_enc.detach(), inner.b_dec.detach()
    b = b_enc - (b_dec @ W_enc if cfg.apply_b_dec_to_input else 0.0)
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        scale = inner.W_dec.detach().norm(dim=-1)
        return W_enc * scale, b * scale
    return W_enc, b


@torch.no_grad()
def dfa(pattern: Tensor, v: Tensor, W_enc: Tensor, batch: Tensor, dest: Tensor, feature: Tensor) -> Tensor:
    """DFA parts [n, n_heads, src] for n (sequence, destination, feature) triples.

    pattern [batch, n_heads, dest, src] (the attention pattern, frozen); v [batch, src, n_kv_heads, d_head]
    (the value vectors, `hook_v`); W_enc [n_heads * d_head, d_sae] (effective encoder, `encoder_affine`);
    batch, dest, feature: LongTensors [n]. parts[i, h, s] = pattern[b, h, d, s] * v[b, s, kv(h)] . W_enc[h, :,
    f]."""
    n, (n_heads, src), (n_kv, d_head) = len(batch), pattern.shape[1::2], v.shape[2:]
    # query head h = j * group + g reads value head j (TransformerLens's repeat_interleave)
    w = W_enc[:, feature].T.reshape(n, n_kv, n_heads // n_kv, d_head).to(v.dtype)  # [n, n_kv, group, d_head]
    out = torch.empty(n, n_heads, src, dtype=v.dtype, device=v.device)
    for row in batch.unique().tolist():  # one sequence at a time: its value vectors are shared, never copied
        idx = torch.nonzero(batch == row).flatten()
        vw = torch.einsum("sjk,njgk->njgs", v[row], w[idx]).reshape(len(idx), n_heads, src)
        out[idx] = pattern[row][:, dest[idx], :].transpose(0, 1) * vw
    return out


@torch.no_grad()
def value_decomposition(
    x: Tensor,
    res_sae,
    scale: Tensor,
    ln_w: Tensor,
    ln_b: Tensor | None,
    W_V: Tensor,
    b_V: Tensor,
    *,
    center: bool,
) -> dict[str, Tensor]:
    """Split the value vectors at one source position over a residual SAE's decomposition of the stream there.

    x [d_model]: the residual stream the attention layer reads (its `hook_resid_pre`); res_sae: a LoadedSAE
    (or sae-lens SAE) on that stream; scale: the pre-attention norm's frozen scale at that position
    (`ln1.hook_scale`, a scalar); ln_w [d_model], ln_b [d_model] or None: the norm's weight and bias; W_V
    [n_kv, d_model, d_head], b_V [n_kv, d_head]; center: LayerNorm (True) or RMSNorm (False).

    Returns {"features": LongTensor [m] (the residual SAE's active features), "feature_parts": [m, n_kv,
    d_head], "b_dec_part", "error_part", "bias_part": [n_kv, d_head]}; all parts sum to the value vector LN(x)
    W_V + b_V with the scale frozen."""
    inner = getattr(res_sae, "sae", res_sae)
    acts = inner.encode(x[None].to(inner.W_dec.dtype))[0]
    active = torch.nonzero(acts).flatten()
    recon_bias = sae_decode(inner, torch.zeros_like(acts)[None])[0]  # b_dec (the decoder's value at zero)
    one_hot = torch.zeros(len(active), acts.shape[0], dtype=acts.dtype, device=acts.device)  # beside the SAE
    one_hot[torch.arange(len(active), device=acts.device), active] = acts[active]
    # [m, d_model]; one_hot is as sparse as a code gets: `sae_decode` multiplies only its nonzero entries
    writes = sae_decode(inner, one_hot) - recon_bias if len(active) else x.new_zeros(0, x.shape[0])
    error = x - writes.sum(0) - recon_bias

    def through_value(
        stream: Tensor,
    ) -> Tensor:  # a linear piece of the stream -> its part of v [.., n_kv, d_head]
        if center:
            stream = stream - stream.mean(-1, keepdim=True)
        return torch.einsum("...m,jmk->...jk", stream / scale * ln_w, W_V)

    bias = b_V + (torch.einsum("m,jmk->jk", ln_b, W_V) if ln_b is not None else 0.0)
    return {
        "features": active,
        "feature_parts": through_value(writes),
        "b_dec_part": through_value(recon_bias),
        "error_part": through_value(error),
        "bias_part": bias,
    }


@torch.no_grad()
def rdfa(parts: dict[str, Tensor], attn: float, w_enc_head: Tensor, kv: int) -> dict[str, Tensor]:
    """Contributions to one DFA part A[h, d, s] v[s, kv] . w from each piece of `value_decomposition`.

    attn: the frozen pattern weight A[h, d, s]; w_enc_head [d_head]: the effective encoder slice W_enc[h, :,
    f]; kv: the value head query head h reads. Returns {"features": [m], "feature": [m], "b_dec", "error",
    "bias": scalars}; they sum to the DFA part."""

    def dot(t: Tensor) -> Tensor:
        return attn * (t[..., kv, :] @ w_enc_head)

    return {
        "features": parts["features"],
        "feature": dot(parts["feature_parts"]),
        "b_dec": dot(parts["b_dec_part"]),
        "error": dot(parts["error_part"]),
        "bias": dot(parts["bias_part"]),
    }


LAYER_HOOKS = ("attn.hook_pattern", "attn.hook_v", "attn.hook_z", "hook_resid_pre", "ln1.hook_scale")


@torch.no_grad()
def attention_cache(model, tokens: Tensor, layer: int, *,
                    stream: BlockStream | None = None) -> dict[str, Tensor]:
    """Block `layer`'s {"pattern" [b, H, d, s], "v" [b, s, H_kv, d_head], "z" [b, pos, H, d_head], "resid_pre"
    [b, pos, d_model], "scale" [b, pos]} (float32) on tokens [b, pos]. stream: a `BlockStream` of these tokens
    standing at or before block `layer` (it runs on to just after it, so layers read in turn share one
    pass); None: a pass from the embedding up to block `layer`."""
    stream = BlockStream(model, tokens) if stream is None else stream
    names = [f"blocks.{layer}.{h}" for h in LAYER_HOOKS]
    cache = stream.run_to(layer, names)
    out = {
        key: cache[f"blocks.{layer}.{h}"].float()
        for key, h in zip(("pattern", "v", "z", "resid_pre", "scale"), LAYER_HOOKS)
    }
    out["scale"] = out["scale"][..., 0]
    return out
