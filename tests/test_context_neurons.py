"""Chapter 5: positional kernels, the linear summary and context neurons, against naive loops and forward
passes of tiny random TransformerLens models (GPT-2-like, and Llama-like with rotary positions and GQA)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
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
    """Weights-only computations, as in the chapter; scoped to each test (a module-level switch would leak)."""
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


def fake_ctx():
    return SimpleNamespace(provenance=lambda **k: k, target=SimpleNamespace(target="test"))


def study_on(model, config, cal_tokens, held_tokens):
    """A Study whose calibration and held-out passes are the given windows (no corpus, nothing saved)."""
    study = C.Study(fake_ctx(), config, model, save=False)
    study.tokenizer = SimpleNamespace(bos_token_id=0, eos_token_id=None, unk_token_id=None, pad_token_id=None,
                                      decode=lambda ids: f"<{ids[0]}>")
    study.__dict__["calibration"] = C.layer_pass(model, cal_tokens, config.layer, batch=4)
    study.__dict__["heldout"] = {g: C.layer_pass(model, t, config.layer, batch=4)
                                 for g, t in held_tokens.items()}
    return study


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
    study = study_on(model, C.Config(window=N, n_calibration=3, n_heldout=2), tokens, {"a": windows(2, 9)})
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
    assert torch.allclose(study.kernel, K, atol=1e-5)


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
    study = study_on(model, config, windows(6, 1), {"a": windows(4, 2)})
    uniform = torch.ones(N, N).tril() / torch.arange(1, N + 1)[:, None]
    assert torch.allclose(study.kernel[0], uniform, atol=1e-6)
    for weighted in (False, True):
        K, e_tok, e_pos, w = study.summary_parts([0], weighted=weighted)
        lp = study.heldout["a"]
        y_hat = cn.linear_summary(lp.tokens, K, e_tok, e_pos, w)
        assert torch.allclose(y_hat, lp.head_out[:, :, 0], atol=1e-5)
    quality = C.linear_summary(study)["05_quality"]
    assert (quality["fvu"] < 1e-8).all() and (quality["median_r"] > 0.99999).all()


def test_summary_is_not_exact_for_a_content_head():
    """The same check fails for a head whose scores depend on the tokens: the test can fail."""
    model = tiny_model("llama")
    model.blocks[0].attn.W_Q.mul_(30)
    config = C.Config(heads=[0], window=N, n_calibration=6, n_heldout=4, norm_scale="token",
                      content_weights=False)
    study = study_on(model, config, windows(6, 1), {"a": windows(4, 2)})
    assert float(C.linear_summary(study)["05_quality"]["fvu"].min()) > 1e-3


# --- neurons ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_composition_against_a_forward_pass_with_the_heads_replaced(kind):
    """predict() must equal the MLP pre-activations of a forward pass in which the summarised heads' output is
    replaced by the summary and the MLP norm's scale is frozen at the measured value."""
    model = tiny_model(kind, seed=2)
    heads = [0, 2]
    config = C.Config(heads=heads, window=N, n_calibration=6, n_heldout=4)
    study = study_on(model, config, windows(6, 3), {"a": windows(4, 4)})
    lp = study.heldout["a"]
    K, e_tok, e_pos, w = study.summary_parts(heads)
    summary = cn.linear_summary(lp.tokens, K, e_tok, e_pos, w)
    s2 = float(study.calibration.scale2[:, 1:].mean())

    def swap_heads(out, hook):
        return out - lp.head_out[:, :, heads].sum(2) + summary

    hooks = [("blocks.0.hook_attn_out", swap_heads),
             ("blocks.0.ln2.hook_scale", lambda s, hook: torch.full_like(s, s2))]
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(lp.tokens, names_filter="blocks.0.mlp.hook_pre")
    assert torch.allclose(C.predict(study, lp, heads), cache["blocks.0.mlp.hook_pre"], atol=1e-4)
    # the per-token context scores C[h, t, n] = (w e)(t) . u_n compose to the same context term
    u, _ = study.reads()
    Cs = torch.einsum("htd,dn->htn", e_tok * w[..., None], u)
    if e_pos is None:
        ctx = torch.einsum("hij,hbjn->bin", K, Cs[:, lp.tokens])
        assert torch.allclose(ctx, summary @ u, atol=1e-4)


def test_context_stats_and_pushes_against_loops():
    h, d, m = 2, 6, 5
    e_tok, x_tok = torch.randn(h, VOCAB, d, generator=gen(12)), torch.randn(VOCAB, d, generator=gen(13))
    u, k = torch.randn(d, m, generator=gen(14)), torch.rand(h, 7, generator=gen(15))
    p = torch.rand(VOCAB, generator=gen(16))
    stats = cn.context_stats(e_tok, x_tok, u, p, k, chunk=2)
    q = (p / p.sum()).double()
    for n in range(m):
        C = (e_tok.double() @ u[:, n].double())  # [h, V]
        var_ctx = 0.0
        for dist in range(k.shape[1]):
            g = (k[:, dist].double()[:, None] * C).sum(0)  # one context slot: sum_h k[h, d] C[h, t]
            var_ctx += float((q * (g - (q * g).sum()) ** 2).sum())
        cur = x_tok.double() @ u[:, n].double()
        var_cur = float((q * (cur - (q * cur).sum()) ** 2).sum())
        assert stats.loc[n, "context_std"] == pytest.approx(np.sqrt(var_ctx), rel=1e-4)
        assert stats.loc[n, "current_std"] == pytest.approx(np.sqrt(var_cur), rel=1e-4)
        push = cn.token_pushes(e_tok, u[:, n], p, k.sum(1))
        t = 3
        ref = sum(float(k[hh].sum()) * (float(C[hh, t]) - float((q * C[hh]).sum())) for hh in range(h))
        assert float(push[t]) == pytest.approx(ref, rel=1e-4, abs=1e-6)


def test_auc_against_pair_counting():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (7, 3)).astype(float), rng.integers(0, 4, (5, 3)).astype(float)
    got = cn.auc(a, b)
    for col in range(3):
        wins = sum((x > y) + 0.5 * (x == y) for x in a[:, col] for y in b[:, col])
        assert got[col] == pytest.approx(wins / 35)


def test_chapter_steps_on_a_tiny_gpt2():
    """All four steps run on the GPT-2 path (learned positions, LayerNorm, GELU) and give tidy tables."""
    model = tiny_model("gpt2", seed=5)
    config = C.Config(window=N, n_calibration=6, n_heldout=4, n_top=3, k_tokens=2, min_spread=1.0, max_tv=1.0)
    study = study_on(model, config, windows(6, 5), {"a": windows(4, 6), "b": windows(4, 7)})
    heads = C.kernels(study)["05_heads"]
    assert heads["stable"].all() and len(heads) == 4
    assert set(C.linear_summary(study)["05_quality"]["norm_scale"]) == {"measured"}  # no per-token scale here
    neurons = C.context_neurons(study)
    assert len(neurons["05_neurons"]) == 24 and neurons["05_neurons"]["context_share"].between(0, 1).all()
    assert len(neurons["05_pushes"]) == 3 * 2 * 2
    check = C.check_on_text(study)["05_check"]
    assert "auc b vs a" in check and check["r_pred"].notna().all()


# --- parameters and corpora ---------------------------------------------------------------------------------

def test_bad_parameters_raise_one_clear_message():
    with pytest.raises(ParamsError, match="layer=3"):
        C.Config(layer=3).check(n_layers=1, n_ctx=N)
    with pytest.raises(ParamsError, match="norm_scale"):
        C.Config(norm_scale="both", window=N).check(n_layers=1, n_ctx=N)
    with pytest.raises(ParamsError, match="learned position"):
        C.Study(fake_ctx(), C.Config(window=N, norm_scale="token"), tiny_model("gpt2"), save=False)


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
