"""Chapter-2 attention kernels against naive per-feature, per-head references (CPU, small random weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from weightscope.compute import attention as A
from weightscope.compute import folding, streaming

OOM = getattr(torch, "OutOfMemoryError", RuntimeError)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def layer_weights(n_heads=4, n_kv=2, d_model=12, d_head=3, seed=1):
    """Random (W_Q, W_K, W_V, W_O) in TransformerLens's shapes, kv heads unexpanded."""
    return (
        randn(n_heads, d_model, d_head, seed=seed),
        randn(n_kv, d_model, d_head, seed=seed + 1),
        randn(n_kv, d_model, d_head, seed=seed + 2),
        randn(n_heads, d_head, d_model, seed=seed + 3),
    )


def naive_reads(D, W_Q, W_K, W_V, W_O, dtype=torch.float32):
    """Double loop over features and heads; v through W_OV = W_V[kv] @ W_O[h] formed explicitly."""
    n_heads, n_kv = W_Q.shape[0], W_K.shape[0]
    group = n_heads // n_kv
    D, W_Q, W_K, W_V, W_O = (t.to(dtype) for t in (D, W_Q, W_K, W_V, W_O))
    out = {name: torch.zeros(D.shape[0], n_heads, dtype=torch.float64) for name in "qkv"}
    out["k_kv"] = torch.zeros(D.shape[0], n_kv, dtype=torch.float64)
    for i, d in enumerate(D):
        for h in range(n_heads):
            kv = h // group
            W_OV = W_V[kv] @ W_O[h]  # [d_model, d_model]
            out["q"][i, h] = torch.linalg.vector_norm((d @ W_Q[h]).double())
            out["k"][i, h] = torch.linalg.vector_norm((d @ W_K[kv]).double())
            out["v"][i, h] = torch.linalg.vector_norm((d @ W_OV).double())
        for kv in range(n_kv):
            out["k_kv"][i, kv] = torch.linalg.vector_norm((d @ W_K[kv]).double())
    return out


def assert_reads_close(result, ref, rtol):
    assert set(result) == {"q", "k", "v", "k_kv"}
    for name, value in result.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        np.testing.assert_allclose(value.double().numpy(), ref[name].numpy(), rtol=rtol, atol=0, err_msg=name)


def tiny_model(normalization_type="RMS", n_kv=2, n_layers=4, seed=0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=16, d_head=4, n_heads=4, n_key_value_heads=n_kv, n_ctx=8, d_vocab=20,
        act_fn="gelu", normalization_type=normalization_type, positional_embedding_type="rotary", seed=seed,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    with torch.no_grad():  # non-trivial norm weights, so that folding them matters
        for i, block in enumerate(model.blocks):
            if hasattr(block.ln1, "w"):
                block.ln1.w.copy_(1.0 + 0.5 * randn(16, seed=100 + i))
    return model


# ---------------------------------------------------------------------------------------------------------
# fold_pre_attention_norm
# ---------------------------------------------------------------------------------------------------------


def test_fold_scales_columns_and_optionally_centres():
    D, g = randn(5, 6, seed=2) + 3.0, randn(6, seed=3)
    fold = folding.fold_pre_attention_norm
    np.testing.assert_allclose(fold(D, g, center=False).numpy(), (D * g).numpy(), rtol=1e-6)
    centred = (D - D.mean(1, keepdim=True)) * g
    np.testing.assert_allclose(fold(D, g, center=True).numpy(), centred.numpy(), atol=1e-6)
    assert torch.equal(folding.fold_pre_attention_norm(D, None, center=False), D)
    assert folding.fold_pre_attention_norm(D.bfloat16(), g, center=True).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="g \\[d_model\\]"):
        folding.fold_pre_attention_norm(D, g[:5], center=False)


@pytest.mark.parametrize("normalization_type", ["RMS", "LN"])
def test_fold_is_what_the_models_own_norm_does_up_to_the_per_row_scale(normalization_type):
    model = tiny_model(normalization_type)
    ln1 = model.blocks[1].ln1
    if normalization_type == "LN":
        torch.nn.init.zeros_(ln1.b)
    D = randn(7, 16, seed=4) + 0.5
    folded = folding.fold_pre_attention_norm(D, ln1.w.detach(), center=normalization_type == "LN")
    with torch.no_grad():
        normed = ln1(D[:, None, :])[:, 0]  # [batch=7, pos=1, d_model]
    ratio = normed / folded  # the norm's 1 / rms (or 1 / std): one constant per row
    np.testing.assert_allclose(ratio.numpy(), ratio[:, :1].expand_as(ratio).numpy(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# head_reads
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (6, 1), (6, 3)])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])
def test_head_reads_match_naive_double_loop(n_heads, n_kv, chunk_size):
    weights = layer_weights(n_heads, n_kv)
    D = randn(11, 12, seed=5)
    result = A.head_reads(D, *weights, chunk_size=chunk_size, progress=False)
    assert result["q"].shape == (11, n_heads) and result["k_kv"].shape == (11, n_kv)
    assert_reads_close(result, naive_reads(D, *weights), rtol=1e-5)


def test_head_reads_on_each_device(device):
    weights = layer_weights(6, 3)
    D = randn(13, 12, seed=8)
    result = A.head_reads(D, *(w.to(device) for w in weights), chunk_size=5, progress=False)
    assert_reads_close(result, naive_reads(D, *weights), rtol=1e-5)  # results come back to the CPU in fp32


def test_head_reads_take_parameters_that_require_grad():
    weights = layer_weights(4, 2)
    D = randn(5, 12, seed=9)
    result = A.head_reads(torch.nn.Parameter(D), *map(torch.nn.Parameter, weights), progress=False)
    assert not any(value.requires_grad for value in result.values())
    assert_reads_close(result, naive_reads(D, *weights), rtol=1e-5)


def test_head_reads_when_d_head_exceeds_d_model():
    weights = layer_weights(n_heads=2, n_kv=2, d_model=3, d_head=5)  # R factor is then [3, 5], not square
    D = randn(4, 3, seed=6)
    assert_reads_close(A.head_reads(D, *weights, progress=False), naive_reads(D, *weights), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [3, None])
def test_head_reads_bf16(chunk_size):
    weights = [w.bfloat16() for w in layer_weights(4, 2)]
    D = randn(9, 12, seed=7).bfloat16()
    result = A.head_reads(D, *weights, chunk_size=chunk_size, progress=False)
    assert_reads_close(result, naive_reads(D, *weights, dtype=torch.float32), rtol=3e-2)
    as_fp32 = A.head_reads(D, *weights, dtype=torch.float32, progress=False)
    assert_reads_close(as_fp32, naive_reads(D, *weights), rtol=1e-5)


def test_gqa_mapping_matches_transformer_lens_expansion():
    model = tiny_model("RMS", n_kv=2)
    attn = model.blocks[0].attn
    assert attn._W_K.shape == (2, 16, 4) and attn.W_K.shape == (4, 16, 4)
    kv = A.kv_head_index(4, 2)
    assert kv.tolist() == [0, 0, 1, 1]
    for h in range(4):
        assert torch.equal(attn.W_K[h], attn._W_K[kv[h]]) and torch.equal(attn.W_V[h], attn._W_V[kv[h]])
    D = randn(6, 16, seed=8)
    W_Q, W_O = attn.W_Q.detach(), attn.W_O.detach()
    raw = A.head_reads(D, W_Q, attn._W_K.detach(), attn._W_V.detach(), W_O, progress=False)
    expanded = A.head_reads(D, W_Q, attn.W_K.detach(), attn.W_V.detach(), W_O, progress=False)
    for name in "qkv":  # TL's own expansion is the reference for which kv head each query head uses
        np.testing.assert_allclose(raw[name].numpy(), expanded[name].numpy(), rtol=1e-6)
    assert raw["k_kv"].shape == (6, 2) and torch.equal(raw["k"], raw["k_kv"][:, kv])
    assert not torch.allclose(raw["k_kv"][:, 0], raw["k_kv"][:, 1])  # the test can tell kv heads apart


def test_head_reads_shape_errors_say_what_to_do():
    W_Q, W_K, W_V, W_O = layer_weights(4, 2)
    D = randn(3, 12)
    with pytest.raises(ValueError, match="d_head before d_model"):
        A.head_reads(D, W_Q, W_K, W_V, W_O.transpose(1, 2), progress=False)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        A.head_reads(D, W_Q, *layer_weights(4, 3)[1:3], W_O, progress=False)
    with pytest.raises(ValueError, match="columns"):
        A.head_reads(D[:, :5], W_Q, W_K, W_V, W_O, progress=False)
    with pytest.raises(ValueError, match="same number of heads"):
        A.head_reads(D, W_Q, W_K, W_V[:1], W_O, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        A.head_reads(D, W_Q, W_K, W_V, W_O, chunk_size=0, progress=False)


def test_head_reads_progress_bar_and_empty_input():
    weights = layer_weights(4, 2)
    assert A.head_reads(randn(5, 12), *weights, chunk_size=2, progress=True)["v"].shape == (5, 4)
    empty = A.head_reads(randn(0, 12), *weights, progress=False)
    assert empty["q"].shape == (0, 4) and empty["k_kv"].shape == (0, 2)


def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch):
    seen, original = [], A._reads_chunk

    def flaky(D_chunk, **weights):
        seen.append(D_chunk.shape[0])
        if D_chunk.shape[0] > 4:
            raise OOM("CUDA out of memory. Tried to allocate 1 GiB")
        return original(D_chunk, **weights)

    monkeypatch.setattr(A, "_reads_chunk", flaky)
    weights, D = layer_weights(4, 2), randn(30, 12, seed=9)
    result = A.head_reads(D, *weights, chunk_size=24, progress=False)
    assert seen == [24, 12, 6] + [3] * 10  # halved until it fits, then kept
    assert_reads_close(result, naive_reads(D, *weights), rtol=1e-5)


def test_out_of_memory_on_one_feature_is_clear_and_other_errors_pass(monkeypatch):
    weights, D = layer_weights(4, 2), randn(4, 12)
    monkeypatch.setattr(A, "_reads_chunk", lambda D_chunk, **w: (_ for _ in ()).throw(OOM("out of memory")))
    with pytest.raises(RuntimeError, match="single feature"):
        A.head_reads(D, *weights, chunk_size=4, progress=False)
    monkeypatch.setattr(A, "_reads_chunk", lambda D_chunk, **w: (_ for _ in ()).throw(RuntimeError("dtype!")))
    with pytest.raises(RuntimeError, match="dtype!"):
        A.head_reads(D, *weights, chunk_size=4, progress=False)


def test_automatic_chunks_follow_the_memory_budget(monkeypatch):
    from weightscope.compute import token_scores as K

    seen, original = [], A._reads_chunk

    def recording(D_chunk, **weights):
        seen.append(D_chunk.shape[0])
        return original(D_chunk, **weights)

    monkeypatch.setattr(A, "_reads_chunk", recording)
    monkeypatch.setattr(streaming, "memory_budget", lambda device: 5_000)
    A.head_reads(randn(40, 12), *layer_weights(4, 2), progress=False)
    assert sum(seen) == 40 and 1 < seen[0] < 40 and len(set(seen[:-1])) == 1


# ---------------------------------------------------------------------------------------------------------
# null_zscores
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_null_zscores_match_numpy(q):
    reads, null = randn(20, 5, seed=10).abs(), randn(37, 5, seed=11).abs() * 0.8
    z, exceeds = A.null_zscores(reads, null, q=q)
    r, n = reads.double().numpy(), null.double().numpy()
    np.testing.assert_allclose(z.numpy(), (r - n.mean(0)) / n.std(0, ddof=1), rtol=1e-5)
    assert z.dtype == torch.float32 and exceeds.dtype == torch.bool
    assert np.array_equal(exceeds.numpy(), r > np.quantile(n, q, axis=0))
    assert exceeds.any() and not exceeds.all()


def test_null_zscores_quantile_is_strict_and_per_head():
    null = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    _, exceeds = A.null_zscores(torch.tensor([[2.0, 3.0], [2.5, 31.0]]), null, q=0.5)  # medians 2 and 20
    assert exceeds.tolist() == [[False, False], [True, True]]
    with pytest.raises(ValueError, match="at least 2"):
        A.null_zscores(null, null[:1])
    with pytest.raises(ValueError, match="strictly between"):
        A.null_zscores(null, null, q=1.0)
    with pytest.raises(ValueError, match="n_heads"):
        A.null_zscores(null, null[:, :1])


# ---------------------------------------------------------------------------------------------------------
# qk_pairs
# ---------------------------------------------------------------------------------------------------------


def assert_valid_top_pairs(result, S, top, key):
    """Tie-robust: the right `top` key values, best first, and each (i, j) really scores what is reported."""
    scores, qi, ki = (t.numpy() for t in result)
    assert len(scores) == min(top, S.size)
    np.testing.assert_allclose(scores, S[qi, ki], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(key(scores), -np.sort(-key(S).ravel())[: len(scores)], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(key(scores)) <= 1e-6), "pairs are not sorted best first"
    assert len(set(zip(qi.tolist(), ki.tolist()))) == len(scores), "a pair repeats"


@pytest.mark.parametrize("chunk_size", [1, 3, 8, None])
@pytest.mark.parametrize("sign,key", [("abs", np.abs), ("pos", lambda s: s), ("neg", lambda s: -s)])
def test_qk_pairs_match_full_bilinear_matrix(chunk_size, sign, key):
    Dq, Dk = randn(13, 10, seed=12), randn(17, 10, seed=13)
    W_Q_h, W_K_h = randn(10, 3, seed=14), randn(10, 3, seed=15)
    S = ((Dq @ W_Q_h) @ (Dk @ W_K_h).T).double().numpy()  # [n_q, n_k], the matrix qk_pairs never forms
    result = A.qk_pairs(Dq, Dk, W_Q_h, W_K_h, top=9, sign=sign, chunk_size=chunk_size)
    assert_valid_top_pairs(result, S, 9, key)


def test_qk_pairs_default_cpu_chunks_are_cache_sized_score_blocks(monkeypatch):
    chunks, original = [], A._qk_chunk
    monkeypatch.setattr(A, "_qk_chunk", lambda c, *a: chunks.append(len(c)) or original(c, *a))
    monkeypatch.setattr(A, "CPU_BLOCK_BYTES", 4 * 17 * 5)  # five rows of 17 fp32 scores
    Dq, Dk = randn(13, 10, seed=12), randn(17, 10, seed=13)
    W_Q, W_K = randn(10, 3, seed=14), randn(10, 3, seed=15)
    result = A.qk_pairs(Dq, Dk, W_Q, W_K, top=9)
    assert chunks == [5, 5, 3]
    assert_valid_top_pairs(result, ((Dq @ W_Q) @ (Dk @ W_K).T).double().numpy(), 9, np.abs)


def test_qk_pairs_with_ties_and_more_pairs_than_exist():
    Dq = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # two identical query features: tied scores
    Dk = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    I = torch.eye(2)
    S = (Dq @ Dk.T).double().numpy()
    assert_valid_top_pairs(A.qk_pairs(Dq, Dk, I, I, top=2, chunk_size=1), S, 2, np.abs)
    assert_valid_top_pairs(A.qk_pairs(Dq, Dk, I, I, top=50, chunk_size=2), S, 50, np.abs)


def test_qk_pairs_never_take_a_top_k_over_a_whole_chunk(monkeypatch):
    # a top-k along c x n_k scores copies them with their indices: at 12 GPT-2 blocks that was 0.9 GB of the
    # chapter's peak; the first chunk takes each row's top first, later chunks only the few that beat the last
    lengths, original = [], torch.topk

    def topk(x, k, dim=-1, **kw):
        lengths.append(x.shape[dim])  # how many scores one top-k sorts through
        return original(x, k, dim=dim, **kw)

    monkeypatch.setattr(A.torch, "topk", topk)
    Dq, Dk, W = randn(40, 10, seed=1), randn(300, 10, seed=2), randn(10, 3, seed=3)
    result = A.qk_pairs(Dq, Dk, W, W, top=5, chunk_size=20)
    assert_valid_top_pairs(result, ((Dq @ W) @ (Dk @ W).T).double().numpy(), 5, np.abs)
    assert lengths and max(lengths) <= max(300, 20 * 5), lengths  # one row, or each row's top of a chunk


@pytest.mark.parametrize("sign,key", [("abs", np.abs), ("pos", lambda s: s), ("neg", lambda s: -s)])
def test_qk_pairs_screen_later_chunks_by_row_before_ranking_them(monkeypatch, sign, key):
    # after the first chunk, only rows whose max or min beats the kept last pair are ranked (|s| of a whole
    # chunk was a third of chapter 2's time at 12 GPT-2 blocks)
    ranked, original = [], A._rank_key

    def rank_key(S, sign):
        ranked.append(S.shape[0])  # rows given a rank key
        return original(S, sign)

    monkeypatch.setattr(A, "_rank_key", rank_key)
    Dq, Dk, W = randn(200, 10, seed=4), randn(300, 10, seed=5), randn(10, 3, seed=6)
    Dq[130] *= 4.0  # a query feature whose row holds the best pairs, in a later chunk
    result = A.qk_pairs(Dq, Dk, W, W, top=5, sign=sign, chunk_size=20)
    assert_valid_top_pairs(result, ((Dq @ W) @ (Dk @ W).T).double().numpy(), 5, key)
    assert ranked[0] == 20 and 1 <= sum(ranked[1:]) < 20, ranked  # the first chunk whole, then a few rows


def test_qk_pairs_retry_and_errors(monkeypatch):
    seen, original = [], A._qk_chunk

    def flaky(Dq_chunk, W_Q_h, Kp):
        seen.append(Dq_chunk.shape[0])
        if Dq_chunk.shape[0] > 2:
            raise OOM("CUDA out of memory.")
        return original(Dq_chunk, W_Q_h, Kp)

    monkeypatch.setattr(A, "_qk_chunk", flaky)
    Dq, Dk, W = randn(8, 4, seed=16), randn(5, 4, seed=17), randn(4, 2, seed=18)
    result = A.qk_pairs(Dq, Dk, W, W, top=4, chunk_size=8)
    assert seen == [8, 4, 2, 2, 2, 2]  # halved until it fits, then kept
    assert_valid_top_pairs(result, ((Dq @ W) @ (Dk @ W).T).double().numpy(), 4, np.abs)
    with pytest.raises(ValueError, match="sign"):
        A.qk_pairs(Dq, Dk, W, W, sign="max")
    with pytest.raises(ValueError, match="one head"):
        A.qk_pairs(Dq, Dk, W[None], W[None])


# ---------------------------------------------------------------------------------------------------------
# sae_attention_reads / reads_summary
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook,layer,expected",
    [
        ("hook_resid_pre", 1, 1),
        ("blocks.1.hook_resid_post", 1, 2),
        ("resid_mid", 0, 1),
        ("hook_attn_out", 0, 1),
        ("hook_mlp_out", 2, 3),
    ],
)
def test_first_reading_layer(hook, layer, expected):
    assert A.first_reading_layer(layer, hook) == expected


def test_first_reading_layer_rejects_unknown_hooks():
    with pytest.raises(ValueError, match="hook_resid_post"):
        A.first_reading_layer(1, "hook_z")


@pytest.mark.parametrize("hook,read_layers", [("hook_resid_pre", [1, 2, 3]), ("hook_resid_post", [2, 3])])
def test_sae_attention_reads_table(hook, read_layers):
    model = tiny_model("RMS", n_kv=2)
    W_dec = randn(10, 16, seed=19)
    df = A.sae_attention_reads(model, W_dec, 1, hook, n_null=64, feature_ids=range(100, 110), progress=False)
    assert len(df) == 10 * len(read_layers) * 4
    assert sorted(df["read_layer"].unique().tolist()) == read_layers
    assert (df["distance"] == df["read_layer"] - 1).all() and (df["layer"] == 1).all()
    assert sorted(df["feature"].unique().tolist()) == list(range(100, 110))
    assert (df["kv_head"] == df["head"] // 2).all()
    dtypes = df.dtypes.astype(str).to_dict()
    assert dtypes["feature"] == "int32" and dtypes["head"] == "int16" and dtypes["q"] == "float32"
    assert dtypes["q_part"] == "bool" and dtypes["v_z"] == "float32"

    # the rows of one reading layer are head_reads of W_dec folded with that layer's ln1
    layer = read_layers[-1]
    block = model.blocks[layer]
    weights = A.layer_weights(model, layer)
    folded = folding.fold_pre_attention_norm(W_dec, block.ln1.w.detach(), center=False)
    ref = A.head_reads(folded, *weights, progress=False)
    rows = df[df["read_layer"] == layer]
    for name in "qkv":
        np.testing.assert_allclose(rows[name].to_numpy(), ref[name].numpy().ravel(), rtol=1e-6)


def test_sae_attention_reads_folds_each_layers_ln1():
    model = tiny_model("RMS", n_kv=2)
    W_dec = randn(8, 16, seed=20)
    before = A.sae_attention_reads(model, W_dec, 0, "hook_resid_post", n_null=32, progress=False)
    with torch.no_grad():
        model.blocks[2].ln1.w.mul_(3.0)
    after = A.sae_attention_reads(model, W_dec, 0, "hook_resid_post", n_null=32, progress=False)
    changed = after["read_layer"] == 2
    for name in "qkv":  # the read scales with the weight; z-scores do not (the null is folded alike)
        np.testing.assert_allclose(after.loc[changed, name], 3 * before.loc[changed, name], rtol=1e-5)
        np.testing.assert_allclose(after.loc[~changed, name], before.loc[~changed, name], rtol=1e-6)
        np.testing.assert_allclose(after[f"{name}_z"], before[f"{name}_z"], rtol=1e-4, atol=1e-4)


def test_sae_attention_reads_layernorm_centres_and_weightless_norm():
    model = tiny_model("LN", n_kv=4)
    W_dec = randn(6, 16, seed=21)
    shifted = W_dec + 5.0  # a constant shift along the all-ones direction is removed by LayerNorm
    a = A.sae_attention_reads(model, W_dec, 0, "hook_resid_pre", n_null=16, progress=False)
    b = A.sae_attention_reads(model, shifted, 0, "hook_resid_pre", n_null=16, progress=False)
    np.testing.assert_allclose(a["q"], b["q"], rtol=1e-4)
    pre = tiny_model("LNPre", n_kv=4)  # no ln1.w: nothing to fold but the centring
    df = A.sae_attention_reads(pre, W_dec, 3, "hook_resid_pre", layers=[3], n_null=16, progress=False)
    assert len(df) == 6 * 4
    empty = A.sae_attention_reads(pre, W_dec, 3, "hook_resid_post", n_null=16, progress=False)
    assert len(empty) == 0 and list(empty.columns) == list(df.columns)
    with pytest.raises(ValueError, match="Reading layers"):
        A.sae_attention_reads(pre, W_dec, 2, "hook_resid_post", layers=[2], progress=False)


def test_null_participation_is_rare_for_random_directions_and_summary():
    model = tiny_model("RMS", n_kv=2)
    W_dec = randn(400, 16, seed=22)  # random "features": they beat the 0.9 null quantile ~10% of the time
    df = A.sae_attention_reads(model, W_dec, 0, "hook_resid_pre", q=0.9, n_null=2000, seed=3, progress=False)
    summary = A.reads_summary(df)
    assert len(summary) == 4 * 4 and (summary["n_features"] == 400).all()
    assert summary[["layer", "read_layer", "head"]].duplicated().sum() == 0
    for name in "qkv":
        assert summary[f"{name}_frac"].between(0.03, 0.2).all(), summary[f"{name}_frac"]
    one = df[(df["read_layer"] == 2) & (df["head"] == 3)]
    row = summary[(summary["read_layer"] == 2) & (summary["head"] == 3)].iloc[0]
    assert row["q_frac"] == pytest.approx(one["q_part"].mean())
    assert row["any_frac"] == pytest.approx((one["q_part"] | one["k_part"] | one["v_part"]).mean())
    assert row["kv_head"] == 1 and row["distance"] == 2


def test_reads_summary_groups_as_the_three_key_groupby():
    """reads_summary groups by one integer code: same groups, order and values as grouping by the three
    columns, on a shuffled table with two SAE layers, gaps in the reading layers and a 2-feature group."""
    model = tiny_model("RMS", n_kv=2)
    parts = [A.sae_attention_reads(model, randn(n, 16, seed=30 + layer), layer, "hook_resid_pre",
                                   layers=[3, layer + 1][: 2 - (layer == 2)], n_null=50, progress=False)
             for layer, n in ((0, 40), (2, 2))]
    df = pd.concat(parts).sample(frac=1.0, random_state=0).reset_index(drop=True)
    got = A.reads_summary(df)
    ref = (df.assign(any_part=df["q_part"] | df["k_part"] | df["v_part"])
           .groupby(["layer", "read_layer", "head"], sort=True)
           .agg(q_frac_cov=("q_part_cov", "mean"), n_features=("feature", "size"), q_frac=("q_part", "mean"),
                any_frac=("any_part", "mean"), q_z_median=("q_z", "median"), kv_head=("kv_head", "first"))
           .reset_index())
    assert len(got) == len(ref) == 3 * 4
    for col in ref.columns:
        np.testing.assert_array_equal(got[col].to_numpy(), ref[col].to_numpy(), err_msg=col)
    code = A.group_code(df, ["layer", "read_layer", "head"])
    assert (pd.Series(code).groupby(code).ngroup().to_numpy()
            == df.groupby(["layer", "read_layer", "head"], sort=True).ngroup().to_numpy()).all()


# ---------------------------------------------------------------------------------------------------------
# Rotary QK scores against a forward pass; the decoder-covariance null; norm matching
# ---------------------------------------------------------------------------------------------------------


def _rotary_head(adjacent: bool, rotary_dim: int, ntk: bool):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    extra = dict(use_NTK_by_parts_rope=True, NTK_by_parts_factor=8.0, NTK_by_parts_low_freq_factor=1.0,
                 NTK_by_parts_high_freq_factor=4.0, NTK_original_ctx_len=16) if ntk else {}
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, d_head=8, n_heads=2, n_ctx=64, d_vocab=10, act_fn="gelu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=rotary_dim, rotary_adjacent_pairs=adjacent,
        rotary_base=50, seed=3, device="cpu", **extra)
    return HookedTransformer(cfg)


@pytest.mark.parametrize("adjacent,rotary_dim,ntk", [(False, 8, False), (True, 8, False), (False, 4, False),
                                                     (True, 6, False), (False, 8, True)])
def test_rotary_qk_score_matches_a_forward_pass_of_one_head(adjacent, rotary_dim, ntk):
    model = _rotary_head(adjacent, rotary_dim, ntk)
    attn = model.blocks[0].attn
    x_q, x_k = randn(16, seed=40), randn(16, seed=41)
    head = 1
    seen = {}
    attn.hook_attn_scores.add_hook(lambda t, hook: seen.setdefault("scores", t.detach().clone()))
    for i, j in [(5, 5), (9, 2), (40, 3), (33, 30)]:
        seen.clear()
        resid = torch.zeros(1, 41, 16)
        resid[0, j], resid[0, i] = x_k, x_q
        attn(resid, resid, resid)  # brute force: the head's real attention logits at two positions
        expected = float(seen["scores"][0, head, i, j]) * attn.attn_scale
        q = (x_q @ attn.W_Q[head] + attn.b_Q[head]).detach()[None]
        k = ((x_q if i == j else x_k) @ attn.W_K[head] + attn.b_K[head]).detach()  # one vector at offset 0
        got = float(A.rotate_queries(q, [i - j], model.cfg)[0, 0] @ k)
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-4), (i, j)
    attn.hook_attn_scores.remove_hooks()


def test_qk_pairs_over_offsets_match_a_naive_loop():
    model = _rotary_head(False, 8, False)
    attn = model.blocks[0].attn
    Dq, Dk = randn(7, 16, seed=42), randn(5, 16, seed=43)
    W_Q, W_K = attn.W_Q[0].detach(), attn.W_K[0].detach()
    offsets = [0, 1, 4, 9]
    per_offset = np.stack([(A.rotate_queries(Dq @ W_Q, [o], model.cfg)[:, 0] @ (Dk @ W_K).T).numpy()
                           for o in offsets])  # [n_off, n_q, n_k]
    for summary, S in (("mean", per_offset.mean(0)),
                       ("max_abs", np.take_along_axis(per_offset, np.abs(per_offset).argmax(0)[None], 0)[0])):
        scores, qi, ki = A.qk_pairs(Dq, Dk, W_Q, W_K, top=6, offsets=offsets, cfg=model.cfg, summary=summary,
                                    chunk_size=3)
        np.testing.assert_allclose(scores.numpy(), S[qi.numpy(), ki.numpy()], rtol=1e-5, atol=1e-6)
        assert np.sort(np.abs(S).ravel())[-6:].min() == pytest.approx(np.abs(scores.numpy()).min(), rel=1e-5)
    # offset 0 is the position-free score; a model without rotary positions keeps that one score
    plain = A.qk_pairs(Dq, Dk, W_Q, W_K, top=6)
    zero = A.qk_pairs(Dq, Dk, W_Q, W_K, top=6, offsets=[0], cfg=model.cfg)
    np.testing.assert_allclose(plain[0].numpy(), zero[0].numpy(), rtol=1e-5)
    from types import SimpleNamespace
    learned = A.qk_pairs(Dq, Dk, W_Q, W_K, top=6, offsets=offsets, cfg=SimpleNamespace(
        positional_embedding_type="standard"))
    np.testing.assert_allclose(plain[0].numpy(), learned[0].numpy(), rtol=1e-5)


def test_decoder_gaussian_null_has_the_decoder_rows_covariance():
    mixing = randn(6, 6, seed=44)
    D = randn(400, 6, seed=45) @ mixing + torch.arange(6.0)  # anisotropic rows with an offset
    draws = A.decoder_gaussian_like(D, 200_000, seed=1).double().numpy()
    target_cov = np.cov(D.double().numpy().T)
    np.testing.assert_allclose(np.cov(draws.T), target_cov, atol=0.03 * np.abs(target_cov).max())
    np.testing.assert_allclose(draws.mean(0), D.double().numpy().mean(0), atol=0.02 * np.abs(target_cov).max())
    nulls = A.null_directions(D, 50, seed=2)
    assert set(nulls) == set(A.NULL_KINDS)
    for null in nulls.values():
        np.testing.assert_allclose(torch.linalg.vector_norm(null, dim=1).numpy(), 1.0, rtol=1e-5)


def test_reads_compare_each_feature_with_a_null_of_its_own_norm():
    model = tiny_model("RMS", n_kv=2)
    W_dec = randn(12, 16, seed=46)
    scaled = W_dec * torch.linspace(0.1, 5.0, 12)[:, None]  # decoder norms that vary, as in Gemma Scope
    a = A.sae_attention_reads(model, W_dec, 0, "hook_resid_pre", n_null=64, progress=False)
    b = A.sae_attention_reads(model, scaled, 0, "hook_resid_pre", n_null=64, progress=False)
    for name in "qkv":
        for suffix in ("", "_cov"):
            if suffix == "":  # the isotropic null does not depend on the rows; the fitted one does
                np.testing.assert_allclose(a[f"{name}_z"], b[f"{name}_z"], rtol=1e-4, atol=1e-4)
                assert (a[f"{name}_part"] == b[f"{name}_part"]).all()
            assert f"{name}_z{suffix}" in b and f"{name}_part{suffix}" in b


def test_chapter_participation_from_head_summaries_equals_the_long_table_mean():
    """Chapter 2 keeps per-head summaries, not the long table: the pooled rate must be the long table's mean."""
    import pandas as pd

    from weightscope.chapters import attention as chapter

    rng = np.random.default_rng(0)
    rows = []
    for layer, n_features in ((0, 37), (1, 11)):  # unequal SAE widths: the weights matter
        for read_layer in range(layer, 3):
            for head in range(4):
                for f in range(n_features):
                    rows.append({"layer": layer, "read_layer": read_layer, "head": head, "kv_head": head // 2,
                                 "distance": read_layer - layer, "feature": f})
    reads = pd.DataFrame(rows)
    for s in "qkv":
        reads[f"{s}_z"] = rng.normal(size=len(reads))
        for suffix in ("", "_cov"):
            reads[f"{s}_part{suffix}"] = rng.random(len(reads)) < rng.random()
    config = chapter.Config()
    got = chapter.participation(A.reads_summary(reads), config).set_index(["side", "null"])["rate"]
    for s, side in chapter.SIDES.items():
        for suffix, null in chapter.NULLS.items():
            assert got[(side, null)] == pytest.approx(reads[f"{s}_part{suffix}"].mean(), abs=1e-12)


def test_ov_factor_is_computed_once_per_layer_and_follows_changes(monkeypatch):
    """The QR of W_O is reused for the same weights, and recomputed when they change in place."""
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda X: calls.append(1) or qr(X))
    W_O = torch.randn(3, 4, 10)
    R = A.ov_factor(W_O, "cpu")
    assert torch.equal(A.ov_factor(W_O.detach(), "cpu"), R) and len(calls) == 1
    W_O.mul_(2)  # in place: a new version
    assert torch.allclose(A.ov_factor(W_O, "cpu").abs(), 2 * R.abs(), atol=1e-5) and len(calls) == 2
    other = torch.randn(3, 4, 10)
    A.ov_factor(other, "cpu")
    assert len(calls) == 3


def test_qk_pairs_for_sae_on_each_device(device):
    """Chapter 2's QK pairs and offset correlations with the model and decoder on `device` equal the CPU's."""
    import pandas as pd

    from weightscope.chapters import attention as chapter

    model, W_dec = tiny_model("RMS", n_kv=2), randn(40, 16, seed=50)
    reads = A.sae_attention_reads(model, W_dec, 0, "hook_resid_pre", n_null=64, progress=False)
    config = chapter.Config(n_pair_heads=2, top_pairs=5, qk_max_offset=4)
    offsets = list(range(config.qk_max_offset + 1))
    want = chapter.qk_pairs_for_sae(model, W_dec, 0, reads, config, offsets)
    got = chapter.qk_pairs_for_sae(model.to(device), W_dec.to(device), 0, reads, config, offsets)
    for a, b in zip(got, want):
        assert len(b) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


def test_ov_factor_and_head_reads_under_inference_mode(monkeypatch):
    """Inference tensors (bench/run.py reads under `torch.inference_mode()`) have no version counter: the
    reads are still right, R is reused, and an in-place change made inside inference mode is still seen,
    even where the 64-value probe does not look."""
    with torch.inference_mode():
        weights, D = layer_weights(4, 2), randn(9, 12, seed=10)
        assert weights[3].is_inference()
        inside = A.head_reads(D, *weights, progress=False)
    assert_reads_close(inside, naive_reads(D, *weights), rtol=1e-5)
    assert_reads_close(A.head_reads(D, *weights, progress=False), naive_reads(D, *weights), rtol=1e-5)
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda X: calls.append(1) or qr(X))
    with torch.inference_mode():
        W_O = torch.randn(3, 4, 100)  # 1,200 values: the probe reads every 18th, 64 of them
        R = A.ov_factor(W_O, "cpu")
        assert A.ov_factor(W_O, "cpu") is R and len(calls) == 1
        W_O[2, 3, 99] += 1.0  # not a probed value
        changed = A.ov_factor(W_O, "cpu")
    assert len(calls) == 2 and torch.equal(changed, torch.linalg.qr(W_O.transpose(1, 2)).R)


def test_reads_table_is_joined_column_by_column_without_copies():
    """The long reads table is held once while its layers are joined: each column is joined as its parts are
    released and the frame keeps the joined arrays (a copy into pandas' blocks would hold it two or three
    times; numpy's buffers are traced by tracemalloc)."""
    import tracemalloc

    n = 200_000
    A._concat([])  # pandas imported before memory is traced
    tracemalloc.start()
    try:
        parts = [{name: np.ones(n, dtype=dtype) for name, dtype in A._COLUMN_DTYPES.items()}
                 for _ in range(4)]
        size = sum(a.nbytes for part in parts for a in part.values())
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        df = A._concat(parts)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(df) == 4 * n and all(df[c].dtype == d for c, d in A._COLUMN_DTYPES.items())
    assert peak - base < 0.25 * size, f"joining took {(peak - base) / size:.2f} x the table"
    assert not any(parts)  # the parts were emptied
