"""Chapter 5: positional kernels, the linear summary and context neurons, against naive loops and forward
passes of tiny random TransformerLens models (GPT-2-like, and Llama-like with rotary positions and GQA)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import standins
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.chapters import context_neurons as C
from weightscope.compute import context_neurons as cn
from weightscope.compute import positional_kernels as pk
from weightscope.config.params import ParamsError
from weightscope.load import corpora

N, VOCAB = 12, 40


@pytest.fixture(autouse=True)
def _no_grad():
    """Weights-only computations, as in the chapter; scoped to each test (a module-level switch leaks)."""
    with torch.no_grad():
        yield


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_patterns(b=5, h=3, n=N, seed=0):
    """[b, h, n, n] causal softmax rows of random scores."""
    scores = torch.randn(b, h, n, n, generator=gen(seed)) * 2
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1), scores.masked_fill(~mask, float("-inf"))


def tiny_model(kind: str, seed: int = 0) -> HookedTransformer:
    """A 1-layer random model: "gpt2" (LayerNorm, learned positions, GELU) or "llama" (RMSNorm, rotary,
    SwiGLU, grouped-query attention). Biases are made non-zero so that every bias path is exercised."""
    common = dict(n_layers=1, d_model=16, n_ctx=N, d_head=4, n_heads=4, d_mlp=24, d_vocab=VOCAB, seed=seed)
    if kind == "gpt2":
        cfg = HookedTransformerConfig(**common, act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard")
    else:
        cfg = HookedTransformerConfig(**common, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                      positional_embedding_type="rotary", rotary_dim=4, n_key_value_heads=2)
    model = HookedTransformer(cfg).eval()
    g = gen(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith(("b_V", "b_in", "b_O", "b_Q", "b_K", "ln1.b", "ln2.b")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


class FakeTokenizer:
    bos_token_id, eos_token_id, unk_token_id, pad_token_id = 0, None, None, None

    def decode(self, ids):
        return f"<{ids[0]}>"


def measured(model, config, cal_tokens, held_tokens):
    """The chapter's forward passes of the given windows (no corpus, nothing saved)."""
    m = C.measure(model, config, cal_tokens, held_tokens)
    m.tokenizer = FakeTokenizer()
    return m


def windows(b, seed, bos=0):
    t = torch.randint(1, VOCAB, (b, N), generator=gen(seed))
    t[:, 0] = bos
    return t


# --- positional kernels -------------------------------------------------------------------------------------

def test_kernel_and_relative_kernel_against_brute_force():
    pat, _ = random_patterns()
    acc = pk.KernelAccumulator(3, N)
    acc.add(pat[:2])
    acc.add(pat[2:])
    K = acc.kernel()
    assert torch.allclose(K, pat.mean(0), atol=1e-6)
    for min_query in (0, 5):
        k = pk.relative_kernel(K, min_query=min_query)
        for h in range(3):
            for d in range(N):
                vals = [pat[b, h, i, i - d] for b in range(5) for i in range(N) if i >= d and i >= min_query]
                assert float(k[h, d]) == pytest.approx(float(torch.stack(vals).mean()), abs=1e-6)


def test_kernel_of_a_model_against_attention_computed_by_hand():
    """The chapter's kernel of a tiny GPT-2 equals the mean over windows of softmax(q . k / sqrt(d_head)),
    with q and k computed from the weights position by position (LayerNorm, learned positions)."""
    model = tiny_model("gpt2", seed=3)
    tokens = windows(3, 8)
    m = measured(model, C.Config(window=N, n_calibration=4, n_heldout=2), tokens, {"a": windows(2, 9)})
    attn, ln = model.blocks[0].attn, model.blocks[0].ln1
    eps = model.cfg.eps
    K = torch.zeros(4, N, N)
    for b in range(3):
        for h in range(4):
            for i in range(N):
                def normed(j):
                    x = model.W_E[tokens[b, j]] + model.W_pos[j]
                    x = x - x.mean()
                    return x / torch.sqrt(x.pow(2).mean() + eps) * ln.w + ln.b
                q = normed(i) @ attn.W_Q[h] + attn.b_Q[h]
                scores = torch.stack([(q @ (normed(j) @ attn.W_K[h] + attn.b_K[h])) / 2.0
                                      for j in range(i + 1)])  # sqrt(d_head = 4)
                K[h, i, : i + 1] += scores.softmax(0) / 3
    assert torch.allclose(m.kernel, K, atol=1e-5)


def test_spread_content_tv_and_denominators_against_loops():
    pat, scores = random_patterns(seed=3)
    K = pat.mean(0)
    eff, tv = pk.effective_tokens(pat, min_query=1), pk.content_tv(pat, K, min_query=1)
    logz = pk.log_denominators(scores)
    for h in range(3):
        ents, tvs = [], []
        for b in range(5):
            for i in range(1, N):
                p = pat[b, h, i, : i + 1].double()
                ents.append(float(torch.exp(-(p * p.log()).sum())))
                tvs.append(0.5 * float((pat[b, h, i] - K[h, i]).abs().sum()))
                z = sum(float(torch.exp(scores[b, h, i, j])) for j in range(i + 1))
                assert float(logz[b, h, i]) == pytest.approx(np.log(z), rel=1e-5)
        assert float(eff[h]) == pytest.approx(np.mean(ents), rel=1e-5)
        assert float(tv[h]) == pytest.approx(np.mean(tvs), abs=1e-6)
    uniform = torch.ones(N, N).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    assert float(pk.effective_tokens(uniform, min_query=N - 1)[0]) == pytest.approx(N, rel=1e-5)


def test_translation_tv_is_zero_only_for_distance_kernels():
    k = torch.rand(2, N, generator=gen(4)) + 0.1
    i = torch.arange(N)
    rel = k[:, (i[:, None] - i[None, :]).clamp(min=0)] * (i[None, :] <= i[:, None])
    rel = rel / rel.sum(-1, keepdim=True)
    assert float(pk.translation_tv(rel).max()) < 1e-6
    pat, _ = random_patterns(seed=5)
    assert float(pk.translation_tv(pat[0]).min()) > 0.05  # a random pattern depends on more than distance


# --- the linear summary -------------------------------------------------------------------------------------

def test_linear_summary_and_weights_against_loops():
    h, b, d = 2, 3, 5
    tokens = torch.randint(0, VOCAB, (b, N), generator=gen(6))
    K, _ = random_patterns(b=1, h=h, seed=7)
    K = K[0]
    e_tok, e_pos = torch.randn(h, VOCAB, d, generator=gen(8)), torch.randn(h, N, d, generator=gen(9))
    w = torch.rand(h, VOCAB, generator=gen(10)) + 0.5
    y = cn.linear_summary(tokens, K, e_tok, e_pos, w)
    for bb in range(b):
        for i in range(N):
            ref = sum(K[hh, i, j] * w[hh, tokens[bb, j]] * (e_tok[hh, tokens[bb, j]] + e_pos[hh, j])
                      for hh in range(h) for j in range(N))
            assert torch.allclose(y[bb, i], ref, atol=1e-5)
    pat, _ = random_patterns(b=b, h=h, seed=11)
    tw = cn.token_weights(tokens, pat, K, VOCAB, prior=1.0)
    for hh in range(h):
        for t in range(VOCAB):
            where = [(bb, j) for bb in range(b) for j in range(N) if tokens[bb, j] == t]
            got = sum(float(pat[bb, hh, :, j].sum()) for bb, j in where)
            exp = sum(float(K[hh, :, j].sum()) for bb, j in where)
            assert float(tw[hh, t]) == pytest.approx((got + 1) / (exp + 1), rel=1e-5)
    den = cn.kernel_denominators(tokens, K, w)
    ref = sum(float(K[0, 4, j] * w[0, tokens[1, j]]) for j in range(N))
    assert float(den[1, 0, 4]) == pytest.approx(ref, rel=1e-5)


def test_linear_summary_without_heads_says_so():
    tokens = torch.randint(0, VOCAB, (2, N), generator=gen(12))
    with pytest.raises(ValueError, match="at least one head"):
        cn.linear_summary(tokens, torch.zeros(0, N, N), torch.zeros(0, VOCAB, 4))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_summary_is_exact_for_a_positional_head(kind):
    """Zero query/key weights and biases make head 0 attend uniformly (a pattern of positions alone); with
    rows of W_E of equal norm the norm is exactly linear, so the summary must reproduce the head exactly."""
    model = tiny_model(kind)
    attn = model.blocks[0].attn
    for name in ("W_Q", "b_Q") + (("_W_K", "_b_K") if kind == "llama" else ("W_K", "b_K")):
        getattr(attn, name)[0].zero_()
    E = model.embed.W_E
    E.copy_(cn.centre(E) if kind == "gpt2" else E)
    E.mul_(2.0 / cn.token_scales(E, centred=kind == "gpt2", eps=0)[:, None])  # every token's scale is 2
    if kind == "gpt2":
        model.pos_embed.W_pos.zero_()  # positions would change the scale
    config = C.Config(heads=[0], window=N, n_calibration=6, n_heldout=4, norm_scale="measured")
    m = measured(model, config, windows(6, 1), {"a": windows(4, 2)})
    uniform = torch.ones(N, N).tril() / torch.arange(1, N + 1)[:, None]
    assert torch.allclose(m.kernel[0], uniform, atol=1e-6)
    for weighted in (False, True):
        parts = C.summary_parts(m, config, [0], weighted=weighted)
        lp = m.heldout["a"]
        assert torch.allclose(cn.linear_summary(lp.tokens, *parts), lp.heads_output([0]), atol=1e-5)
    quality = C.summary_tables(m, config, [0], "listed")["05_quality"]
    assert (quality["fvu"] < 1e-8).all() and (quality["median_r"] > 0.99999).all()


def test_summary_is_not_exact_for_a_content_head():
    """The same check fails for a head whose scores depend on the tokens: the test can fail."""
    model = tiny_model("llama")
    model.blocks[0].attn.W_Q.mul_(30)
    config = C.Config(heads=[0], window=N, n_calibration=6, n_heldout=4, norm_scale="token",
                      content_weights=False)
    m = measured(model, config, windows(6, 1), {"a": windows(4, 2)})
    assert float(C.summary_tables(m, config, [0], "listed")["05_quality"]["fvu"].min()) > 1e-3


def test_extended_on_demand_equals_the_full_tensor():
    """`Extended` (normed rows once, heads' maps) gives what `extended_embeddings` gives for every token, its
    scores equal e . u, and its weighted mean equals the mean of the full tensor."""
    h, d, dh = 3, 8, 4
    X, W_V = torch.randn(VOCAB, d, generator=gen(20)), torch.randn(h, d, dh, generator=gen(21))
    b_V, W_O = torch.randn(h, dh, generator=gen(22)), torch.randn(h, dh, d, generator=gen(23))
    ln_w, ln_b = torch.rand(d, generator=gen(24)) + 0.5, torch.randn(d, generator=gen(25))
    scale = torch.rand(VOCAB, generator=gen(26)) + 0.5
    full = cn.extended_embeddings(X, ln_w, ln_b, W_V, b_V, W_O, scale, centred=True)
    ext = cn.Extended(cn.normed_rows(X, ln_w, ln_b, scale, centred=True), W_V, b_V, W_O)
    assert torch.allclose(ext.full(), full, atol=1e-5)
    ids = torch.randint(0, VOCAB, (2, 5), generator=gen(27))
    assert torch.allclose(ext.at(ids), full[:, ids], atol=1e-5)
    u = torch.randn(d, 6, generator=gen(28))
    assert torch.allclose(ext.scores(u), torch.einsum("htd,dn->htn", full, u), atol=1e-4)
    q = torch.rand(h, VOCAB, generator=gen(29))
    ref = torch.einsum("ht,htd->hd", q / q.sum(-1, keepdim=True), full)
    assert torch.allclose(ext.mean(q), ref, atol=1e-5)


def test_position_only_floor_keeps_positions_and_drops_tokens():
    """The floor is the summary of a window of average tokens: equal to the summary of any window whose
    tokens all have the average extended embedding, and the same for every window."""
    model = tiny_model("gpt2", seed=4)
    config = C.Config(heads=[0, 1], window=N, n_calibration=6, n_heldout=4)
    m = measured(model, config, windows(6, 1), {"a": windows(4, 2)})
    parts = C.summary_parts(m, config, [0, 1])
    K, ext, e_pos, w = parts
    floor = C.position_only(m.heldout["a"].tokens, parts, m.frequency)
    assert torch.allclose(floor[0], floor[1], atol=1e-6)  # no token identity left
    q = m.frequency[None] * w
    e_bar = torch.einsum("ht,htd->hd", q / q.sum(-1, keepdim=True), ext.full())
    w_bar = q.sum(-1) / m.frequency.sum()
    ref = torch.einsum("hij,hjd->id", K, (e_bar[:, None] + e_pos) * w_bar[:, None, None])
    assert torch.allclose(floor[0], ref, atol=1e-5)


# --- neurons ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_composition_against_a_forward_pass_with_the_heads_replaced(kind):
    """predict() must equal the MLP pre-activations of a forward pass in which the summarised heads' output is
    replaced by the summary and the MLP norm's scale is frozen at the measured value."""
    model = tiny_model(kind, seed=2)
    heads = [0, 2]
    config = C.Config(heads=heads, window=N, n_calibration=6, n_heldout=4)
    m = measured(model, config, windows(6, 3), {"a": windows(4, 4)})
    lp = m.heldout["a"]
    parts = C.summary_parts(m, config, heads)
    K, ext, e_pos, w = parts
    summary = cn.linear_summary(lp.tokens, *parts)
    s2 = float(m.calibration.scale2[:, 1:].mean())

    def swap_heads(out, hook):
        return out - lp.heads_output(heads) + summary

    hooks = [("blocks.0.hook_attn_out", swap_heads),
             ("blocks.0.ln2.hook_scale", lambda s, hook: torch.full_like(s, s2))]
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(lp.tokens, names_filter="blocks.0.mlp.hook_pre")
    assert torch.allclose(C.predict(m, config, lp, heads, parts), cache["blocks.0.mlp.hook_pre"], atol=1e-4)
    # the per-token context scores C[h, t, n] = (w e)(t) . u_n compose to the same context term
    u, _ = C.reads(m, config)
    Cs = ext.scores(u) * w[..., None]
    if e_pos is None:
        ctx = torch.einsum("hij,hbjn->bin", K, Cs[:, lp.tokens])
        assert torch.allclose(ctx, summary @ u, atol=1e-4)


def test_context_stats_and_pushes_against_loops():
    h, d, m = 2, 6, 5
    e_tok, x_tok = torch.randn(h, VOCAB, d, generator=gen(12)), torch.randn(VOCAB, d, generator=gen(13))
    u, k = torch.randn(d, m, generator=gen(14)), torch.rand(h, 7, generator=gen(15))
    p, w = torch.rand(VOCAB, generator=gen(16)), torch.rand(h, VOCAB, generator=gen(17)) + 0.5
    stats = cn.context_stats(e_tok, x_tok, u, p, k, weights=w, chunk=2)
    q = (p / p.sum()).double()
    for n in range(m):
        C = (e_tok.double() @ u[:, n].double()) * w.double()  # [h, V]
        var_ctx = 0.0
        for dist in range(k.shape[1]):
            g = (k[:, dist].double()[:, None] * C).sum(0)  # one context slot: sum_h k[h, d] C[h, t]
            var_ctx += float((q * (g - (q * g).sum()) ** 2).sum())
        cur = x_tok.double() @ u[:, n].double()
        var_cur = float((q * (cur - (q * cur).sum()) ** 2).sum())
        assert stats.loc[n, "context_std"] == pytest.approx(np.sqrt(var_ctx), rel=1e-4)
        assert stats.loc[n, "current_std"] == pytest.approx(np.sqrt(var_cur), rel=1e-4)
        push = cn.token_pushes(C.float(), p, k.sum(1))
        t = 3
        ref = sum(float(k[hh].sum()) * (float(C[hh, t]) - float((q * C[hh]).sum())) for hh in range(h))
        assert float(push[t]) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    # an Extended gives the same table, streamed in chunks sized from the memory budget
    X = torch.randn(VOCAB, d, generator=gen(18))
    W_V, W_O = torch.randn(h, d, 3, generator=gen(19)), torch.randn(h, 3, d, generator=gen(20))
    ext = cn.Extended(X, W_V, None, W_O)
    a = cn.context_stats(ext, x_tok, u, p, k, weights=w, budget_bytes=3 * 4 * h * VOCAB * 2)
    b = cn.context_stats(ext.full(), x_tok, u, p, k, weights=w)
    assert np.allclose(a["context_std"], b["context_std"], rtol=1e-4)


def test_auc_against_pair_counting():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (7, 3)).astype(float), rng.integers(0, 4, (5, 3)).astype(float)
    got = cn.auc(a, b)
    for col in range(3):
        wins = sum((x > y) + 0.5 * (x == y) for x in a[:, col] for y in b[:, col])
        assert got[col] == pytest.approx(wins / 35)


def test_genre_nulls_against_hand_counts():
    """Separation, the label-shuffled AUCs and the permutation p-value, against direct computations."""
    aucs = np.array([[0.9, 0.5, 0.2, 0.7], [0.5, 0.5, 0.5, 0.8]])
    assert cn.separated(aucs, 0.75).tolist() == [True, False, True, True]
    rng = np.random.default_rng(1)
    means = [rng.normal(size=(6, 4)), rng.normal(size=(5, 4)) + np.array([5, 0, 0, 0])]
    assert cn.genre_aucs(means)[0, 0] == 1.0  # a shift of 5 separates perfectly
    shuffled = np.mean([cn.shuffled_aucs(means, rng)[0, 0] for _ in range(200)])
    assert abs(shuffled - 0.5) < 0.1  # shuffling the labels removes the separation
    hits = np.array([1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    p_top = cn.set_count_pvalue(hits, np.array([0, 1]), 2000, np.random.default_rng(0))
    assert p_top == pytest.approx(1 / 28, abs=0.01)  # both hits in a random pair of 8: 1 / C(8, 2)
    assert cn.set_count_pvalue(hits, np.array([2, 3]), 200, np.random.default_rng(0)) == 1.0


def test_chapter_tables_on_a_tiny_gpt2():
    """Every table on the GPT-2 path (learned positions, LayerNorm, GELU), tidy, with heads forced."""
    model = tiny_model("gpt2", seed=5)
    config = C.Config(window=N, n_calibration=6, n_heldout=4, n_top=3, k_tokens=2, heads="all",
                      n_permutations=100)
    m = measured(model, config, windows(6, 5), {"a": windows(4, 6), "b": windows(4, 7)})
    t = C.compute_tables(model, config, m)
    assert len(t["05_heads"]) == 4 and bool(t["05_summary"]["applies"].iloc[0])
    assert set(t["05_quality"]["norm_scale"]) == {"measured"}  # no per-token scale with learned positions
    assert len(t["05_neurons"]) == 24 and t["05_neurons"]["context_share"].between(0, 1).all()
    assert len(t["05_pushes"]) == 3 * 2 * 2
    assert "auc b vs a" in t["05_check"] and t["05_check"]["r_pred"].notna().all()
    assert set(t["05_genres"]["population"]) == {"top by context share", "lowest context share",
                                                 "all neurons (base rate)", "genre labels shuffled"}


def test_no_stable_head_ranks_no_neuron():
    """With heads="stable" and no head passing, the measurements are made but no neuron is ranked, and the
    findings say the method does not apply."""
    model = tiny_model("llama", seed=6)
    model.blocks[0].attn.W_Q.mul_(30)  # content-dependent heads
    config = C.Config(window=N, n_calibration=6, n_heldout=4, max_tv=0.01)
    m = measured(model, config, windows(6, 5), {"a": windows(4, 6)})
    raw = C.compute_tables(model, config, m)
    t = C.Tables(*(raw[n] for n in C.NAMES), config=config)
    assert not t.applies and t.neurons.empty and t.check.empty and len(t.quality)
    found = C.findings(t)
    assert "does not apply" in found["applies"][0] and "neurons" not in found


def test_kernel_noise_and_translation_null_against_loops():
    pat, _ = random_patterns(b=6, seed=8)
    a, b = pat[0::2].mean(0), pat[1::2].mean(0)
    noise = pk.split_half_tv(pat)
    for h in range(3):
        ref = np.mean([0.5 * float((a[h, i] - b[h, i]).abs().sum()) for i in range(1, N)])
        assert float(noise[h]) == pytest.approx(ref, abs=1e-6)
    same = pat[:1].expand(6, -1, -1, -1)  # identical windows: no sampling noise at all
    assert float(pk.split_half_tv(same).max()) < 1e-6
    assert float(pk.split_half_translation_tv(same).max()) < 1e-6
    m = N // 2
    ref = np.mean([0.5 * float((a[0, i, i - np.arange(min(i, m) + 1)] / a[0, i, i - np.arange(min(i, m) + 1)]
                                .sum() - b[0, i, i - np.arange(min(i, m) + 1)]
                                / b[0, i, i - np.arange(min(i, m) + 1)].sum()).abs().sum())
                   for i in range(1, N)])
    assert float(pk.split_half_translation_tv(pat)[0]) == pytest.approx(ref, abs=1e-6)


def test_relative_log_denominators_ignore_row_shifts():
    _, scores = random_patterns(seed=9)
    rel = pk.relative_log_denominators(scores)
    shifted = pk.relative_log_denominators(scores + torch.randn(5, 3, N, 1, generator=gen(30)))
    assert torch.allclose(rel, shifted, atol=1e-4)
    b, h, i = 1, 2, 5
    s = scores[b, h, i, : i + 1].double()
    assert float(rel[b, h, i]) == pytest.approx(float(torch.logsumexp(s, 0) - s.mean()), rel=1e-5)


# --- parameters, pre-flight and corpora ------------------------------------------------------------

def test_bad_parameters_raise_one_clear_message():
    with pytest.raises(ParamsError, match="norm_scale.*\n?.*auc_rule|norm_scale") as err:
        C.Config(norm_scale="both", auc_rule=2.0)
    assert "auc_rule" in str(err.value)  # every problem at once
    assert C.Config(heads="2,0").heads == (2, 0) and C.Config(heads=[1]).heads == (1,)
    with pytest.raises(ParamsError, match="heads"):
        C.Config(heads="stabel")
    dims = SimpleNamespace(n_layers=1, n_ctx=N, n_heads=4, model_type="gpt2")
    problems = C.Config(layer=3, window=2 * N, heads=[7], norm_scale="token").problems(dims)
    assert len(problems) >= 4 and any("layer = 3" in p for p in problems)


def test_missing_corpora_are_a_problem(monkeypatch, tmp_path):
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path))
    def found():
        return [item.problem(None, set()) for item in C.Config().inputs()]

    assert found() and all("no corpus file" in p for p in found())
    monkeypatch.delenv("WEIGHTSCOPE_CORPORA")
    assert "WEIGHTSCOPE_CORPORA is not set" in found()[0]


def test_preflight_refuses_a_bad_override_before_any_chapter(tmp_path):
    """A chapter-5 override out of range (layer 9 of the 5-layer demo) ends in exit 2 before any chapter."""
    import subprocess
    import sys

    from weightscope.publish.book import REPO_ROOT

    params = tmp_path / "broken5.yaml"
    text = (REPO_ROOT / "params" / "demo.yaml").read_text()
    params.write_text(text.replace("target: demo", "target: broken5")
                      .replace("chapters: {}", "chapters: {05_context_neurons: {layer: 9}}"))
    proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", str(params),
                           "--chapters", "01", "05", "--no-html"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "05_context_neurons: layer = 9" in proc.stderr and "nothing was run" in proc.stderr


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]


def test_corpus_text_and_windows(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path))
    book = "header\n*** START OF THE BOOK ***\nabc def\n\nghi\n*** END OF THE BOOK ***\nlicence"
    (tmp_path / "book.txt").write_text(book)
    (tmp_path / "wiki.txt").write_text('<doc id="1" title="x">\nbody\n</doc>\n')
    assert corpora.corpus_text("book.txt").split() == ["abc", "def", "ghi"]
    assert "doc" not in corpora.corpus_text("wiki.txt")
    ids = corpora.token_windows(CharTokenizer(), "abcdefghij" * 10, n=3, length=5, bos=1)
    assert ids.shape == (3, 5) and (ids[:, 0] == 1).all()
    assert ids[0, 1:].tolist() == [ord(c) % 50 for c in "abcd"]
    with pytest.raises(corpora.CorpusError, match="fewer"):
        corpora.token_windows(CharTokenizer(), "abc", n=3, length=5, bos=1)
    with pytest.raises(corpora.CorpusError, match="Known files"):
        corpora.corpus_path("missing.txt")


# --- the known answer: a GPT-2 with planted context heads ----------------------------------------

COMMON = ("the a man went to town and saw her dog it was big small red blue day night ran walked "
          "home tree house river field old new good bad happy sad said looked").split()


def _corpus(rng: np.random.Generator, words: list[str], n_paragraphs: int = 60) -> str:
    return "\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(n_paragraphs))


@pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/gpt2")
def test_known_answer_planted_context_heads(tmp_path, monkeypatch):
    """On a GPT-2 whose heads 0 and 2 read only the learned positions in their queries and keys (the kernel is
    exact) and whose neuron 7 reads their bag of five planted tokens, the chapter must find exactly those
    heads, approximate their summed output with r >= 0.99, rank neuron 7 first with the planted tokens among
    its top pushing tokens, and find that it separates the genre that holds them."""
    from weightscope.chapters.context import open_chapter

    planted = standins.build_context_heads_gpt2(tmp_path / "planted")
    rng = np.random.default_rng(0)
    corpora_dir = tmp_path / "corpora"
    corpora_dir.mkdir()
    (corpora_dir / "plain.txt").write_text(_corpus(rng, COMMON))
    bag_words = [w.strip() for w in standins.BAG_WORDS]
    (corpora_dir / "fantasy.txt").write_text(_corpus(rng, COMMON + bag_words * 4))
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(corpora_dir))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    saes = standins.build_saes(planted["folder"], tmp_path / "saes", layers=[0])
    params = standins.write_params("planted", planted["folder"], saes, tmp_path / "planted.yaml")
    config = C.Config(calibration="plain.txt", heldout={"plain": "plain.txt", "fantasy": "fantasy.txt"},
                      window=32, n_calibration=8, n_heldout=8, n_top=5, k_tokens=8, n_permutations=200)
    t = C.run(open_chapter(str(params)), config)

    assert t.applies and t.heads.loc[t.heads["stable"], "head"].tolist() == planted["heads"]
    assert (t.heads.loc[planted["heads"], "content_tv"] < 1e-4).all()  # the kernel is exact
    q = t.quality[t.quality["configured"]]
    assert (q["median_r"] >= 0.99).all() and (q["fvu"] < 0.02).all()
    assert (q["median_r position-only"] < q["median_r"] - 0.2).all()  # the tokens carry it, not positions
    top = t.neurons.iloc[0]
    assert int(top["neuron"]) == planted["neuron"] and top["context_share"] > 0.99
    up = t.pushes[(t.pushes["neuron"] == planted["neuron"]) & (t.pushes["side"] == "up")]
    assert set(planted["bag"]) <= set(up["token_id"])
    row = t.check[t.check["neuron"] == planted["neuron"]].iloc[0]
    assert row["auc fantasy vs plain"] == 1.0 and row["r_pred"] > 0.9
    assert "does not apply" not in " ".join(C.findings(t)["applies"])


@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("per_row", [True, False])
def test_normed_rows_equals_the_formula_and_leaves_its_input_alone(centred, per_row):
    """Computed in place after the first step (chapter 5's peak at a 50k vocabulary): the same values as the
    out-of-place formula, X untouched, and a wider dtype of the norm's weight still promotes the result."""
    g = torch.Generator().manual_seed(3)
    X, w, b = torch.randn(40, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    scale = torch.rand(40, generator=g) + 0.5 if per_row else 1.7
    before = X.clone()
    x = X - X.mean(-1, keepdim=True) if centred else X
    s = scale.reshape(-1, 1) if per_row else scale
    assert torch.equal(cn.normed_rows(X, w, b, scale, centred=centred), x / s * w + b)
    assert torch.equal(cn.normed_rows(X, w, b, scale, centred=centred, bias=False), x / s * w)
    assert torch.equal(X, before)
    half = cn.normed_rows(X.bfloat16(), w, b, 1.7, centred=centred)
    assert half.dtype == torch.float32
