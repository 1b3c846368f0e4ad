"""FF-KV dictionaries: exact reconstruction on tiny random SwiGLU, Gemma-2 and GPT-2 blocks; the alignment
kernel against a brute-force cosine matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.compute import ffkv

ARCHS = {
    # Llama-style SwiGLU, grouped-query attention
    "swiglu": dict(act_fn="silu", normalization_type="RMS", gated_mlp=True, n_key_value_heads=2,
                   positional_embedding_type="rotary", final_rms=True),
    # Gemma-2: GeGLU, pre- and post-feed-forward RMSNorms
    "gemma2": dict(act_fn="gelu_pytorch_tanh", normalization_type="RMS", gated_mlp=True, n_key_value_heads=2,
                   use_normalization_before_and_after=True, positional_embedding_type="rotary",
                   final_rms=True),
    # GPT-2: LayerNorm, gelu_new, biases everywhere
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN"),
}


def tiny_model(arch: str, seed: int = 0) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=50, n_ctx=16,
                                  seed=seed, **ARCHS[arch])
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random, norms included, so that folding mistakes show
        for p in model.parameters():
            offset = 1.0 if p.ndim == 1 and p.shape[0] == 16 else 0.0  # norm weights near 1, biases near 0
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + offset)
    return model.eval()


@pytest.fixture(params=list(ARCHS))
def model(request):
    return tiny_model(request.param)


def _run(model, layer: int):
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{layer}.{h}" for h in ("hook_resid_mid", "mlp.hook_post", "hook_mlp_out")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    x = model.blocks[layer].ln2(cache[names[0]])  # the MLP's input: the stream after the pre-MLP norm
    return [t.reshape(-1, t.shape[-1]).detach() for t in (x, cache[names[1]], cache[names[2]])]


@pytest.mark.parametrize("layer", [0, 1])
def test_latents_are_the_input_of_the_down_projection(model, layer):
    x, post, _out = _run(model, layer)
    block = ffkv.ff_block(model, layer)
    torch.testing.assert_close(ffkv.latents(block, x), post, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "normalized"])
def test_plain_and_normalized_reconstruction_is_the_blocks_output(model, variant):
    _x, post, out = _run(model, 1)
    block = ffkv.ff_block(model, 1)
    z = ffkv.encode(block, post, variant)
    torch.testing.assert_close(ffkv.decode(block, z, variant), out, rtol=1e-5, atol=1e-5)


def test_post_norm_is_applied_on_the_decoder_side():
    model = tiny_model("gemma2")
    _x, post, out = _run(model, 0)
    block = ffkv.ff_block(model, 0)
    assert block.ln2_post_w is not None and block.gated
    raw = post @ block.W_out  # without the post norm the output is not matched
    assert not torch.allclose(raw, out, atol=1e-3)
    # the value vectors carry its weight: each neuron's write has the direction of W_out[i] * w_post
    manual = block.W_out * model.blocks[0].ln2_post.w
    torch.testing.assert_close(ffkv.value_vectors(block), manual)


def test_gpt2_and_swiglu_value_vectors_are_the_rows_of_w_out():
    for arch in ("gpt2", "swiglu"):
        block = ffkv.ff_block(tiny_model(arch), 0)
        assert block.ln2_post_w is None
        assert torch.equal(ffkv.value_vectors(block), block.W_out)


def test_key_vectors_fold_the_pre_mlp_norm():
    model = tiny_model("swiglu")
    block = ffkv.ff_block(model, 0)
    g = model.blocks[0].ln2.w
    # gate pre-activation of a neuron for MLP input g * x / rms: its key on the raw stream is g * W_gate[:, i]
    torch.testing.assert_close(ffkv.key_vectors(block, "gate"), (model.blocks[0].mlp.W_gate * g[:, None]).T)
    torch.testing.assert_close(ffkv.key_vectors(block, "up"), (model.blocks[0].mlp.W_in * g[:, None]).T)
    gpt2 = tiny_model("gpt2")
    b = ffkv.ff_block(gpt2, 0)
    W = gpt2.blocks[0].mlp.W_in * gpt2.blocks[0].ln2.w[:, None]
    torch.testing.assert_close(ffkv.key_vectors(b), (W - W.mean(0, keepdim=True)).T)  # LayerNorm centres
    with pytest.raises(ValueError, match="gate or the up"):
        ffkv.key_vectors(block, "down")


def test_topk_keeps_the_k_largest_by_absolute_value():
    a = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    kept = ffkv.topk_abs(a, 10)
    for row, out in zip(a, kept):  # naive: sort each row by |value|
        order = sorted(range(30), key=lambda j: -abs(float(row[j])))
        assert set(torch.nonzero(out).flatten().tolist()) == set(order[:10])
        assert torch.equal(out[order[:10]], row[order[:10]])
    with pytest.raises(ValueError, match="between 1 and 30"):
        ffkv.topk_abs(a, 31)


def test_topk_normalized_ranks_by_the_size_of_each_write():
    model = tiny_model("swiglu")
    _x, post, out = _run(model, 0)
    block = ffkv.ff_block(model, 0)
    z = ffkv.encode(block, post, "topk_normalized", k=5)
    contribution = (post * block.W_out.norm(dim=1)).abs()
    assert torch.equal(z != 0, contribution >= contribution.topk(5, dim=1).values[:, -1:])
    # the full-k TopK is the plain reconstruction; fewer neurons explain less
    full = ffkv.decode(block, ffkv.encode(block, post, "topk", k=block.d_mlp), "topk")
    torch.testing.assert_close(full, out, rtol=1e-5, atol=1e-5)
    ev5 = ffkv.explained_variance(out, ffkv.decode(block, z, "topk_normalized"))
    assert ev5 < ffkv.explained_variance(out, full)


def test_explained_variance_against_the_formula():
    y = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    y_hat = y + 0.3 * torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    expected = 1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert ffkv.explained_variance(y, y_hat) == pytest.approx(float(expected), rel=1e-6)
    assert ffkv.explained_variance(y, y) == 1.0


@pytest.mark.parametrize("signed", [True, False])
def test_max_cosine_on_each_device_against_the_brute_force_matrix(device, signed):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(70, 12, generator=g), torch.randn(33, 12, generator=g)
    A[3] = 0.0  # a zero row has cosine 0 with everything
    B[5] = -2.5 * A[7]  # an exact (anti-)alignment
    C = torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in B] for a in A])
    C = C if signed else C.abs()
    best, which = ffkv.max_cosine(A.to(device), B.to(device), signed=signed, chunk_size=8)
    torch.testing.assert_close(best, C.max(1).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(C[torch.arange(70), which], C.max(1).values)
    assert best[3] == 0.0
    assert (best[7] == pytest.approx(1.0, abs=1e-6)) is (not signed)


@pytest.mark.parametrize("signed", [True, False])
def test_max_cosine_both_on_each_device_equals_max_cosine_each_way(device, signed):
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(70, 12, generator=g), torch.randn(33, 12, generator=g)
    B[5] = -2.5 * A[7]
    rows, cols = ffkv.max_cosine_both(A.to(device), B.to(device), signed=signed, chunk_size=8)
    torch.testing.assert_close(rows, ffkv.max_cosine(A, B, signed=signed)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cols, ffkv.max_cosine(B, A, signed=signed)[0], rtol=1e-5, atol=1e-6)
    assert rows.device.type == cols.device.type == "cpu" and cols.shape == (33,)


def test_alignment_shares_count_the_cut_offs():
    values = torch.tensor([0.95, 0.9, 0.5, 0.29, 0.1, 0.3])
    shares = ffkv.alignment_shares(values, aligned=0.9, unaligned=0.3)
    assert shares["aligned"] == pytest.approx(2 / 6) and shares["unaligned"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="unaligned <= aligned"):
        ffkv.alignment_shares(values, aligned=0.2, unaligned=0.3)


def test_errors_a_user_can_cause():
    model = tiny_model("gpt2")
    block = ffkv.ff_block(model, 0)
    with pytest.raises(ValueError, match="unknown FF-KV variant"):
        ffkv.encode(block, torch.zeros(1, 24), "sparse")
    attn_only = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_heads=2, n_ctx=4,
                                                          d_vocab=10, attn_only=True, act_fn="relu"))
    with pytest.raises(ValueError, match="no feed-forward weights"):
        ffkv.ff_block(attn_only, 0)


# --- Hugging Face checkpoints read by the streaming loader, checked against the HF block itself ---------


def _hf_gemma2_and_llama(tmp_path):
    import transformers

    shape = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    configs = {"gemma2": (transformers.Gemma2Config(head_dim=8, **shape), "gelu_pytorch_tanh"),
               "llama": (transformers.LlamaConfig(**shape), "silu")}
    out = {}
    for i, (arch, (cfg, act)) in enumerate(configs.items()):
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():  # HF initialises norm weights to 0 / 1: random ones expose a missing 1 + w
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(tmp_path / arch, safe_serialization=True)
        out[arch] = (model, tmp_path / arch, act)
    return out


def _tl_names(weights, act_fn: str):
    """The loader's `WeightSet` under TransformerLens attribute names, as a weights-only model object."""
    from types import SimpleNamespace as NS

    blocks = [NS(mlp=NS(W_in=lw.W_in, W_gate=lw.W_gate, W_out=lw.W_out, b_in=lw.b_in, b_out=lw.b_out),
                 ln2=NS(w=lw.ln2_w), ln2_post=NS(w=lw.ln2_post_w) if lw.ln2_post_w is not None else None)
              for _, lw in sorted(weights.layers.items())]
    cfg = NS(act_fn=act_fn, normalization_type=weights.normalization_type, eps=weights.eps)
    return NS(blocks=blocks, cfg=cfg)


def test_ffkv_of_loaded_checkpoints_reproduces_the_hf_feed_forward(tmp_path):
    from weightscope.load.checkpoints import load_weights

    for arch, (hf, folder, act) in _hf_gemma2_and_llama(tmp_path).items():
        weights = load_weights(folder, mlp=True)
        model = _tl_names(weights, act)
        x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
        for layer, hf_layer in enumerate(hf.model.layers):
            block = ffkv.ff_block(model, layer)
            with torch.no_grad():
                if arch == "gemma2":  # pre-norm, MLP, then the post-feed-forward norm (applied on decode)
                    inp = hf_layer.pre_feedforward_layernorm(x)
                    expected = hf_layer.post_feedforward_layernorm(hf_layer.mlp(inp))
                else:
                    inp = hf_layer.post_attention_layernorm(x)
                    expected = hf_layer.mlp(inp)
            assert block.gated and (block.ln2_post_w is not None) == (arch == "gemma2")
            z = ffkv.encode(block, ffkv.latents(block, inp), "normalized")
            torch.testing.assert_close(ffkv.decode(block, z, "normalized"), expected, rtol=1e-4, atol=1e-5)
            # the pre-MLP norm folded into the keys: gate pre-activations from the raw stream, up to its RMS
            rms = x.pow(2).mean(-1, keepdim=True).add(weights.eps).sqrt()
            torch.testing.assert_close((x / rms) @ ffkv.key_vectors(block, "gate").T, inp @ block.W_gate,
                                       rtol=1e-4, atol=1e-5)
