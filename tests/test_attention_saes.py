"""Attention-output (hook_z) SAEs: head attribution, DFA and recursive DFA against naive loops, exactness
checks
against the model's own forward pass and sae-lens's encoder, and loading, on tiny random models built here."""

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.compute import dfa as dfa_mod
from weightscope.compute import head_attribution as ha
from weightscope.compute.passes import BlockStream
from weightscope.config.params import ParamsError, load_target, parse_target
from weightscope.load import saes
from weightscope.load.saes import SAEError

N_HEADS, D_HEAD, D_MODEL = 4, 8, 32


def tiny_model(norm: str = "RMS", n_kv: int | None = 2, seed: int = 0) -> HookedTransformer:
    """A tiny random model; RMS + rotary + GQA (Llama-like) or LN + learned positions (GPT-2-like)."""
    pos = "rotary" if norm == "RMS" else "standard"
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=24,
        d_head=D_HEAD,
        n_heads=N_HEADS,
        n_key_value_heads=n_kv,
        d_mlp=64,
        d_vocab=60,
        act_fn="silu",
        normalization_type=norm,
        positional_embedding_type=pos,
        seed=seed,
    )
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial norm weights and value biases, so that folding them matters
        for block in model.blocks:
            block.ln1.w.copy_(1.0 + 0.5 * torch.randn(D_MODEL, generator=gen))
            if norm == "LN":
                block.ln1.b.copy_(0.3 * torch.randn(D_MODEL, generator=gen))
            b_v = block.attn._b_V if n_kv else block.attn.b_V
            b_v.copy_(0.2 * torch.randn(b_v.shape, generator=gen))
    return model


def attn_sae(arch: str = "topk", *, layer: int = 1, d_sae: int = 48, reshape: str = "none", seed: int = 0):
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.attn.hook_z", model_name="tiny")
    d_in = N_HEADS * D_HEAD
    if arch == "topk":
        sae = TopKSAE(
            TopKSAEConfig(
                d_in=d_in,
                d_sae=d_sae,
                k=6,
                rescale_acts_by_decoder_norm=True,
                reshape_activations=reshape,
                metadata=meta,
            )
        )
    else:
        sae = StandardSAE(
            StandardSAEConfig(d_in=d_in, d_sae=d_sae, reshape_activations=reshape, metadata=meta)
        )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
        sae.W_dec.mul_(torch.rand(d_sae, 1) + 0.5)  # decoder norms differ from 1, so the rescaling matters
    return sae


def resid_sae(layer: int, hook: str = "hook_resid_post", seed: int = 1):
    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=f"blocks.{layer}.{hook}", model_name="tiny")
    sae = TopKSAE(
        TopKSAEConfig(d_in=D_MODEL, d_sae=64, k=5, rescale_acts_by_decoder_norm=True, metadata=meta)
    )
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sae


def tokens(model, batch=3, seed=0):
    return torch.randint(
        0, model.cfg.d_vocab, (batch, model.cfg.n_ctx), generator=torch.Generator().manual_seed(seed)
    )


# ------------------------------------------------------------------------------------------------------------
# Head attribution


def test_head_shares_match_a_naive_loop():
    W = torch.randn(10, N_HEADS * D_HEAD)
    got = ha.head_shares(W, N_HEADS, D_HEAD)
    for f in range(10):
        norms = [sum(W[f, h * D_HEAD + k].item() ** 2 for k in range(D_HEAD)) ** 0.5 for h in range(N_HEADS)]
        for h in range(N_HEADS):
            assert got[f, h].item() == pytest.approx(norms[h] / sum(norms), rel=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(10))


def test_kv_heads_follow_transformer_lens_grouping():
    model = tiny_model(n_kv=2)
    kv = ha.kv_heads(N_HEADS, 2)
    W_V, _W_V = model.blocks[0].attn.W_V, model.blocks[0].attn._W_V  # W_V repeats _W_V per query head
    for h in range(N_HEADS):
        assert torch.equal(W_V[h], _W_V[kv[h]])
    with pytest.raises(ValueError, match="multiple"):
        ha.kv_heads(4, 3)


def test_residual_writes_match_the_attention_output():
    """A decoder row read as a hook_z vector and pushed through W_O equals the loop over heads."""
    model = tiny_model()
    W_O = model.blocks[1].attn.W_O.detach()
    W = torch.randn(5, N_HEADS * D_HEAD)
    got = ha.residual_writes(W, W_O)
    naive = torch.stack(
        [sum(W[f, h * D_HEAD : (h + 1) * D_HEAD] @ W_O[h] for h in range(N_HEADS)) for f in range(5)]
    )
    assert torch.allclose(got, naive, atol=1e-5)


def test_same_share_null_keeps_shares_and_changes_directions():
    W = torch.randn(6, N_HEADS * D_HEAD)
    null = ha.same_share_null(W, N_HEADS, D_HEAD, torch.Generator().manual_seed(0))
    assert torch.allclose(
        ha.head_shares(null, N_HEADS, D_HEAD), ha.head_shares(W, N_HEADS, D_HEAD), atol=1e-5
    )
    assert (torch.nn.functional.cosine_similarity(null, W, dim=-1).abs() < 0.9).all()


def test_connected_groups_against_hand_made_graph():
    sim = torch.eye(5)
    sim[0, 1] = sim[1, 0] = 0.8  # 0-1 linked, 1-2 linked (chain), 3 alone, 4 alone
    sim[1, 2] = sim[2, 1] = 0.6
    labels = ha.connected_groups(sim, 0.5)
    assert labels[0] == labels[1] == labels[2] and len({labels[0], labels[3], labels[4]}) == 3
    assert len(set(ha.connected_groups(sim, 0.7))) == 4
    sim3 = ha.cosine_matrix(torch.tensor([[1.0, 0], [1, 0.01], [0, 1]]))
    assert ha.group_stats(sim3, 0.5) == (2, pytest.approx(2 / 3)) and ha.group_stats(sim3, 1.01) == (3, 1 / 3)


def test_profile_cosines_from_the_gram_equal_the_cosines_of_centred_profiles(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    M, writes = torch.randn(D_MODEL, 40, generator=gen), torch.randn(3, 4, D_MODEL, generator=gen)
    writes[1, 2] = 0  # a zero write: cosine 0 with everything
    keep = torch.tensor([0, 3, 5, 8, 13, 21, 34, 39])
    monkeypatch.setattr(ha, "PROFILE_COLUMNS", 3)  # the vocabulary in steps: the gram is the sum of its parts
    for cols in (None, keep):
        prof = writes @ (M if cols is None else M[:, cols])
        prof = prof - prof.mean(-1, keepdim=True)
        naive = torch.nn.functional.cosine_similarity(prof[..., :, None, :], prof[..., None, :, :], dim=-1)
        torch.testing.assert_close(ha.profile_cosines(writes, ha.profile_gram(M, cols)), naive,
                                   rtol=1e-5, atol=1e-5)


def test_head_similarities_and_polysemantic_table():
    model = tiny_model()
    sae = attn_sae()
    W_O, M = model.blocks[1].attn.W_O.detach(), model.W_U.detach()
    sims = ha.head_similarities(sae.W_dec.detach(), W_O, ha.profile_gram(M), k=5, n_null=3, seed=0)
    assert len(sims) == N_HEADS * (1 + 3)
    # the features' matrix equals a naive recomputation from the head's top-5 decoder rows
    top = ha.head_shares(sae.W_dec.detach(), N_HEADS, D_HEAD)[:, 2].topk(5).indices
    writes = torch.stack(
        [
            sum(sae.W_dec[f, h * D_HEAD : (h + 1) * D_HEAD] @ W_O[h] for h in range(N_HEADS))
            for f in top.tolist()
        ]
    )
    logits = writes @ M
    head2 = [s for h, kind, _, s in sims if h == 2 and kind == "features"][0]
    assert torch.allclose(head2, ha.cosine_matrix(logits - logits.mean(-1, keepdim=True)), atol=1e-5)
    tau = ha.null_link_threshold(sims, 0.95)
    assert -1 <= tau <= 1
    out = ha.polysemantic_heads(sims, layer=1, taus=[0.2, tau])
    assert len(out) == N_HEADS * 2 * (1 + 3) and set(out["kind"]) == {"features", "null"}
    assert (out["n_groups"] >= 1).all() and (out["n_groups"] <= 5).all()


# ------------------------------------------------------------------------------------------------------------
# DFA


@pytest.mark.parametrize(
    "norm,n_kv,arch", [("RMS", 2, "topk"), ("LN", None, "standard"), ("RMS", 4, "standard")]
)
def test_dfa_is_exact_and_matches_a_naive_loop(norm, n_kv, arch):
    model = tiny_model(norm, n_kv)
    sae = attn_sae(arch)
    toks = tokens(model)
    c = dfa_mod.attention_cache(model, toks, 1)
    W_eff, b_eff = dfa_mod.encoder_affine(sae)
    z = c["z"].flatten(2)  # [b, pos, H * d_head], head-major as sae-lens flattens it
    pre = z @ W_eff + b_eff  # [b, pos, d_sae]
    # the effective encoder reproduces sae-lens's own encoding
    acts = sae.encode(z)
    if arch == "topk":
        top = pre.topk(6, dim=-1)
        expect = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        expect = pre.relu()
    assert torch.allclose(acts, expect, atol=1e-5)
    b, d, f = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 5, 23, 11]), torch.tensor([3, 0, 47, 20])
    parts = dfa_mod.dfa(c["pattern"], c["v"], W_eff, b, d, f)
    assert parts.shape == (4, N_HEADS, model.cfg.n_ctx)
    # exact: parts plus the bias equal the pre-activation (fp32, 1e-5)
    assert torch.allclose(parts.sum((1, 2)) + b_eff[f], pre[b, d, f], atol=1e-5)
    # and equal a naive loop over heads, sources and head dimensions
    group = N_HEADS // (n_kv or N_HEADS)
    for i in range(4):
        for h in range(N_HEADS):
            for s in range(model.cfg.n_ctx):
                want = sum(
                    c["pattern"][b[i], h, d[i], s].item()
                    * c["v"][b[i], s, h // group, k].item()
                    * W_eff[h * D_HEAD + k, f[i]].item()
                    for k in range(D_HEAD)
                )
                assert parts[i, h, s].item() == pytest.approx(want, abs=1e-5)
    for i in range(4):  # causal: nothing from sources after the destination
        assert (parts[i, :, int(d[i]) + 1 :] == 0).all()


@pytest.mark.parametrize("norm,n_kv", [("RMS", 2), ("LN", None)])
def test_block_stream_reads_layers_in_turn_as_separate_passes_do(norm, n_kv):
    model = tiny_model(norm, n_kv)
    toks = tokens(model)
    runs = [0] * model.cfg.n_layers
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    alone = [dfa_mod.attention_cache(model, toks, layer) for layer in range(model.cfg.n_layers)]
    assert runs == [2, 1]  # a pass from the embedding per layer read
    runs[:] = [0, 0]
    stream = BlockStream(model, toks)
    in_turn = [dfa_mod.attention_cache(model, toks, layer, stream=stream) for layer in range(2)]
    assert runs == [1, 1]  # in stretches: every block once
    for a, b in zip(alone, in_turn):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already run"):
        stream.run_to(0, ["blocks.0.attn.hook_z"])


def test_dfa_with_reshaping_sae_reads_unflattened_hook_z():
    """A release-style SAE (`reshape_activations: hook_z`) encodes [.., n_heads, d_head]; the same effective
    encoder applies to the flattened input."""
    model = tiny_model()
    sae = attn_sae("standard", reshape="hook_z")
    c = dfa_mod.attention_cache(model, tokens(model), 1)
    W_eff, b_eff = dfa_mod.encoder_affine(sae)
    assert torch.allclose(sae.encode(c["z"]), (c["z"].flatten(2) @ W_eff + b_eff).relu(), atol=1e-5)


def test_encoder_affine_refuses_gated_like_architectures():
    class Fake:
        class cfg:
            @staticmethod
            def architecture():
                return "gated"

    with pytest.raises(dfa_mod.DFAError, match="affine"):
        dfa_mod.encoder_affine(Fake())


# ------------------------------------------------------------------------------------------------------------
# Recursive DFA


@pytest.mark.parametrize("norm,n_kv", [("RMS", 2), ("LN", None)])
def test_rdfa_parts_sum_to_the_value_vector_and_the_dfa_part(norm, n_kv):
    model = tiny_model(norm, n_kv)
    sae, res = attn_sae("topk"), resid_sae(0)
    toks = tokens(model)
    c = dfa_mod.attention_cache(model, toks, 1)
    attn = model.blocks[1].attn
    W_V = (attn._W_V if n_kv else attn.W_V).detach()
    b_V = (attn._b_V if n_kv else attn.b_V).detach()
    ln = model.blocks[1].ln1
    bi, s, d, f = 1, 4, 9, 7
    parts = dfa_mod.value_decomposition(
        c["resid_pre"][bi, s],
        res,
        c["scale"][bi, s],
        ln.w.detach(),
        getattr(ln, "b", None),
        W_V,
        b_V,
        center=norm == "LN",
    )
    total = parts["feature_parts"].sum(0) + parts["b_dec_part"] + parts["error_part"] + parts["bias_part"]
    assert torch.allclose(total, c["v"][bi, s], atol=1e-5)
    assert len(parts["features"]) == 5  # TopK k=5 active features
    W_eff, _ = dfa_mod.encoder_affine(sae)
    h = 3
    kv = int(ha.kv_heads(N_HEADS, n_kv)[h])
    A = c["pattern"][bi, h, d, s].item()
    contrib = dfa_mod.rdfa(parts, A, W_eff[h * D_HEAD : (h + 1) * D_HEAD, f], kv)
    part = dfa_mod.dfa(c["pattern"], c["v"], W_eff, torch.tensor([bi]), torch.tensor([d]), torch.tensor([f]))[
        0, h, s
    ]
    got = contrib["feature"].sum() + contrib["b_dec"] + contrib["error"] + contrib["bias"]
    assert got.item() == pytest.approx(part.item(), abs=1e-5)
    # each feature's contribution equals a naive recomputation from its decoder write
    g = int(parts["features"][0])
    a_g = res.encode(c["resid_pre"][bi, s][None])[0, g]
    write = (
        a_g * res.W_dec[g] / res.W_dec[g].norm()
    )  # rescale_acts_by_decoder_norm: unit decoder per activation
    if norm == "LN":
        write = write - write.mean()
    v_part = (write / c["scale"][bi, s] * ln.w) @ W_V[kv]
    assert contrib["feature"][0].item() == pytest.approx(
        A * (v_part @ W_eff[h * D_HEAD : (h + 1) * D_HEAD, f]).item(), abs=1e-5
    )


# ------------------------------------------------------------------------------------------------------------
# Loading and parameters


def test_require_attention_z_accepts_hook_z_and_refuses_others(tmp_path):
    model = tiny_model()
    sae = attn_sae()
    sae.save_model(tmp_path / "layer_1")
    [loaded] = saes.load_saes(tmp_path, [1], model=model)
    assert saes.require_attention_z(loaded, model.cfg) is loaded
    assert saes.is_attention_z_hook("blocks.3.attn.hook_z") and not saes.is_attention_z_hook(
        "blocks.3.hook_z"
    )
    with pytest.raises(SAEError, match="no per-head slices"):
        saes.require_attention_z(saes._describe(resid_sae(0, "hook_attn_out"), "x", None, None, folded=False))
    with pytest.raises(SAEError, match="hook_z"):
        saes.require_attention_z(saes._describe(resid_sae(0), "x", None, None, folded=False))
    other = tiny_model(n_kv=None)
    other.cfg.d_head = 4  # a model whose hook_z is narrower than the SAE
    with pytest.raises(SAEError, match="n_heads \\* d_head"):
        saes.require_attention_z(loaded, other.cfg)


def test_demo_colon_config_names_a_pinned_or_prepared_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))  # an empty cache: the pinned SAEs still load
    assert saes.load_saes("demo:attn", [0])[0].hook_name == "blocks.0.attn.hook_z"
    with pytest.raises(SAEError, match="'no-such-config'"):
        saes.load_saes("demo:no-such-config", [0])


def test_params_attn_saes_entry():
    base = {"target": "t", "model": {"name": "gpt2-small"}, "saes": {"source": "gpt2-small-res-jb"}}
    t = parse_target(
        {**base, "attn_saes": {"source": "gpt2-small-hook-z-kk", "id_template": "blocks.{layer}.hook_z"}}
    )
    assert t.attn_sae_ids([0, 5]) == ["blocks.0.hook_z", "blocks.5.hook_z"]
    with pytest.raises(ParamsError, match="unknown key"):
        parse_target({**base, "attn_saes": {"source": "x", "ids": "y"}})
    with pytest.raises(ParamsError, match="no attention-output SAEs"):
        parse_target(base).attn_sae_ids([0])


# ------------------------------------------------------------------------------------------------------------
# The chapter's steps, end to end on a tiny random model with release-style SAEs (hook_z reshaping, resid_pre)


def _tiny_run(tmp_path, monkeypatch, **overrides):
    from types import SimpleNamespace

    from weightscope.chapters import attention_saes as ch

    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))
    model = tiny_model("LN", None)
    attn = [saes._describe(attn_sae("standard", layer=layer, reshape="hook_z", seed=layer), "tiny", None,
                           None, folded=False) for layer in (0, 1)]
    resid = {layer: saes._describe(resid_sae(layer, "hook_resid_pre", seed=10 + layer), "tiny", None, None,
                                   folded=False) for layer in (0, 1)}
    target = SimpleNamespace(target="tiny", attn_saes={"source": "tiny"})
    ctx = SimpleNamespace(params=target, provenance=lambda **kw: {"chapter": kw}, device="cpu")
    cfg = ch.Config(**{**dict(top_k=4, n_null=3, text_rows=3, text_ctx=24, dfa_features=3, n_examples=4,
                              min_fires=1, induction_len=8, induction_rows=3), **overrides})
    return ch, ch.run(ctx, cfg, model=model, attn=attn, resid=resid, text=tokens(model)), model


def test_chapter_run_on_a_tiny_model(tmp_path, monkeypatch):
    ch, t, model = _tiny_run(tmp_path, monkeypatch)
    assert len(t.shares) == 2 * 48 * N_HEADS and len(t.top) == 2 * N_HEADS * 4
    assert len(t.poly_heads) == 2 * N_HEADS and 0 <= t.tau["tau"][0] <= 1
    assert t.writes.loc[t.writes["layer"] == 0, "resid_hook"].eq("blocks.1.hook_resid_pre").all()
    assert t.writes.loc[t.writes["layer"] == 1, "resid_hook"].isna().all()  # no residual SAE after the last
    tab = ch.top_features_table(t, n=3)
    assert len(tab) == 2 * N_HEADS and tab["features"].str.count(",").eq(2).all()
    ex = t.examples
    assert (ex["abs_error"] < 1e-5).all() and len(ex) == 6
    active = ex["activation"] > 0  # sae-lens's own encode: equal to parts + bias where the feature is active
    assert active.any() and (ex.loc[active, "error_vs_sae_lens"] < 1e-5).all()
    assert ch.exact_splits(ex).all() and ch.examples_table(t)["exact"].all()
    assert "abs_error" not in ch.examples_table(t) and "abs_error" in t.examples  # shown: the verdict only
    assert (ex["dest"] >= t.config.min_sources - 1).all()
    assert set(t.families["family"]) <= set(ch.FAMILIES)
    assert t.families[["short", "null_short"]].le(1 + 1e-6).all().all()
    sums = t.rdfa.groupby(["layer", "feature"]).agg(part=("part", "first"), total=("contribution", "sum"))
    assert np.allclose(sums["part"], sums["total"], atol=1e-5)  # the pieces sum to each DFA part
    assert set(t.rdfa["layer"]) == {0, 1}  # resid_pre of each layer is the stream its attention reads
    found = ch.findings(t)
    assert set(found) == {"saes", "shares", "poly", "writes", "dfa", "families", "rdfa"}
    assert all(isinstance(line, str) and line for lines in found.values() for line in lines)
    assert "rows of 24 tokens" in found["dfa"][0]
    # derived tables against plain recomputations
    best = t.shares.groupby(["layer", "feature"])["share"].max()
    assert ch.share_summary(t)["half"] == pytest.approx(float((best >= 0.5).mean()))
    owned = t.heads.groupby("layer")["features_owned"].sum()
    assert (owned == 48).all()  # every feature's largest share is held by exactly one head
    gap = ch.poly_gap(t)
    assert np.allclose(gap["gap"], gap["null"] - gap["features"])


def test_null_sample_keeps_narrow_saes_whole_and_subsamples_wide_ones():
    from weightscope.chapters import attention_saes as ch

    W = torch.randn(48, 16)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(ch._null_sample(W, 48, gen), W)  # no wider than n: every row, and no draw
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())
    part = ch._null_sample(W, 20, gen)
    hits = (part[:, None, :] == W[None]).all(-1)  # [20, 48]: which row of W each null row copies
    assert part.shape == (20, 16) and hits.sum(1).eq(1).all() and hits.any(0).sum() == 20  # 20 distinct rows


def test_residual_reads_null_has_n_null_reads_rows(tmp_path, monkeypatch):
    from weightscope.chapters import attention_saes as ch

    seen, sample = [], ch._null_sample
    monkeypatch.setattr(ch, "_null_sample", lambda *a: seen.append(len(rows := sample(*a))) or rows)
    _, t, _ = _tiny_run(tmp_path, monkeypatch, n_null_reads=20)
    assert seen == [20]  # layer 0 only: layer 1 has no residual SAE after it
    _, whole, _ = _tiny_run(tmp_path / "whole", monkeypatch)
    cols = ["resid_features", "resid_top_score"]  # the features' own reads do not depend on the null
    assert t.writes[cols].equals(whole.writes[cols]) and seen == [20, 48]


def test_head_level_tables_on_a_tiny_model(tmp_path, monkeypatch):
    ch, t, _ = _tiny_run(tmp_path, monkeypatch, own_share_min=0.3)
    sh = t.slice_heads
    assert len(sh) == 2 * N_HEADS and 0 <= t.slice_tau["tau"][0] <= 1
    assert sh["qualifies"].equals(sh["top_share_mean"] >= 0.3)
    sentence = ch.head_level_sentence(t)
    assert sentence.startswith(f"{int(sh['qualifies'].sum())} of {2 * N_HEADS} heads qualify")
    hp = t.head_profiles
    assert len(hp) == 2 * N_HEADS and hp[["locality", "induction_score"]].le(1 + 1e-6).all().all()
    assert (t.families["null_short_heads"].between(0, 1 + 1e-6)).all()
    short = t.families["family"] == ch.FAMILIES[1]
    assert (t.families.loc[short, "short"] > t.families.loc[short, "null_short_heads"]).all()


def test_head_profiles_find_a_planted_induction_head_and_a_local_head():
    from weightscope.chapters.attention_saes import Config, head_profiles

    config = Config(short_window=1, induction_len=5)
    T, n = 5, 11  # BOS, a sequence of 5, the same 5 again
    text = torch.zeros(1, 3, n, n)
    text[0, 0] = torch.eye(n)  # head 0 attends to itself: all its mass within the window
    text[0, 1] = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]  # uniform
    text[0, 2, :, 0] = 1.0  # attends to BOS only
    rep = text.clone()
    d = torch.arange(T + 1, n)
    rep[0, 2] = 0
    rep[0, 2, d, d - T + 1] = 1.0  # head 2 on the repeats: the token after the earlier copy
    rep[0, 2, : T + 1, 0] = 1.0
    hp = head_profiles({"pattern": text}, {"pattern": rep}, 0, config)
    assert hp["locality"].tolist()[0] == pytest.approx(1.0)
    assert hp["locality"].tolist()[1] == pytest.approx(hp["locality_uniform"].iloc[0])
    assert hp["locality"].tolist()[2] == pytest.approx(0.0)
    assert hp["induction_score"].tolist()[2] == pytest.approx(1.0)
    assert hp["induction_score"].tolist()[1] == pytest.approx(hp["induction_uniform"].iloc[0])
    assert hp["induction_score"].tolist()[0] == pytest.approx(0.0)


def test_head_slice_similarities_match_a_naive_loop():
    gen = torch.Generator().manual_seed(3)
    W_dec = torch.randn(30, N_HEADS * D_HEAD, generator=gen)
    W_O = torch.randn(N_HEADS, D_HEAD, D_MODEL, generator=gen)
    M = torch.randn(D_MODEL, 40, generator=gen)
    sims = ha.head_slice_similarities(W_dec, W_O, ha.profile_gram(M), k=5, n_null=2, seed=0)
    shares = ha.head_shares(W_dec, N_HEADS, D_HEAD)
    for head, kind, draw, sim in sims:
        if kind != "features":
            assert sim.shape == (5, 5)
            continue
        top = shares[:, head].topk(5).indices
        own = W_dec[top].reshape(5, N_HEADS, D_HEAD)[:, head]
        prof = torch.stack([own[i] @ W_O[head] @ M for i in range(5)])
        prof = prof - prof.mean(-1, keepdim=True)
        naive = torch.nn.functional.cosine_similarity(prof[:, None], prof[None], dim=-1)
        assert torch.allclose(sim, naive, atol=1e-5)
        other = W_dec[top].reshape(5, N_HEADS, D_HEAD)[:, (head + 1) % N_HEADS]
        assert not torch.allclose(sim, torch.nn.functional.cosine_similarity(
            (other @ W_O[head] @ M)[:, None], (other @ W_O[head] @ M)[None], dim=-1), atol=1e-3)


def test_min_sources_moves_the_dfa_examples(tmp_path, monkeypatch):
    _, t, _ = _tiny_run(tmp_path, monkeypatch, min_sources=20)
    assert (t.examples["dest"] >= 19).all() and (t.examples["sources"] >= 20).all()


def test_chunked_topk_equals_the_whole_product():
    from weightscope.chapters.attention_saes import chunked_topk

    gen = torch.Generator().manual_seed(0)
    rows, M = torch.randn(37, 8, generator=gen), torch.randn(8, 50, generator=gen)
    keep = torch.tensor([0, 3, 4, 9, 20, 21, 33, 49])
    whole = (rows @ M).topk(5, dim=-1)
    sub = (rows @ M[:, keep]).topk(5, dim=-1)
    for chunk in (1, 50, 51, 10_000):  # a chunk of one row, exactly one row, several rows, everything
        vals, idx = chunked_topk(rows, M, 5, chunk_elements=chunk)
        assert torch.equal(idx, whole.indices) and torch.allclose(vals, whole.values)
        vals, idx = chunked_topk(rows, M, 5, keep=keep, chunk_elements=chunk)
        assert torch.equal(idx, keep[sub.indices]) and torch.allclose(vals, sub.values)


def test_chunked_topk_on_a_vocabulary_wide_product_takes_the_two_stage_topk(monkeypatch):
    """At a vocabulary's width (>= 8k columns) the top-k is chapter 1's two-stage one: same ids and values as
    torch.topk of the whole product, with and without columns left out (set to -inf in the chunk)."""
    from weightscope.chapters.attention_saes import chunked_topk

    gen = torch.Generator().manual_seed(1)
    rows, M = torch.randn(9, 16, generator=gen), torch.randn(16, 9000, generator=gen)
    keep = torch.randperm(9000, generator=gen)[:40].sort().values
    whole, sub = (rows @ M).topk(6, dim=-1), (rows @ M[:, keep]).topk(6, dim=-1)
    widths, topk = [], torch.topk
    monkeypatch.setattr(torch, "topk", lambda x, k, **kw: widths.append(x.shape[-1]) or topk(x, k, **kw))
    for chunk in (9000, 4 * 9000):
        vals, idx = chunked_topk(rows, M, 6, chunk_elements=chunk)
        assert torch.equal(idx, whole.indices) and torch.allclose(vals, whole.values)
        vals, idx = chunked_topk(rows, M, 6, keep=keep, chunk_elements=chunk)
        assert torch.equal(idx, keep[sub.indices]) and torch.allclose(vals, sub.values)
    assert widths and max(widths) < 9000  # no whole-row torch.topk


def test_chunked_topk_defaults_to_the_streaming_budget(monkeypatch):
    from weightscope.chapters import attention_saes as ch

    monkeypatch.setattr(ch, "auto_chunk_size", lambda width, dtype, device: 4)  # 4 rows of 50 scores
    products, buffers, matmul = [], set(), torch.matmul

    def counted(a, b, *, out=None):
        products.append(len(a))
        buffers.add(None if out is None else (out.data_ptr(), out.stride()))
        return matmul(a, b, out=out)

    monkeypatch.setattr(torch, "matmul", counted)
    gen = torch.Generator().manual_seed(0)
    rows, M = torch.randn(10, 8, generator=gen), torch.randn(8, 50, generator=gen)
    vals, idx = ch.chunked_topk(rows, M, 5)
    monkeypatch.undo()
    whole = (rows @ M).topk(5, dim=-1)
    assert products == [4, 4, 2] and torch.equal(idx, whole.indices) and torch.allclose(vals, whole.values)
    assert len(buffers) == 1 and None not in buffers  # on a CPU every chunk's scores go into one buffer,
    assert next(iter(buffers))[1] == (64, 1)  # its rows on 64-byte lines (50 scores a row)


def test_config_lists_every_problem_at_once():
    from weightscope.chapters.attention_saes import Config

    with pytest.raises(ParamsError) as err:
        Config(q_link=7, top_k=0, min_sources=500, short_window=-1)
    text = str(err.value)
    for fragment in ("q_link = 7", "top_k = 0", "min_sources = 500 exceeds text_ctx", "short_window = -1"):
        assert fragment in text
    assert Config(text_ctx=512).problems(SimpleNamespace(n_ctx=256)) == [
        "text_ctx: rows of 512 tokens exceed the model's context (256)"]
    assert Config().problems(SimpleNamespace(n_ctx=None)) == []


def _attn_params(tmp_path, attn_source: str, chapters=None):
    model = tmp_path / "tiny"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                   "hidden_size": 32, "num_attention_heads": 4,
                                                   "vocab_size": 60, "max_position_embeddings": 64}))
    (model / "model.safetensors").write_bytes(b"")
    path = tmp_path / "tiny-attn.yaml"
    path.write_text(yaml.safe_dump({"target": "tiny-attn", "model": {"name": str(model)},
                                    "saes": {"source": str(tmp_path / "res")}, "layers": [0, 1],
                                    "attn_saes": {"source": attn_source},
                                    "chapters": chapters or {}}))
    return load_target(path)


def test_preflight_checks_the_overrides_and_the_attention_saes(tmp_path):
    from weightscope.publish import preflight as pf

    dims = pf.ModelDims(n_layers=2, d_model=32, d_vocab=60, n_heads=4, n_ctx=256)
    defaults = {"target": "x", **{f.name: f.default for f in dataclasses.fields(
        __import__("weightscope.chapters.attention_saes", fromlist=["Config"]).Config)}}
    missing = _attn_params(tmp_path, str(tmp_path / "no-such-folder"), {"04_attention_saes": {"q_link": 7}})
    problems = pf.chapter_problems(missing, "04_attention_saes", defaults, dims)  # every problem at once
    assert len(problems) == 2 and "q_link = 7 is a share" in problems[0]
    assert "no-such-folder does not exist" in problems[1]
    ok = _attn_params(tmp_path, str(tmp_path / "no-such-folder"))
    problems = pf.chapter_problems(ok, "04_attention_saes", defaults, dims)
    assert len(problems) == 1 and "no-such-folder does not exist" in problems[0]
    # a folder holding residual SAEs where hook_z SAEs belong
    for layer in (0, 1):
        resid_sae(layer, "hook_resid_post").save_model(tmp_path / "resid-as-attn" / f"layer_{layer}")
    wrong = _attn_params(tmp_path, str(tmp_path / "resid-as-attn"))
    problems = pf.chapter_problems(wrong, "04_attention_saes", defaults, dims)
    assert len(problems) == 2 and all("not blocks.L.attn.hook_z" in p for p in problems)
    for layer in (0, 1):
        attn_sae(layer=layer).save_model(tmp_path / "attn" / f"layer_{layer}")
    right = _attn_params(tmp_path, str(tmp_path / "attn"))
    assert pf.chapter_problems(right, "04_attention_saes", defaults, dims) == []


# ------------------------------------------------------------------------------------------------------------
# The demo attention SAEs: sae-lens's runner on flattened hook_z, through the prepare stage's machinery


def test_tiny_attention_training_on_hook_z(tmp_path, monkeypatch):
    import dataclasses

    from weightscope.prepare import demo_saes

    folder = tmp_path / "corpora" / "tinystories"
    folder.mkdir(parents=True)
    stories = [
        f"Once upon a time, Lily had {i} red balls. She played in the park with Tom." for i in range(60)
    ]
    (folder / "tinystories_lowercase.txt").write_text("\n".join(s.lower() for s in stories) + "\n")
    (folder / "tinystories_cased.txt").write_text("\n\n".join(stories[:20]) + "\n")
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path / "corpora"))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_MODEL,
        n_ctx=64,
        d_head=D_HEAD,
        n_heads=N_HEADS,
        n_key_value_heads=2,
        d_mlp=64,
        d_vocab=512,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        seed=0,
    )
    model = HookedTransformer(cfg).eval()
    test_cfg = dataclasses.replace(
        demo_saes.ATTN_TINY,
        name="attn-test",
        d_sae=48,
        k=4,
        train_rows=48,
        training_tokens=3072,
        max_eval_tokens=512,
    )
    encode = lambda text: [demo_saes.BOS_ID] + [3 + b for b in text.encode()]  # noqa: E731
    root = demo_saes.ensure_demo_saes(test_cfg, model=model, encode=encode, progress=False)
    manifest = demo_saes.read_manifest(root)
    assert manifest["complete"] and manifest["hook_template"] == "blocks.{layer}.attn.hook_z"
    assert all(m["explained_variance"] < 1 and m["mean_l0"] <= 4 for m in manifest["per_layer"].values())
    loaded = saes.load_saes("demo:attn-test", model=model)  # through the pointer the prepare stage wrote
    assert [(s.hook_name, s.d_in) for s in loaded] == [
        ("blocks.0.attn.hook_z", N_HEADS * D_HEAD),
        ("blocks.1.attn.hook_z", N_HEADS * D_HEAD),
    ]
    assert saes.require_attention_z(loaded[1], model.cfg) is loaded[1]
    held = demo_saes.held_out_stories(test_cfg)
    assert held and all(isinstance(s, str) for s in held)
    assert not set(held) & set(stories[:18])  # held-out cased stories are the last ones


# ------------------------------------------------------------------------------------------------------------
# A Gemma-2 stand-in with hook_z SAEs, named in a params file with `processing: auto`, through the chapter


@pytest.fixture(scope="module")
def gemma_chapter(tmp_path_factory):
    import standins

    from weightscope.chapters import attention_saes as ch
    from weightscope.chapters.context import open_chapter

    tmp = tmp_path_factory.mktemp("gemma-attn")
    before = os.environ.get("WEIGHTSCOPE_DATA")
    os.environ["WEIGHTSCOPE_DATA"] = str(tmp / "data")
    folder = standins.build_model("gemma2", tmp / "gemma2", n_layers=2)
    resid = standins.build_saes(folder, tmp / "res")
    attn = standins.build_attn_saes(folder, tmp / "attn")
    params = standins.write_params("standin-gemma2-attn", folder, resid, tmp / "standin-gemma2-attn.yaml")
    raw = yaml.safe_load(params.read_text())
    assert "processing" not in raw["model"]  # processing: auto, the setting of the shipped real targets
    params.write_text(yaml.safe_dump({**raw, "attn_saes": {"source": str(attn)}}, sort_keys=False))
    config = ch.Config(top_k=4, n_null=2, text_rows=2, text_ctx=32, dfa_features=2, n_examples=2,
                       min_fires=1, induction_len=6, induction_rows=2)
    try:
        ctx = open_chapter(str(params))
        yield ch, ch.run(ctx, config), folder, attn, resid, ctx, config
    finally:
        if before is None:
            os.environ.pop("WEIGHTSCOPE_DATA", None)
        else:
            os.environ["WEIGHTSCOPE_DATA"] = before


def test_processing_auto_with_attention_saes_runs_the_chapter(gemma_chapter):
    ch, t, *_ = gemma_chapter
    assert t.info["post_attention_norm"] and len(t.writes) == 2 * 48 and len(t.examples) == 4
    assert any("normalises the attention output" in line for line in ch.findings(t)["saes"])


def test_gemma2_writes_equal_plain_torch_with_the_post_attention_norm(gemma_chapter):
    import standins
    from safetensors.torch import load_file

    from weightscope.compute.lens import token_strings
    from weightscope.compute.token_scores import content_token_ids, token_categories

    _, t, folder, attn, *_ = gemma_chapter
    cfg, sd = standins.hf_weights(folder)
    M = standins.reference_output_matrix(cfg, sd)
    tok, d_vocab = standins.tokenizer(), cfg["vocab_size"]
    ids = content_token_ids(token_categories(tok, d_vocab), ("byte", "special"))
    assert t.info["content_tokens"] == len(ids) < d_vocab  # chapter 1's filter: byte pieces, specials out
    vocab = token_strings(SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(d_vocab=d_vocab)))
    for layer in (0, 1):
        W_dec = load_file(str(attn / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"].float()
        book = t.writes[t.writes["layer"] == layer].sort_values("feature")["top_tokens"].tolist()

        def top(post_norm):
            scores = standins.reference_attn_writes(cfg, sd, W_dec, layer, post_norm=post_norm) @ M[:, ids]
            return [" | ".join(vocab[int(ids[j])] for j in row) for row in scores.topk(6, dim=-1).indices]

        assert book == top(True)  # equal to plain torch with the norm's weight folded in
        assert sum(a != b for a, b in zip(book, top(False))) > len(book) // 2  # and unlike it without


def _saved_sae(folder):
    """(cfg.json, fp32 weights) of an SAE saved by sae-lens, read from its files alone."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "sae_weights.safetensors"))
    return json.loads((folder / "cfg.json").read_text()), {k: v.float() for k, v in weights.items()}


def _plain_topk_encode(cfg, w, x):
    """A TopK SAE's activations [n, d_sae] for x [n, d_in] (sae-lens's rule: subtract b_dec where
    `apply_b_dec_to_input`, keep the k largest pre-activations, ReLU)."""
    pre = (x - w["b_dec"] if cfg.get("apply_b_dec_to_input") else x) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(cfg["k"], dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def test_gemma2_recursive_dfa_equals_plain_torch_with_the_pre_attention_norm(gemma_chapter):
    """Recursive DFA on the Gemma-2 stand-in, recomputed from the Hugging Face model alone: its attention
    pattern, residual stream and RMSNorm (1 + weight, eps), and both SAEs' saved files."""
    import standins
    import transformers

    from weightscope.load.corpora import held_out_windows

    _, t, folder, attn, resid, ctx, config = gemma_chapter
    cfg, sd = standins.hf_weights(folder)
    tok, bos = standins.tokenizer(), cfg["bos_token_id"]
    text = held_out_windows(lambda s: [bos] + tok.encode(s), n_tokens=config.text_rows * config.text_ctx,
                            row_len=config.text_ctx)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(text, output_hidden_states=True, output_attentions=True)
    n_heads, n_kv, d_head = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rd = t.rdfa.merge(t.examples[["layer", "feature", "row", "dest_token"]], on=["layer", "feature"])
    assert set(rd["layer"]) == {1}  # the residual SAE on resid_post 0 is the stream layer 1's attention reads
    vocab = [tok.decode([i]) for i in range(cfg["vocab_size"])]
    for (layer, f), ex in rd.groupby(["layer", "feature"]):
        e = ex.iloc[0]
        row, d, h, s = int(e["row"]), int(e["dest"]), int(e["head"]), int(e["src"])
        assert vocab[int(text[row, d])] == e["dest_token"]  # the same text as the chapter's
        w_enc = _saved_sae(attn / f"layer_{layer}")[1]["W_enc"]
        x = out.hidden_states[layer][row]  # [pos, d_model]: the stream block `layer` reads
        A = out.attentions[layer][row]  # [n_heads, dest, src]
        W_V = sd[f"model.layers.{layer}.self_attn.v_proj.weight"].view(n_kv, d_head, -1)  # [kv, d_head, d_model]
        g = sd[f"model.layers.{layer}.input_layernorm.weight"]
        rms = (x.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"]).sqrt()  # [pos, 1]
        kv = torch.arange(n_heads) // (n_heads // n_kv)
        v = torch.einsum("pm,jkm->pjk", x / rms * (1 + g), W_V)  # [pos, kv, d_head]
        w_head = w_enc[:, f].view(n_heads, d_head)
        parts = A[:, d, :d + 1] * torch.einsum("spk,pk->ps", v[:d + 1, kv], w_head)  # [n_heads, src]
        assert divmod(int(parts.abs().argmax()), d + 1) == (h, s)  # the largest part is the one split
        assert e["part"] == pytest.approx(float(parts[h, s]), rel=1e-4, abs=1e-6)
        res_cfg, w_res = _saved_sae(resid / f"layer_{layer - 1}")
        acts = _plain_topk_encode(res_cfg, w_res, x[s][None])

        def contributions(norm_weight):  # each active residual feature's share of the part
            active = torch.nonzero(acts[0]).flatten()
            writes = acts[0, active, None] * w_res["W_dec"][active]  # [m, d_model]
            through = torch.einsum("am,km->ak", writes / rms[s] * norm_weight, W_V[kv[h]])
            return dict(zip(active.tolist(), (A[h, d, s] * through @ w_head[h]).tolist()))

        book = ex[ex["piece"] == "residual feature"].set_index("resid_feature")["contribution"].to_dict()
        right, wrong = contributions(1 + g), contributions(g)  # Gemma's 1 + weight, and its raw weight
        assert book and all(right[j] == pytest.approx(c, rel=1e-4, abs=1e-6) for j, c in book.items())
        assert sum(abs(right[j] - wrong[j]) > 1e-3 * abs(right[j]) for j in book) > len(book) // 2


def test_bad_chapter4_inputs_exit_2_before_any_chapter_runs(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "params" / "demo.yaml").read_text())
    raw.update(target="bad-attn", attn_saes={"source": str(tmp_path / "no-such-attn")},
               chapters={"04_attention_saes": {"q_link": 7}})
    params = tmp_path / "bad-attn.yaml"
    params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "WEIGHTSCOPE_DATA": str(tmp_path / "data"),
           "WEIGHTSCOPE_BOOK": str(tmp_path / "book"), "PYTHONPATH": str(repo / "lib")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", str(params),
                           "--no-html"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "q_link = 7 is a share" in proc.stderr and "no-such-attn does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and "[book" not in proc.stdout  # nothing was run
    print(f"pre-flight refusal in {time.monotonic() - start:.0f} s")


def test_processing_mismatch_between_attention_and_residual_saes_is_named():
    from weightscope.chapters.attention_saes import processing_mismatch

    sae = SimpleNamespace(model_from_pretrained_kwargs={"center_writing_weights": True})
    assert processing_mismatch({"center_writing_weights": True}, sae) == {}
    assert processing_mismatch({}, sae) == {"center_writing_weights": (True, False)}
    assert processing_mismatch({}, SimpleNamespace(model_from_pretrained_kwargs=None)) == {}


def test_training_sweep_says_which_variants_meet_the_bar(monkeypatch, tmp_path):
    """`--sweep attn` trains each variant (faked here: explained variance 0.75 + 0.03 per million training
    tokens, 0.02 less at layer 4); chapter 4's table and sentence must say which variants meet the bar."""
    from weightscope.chapters import attention_saes as ch
    from weightscope.prepare import demo_saes

    def fake_training(cfg, **kwargs):
        root = tmp_path / "trainings" / f"{cfg.training_tokens}-{cfg.k}-{cfg.d_sae}-{cfg.train_rows}"
        per_layer = {str(layer): dict(explained_variance=0.75 + 0.03 * cfg.training_tokens / 1e6 - 0.02 * (layer == 4),
                                      mean_l0=float(cfg.k), dead_fraction=0.01, training_time_s=1.0)
                     for layer in cfg.layers}
        root.mkdir(parents=True)
        (root / "manifest.json").write_text(json.dumps({"per_layer": per_layer, "n_eval_tokens": 100}))
        return root

    monkeypatch.setattr(demo_saes, "ensure_demo_saes", fake_training)
    monkeypatch.setattr(saes, "PINNED_DIR", tmp_path)
    path = demo_saes.sweep("attn", progress=False)
    assert path == tmp_path / "attn_sweep.json"
    spec = demo_saes.SWEEPS["attn"]
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) == len(spec["variants"]) * len(spec["layers"])
    table = ch.training_sweep(SimpleNamespace(params=SimpleNamespace(attn_saes={"source": "demo:attn"})))
    expected = {label: all(0.75 + 0.03 * dataclasses.replace(demo_saes.ATTN, **change).training_tokens / 1e6
                           - 0.02 * (layer == 4) >= saes.TARGET_BAR["explained_variance_min"]
                           for layer in spec["layers"])
                for label, change in spec["variants"].items()}
    assert dict(zip(table["variant"], table["all_meet"])) == expected
    assert 0 < sum(expected.values()) < len(expected)  # the fake separates the variants: the check can fail
    assert f"{sum(expected.values())} of {len(expected)} variants meet the bar" in ch.sweep_sentence(table)
    assert ch.training_sweep(SimpleNamespace(params=SimpleNamespace(attn_saes={"source": "jbloom/x"}))).empty


def test_families_when_no_feature_fires_enough_on_the_repeated_half(tmp_path, monkeypatch):
    """min_fires above the repeated half's 24 positions (3 rows x 8) but within the text's 72: features are
    classified on the text, none can be induction, and the chapter still runs (a sparse SAE's case)."""
    ch, t, _ = _tiny_run(tmp_path, monkeypatch, min_fires=30)
    assert len(t.families) > 0
    assert t.families["induction"].isna().all() and (t.families["fires_repeated"] < 30).all()
    assert not (t.families["family"] == ch.FAMILIES[0]).any()


def test_top_positions_in_column_chunks_equal_the_whole_masked_tensor(monkeypatch):
    from weightscope.chapters import attention_saes as ch

    gen = torch.Generator().manual_seed(2)
    acts = torch.relu(torch.randn(3, 7, 30, generator=gen))  # [b, pos, d_sae], about half firing
    allowed = torch.zeros(3, 7, dtype=torch.long)
    allowed[:, 4:] = 1

    def naive(a, n, min_fires):  # the whole masked tensor, one feature at a time
        flat = a.flatten(0, 1)
        out = []
        for j in range(flat.shape[1]):
            if (flat[:, j] > 0).sum() >= min_fires:
                v, i = flat[:, j].topk(n)
                out += [(j, int(p) // 7, int(p) % 7) for p in i[v > 0]]
        return sorted(out), (flat > 0).sum(0)

    for mask in (None, allowed):
        want, want_fires = naive(acts if mask is None else acts * mask[..., None], 4, 3)
        for chunk in (21, 5 * 21, 10_000):  # one feature column at a time, five, all
            monkeypatch.setattr(ch, "CHUNK_ELEMENTS", chunk)
            f, b, d, fires = ch._top_positions(acts, 4, 3, allowed=mask)
            assert sorted(zip(f.tolist(), b.tolist(), d.tolist())) == want
            assert torch.equal(fires, want_fires)


def test_examples_rank_near_equal_activations_as_equal_and_keep_the_earlier_position():
    # stories that begin alike give equal or last-bit-apart activations at different positions; which one a
    # feature's examples use followed the processor's top-k kernel (chapter 4's families moved with it)
    from weightscope.chapters import attention_saes as ch

    a = torch.tensor(0.55819964)
    b = torch.nextafter(a, torch.tensor(1.0))
    for first, second in ((a, b), (b, a)):
        acts = torch.zeros(2, 4, 3)  # [rows, pos, d_sae]
        acts[0, 1, 0], acts[1, 0, 0], acts[1, 3, 0] = first, second, 0.9  # feature 0: one strong, two equal
        acts[1, 2, 2], acts[0, 3, 2] = second, first  # feature 2's peaks: equal, at rows 1 and 0
        f, row, dest, _ = ch._top_positions(acts, 2, 1)
        assert sorted(zip(f.tolist(), row.tolist(), dest.tolist())) == [(0, 0, 1), (0, 1, 3), (2, 0, 3),
                                                                       (2, 1, 2)]
        f1, r1, d1, _ = ch._top_positions(acts, 1, 1)
        assert list(zip(f1.tolist(), r1.tolist(), d1.tolist())) == [(0, 1, 3), (2, 0, 3)]
        acts[1, 3, 0] = 0  # now feature 0's peak is the near-equal pair: the earlier position wins
        f1, r1, d1, _ = ch._top_positions(acts, 1, 1)
        assert list(zip(f1.tolist(), r1.tolist(), d1.tolist())) == [(0, 0, 1), (2, 0, 3)]
        row, dest, feats = ch._dfa_peaks(acts, 1, 1)  # from destination 1 on: features 0 and 2 tie
        assert (feats.tolist(), row.tolist(), dest.tolist()) == ([0], [0], [1])  # the lower feature id
        row, dest, feats = ch._dfa_peaks(acts, 2, 1)  # from destination 2 on: feature 2 only
        assert (feats.tolist(), row.tolist(), dest.tolist()) == ([2], [0], [3])


def _on(loaded, device):
    """A `LoadedSAE` with its sae-lens SAE moved to `device`."""
    loaded.sae.to(device)
    loaded.sae.cfg.device = str(device)
    return loaded


@pytest.mark.parametrize("min_fires", [1, 30])  # 30: no feature fires enough on the repeated half
def test_text_analyses_on_each_device(device, min_fires):
    """DFA examples, families and recursive DFA with the model, SAEs and text on `device` equal the CPU's."""
    from weightscope.chapters import attention_saes as ch

    def run(device):
        model = tiny_model("LN", None).to(device)
        attn = [_on(saes._describe(attn_sae("standard", layer=layer, reshape="hook_z", seed=layer), "tiny",
                                   None, None, folded=False), device) for layer in (0, 1)]
        resid = {layer: _on(saes._describe(resid_sae(layer, "hook_resid_pre", seed=10 + layer), "tiny", None,
                                           None, folded=False), device) for layer in (0, 1)}
        cfg = ch.Config(dfa_features=3, n_examples=4, min_fires=min_fires, induction_len=8, induction_rows=3)
        return ch.text_analyses(model, attn, resid, tokens(model).to(device), cfg)

    want, got = run("cpu"), run(device)
    assert len(want["04_rdfa"]) and len(want["04_families"])
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=False, rtol=1e-4, atol=1e-5)


def test_text_analyses_report_each_layers_dfa_profiles_chunk_by_chunk(monkeypatch):
    """The held-out analyses advance a bar per step, and inside the families step a bar per layer over the DFA
    profiles' examples (over 100,000 a layer at GPT-2 small's width: the longest step), one chunk at a time;
    the profiles in chunks equal them in one piece."""
    from weightscope.chapters import attention_saes as ch

    bars = []

    class Bar:
        def __init__(self, total, enabled, desc, unit):
            self.total, self.desc, self.steps = total, desc, []
            bars.append(self)

        def update(self, n):
            self.steps.append(n)

        def close(self):
            pass

    monkeypatch.setattr(ch, "progress_bar", Bar)
    model = tiny_model("LN", None)
    attn = [saes._describe(attn_sae("standard", layer=layer, reshape="hook_z", seed=layer), "tiny", None,
                           None, folded=False) for layer in (0, 1)]
    cfg = ch.Config(dfa_features=3, n_examples=4, min_fires=1, induction_len=8, induction_rows=3)
    out = ch.text_analyses(model, attn, {}, tokens(model), cfg)
    steps, *profiles = bars
    assert steps.desc == "held-out text analyses" and steps.steps == [1] * 8
    assert [b.desc for b in profiles] == ["DFA profiles, layer 0", "DFA profiles, layer 1"]
    for b in profiles:
        assert b.total > 0 and sum(b.steps) == b.total
    c, W_eff, _, acts = ch._layer_pass(model, attn[1], tokens(model))
    f, b, d, _ = ch._top_positions(acts, cfg.n_examples, cfg.min_fires)
    bar = Bar(len(b), True, "chunks", "example")
    chunked = ch._dfa_profiles(c, W_eff, b, d, f, cfg.short_window, chunk=5, bar=bar)
    assert bar.steps == [5] * (len(b) // 5) + [len(b) % 5] * bool(len(b) % 5)
    for x, y in zip(chunked, ch._dfa_profiles(c, W_eff, b, d, f, cfg.short_window)):
        torch.testing.assert_close(x, y)
    assert len(out["04_families"])


def test_exact_splits_fail_a_split_off_by_more_than_rounding_and_say_so():
    from weightscope.chapters import attention_saes as ch

    ex = pd.DataFrame({"pre_activation": [2.0, 0.5, -3.0, 40.0], "activation": [2.0, 0.5, 0.0, 40.0],
                       "abs_error": [2e-7, 3e-6, 1e-7, 2e-4], "error_vs_sae_lens": [2e-7, 3e-6, 3.0, 2e-4]})
    # row 2 is inactive: sae-lens returns 0, so only its pre-activation counts; row 3's tolerance is 40 x 1e-5
    assert ch.exact_splits(ex).tolist() == [True, True, True, True]
    assert ch.exactness_sentence(ex).startswith("The split is exact in all 4 examples")
    ex.loc[1, "abs_error"] = 2e-5  # above 1e-5 x max(1, 0.5)
    ex.loc[3, "error_vs_sae_lens"] = 5e-4  # above 40 x 1e-5
    assert ch.exact_splits(ex).tolist() == [True, False, True, False]
    said = ch.exactness_sentence(ex)
    assert "NOT exact in 2 of 4" in said and "2.00e-04" in said and "5.00e-04" in said


def test_rdfa_check_says_exact_only_within_the_tolerance_and_names_a_larger_error():
    from types import SimpleNamespace

    from weightscope.chapters import attention_saes as ch

    def rows(part, pieces):  # one example: its DFA part and the pieces of its decomposition
        return [{"layer": 0, "feature": part, "part": float(part), "piece": p, "contribution": c}
                for p, c in pieces]

    rdfa = pd.DataFrame(rows(2, [("residual feature", 1.5), ("residual SAE error", 0.5 + 3e-6)])
                        + rows(50, [("residual feature", 40.0), ("residual SAE error", 10.0 + 4e-4)]))
    r = ch.rdfa_check(SimpleNamespace(rdfa=rdfa))  # gaps 3e-6 (<= 1e-5) and 4e-4 (<= 50 x 1e-5)
    assert (r["examples"], r["exact"]) == (2, 2)
    said = ch.rdfa_sentence(r)
    assert "in all 2 the pieces sum to the DFA part" in said and "e-0" not in said.split("fp32")[1]
    assert "median 23% of the part's size" in said  # median of 0.5/2 and 10/50 (plus the gaps): 0.225005
    rdfa.loc[rdfa["feature"] == 50, "contribution"] += 1e-3  # both pieces: gap 2.4e-3 > 5e-4
    said = ch.rdfa_sentence(ch.rdfa_check(SimpleNamespace(rdfa=rdfa)))
    assert "in 1 of 2 the pieces do NOT sum" in said and "= 2.40e-03" in said
    assert ch.rdfa_sentence({"examples": 0}).startswith("No residual SAE")


def test_the_chapter_loads_its_saes_one_layer_at_a_time(tmp_path, monkeypatch, sae_loads):
    """`load` gives both kinds of SAE as lazy sequences: the chapter then never holds more than two SAEs at
    once (a layer's attention SAE and the residual SAE joined to it, or the next attention SAE while the loop
    moves on), rather than every layer's of both kinds (35.8 GB at Gemma-2-2B's 26 blocks, estimated); and its
    tables equal those of the same SAEs given loaded, as a list and a {layer: SAE} dict."""
    import standins

    from weightscope.chapters import attention_saes as ch
    from weightscope.chapters.context import open_chapter
    from weightscope.load.sae_sequence import SAESequence

    if not standins.GPT2_TOKENIZER.is_dir():
        pytest.skip("needs ../shared/tokenizers/gpt2")
    params, _, _ = standins.build_target("llama", tmp_path, n_layers=4)
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "lazy"))
    ctx = open_chapter(str(params))
    model, attn, resid = ch.load(ctx)
    assert isinstance(attn, SAESequence) and isinstance(resid, SAESequence) and not sae_loads.alive
    config = ch.Config(top_k=4, n_null=2, text_rows=2, text_ctx=32, dfa_features=2, n_examples=2,
                       min_fires=1, induction_len=6, induction_rows=2)
    text = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    lazy = ch.run(ctx, config, model=model, attn=attn, resid=resid, text=text)
    assert len(sae_loads.alive) >= 2 * 4 and 1 <= sae_loads.most <= 2, f"{sae_loads.most} SAEs alive at once"
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "loaded"))
    loaded = ch.run(ctx, config, model=model, attn=[attn[i] for i in range(4)],
                    resid={s.layer: s for s in resid}, text=text)
    for name in ("shares", "top", "poly_heads", "writes", "examples", "parts", "families", "rdfa"):
        pd.testing.assert_frame_equal(getattr(lazy, name), getattr(loaded, name))
    assert lazy.rdfa["layer"].nunique() == 3 and lazy.writes["resid_hook"].notna().all()
