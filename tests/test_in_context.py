"""Chapter 7: the in-context measurements against naive references and known answers.

Known answers: a feature whose decoder is one token's unembedding direction (through the final norm) scores
precision 1 where that token follows; a feature firing independently of the next token scores its top set's
unigram rate; a constructed feature pair's term equals the hooked attention score's double difference; the
direct effect equals the logit change of adding the feature at the final residual (the norm's scale held).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.chapters import in_context as ch
from weightscope.compute import in_context as ic
from weightscope.compute import ranking
from weightscope.compute.lens import output_matrix
from weightscope.config.params import ParamsError


def tiny_model(norm="RMS", pos="rotary", n_kv=None, seed=0, d_vocab=24, softcap=0.0):
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=n_kv,
                                  n_ctx=32, d_vocab=d_vocab, d_mlp=64, act_fn="gelu", normalization_type=norm,
                                  positional_embedding_type=pos, seed=seed, device="cpu",
                                  output_logits_soft_cap=softcap)
    model = HookedTransformer(cfg)
    with torch.no_grad():  # non-trivial norm weights, so that a missed fold changes the numbers
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith(".w") and ("ln" in name):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model.eval()


class ReluSAE(torch.nn.Module):
    """A ReLU SAE stand-in with the fields the chapter reads (`LoadedSAE`'s names)."""

    def __init__(self, d_in, d_sae, hook_name, layer, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.enc = torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5
        self.b = -0.3 * torch.ones(d_sae)
        self.W_dec = torch.randn(d_sae, d_in, generator=gen)
        self.hook_name, self.layer, self.d_in, self.d_sae = hook_name, layer, d_in, d_sae
        self.sae = self

    def encode(self, x):
        return torch.relu(x.float() @ self.enc + self.b)


# ---------------------------------------------------------------------------------------------------------
# streaming: the kept firings equal a naive top-n over all positions


def test_top_firings_match_a_naive_top_n_when_streamed_ties_to_the_earlier_position():
    gen = torch.Generator().manual_seed(1)
    top, entries = ic.TopFirings(7, 4), []
    for first in range(0, 300, 60):  # five batches of 60 positions
        acts = torch.randint(0, 4, (60, 7), generator=gen).float() / 3  # many ties, a quarter zeros
        top.add(acts, first, chunk=3)  # features merged three at a time
        entries += [(f, first + p, float(acts[p, f])) for p in range(60) for f in range(7)]
    got = top.firings()
    for f in range(7):
        mine = [e for e in entries if e[0] == f and e[2] > 0]
        naive = sorted(mine, key=lambda e: (-e[2], e[1]))[:4]  # k/3: distinct in rank_key's bits too
        assert got.position[got.feature == f].tolist() == [e[1] for e in naive]
        assert got.act[got.feature == f].tolist() == [e[2] for e in naive]
        assert int(got.n_active[f]) == len(mine)
    assert got.feature.tolist() == sorted(got.feature.tolist())


def test_top_firings_rank_near_equal_activations_as_equal_whichever_is_a_last_bit_larger():
    # two processors round the same firing's activation a last bit apart: which one a feature keeps must not
    # follow that bit (it moved a mean of chapter 7's pair table between two CPUs)
    a = torch.tensor(0.35550108)
    b = torch.nextafter(a, torch.tensor(1.0))
    for first_two in ([a, b], [b, a]):
        top = ic.TopFirings(1, 2)
        top.add(torch.stack([torch.tensor(0.9), *first_two])[:, None], 0)  # positions 0, 1, 2; keep 2
        assert top.firings().position.tolist() == [0, 1]  # the earlier of the two near-equal ones
        top.add(torch.full((3, 1), float(a)), 3)  # positions 3-5, each equal to a: later equals lose
        assert top.firings().position.tolist() == [0, 1]
    assert float(ranking.rank_key(a)) == float(ranking.rank_key(b)) < float(a)  # rounded toward zero
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    assert bool((ranking.rank_key(x.sort().values).diff() >= 0).all())  # the order kept
    assert float(((x - ranking.rank_key(x)) / x).max()) < 2.0 ** (1 - ranking.RANK_BITS)  # relative steps


def test_top_firings_merge_only_features_that_beat_their_weakest_kept_firing(monkeypatch):
    top = ic.TopFirings(5, 2)
    top.add(torch.tensor([[3.0, 2, 0, 1, 0], [1.0, 2, 0, 4, 0]]), 0)  # features 2 and 4 never fire
    sorted_rows = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, **kw: sorted_rows.append(len(x)) or real_sort(x, **kw))
    # feature 0 ties its weakest (the kept, earlier one stays), 1 falls below it, 3 beats it, 4 fires at last
    top.add(torch.tensor([[1.0, 1.5, 0, 2, 0.5]]), 2)
    assert sorted_rows == [2]  # features 3 and 4 only
    got = top.firings()
    assert got.position[got.feature == 0].tolist() == [0, 1]
    assert got.position[got.feature == 3].tolist() == [1, 2]
    assert got.act[got.feature == 4].tolist() == [0.5]
    assert got.n_active.tolist() == [3, 3, 0, 3, 1]


def test_firing_pass_keeps_each_features_strongest_firings_and_counts_all():
    model = tiny_model()
    sae = ReluSAE(32, 16, "blocks.0.hook_resid_post", 0)
    tokens = torch.randint(1, 24, (6, 10), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0  # BOS
    res = ic.firing_pass(model, [sae], tokens, n_keep=3, batch_rows=4, bos_id=0, progress=False)
    _, cache = model.run_with_cache(tokens)
    acts = sae.encode(cache[sae.hook_name].reshape(-1, 32))
    ok = (tokens != 0).reshape(-1) & (torch.arange(60) % 10 != 9)
    acts = acts * ok[:, None]
    fir = res.firings[0]
    assert torch.equal(fir.n_active, (acts > 0).sum(0))
    for f in range(16):
        naive = acts[:, f][acts[:, f] > 0].sort(descending=True).values[:3]
        assert fir.act[fir.feature == f].tolist() == pytest.approx(naive.tolist(), rel=1e-5)
        assert torch.allclose(acts[fir.position[fir.feature == f], f], fir.act[fir.feature == f])
    assert torch.allclose(res.final_scale, cache["ln_final.hook_scale"].reshape(-1))
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].reshape(-1, 32)
    assert torch.allclose(res.final_resid, final, atol=1e-6)  # the clean side of every ablation


def test_sae_groups_follow_the_layers_and_fit_the_budget():
    assert ic.sae_groups([2, 0, 1], [10, 10, 10], 20) == [[1, 2], [0]]  # in layer order
    assert ic.sae_groups([0, 1, 2], [10, 30, 10], 20) == [[0], [1], [2]]  # one over the budget: alone
    assert ic.sae_groups([0, 1, 2], [10, 10, 10], 10**9) == [[0, 1, 2]]


@pytest.mark.parametrize("budget", [1, 2])
def test_firing_pass_in_groups_of_saes_equals_one_pass_with_every_sae(budget):
    """Held a group at a time (stretches of blocks, each batch's residual kept between them), the SAEs keep
    the firings, norm scales and final residual of one pass holding them all; the later group reads the
    first block again through the kept stream, not a new pass."""
    model = tiny_model(seed=1)
    tokens = torch.randint(1, 24, (6, 10), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    saes = [ReluSAE(32, 16, "blocks.0.hook_resid_mid", 0, seed=4),
            ReluSAE(32, 16, "blocks.1.hook_resid_pre", 1, seed=5)]
    kw = dict(n_keep=3, batch_rows=4, bos_id=0, attn_layers=[0, 1], progress=False)
    one = ic.firing_pass(model, saes, tokens, **kw)
    runs = []
    block = type(model.blocks[0]).forward

    def counted(self, *a, **k):
        runs.append(self)
        return block(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model.blocks[0]), "forward", counted)
        got = ic.firing_pass(model, saes[::-1], tokens, sae_budget_bytes=budget * ic.sae_bytes(saes[0]), **kw)
    assert len(runs) == model.cfg.n_layers * 2  # every block once per batch, whatever the grouping
    for lay in (0, 1):
        a, b = one.firings[lay], got.firings[lay]
        assert torch.equal(a.feature, b.feature) and torch.equal(a.position, b.position)
        assert torch.equal(a.act, b.act) and torch.equal(a.n_active, b.n_active)
        assert torch.equal(one.attn_scale[lay], got.attn_scale[lay])
    assert torch.equal(one.final_scale, got.final_scale) and torch.equal(one.final_resid, got.final_resid)
    assert not torch.equal(one.attn_scale[0], torch.ones_like(one.attn_scale[0]))  # the scales were read


def test_sae_budget_counts_the_saes_at_the_dtype_they_are_held_in():
    """Two bf16 SAEs fit the budget of one fp32 SAE: one group, where the same SAEs in fp32 need two (counted
    in fp32, a GPU's bf16 groups were half-full)."""
    from weightscope.load.sae_sequence import SAESequence

    model = tiny_model(seed=1)
    tokens = torch.randint(1, 24, (2, 10), generator=torch.Generator().manual_seed(3))
    fp32 = [ReluSAE(32, 16, f"blocks.{lay}.hook_resid_pre", lay, seed=4 + lay) for lay in (0, 1)]
    bf16 = [ReluSAE(32, 16, f"blocks.{lay}.hook_resid_pre", lay, seed=4 + lay) for lay in (0, 1)]
    for sae in bf16:
        sae.W_dec = sae.W_dec.bfloat16()
    budget = ic.sae_bytes(fp32[0])
    kw = dict(n_keep=3, batch_rows=2, progress=False, sae_budget_bytes=budget)
    assert ic.firing_pass(model, fp32, tokens, **kw).sae_groups == 2
    assert ic.firing_pass(model, bf16, tokens, **kw).sae_groups == 1
    assert ic.held_element_bytes(fp32) == 4 and ic.held_element_bytes(bf16) == 2
    lazy = [SAESequence("demo", ["x"], [0], device="cpu", dtype=d) for d in ("bfloat16", "float32", None)]
    assert [ic.held_element_bytes(s) for s in lazy] == [2, 4, 4]  # no weights read


def test_memory_budget_lowers_the_kept_firings_and_the_batch():
    assert ic.keep_per_feature(10**9, 2, 100, 64) == 64
    small = ic.keep_per_feature(2 * 2 * 100 * ic.ENTRY_BYTES * 5, 2, 100, 64)
    assert small == 5
    assert ic.batch_rows_for(8 * 128 * 1000 * 3, 128, 1000, 1) == 3
    assert ic.batch_rows_for(1, 128, 1000, 1) == 1


# ---------------------------------------------------------------------------------------------------------
# output and input side: known answers


def _pass(tokens, feature, position, act, d_sae):
    flat = tokens.reshape(-1)
    evaluated = torch.ones_like(flat, dtype=torch.bool)
    evaluated.view(tokens.shape)[:, -1] = False
    fir = ic.Firings(feature, position, act, torch.bincount(feature, minlength=d_sae))
    return ic.PassResult(tokens, torch.ones(len(flat)), {}, {0: fir}, evaluated,
                         final_resid=torch.zeros(len(flat), 1))  # no ablation reads it here


def test_a_feature_along_one_tokens_unembedding_scores_precision_one_where_it_follows():
    model = tiny_model()
    M_out, _ = output_matrix(model)
    t = 7
    d = M_out[:, t] / M_out[:, t].norm()  # the feature's decoder: token t's direction through the final norm
    scores = d @ M_out
    assert int(scores.argmax()) == t  # its weights-only top token is t (computed, not assumed)
    tokens = torch.randint(0, 24, (8, 16), generator=torch.Generator().manual_seed(3))
    nxt = torch.cat([tokens.reshape(-1)[1:], torch.tensor([0])])
    evaluated = torch.ones(8, 16, dtype=torch.bool)
    evaluated[:, -1] = False
    where = torch.nonzero((nxt == t) & evaluated.reshape(-1)).squeeze(1)  # fires where t follows
    assert len(where) > 3
    feats = pd.DataFrame({"layer": 0, "feature": [0], "dec_predicts": [True],
                          "dec_top_ids": [scores.argsort(descending=True)[:3].tolist()]})
    res = _pass(tokens, torch.zeros(len(where), dtype=torch.long), where, torch.ones(len(where)), 1)
    out = ch.side_table(res, feats, "dec", nxt, 1, 24)
    assert out["rate"].iloc[0] == 1.0
    assert out["firings"].iloc[0] == len(where)


def test_a_feature_firing_regardless_of_the_next_token_scores_the_unigram_rate():
    tokens = torch.randint(0, 24, (8, 16), generator=torch.Generator().manual_seed(4))
    flat = tokens.reshape(-1)
    nxt = torch.cat([flat[1:], flat[:1]])
    evaluated = torch.ones(8, 16, dtype=torch.bool)
    evaluated[:, -1] = False
    everywhere = torch.nonzero(evaluated.reshape(-1)).squeeze(1)  # fires at every position
    top = [3, 5, 5, 11]  # a repeated id counts once
    feats = pd.DataFrame({"layer": 0, "feature": [0], "dec_predicts": [False], "dec_top_ids": [top]})
    n = len(everywhere)
    res = _pass(tokens, torch.zeros(n, dtype=torch.long), everywhere, torch.ones(n), 1)
    out = ch.side_table(res, feats, "dec", nxt, 4, 24)
    ev_next = nxt[evaluated.reshape(-1)].tolist()
    naive = sum(tok in {3, 5, 11} for tok in ev_next) / len(ev_next)
    assert out["rate"].iloc[0] == pytest.approx(naive)
    assert out["base"].iloc[0] == pytest.approx(naive)


def test_set_base_rates_match_a_naive_count():
    tokens = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, 50, (6, 3), generator=torch.Generator().manual_seed(6))
    ids[0] = torch.tensor([7, 7, 9])  # a repeated id counts once
    dense = ic.set_base_rates(tokens, ids, 50)
    naive = torch.tensor([np.mean([t in set(row) for t in tokens.tolist()]) for row in ids.tolist()],
                         dtype=torch.float64)
    assert torch.allclose(dense, naive)


# ---------------------------------------------------------------------------------------------------------
# direct effect and attention term against the hooked model


@pytest.mark.parametrize("norm", ["RMS", "LN"])
@torch.no_grad()  # the model's weights require grad; nothing here is differentiated
def test_direct_effect_equals_the_logit_change_at_the_final_residual(norm):
    model = tiny_model(norm=norm, pos="standard")
    tokens = torch.randint(0, 24, (1, 12), generator=torch.Generator().manual_seed(7))
    d = torch.randn(32, generator=torch.Generator().manual_seed(8))
    top = torch.tensor([2, 9, 4])
    a, p = 1.7, 5
    _, cache = model.run_with_cache(tokens)
    scale = cache["ln_final.hook_scale"]
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def add(resid, hook):
        resid[0, p] += a * d
        return resid

    hooks = [("ln_final.hook_scale", lambda s, hook: scale)]  # the scale held at the clean run's
    diff = (model.run_with_hooks(tokens, fwd_hooks=hooks + [(last, add)]) - model(tokens))[0, p]
    want = diff[top].mean() - diff.mean()
    M_out, _ = output_matrix(model)
    centred = ic.centred_scores(d[None], M_out, top[None])
    got = ic.direct_effects(torch.tensor([a]), scale[0, p], centred)
    assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_centred_scores_equal_the_full_product_gathered():
    gen = torch.Generator().manual_seed(3)
    W, M = torch.randn(6, 8, generator=gen), torch.randn(8, 40, generator=gen)
    ids = torch.randint(0, 40, (6, 3), generator=gen)
    S = W @ M  # the naive route: every token's score, then the gather and the mean
    want = S.gather(1, ids).mean(1) - S.mean(1)
    assert torch.allclose(ic.centred_scores(W, M, ids), want, atol=1e-5)


@pytest.mark.parametrize("norm,pos,n_kv", [("RMS", "rotary", None), ("RMS", "rotary", 2),
                                          ("LN", "standard", None)])
def test_pair_term_equals_the_hooked_attention_score_double_difference(norm, pos, n_kv):
    model = tiny_model(norm=norm, pos=pos, n_kv=n_kv, seed=1)
    layer, head, i, j = 1, 2, 9, 3
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 24, (1, 12), generator=gen)
    dq, dk = torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    aq, ak = 1.3, 0.8
    _, cache = model.run_with_cache(tokens)
    scale = cache[f"blocks.{layer}.ln1.hook_scale"]

    def scores(with_q, with_k):
        def add(resid, hook):
            resid = resid.clone()
            resid[0, i] += aq * dq * with_q
            resid[0, j] += ak * dk * with_k
            return resid

        hooks = [(f"blocks.{layer}.hook_resid_pre", add),
                 (f"blocks.{layer}.ln1.hook_scale", lambda s, hook: scale)]
        with model.hooks(fwd_hooks=hooks):
            _, c = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_attn_scores")
        return c[f"blocks.{layer}.attn.hook_attn_scores"][0, head, i, j]

    want = scores(1, 1) - scores(1, 0) - scores(0, 1) + scores(0, 0)
    Q, _ = ic.folded_projections(model, layer, head, dq[None])
    _, K = ic.folded_projections(model, layer, head, dk[None])
    q, k = aq / scale[0, i] * Q, ak / scale[0, j] * K
    got = ic.pair_contributions(q, k, torch.tensor([i - j]), model.cfg)
    assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    wrong = ic.pair_contributions(q, k, torch.tensor([0]), model.cfg)  # the offset matters under rotary
    if pos == "rotary":
        assert float(wrong) != pytest.approx(float(want), rel=1e-3)


def test_co_firings_pairs_key_at_or_before_the_query_in_the_same_row():
    pos_q = torch.tensor([3, 12, 19, 25])
    pos_k = torch.tensor([1, 3, 11, 26])
    iq, ik = ic.co_firings(pos_q, pos_k, row_len=10, max_offset=5)
    got = sorted(zip(pos_q[iq].tolist(), pos_k[ik].tolist()))
    # 3 and 12 are in other rows; 19 and 11 are 8 apart (> 5); 26 comes after 25
    assert got == [(3, 1), (3, 3), (12, 11)]


@pytest.mark.parametrize("norm,softcap", [("RMS", 0.0), ("LN", 0.0), (None, 0.0), ("RMS", 2.0)])
def test_final_logits_equal_the_forward_pass_logits(norm, softcap, monkeypatch):
    """Logits of the wanted positions alone, from the final residual: the whole pass's logits (a soft cap
    small enough to bend them, so that a missed cap fails; an unembedding bias, so that a missed one does),
    without TransformerLens's `Unembed`, which copies W_U's transpose on every call."""
    from transformer_lens.components import Unembed

    from weightscope.compute.passes import final_logits

    model = tiny_model(norm=norm, softcap=softcap)
    with torch.no_grad():
        model.W_U.mul_(8)
        model.unembed.b_U.copy_(torch.randn(24, generator=torch.Generator().manual_seed(5)))
    rows = torch.randint(0, 24, (3, 12), generator=torch.Generator().manual_seed(4))
    positions = torch.tensor([0, 5, 14, 26, 30])
    logits, cache = model.run_with_cache(rows)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].reshape(-1, 32)[positions]
    monkeypatch.setattr(Unembed, "forward", lambda *a, **k: pytest.fail("went through Unembed"))
    assert torch.allclose(final_logits(model, final), logits.reshape(-1, 24)[positions], atol=1e-5)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_post",
                                  "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
def test_ablation_equals_the_logit_change_of_a_whole_hooked_pass(hook):
    """Rows run in groups of one to three, cut after their last wanted position, the ablated pass started at
    the site's block: the same effect as two whole passes with the feature removed by a hook (the naive
    reference)."""
    model = tiny_model(pos="standard", softcap=3.0)
    sae = ReluSAE(32, 8, hook, 1, seed=3)
    rows = torch.randint(0, 24, (3, 10), generator=torch.Generator().manual_seed(10))
    _, cache = model.run_with_cache(rows)
    acts = sae.encode(cache[hook]).reshape(-1, 8)  # [30, 8]
    f = int(acts.gt(0).sum(0).argmax())
    positions = torch.nonzero(acts[:, f] > 0).squeeze(1)
    assert len(torch.unique(positions // 10)) > 1 and len(positions) > 3  # several rows, several columns
    top = torch.tensor([1, 5])

    def remove(resid, hook):
        return resid - sae.encode(resid)[..., f, None] * sae.W_dec[f]

    diff = (model(rows) - model.run_with_hooks(rows, fwd_hooks=[(hook, remove)])).reshape(-1, 24)[positions]
    clean = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].reshape(-1, 32)[positions]
    for rows_per_pass in (1, 2, 3):  # the SAE's code of a pass is [rows, 10 columns, 8 features]
        got = ic.ablation_effects(model, sae, f, rows, positions, top, clean=clean,
                                  chunk_elements=80 * rows_per_pass)
        assert torch.allclose(got, diff[:, top].mean(1) - diff.mean(1), atol=1e-5)
    assert got.abs().max() > 1e-3  # the ablation moves the logits: the comparison can fail


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_ablation_of_a_sae_lens_sae_reads_one_encoder_column_where_it_can(tmp_path, monkeypatch,
                                                                           architecture):
    """With sae-lens's own SAEs: ReLU and JumpReLU ablations read the feature's activation from its encoder
    column alone, so a pass is bounded by the model's width, not the SAE's (fewer, larger groups); the effect
    equals two whole passes with the feature removed through sae-lens's whole encode (the naive reference).
    TopK encodes whole."""
    import realwidth
    from weightscope.load import saes

    model, hook = tiny_model(pos="standard"), "blocks.1.hook_resid_pre"
    hf = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4}
    sae = saes.load_saes(str(realwidth.write_saes(tmp_path, hf, [1], architecture, 512, "hook_resid_pre",
                                                  16 if architecture == "topk" else None, {})))[0]
    rows = torch.randint(0, 24, (3, 10), generator=torch.Generator().manual_seed(10))
    _, cache = model.run_with_cache(rows)
    with torch.no_grad():
        acts = sae.sae.encode(cache[hook]).reshape(-1, 512)
    f = int(acts.gt(0).sum(0).argmax())
    positions = torch.nonzero(acts[:, f] > 0).squeeze(1)
    assert len(torch.unique(positions // 10)) > 1  # several rows: grouping matters

    def remove(resid, hook):
        return resid - sae.sae.encode(resid)[..., f, None] * sae.W_dec[f]

    top = torch.tensor([1, 5])
    with torch.no_grad():
        ablated = model.run_with_hooks(rows, fwd_hooks=[(hook, remove)])
        diff = (model(rows) - ablated).reshape(-1, 24)[positions]
    clean = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"].reshape(-1, 32)[positions]
    passes = []
    original = ic._ablated
    monkeypatch.setattr(ic, "_ablated", lambda *a: passes.append(a[2].shape[0]) or original(*a))
    # one row at 10 columns: 640 floats at the model's width (d_mlp 64), 5,120 with the SAE's code
    got = ic.ablation_effects(model, sae, f, rows, positions, top, clean=clean, chunk_elements=2000)
    assert torch.allclose(got, diff[:, top].mean(1) - diff.mean(1), atol=1e-5)
    assert got.abs().max() > 1e-4  # the ablation moves the logits: the comparison can fail
    n_rows = len(torch.unique(positions // 10))
    assert passes == ([n_rows] if architecture != "topk" else [1] * n_rows)


# ---------------------------------------------------------------------------------------------------------
# statistics, config, summary


def test_spearman_and_its_shuffled_null_is_centred():
    x = np.arange(40.0)
    assert ic.spearman(x, x ** 3) == pytest.approx(1.0)
    lo, hi = ic.shuffled_spearman(x, x, n_perm=500, seed=0)
    assert lo < 0 < hi and hi < 0.5


@pytest.mark.parametrize("n", [3, 57])
def test_the_shuffled_null_equals_ranking_every_shuffle(n):
    """Ranked once, dotted per shuffle: the same quantiles as `spearman` of each shuffle (ties included)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=n), np.round(rng.normal(size=n), 1)  # y with ties
    draws = np.random.default_rng(6)
    naive = [ic.spearman(x, draws.permutation(y)) for _ in range(300)]
    got = ic.shuffled_spearman(x, y, n_perm=300, seed=6)
    assert got == pytest.approx(tuple(np.nanquantile(naive, [0.025, 0.975])), abs=1e-12)
    assert all(np.isnan(ic.shuffled_spearman(x, np.ones(n), n_perm=10, seed=0)))  # a constant side
    assert all(np.isnan(ic.shuffled_spearman(x[:2], y[:2], n_perm=10, seed=0)))


def test_config_lists_every_problem_at_once_and_checks_the_model():
    with pytest.raises(ParamsError) as err:
        ch.Config(n_tokens=0, row_len=1, n_boot=5, direct_majority=2.0)
    msg = str(err.value)
    for word in ("n_tokens", "row_len", "n_boot", "direct_majority"):
        assert word in msg
    dims = SimpleNamespace(d_vocab=4, n_ctx=64)
    assert len(ch.Config(k_out=5, row_len=128).problems(dims)) == 2
    assert ch.Config(k_out=3, m_in=3, row_len=64).problems(dims) == []


def test_agreement_rule_and_summary_findings():
    assert ch.agreement(0.1, 0.3) == ch.HOLDS
    assert ch.agreement(-0.3, 0.0) == ch.FAILS
    assert ch.agreement(-0.1, 0.2) == ch.UNSURE
    assert ch.agreement(float("nan"), 1.0) == ch.UNSURE
    assert ch.agreement(0.0, 0.0, n=1) == ch.UNSURE  # one feature: no verdict
    assert ch.within(0.8, 1.5, 0.5, 2.0, 10) == ch.HOLDS
    assert ch.within(2.1, 3.0, 0.5, 2.0, 10) == ch.FAILS
    assert ch.within(1.4, 2.9, 0.5, 2.0, 10) == ch.UNSURE
    rng = np.random.default_rng(0)
    n = 40
    output = pd.DataFrame({"layer": 0, "feature": range(n), "predicts": [i < 10 for i in range(n)],
                           "firings": 20, "rate": [0.5] * 10 + [0.05] * 30, "base": 0.05})
    inp = output.rename(columns={"predicts": "reads"})
    effects = pd.DataFrame({"layer": [0] * 6 + [3] * 6,
                            "direct share": np.r_[rng.uniform(1.5, 1.9, 6), rng.uniform(0.95, 1.05, 6)]})
    pairs = pd.DataFrame({"kind": ["chapter 2's top"] * 10 + ["random"] * 10,
                          "weights-only": np.r_[np.linspace(1, 2, 10), np.linspace(-0.1, 0.1, 10)],
                          "in context": np.r_[np.linspace(1, 2, 10), np.linspace(-0.1, 0.1, 10)]})
    words = pd.DataFrame({"firings": 20, "dec_label": ["semantic"] * 20 + ["non-semantic"] * 20,
                          "enc_label": ["non-semantic"] * 20 + ["semantic"] * 20,
                          "word share": [0.9] * 20 + [0.2] * 20, "base": 0.5})
    summary = ch.summarise(output, inp, effects, pairs, words, ch.Config(n_boot=200))
    verdict = dict(zip(summary["claim"].str[:40], summary["agreement"]))
    assert list(summary["agreement"]).count(ch.HOLDS) == 9  # 10 claims: all but the reversed input-label claim
    assert len(summary) == ch.N_CLAIMS  # the total of summarise's progress bar
    assert [v for k, v in verdict.items() if k.startswith("populations (input")] == [ch.FAILS]
    t = SimpleNamespace(summary=summary, text=pd.DataFrame([{"tokens": 100, "row_len": 10, "SAE groups": 3,
                                                              "firings kept per feature": 4}]))
    found = ch.findings(t)
    assert "holding the SAEs in 3 groups of consecutive layers" in found["text"][0]
    assert "9 hold in context, 1 does not" in found["tally"][0]
    assert len(found["claims"]) == len(summary) + 1  # and what the direct share means
    assert ch.direct_sentence(2.0).startswith("The direct path overstates")
    assert ch.direct_sentence(0.5).startswith("The direct path understates")
    assert ch.direct_sentence(1.05).startswith("The direct path is about the whole")


def test_head_correlations_per_head_and_overall():
    x = np.arange(12.0)
    kinds = (["chapter 2's top"] * 3 + ["random"] * 3) * 2
    pairs = pd.DataFrame({"head": ["1.0"] * 6 + ["1.1"] * 6, "kind": kinds,
                          "weights-only": x, "in context": np.r_[x[:6], -x[6:]]})
    out = ch.head_correlations(pairs, ch.Config(n_boot=200)).set_index("head")
    assert out.loc["1.0", "rho"] == pytest.approx(1.0) and out.loc["1.1", "rho"] == pytest.approx(-1.0)
    assert out.loc["all heads", "pairs"] == 12 and out.loc["1.0", "top pairs"] == 3


@pytest.mark.parametrize("summary", ["mean", "max_abs"])
def test_random_pairs_are_scored_as_chapter_2_scores_its_top_pairs(summary):
    from weightscope.compute import attention

    model = tiny_model(seed=2)
    D = torch.randn(12, 32, generator=torch.Generator().manual_seed(11))
    layer, head, offsets = 1, 3, list(range(6))
    Df = attention.read_by_layer(model, D, layer)
    scores, qi, ki = attention.qk_pairs(Df, Df, model.blocks[layer].attn.W_Q[head].detach(),
                                        model.blocks[layer].attn.W_K[head].detach(), top=5, offsets=offsets,
                                        cfg=model.cfg, summary=summary)
    Q, K = ic.folded_projections(model, layer, head, D)
    for s, a, b in zip(scores.tolist(), qi.tolist(), ki.tolist()):
        assert ic.pair_weight_score(Q[a], K[b], offsets, model.cfg, summary) == pytest.approx(s, rel=1e-4)


def test_pair_direct_and_ablation_tables_on_each_device(device):
    """Chapter 7's tables read from the activation pass with the model and SAE on `device` equal the CPU's
    (the kept firings come back to the CPU; the folded query and key projections are taken there)."""
    tokens = torch.randint(1, 24, (6, 12), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 0  # BOS
    gen = torch.Generator().manual_seed(5)
    feats = pd.DataFrame({"layer": 0, "feature": range(16), "dec_predicts": [f % 2 == 0 for f in range(16)],
                          "dec_top_ids": [torch.randperm(24, generator=gen)[:5].tolist() for _ in range(16)]})
    pairs = pd.DataFrame({"head": ["1.2"] * 3, "SAE layer": 0, "score": [0.5, -0.2, 0.1],
                          "query feature": [1, 4, 7], "key feature": [2, 4, 9]})
    config = ch.Config(n_random_pairs=4, min_firings=1, n_ablate=2, ablate_positions=3)

    def tables(device):
        model = tiny_model(seed=3).to(device)
        sae = ReluSAE(32, 16, "blocks.0.hook_resid_post", 0)
        sae.enc, sae.b, sae.W_dec = sae.enc.to(device), sae.b.to(device), sae.W_dec.to(device)
        res = ic.firing_pass(model, [sae], tokens, n_keep=4, batch_rows=4, bos_id=0, attn_layers=[1],
                             progress=False)
        nxt = torch.cat([res.tokens.reshape(-1)[1:], res.tokens.reshape(-1)[:1]])
        output = ch.side_table(res, feats, "dec", nxt, 5, 24)
        return [ch.pair_table(model, [sae], res, pairs, ch.pair_heads(pairs), config, ch.pair_settings(None)),
                ch.direct_table(model, [sae], res, feats, config),
                ch.ablation_table(model, [sae], res, feats, output, config)]

    want, got = tables("cpu"), tables(device)
    assert want[0]["in context"].notna().any() and len(want[2])
    for a, b in zip(got, want):
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


def test_the_chapter_holds_one_group_of_saes_at_a_time(lazy_standin, sae_loads):
    """With the SAEs as the book loads them (`SAESequence`: each loaded when reached) and a budget of two
    SAEs, the chapter never holds more than two (all at once: 34 GB of SAEs at Llama-3.1-8B's 32 layers), and
    its tables equal those of one pass holding every SAE, listed; only the groups counted differ."""
    import dataclasses

    ctx = lazy_standin
    _, saes = ctx.load_model_and_saes()
    full = ctx.load_full_model()
    one = saes.describe()[0]
    gen = torch.Generator().manual_seed(0)
    ids = [(layer, f) for layer in range(4) for f in range(one.d_sae)]
    def top():
        return [torch.randint(0, full.cfg.d_vocab, (5,), generator=gen).tolist() for _ in ids]

    feats = pd.DataFrame({"layer": [a for a, _ in ids], "feature": [f for _, f in ids], "dec_top_ids": top(),
                          "enc_top_ids": top(), "dec_predicts": [f % 2 == 0 for _, f in ids],
                          "enc_predicts": [f % 3 == 0 for _, f in ids]})
    labels = feats[["layer", "feature"]].assign(dec_label="semantic", enc_label="non-semantic")
    pairs = pd.DataFrame({"head": ["2.1", "2.1"], "SAE layer": 1, "score": [0.3, -0.1],
                          "query feature": [1, 2], "key feature": [3, 2]})
    text = (torch.randint(1, full.cfg.d_vocab, (8, 32), generator=gen), None)
    config = ch.Config(n_tokens=256, row_len=32, n_boot=100, n_ablate=2, ablate_positions=4, min_firings=1,
                       n_random_pairs=4, sae_memory_mb=2 * ic.sae_bytes(one) / 2**20)
    sae_loads.reset()
    lazy = ch.measure(full, saes, feats, pairs, labels, config, text)
    assert len(sae_loads.alive) >= 4 and 1 <= sae_loads.most <= 2, f"{sae_loads.most} SAEs alive at once"
    listed = ch.measure(full, [saes[i] for i in range(len(saes))], feats, pairs, labels,
                        dataclasses.replace(config, sae_memory_mb=2048), text)
    assert lazy[0]["firings"].sum() > 0 and lazy[3]["in context"].notna().any()
    for a, b in zip(lazy[:-1], listed[:-1]):
        pd.testing.assert_frame_equal(a, b)
    assert (lazy[-1]["SAE groups"].item(), listed[-1]["SAE groups"].item()) == (2, 1)
