"""Chapter 6 on a tiny random model with stand-in SAEs: contract, chapter 1's rule called, reads, alignment
against its null, held-out checks against a random dictionary, the summary, and one copy of the model."""

from __future__ import annotations

import dataclasses
import gc
import weakref
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from weightscope.chapters import ffkv as ch
from weightscope.chapters import output_tokens
from weightscope.compute import ffkv, lens
from weightscope.config.params import ParamsError

from test_ffkv import tiny_model

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_ffkv_baseline.md"


class StandInSAE(torch.nn.Module):
    """A TopK SAE with random weights, with the fields the chapter reads (as `load.saes.LoadedSAE`)."""

    def __init__(self, layer: int, d_model: int = 16, d_sae: int = 40, k: int = 4,
                 hook: str = "hook_resid_post"):
        super().__init__()
        g = torch.Generator().manual_seed(layer)
        self.W_enc = torch.randn(d_model, d_sae, generator=g)
        self.W_dec = F.normalize(torch.randn(d_sae, d_model, generator=g), dim=1)
        self.layer, self.d_sae, self.k = layer, d_sae, k
        self.hook_name, self.sae_id = f"blocks.{layer}.{hook}", f"stand-in-{layer}"
        self.sae = self

    def encode(self, x):
        return ffkv.topk_abs(F.relu(x @ self.W_enc), self.k)

    def decode(self, f):
        return f @ self.W_dec


WORDS = ("<s> the a cat dog sat ran big small red blue one two three four five six seven eight nine ten house "
         "tree car road sun moon star sky sea fish bird cow pig hen fox owl bee ant bat rat elk yak emu ape "
         "hat cup pen box cap").split()


def word_tokenizer():
    """A word-level tokenizer of 50 words (BOS first), built in memory: chapter 1 reads a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def lens_model(arch: str = "swiglu"):
    """The tiny model with a 50-word vocabulary (chapter 1's lens reads the tokenizer)."""
    model = tiny_model(arch)
    model.tokenizer = word_tokenizer()
    return model


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))
    return SimpleNamespace(params=SimpleNamespace(target="test-ffkv", neuronpedia=None, sae_source="local"),
                           dtype=torch.float32, device=torch.device("cpu"),
                           provenance=lambda **kw: {"chapter": kw})


CFG = ch.Config(n_null=300, m_coherence=3, k=5)


def test_pairing_follows_the_site():
    assert ch.mlp_layer_for(StandInSAE(1)) == 1  # resid_post of L: written last by block L's MLP
    assert ch.mlp_layer_for(StandInSAE(1, hook="hook_resid_pre")) == 0
    assert ch.mlp_layer_for(StandInSAE(0, hook="hook_resid_pre")) is None


def test_config_lists_every_problem_at_once():
    with pytest.raises(ParamsError) as err:
        ch.Config(topk=-3, concentration_stat="neg_entropy", key="down", m_coherence=20)
    text = str(err.value)
    for part in ("topk = -3", "concentration_stat 'neg_entropy'", "key 'down'", "m_coherence <= k"):
        assert part in text
    assert ch.Config(k=60).problems(SimpleNamespace(d_vocab=50))  # k beyond the vocabulary: chapter 1's check
    assert ch.Config().problems(SimpleNamespace(d_vocab=50)) == []


def test_notebook_parameters_are_the_config_fields():
    from weightscope.publish.book import notebook_defaults

    declared = set(notebook_defaults(NOTEBOOK)) - {"params_file"}
    assert declared == {f.name for f in dataclasses.fields(ch.Config)}


def test_a_bad_override_is_a_preflight_problem(tmp_path):
    from weightscope.config.params import load_target
    from weightscope.publish import preflight as pf
    from weightscope.publish.book import notebook_defaults

    params = tmp_path / "t.yaml"
    params.write_text("target: t\nmodel:\n  name: stories260K\nsaes:\n  source: demo\n"
                      "chapters: {06_ffkv_baseline: {topk: -3}}\n")
    target = load_target(params)
    dims = pf.ModelDims(n_layers=5, d_model=64, d_vocab=512)
    problems = pf.chapter_problems(target, "06_ffkv_baseline", notebook_defaults(NOTEBOOK), dims)
    assert len(problems) == 1 and "chapters.06_ffkv_baseline" in problems[0] and "topk = -3" in problems[0]


def test_sae_feature_rates_equal_chapter_ones(ctx, monkeypatch):
    model = lens_model()
    saes = [StandInSAE(0), StandInSAE(1)]
    gathers, side_matrices = [], lens.side_matrices
    monkeypatch.setattr(lens, "side_matrices", lambda *a: gathers.append(1) or side_matrices(*a))
    rows = ch.token_lens(ctx, CFG, model, saes)
    assert len(gathers) == 2  # once for chapter 1's two layers, once for the neurons' (model-only matrices)
    one = output_tokens.run(ctx, CFG.lens_config(), model=model, saes=saes)
    for side in lens.SIDES:
        mine = rows[rows["dictionary"] == "features"].groupby("layer")[f"{side}_predicts"].mean()
        theirs = one.features.groupby("layer")[f"{side}_predicts"].mean()
        pd.testing.assert_series_equal(mine, theirs)
        null = rows[rows["dictionary"] == "null"].groupby("layer")[f"{side}_predicts"].mean()
        ones_null = one.nulls[one.nulls["population"] == "null: random"].groupby("layer")[f"{side}_predicts"]
        pd.testing.assert_series_equal(null, ones_null.mean())
    counts = rows.groupby(["layer", "dictionary"]).size()
    assert counts[(0, "features")] == 40 and counts[(0, "neurons")] == 24 and counts[(0, "null")] == 300


def test_neurons_are_judged_by_chapter_ones_thresholds_over_content_tokens(ctx):
    model = lens_model()
    sae = StandInSAE(1)
    rows = ch.token_lens(ctx, CFG, model, [sae])
    neurons = rows[rows["dictionary"] == "neurons"].reset_index(drop=True)
    feats = rows[rows["dictionary"] == "features"]
    keep = lens.content_ids(model, CFG.exclude_tokens)
    M = lens.output_matrix(model)[0][:, keep]
    V = ffkv.value_vectors(ffkv.ff_block(model, 1))
    for i in range(len(neurons)):  # naive, row by row: the top token over the content tokens
        s = V[i] @ M
        assert neurons.loc[i, "dec_top_tokens"][0] == lens.token_strings(model)[int(keep[s.argmax()])]
        t = {c: feats[f"dec_thr_{c}"].iloc[0] for c in ("concentration", "string_sim", "emb_cos")}
        expected = neurons.loc[i, "dec_kurtosis"] > t["concentration"] and (
            neurons.loc[i, "dec_string_sim"] > t["string_sim"] or neurons.loc[i, "dec_emb_cos"] > t["emb_cos"])
        assert neurons.loc[i, "dec_predicts"] == expected


def test_reads_of_null_directions_beat_the_null_at_chance():
    model = tiny_model("gpt2")
    cfg = replace(CFG, n_null=4000, q_null=0.9)
    reads = ch.reads_layer(model, StandInSAE(0), cfg)
    assert set(reads["read_layer"]) == {1}  # block 0's write is read by layer 1's attention only
    null = reads[reads["dictionary"] == "null"]
    for r in ("q", "k", "v"):
        assert abs(null[f"{r}_part_frac"].mean() - 0.1) < 0.01
    last = ch.reads_layer(model, StandInSAE(1), cfg)
    assert last.empty  # no later attention reads the last block; its columns stay numeric for concatenation
    both = pd.concat([reads, last], ignore_index=True)
    assert all(pd.api.types.is_numeric_dtype(both[c]) for c in both.columns if c != "dictionary")


def test_reads_do_not_depend_on_a_directions_norm():
    model = tiny_model("swiglu")
    sae = StandInSAE(0)
    base = ch.reads_layer(model, sae, CFG)
    sae.W_dec = sae.W_dec * 7.0
    scaled = ch.reads_layer(model, sae, CFG)
    pd.testing.assert_frame_equal(base, scaled, rtol=1e-4, atol=1e-4)


def cos(A, B):
    return torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in B] for a in A])


def test_alignment_against_the_brute_force_cosine_matrix():
    model = tiny_model("gemma2")
    saes = [StandInSAE(0), StandInSAE(1)]
    rows = ch.alignment_rows(model, saes, CFG)
    values = {L: ffkv.value_vectors(ffkv.ff_block(model, L)) for L in (0, 1)}
    real = rows[rows["population"] == "real"]
    got = real[(real["direction"] == ch.FEATURES_SIDE) & (real["layer"] == 1)]
    expected = cos(saes[1].W_dec, torch.cat([values[0], values[1]])).max(1).values  # same and earlier blocks
    np.testing.assert_allclose(got["max_cos"].to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert (got["set_size"] == 48).all()
    got = real[(real["direction"] == ch.NEURONS_SIDE) & (real["layer"] == 0)]["max_cos"]
    expected = cos(values[0], torch.cat([saes[0].W_dec, saes[1].W_dec])).max(1).values  # SAEs that see it
    np.testing.assert_allclose(got.to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    shares = ch.alignment_shares(rows, CFG).set_index(["direction", "layer"]).loc[(ch.NEURONS_SIDE, 0)]
    assert shares["unaligned"] == pytest.approx(float((expected < 0.3).float().mean()))
    null = rows[(rows["population"] == "null") & (rows["direction"] == ch.NEURONS_SIDE) & (rows["layer"] == 0)]
    assert shares["median (null)"] == pytest.approx(float(torch.tensor(null["max_cos"].to_numpy()).median()))
    assert shares["median excess"] == pytest.approx(shares["median"] - shares["median (null)"])


def test_alignment_null_is_one_draw_per_side_compared_with_each_set_once(monkeypatch):
    model = tiny_model("gemma2")
    saes = [StandInSAE(0), StandInSAE(1)]
    calls, real_max_cosine = [], ffkv.max_cosine
    monkeypatch.setattr(ffkv, "max_cosine",
                        lambda A, B, **kw: calls.append(len(B)) or real_max_cosine(A, B, **kw))
    rows = ch.alignment_rows(model, saes, CFG)
    assert len(calls) == 4  # the features' null with 2 blocks, the neurons' with 2 decoders (not 3 + 3 pairs)
    values = torch.cat([ffkv.value_vectors(ffkv.ff_block(model, L)) for L in (0, 1)])
    null = rows[(rows["population"] == "null") & (rows["direction"] == ch.FEATURES_SIDE)]
    first, second = (null[null["layer"] == L]["max_cos"].to_numpy() for L in (0, 1))
    n = max(CFG.n_null, saes[1].d_sae)
    expected = cos(ffkv.random_atoms(n, values.shape[1], seed=CFG.seed), values).max(1).values
    np.testing.assert_allclose(second, expected.numpy(), rtol=1e-5, atol=1e-6)  # layer 1 sees both blocks
    assert (second >= first).all() and (second > first).any()  # the same rows: layer 0 sees a subset


def test_alignment_excess_finds_planted_copies_and_not_chance():
    model = tiny_model("swiglu")
    sae = StandInSAE(1)
    plain = ch.alignment_shares(ch.alignment_rows(model, [sae], CFG), CFG).set_index("direction")
    assert abs(plain.loc[ch.FEATURES_SIDE, "aligned excess"]) < 0.05  # random rows: no excess over the null
    V = ffkv.value_vectors(ffkv.ff_block(model, 1))
    sae.W_dec = torch.cat([F.normalize(V[:20], dim=1), sae.W_dec[20:]])  # half the features copy a neuron
    planted = ch.alignment_shares(ch.alignment_rows(model, [sae], CFG), CFG).set_index("direction")
    assert planted.loc[ch.FEATURES_SIDE, "aligned excess"] == pytest.approx(0.5, abs=0.05)


def test_random_dictionary_code_reconstructs_what_it_spans_and_matches_least_squares():
    atoms = ffkv.random_atoms(30, 8, seed=3)
    g = torch.Generator().manual_seed(0)
    planted = torch.zeros(50, 30)
    planted[:, :2] = torch.randn(50, 2, generator=g) * 3  # two atoms per token: a known answer
    y = planted @ atoms
    y_hat, uses = ffkv.random_dictionary_code(y - y.mean(0) + y.mean(0), atoms, k=8)
    assert ffkv.explained_variance(y, y_hat) == pytest.approx(1.0, abs=1e-4)  # k = d: anything is spanned
    y = torch.randn(40, 8, generator=g)
    y_hat, uses = ffkv.random_dictionary_code(y, atoms, k=3)
    mu = y.mean(0)
    for i in range(len(y)):  # naive reference: pick the 3 atoms of largest |cos|, least squares on them
        x = y[i] - mu
        idx = (atoms @ x).abs().topk(3).indices
        A = atoms[idx].T
        coef = torch.linalg.pinv(A) @ x
        torch.testing.assert_close(y_hat[i], A @ coef + mu, rtol=1e-4, atol=1e-4)
    assert int(uses.sum()) == 40 * 3
    assert ffkv.alive_share(uses, 40, 0.1) == float((uses >= 4).float().mean())


def test_least_squares_by_normal_equations_equals_lstsq_and_solves_dependent_atoms():
    g = torch.Generator().manual_seed(5)
    S, x = F.normalize(torch.randn(6, 3, 8, generator=g), dim=2), torch.randn(6, 8, 1, generator=g)
    torch.testing.assert_close(ffkv._least_squares(S, x), torch.linalg.lstsq(S.transpose(1, 2), x).solution,
                               rtol=1e-4, atol=1e-5)
    S[2, 1] = 0  # a zero atom: Cholesky cannot factor that system, the pseudo-inverse solves it
    assert torch.linalg.cholesky_ex(S[2] @ S[2].T).info > 0
    coef = ffkv._least_squares(S, x)[2]
    best = torch.linalg.pinv(S[2].T) @ x[2]  # the minimum residual
    assert torch.isfinite(coef).all()
    residual = [(S[2].T @ c - x[2]).norm() for c in (coef, best)]
    torch.testing.assert_close(residual[0], residual[1], rtol=1e-4, atol=1e-5)


def test_random_dictionary_code_bounds_its_working_set(monkeypatch):
    """A dense code (a random SAE has thousands of features on per token) gathers [chunk, d, k] atoms: the
    chunk shrinks to the budget and the code is unchanged; k >= d codes exactly without least squares."""
    atoms = ffkv.random_atoms(40, 8, seed=4)
    y = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    whole, uses = ffkv.random_dictionary_code(y, atoms, k=5)
    gathered = []
    real_solve = ffkv._least_squares
    monkeypatch.setattr(ffkv, "_least_squares", lambda S, x: gathered.append(S.numel()) or real_solve(S, x))
    monkeypatch.setattr(ffkv, "CODE_ELEMENTS", 8 * 5 * 4)  # four tokens' atoms at a time
    small, small_uses = ffkv.random_dictionary_code(y, atoms, k=5)
    assert max(gathered) == 8 * 5 * 4 and len(gathered) == 8
    torch.testing.assert_close(small, whole)
    assert torch.equal(small_uses, uses)
    gathered.clear()
    exact, exact_uses = ffkv.random_dictionary_code(y, atoms, k=12)
    assert not gathered and torch.equal(exact, y) and int(exact_uses.sum()) == 30 * 12
    naive = (y - y.mean(0)) @ atoms.T  # each token's 12 atoms of largest |cosine|, counted in any order
    assert torch.equal(exact_uses, torch.bincount(naive.abs().topk(12).indices.reshape(-1), minlength=40))


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_hooks_in_turn_equal_one_pass_and_hold_only_what_is_still_read(arch):
    """The activations a stretch of blocks at a time equal one full pass's (BOS positions dropped), in the
    order of each group's last block; a hook no later group reads is released before the next stretch."""
    model = tiny_model(arch)
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    bos = int(tokens[0, 0])
    groups = [["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"],
              ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"], ["blocks.0.hook_mlp_out"]]
    _, cache = model.run_with_cache(tokens)
    keep = (tokens != bos).reshape(-1)
    order, refs = [], {}
    for i, acts in ch.hooks_in_turn(model, tokens, groups, bos_id=bos, batch_rows=3):
        gc.collect()
        order.append(i)
        alive = {h for h, r in refs.items() if r() is not None}
        read_later = {h for g in groups if groups.index(g) not in order for h in g}
        assert alive <= read_later | set(acts), f"held after their last group: {alive - read_later}"
        assert sorted(acts) == sorted(groups[i])
        for h, a in acts.items():
            want = cache[h].reshape(-1, cache[h].shape[-1])[keep]
            torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)
            refs[h] = weakref.ref(a)
        del acts, a
    assert order == [2, 0, 1]
    with pytest.raises(ValueError, match="block hooks only"):
        next(ch.hooks_in_turn(model, tokens, [["hook_embed"]]))


def test_activation_checks_are_exact_when_every_neuron_is_kept():
    model = tiny_model("gemma2")
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    checks = ch.activation_checks(model, [StandInSAE(0), StandInSAE(1)], tokens, replace(CFG, topk=24))
    neurons = checks[checks["dictionary"].str.startswith("neurons")]
    np.testing.assert_allclose(neurons["explained_variance"], 1.0, atol=1e-5)
    few = ch.activation_checks(model, [StandInSAE(1)], tokens, replace(CFG, topk=3), bos_id=int(tokens[0, 0]))
    row = few[few["dictionary"] == "neurons"].iloc[0]
    assert row["explained_variance"] < 1.0 and row["mean_l0"] == 3.0 and row["null k"] == 3
    assert row["tokens"] == int((tokens != tokens[0, 0]).sum())  # BOS-like positions left out
    assert row["explained_variance (null)"] < 1.0 and 0 <= row["active (null)"] <= 1
    sae_row = few[few["dictionary"] == "features"].iloc[0]
    assert sae_row["mean_l0"] <= 4.0 and 0 < sae_row["active"] <= 1


def test_both_topk_codes_share_one_random_dictionary_code(monkeypatch):
    model = tiny_model("gemma2")
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    calls, real_code = [], ffkv.random_dictionary_code
    monkeypatch.setattr(ffkv, "random_dictionary_code", lambda y, a, k: calls.append(k) or real_code(y, a, k))
    checks = ch.activation_checks(model, [StandInSAE(1)], tokens, replace(CFG, topk=3))
    assert len(calls) == 2  # one for both TopK codes of the MLP output (same y, atoms, k), one for the SAE's
    neurons = checks[checks["dictionary"].str.startswith("neurons")]
    assert neurons["explained_variance (null)"].nunique() == 1 and neurons["null k"].tolist() == [3, 3]


def test_sae_code_in_chunks_is_the_whole_code():
    sae = StandInSAE(0)
    site = torch.randn(30, 16, generator=torch.Generator().manual_seed(3))
    whole = sae.encode(site)
    recon, uses = ch.sae_code(sae, site, chunk_elements=7 * sae.d_sae)  # 7 tokens at a time, 5 chunks
    torch.testing.assert_close(recon, sae.decode(whole))
    assert torch.equal(uses, (whole != 0).sum(0))


def test_active_share_counts_the_dictionary_own_code_not_its_null():
    # one latent in every token's code: active share 1/m, whatever the random dictionary uses
    y = torch.randn(50, 16, generator=torch.Generator().manual_seed(4))
    uses = torch.zeros(40, dtype=torch.long)
    uses[3] = 50
    row = ch._check_row("features", 0, 0, "site", y, y, uses, CFG, {})
    assert row["mean_l0"] == 1.0 and row["active"] == pytest.approx(1 / 40) and row["active (null)"] > 0.05


def test_activity_threshold_can_fail():
    # a latent in the code on too few tokens is not active, whatever its other values
    uses = torch.tensor([0, 1, 5, 100])
    assert ffkv.alive_share(uses, 1000, 0.001) == 0.75
    assert ffkv.alive_share(uses, 1000, 0.01) == 0.25


def _weights(n: int, dec_f, dec_n, dec_null):
    lens_rows = pd.DataFrame({"dictionary": ["features"] * n + ["neurons"] * n + ["null"] * n, "layer": 0,
                              "row": list(range(n)) * 3, "dec_predicts": dec_f + dec_n + dec_null,
                              "enc_predicts": [False] * (3 * n), "dec_top_tokens": [[" a", " b"]] * (3 * n),
                              "dec_coherent": False})
    reads = lens_rows[["dictionary", "layer", "row"]].assign(
        **{f"{r}_{s}": 0.0 for r in "qkv" for s in ("z_mean", "part_frac")})
    align = pd.DataFrame({"direction": [ch.FEATURES_SIDE] * 2 * n + [ch.NEURONS_SIDE] * 2 * n,
                          "population": (["real"] * n + ["null"] * n) * 2,
                          "max_cos": [0.95] * (n // 2) + [0.5] * (n // 2) + [0.5] * n  # features: half aligned
                          + [0.95] * (n // 2) + [0.5] * (n // 2) + [0.95] * (n // 2) + [0.5] * (n // 2)})
    return {"lens_rows": lens_rows, "reads": reads, "alignment": align}


def test_summary_compares_each_dictionary_against_its_own_null():
    n = 400
    w = _weights(n, [True] * 200 + [False] * 200, [False] * 390 + [True] * 10, [False] * n)
    out = ch.summary(w, None, CFG).set_index("measure")
    dec = out.loc["token lens, output side (decoder-unembedding): passes chapter 1's rule"]
    assert dec["features"] == 0.5 and dec["neurons"] == 10 / n and dec["verdict"] == "features higher"
    assert dec["features null"] == 0.0 and dec["neurons excess"] == 10 / n
    enc = out.loc["token lens, input side (encoder-embedding): passes chapter 1's rule"]
    assert enc["p"] == 1.0 and enc["verdict"] == "no clear difference"
    # neurons reach 50% aligned, but so do random directions against the same set: no excess
    al = out.loc[f"alignment: max cosine to the other dictionary >= {CFG.aligned}"]
    assert al["neurons"] == 0.5 and al["neurons excess"] == 0.0 and al["features excess"] == 0.5
    assert al["verdict"] == "features higher"


def test_layer_measures_name_a_dictionary_only_when_every_layer_agrees():
    checks = pd.DataFrame({"dictionary": ["features", "neurons"] * 3, "layer": [0, 0, 1, 1, 2, 2],
                           "explained_variance": [0.9, 0.5, 0.8, 0.6, 0.7, 0.4],
                           "explained_variance (null)": [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],
                           "active": [0.9, 1.0, 1.0, 0.9, 0.9, 1.0],
                           "active (null)": [0.9, 0.5, 0.9, 0.5, 0.9, 0.5]})
    ev = ch._layer_row("ev", checks, "explained_variance")
    assert ev["verdict"] == "features higher in every layer" and ev["neurons"] == pytest.approx(0.5)
    assert ev["features excess"] == pytest.approx(0.5)
    active = ch._layer_row("active", checks, "active")  # neurons are higher only against their own null
    assert active["verdict"] == "neurons higher in every layer"
    shown = ch.for_people(pd.DataFrame([{**ev, "unit": "mean over layers"}]))
    assert shown["features"].tolist() == ["0.80"] and shown["features excess"].tolist() == ["+0.50"]


def test_run_holds_one_copy_of_the_model(ctx, monkeypatch):
    """The weights-only model is released before the full model is loaded for the held-out checks."""
    saes = [StandInSAE(1)]
    held = {}

    def load_model_and_saes(mlp):
        model = lens_model()
        held["ref"] = weakref.ref(model)
        return model, saes

    def load_full_model():
        gc.collect()
        held["alive when the full model loads"] = held["ref"]() is not None
        return tiny_model("swiglu")

    ctx.load_model_and_saes, ctx.load_full_model = load_model_and_saes, load_full_model
    ctx.held_out_rows = lambda full, n, row_len: (torch.randint(0, 50, (2, 8)), None)
    t = ch.run(ctx, CFG)
    assert held["alive when the full model loads"] is False
    found = ch.findings(t)
    assert len(found["lens"]) == 2 and "pass chapter 1's rule" in found["lens"][0]
    assert found["summary"][0].startswith(f"Of {len(t.summary)} measures")


def test_run_sets_the_weights_only_tables_aside_during_the_held_out_checks(ctx, monkeypatch):
    """The weights-only tables that grow with layers x rows (1.1 GB at GPT-2 small's width, 12 blocks) wait
    on disk while the full model runs the held-out text, where the chapter peaks, and come back equal."""
    ctx.load_model_and_saes = lambda mlp: (lens_model(), [StandInSAE(1)])
    ctx.load_full_model = lambda: tiny_model("swiglu")
    ctx.held_out_rows = lambda full, n, row_len: (torch.randint(0, 50, (2, 8)), None)
    refs, copies, alive = {}, {}, []
    real_tables, real_checks = ch.weight_tables, ch.held_out_checks

    def weight_tables(*args):
        tables = real_tables(*args)
        refs.update({name: weakref.ref(tables[name]) for name in ch.GROWN})
        copies.update({name: frame.copy() for name, frame in tables.items()})
        return tables

    def held_out_checks(*args, **kw):
        gc.collect()
        alive.extend(name for name, ref in refs.items() if ref() is not None)
        return real_checks(*args, **kw)

    monkeypatch.setattr(ch, "weight_tables", weight_tables)
    monkeypatch.setattr(ch, "held_out_checks", held_out_checks)
    t = ch.run(ctx, CFG)
    assert refs and alive == []
    for name, frame in copies.items():
        pd.testing.assert_frame_equal(getattr(t, name), frame)


def test_page_tables_for_the_plots():
    reads = pd.DataFrame({"dictionary": ["features"] * 3, "distance": [1, 1, 2], "q_part_frac": [0.1, 0.3, 0.5],
                          "k_part_frac": 0.0, "v_part_frac": 1.0})
    long = ch.reads_by_distance(reads).set_index(["distance", "read"])["share"]
    assert long[(1, "query")] == pytest.approx(0.2) and long[(2, "value (OV)")] == 1.0
    checks = pd.DataFrame({"dictionary": ["features"], "layer": [0], "explained_variance": [0.9],
                           "explained_variance (null)": [0.4]})
    shown = ch.checks_long(checks).set_index("code")["explained variance"]
    assert shown["features"] == 0.9 and shown["features: random dictionary"] == 0.4


def test_activation_checks_on_each_device(device):
    """The held-out checks (each code beside its random dictionary's) with the model, SAEs and tokens on
    `device` equal the CPU's: the random atoms are drawn on the CPU and the code is taken beside the
    activations."""
    def on(sae):
        sae.W_enc, sae.W_dec = sae.W_enc.to(device), sae.W_dec.to(device)
        return sae

    model = tiny_model("gemma2")
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    cfg, bos = replace(CFG, topk=3), int(tokens[0, 0])
    want = ch.activation_checks(model, [StandInSAE(0), StandInSAE(1)], tokens, cfg, bos_id=bos)
    # the tokens stay on the CPU, as `ctx.held_out_rows` returns them
    got = ch.activation_checks(model.to(device), [on(StandInSAE(0)), on(StandInSAE(1))], tokens, cfg,
                               bos_id=bos)
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-4, atol=1e-5)


def test_held_out_checks_count_each_code_on_their_bar(monkeypatch):
    """The held-out checks advance their bar once per code (seconds apiece at a real width), not per SAE."""
    counts = []

    class Bar:
        def __init__(self, total, *args, **kwargs):
            self.total, self.n = total, 0
            counts.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(ch, "progress_bar", Bar)
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    checks = ch.activation_checks(tiny_model("gemma2"), [StandInSAE(0), StandInSAE(1)], tokens,
                                  replace(CFG, topk=3))
    (bar,) = counts
    assert bar.n == bar.total == len(checks) == 2 * ch.CHECKS_PER_SAE


def test_run_loads_the_saes_one_at_a_time(lazy_standin, sae_loads):
    """With the SAEs as the book loads them (`SAESequence`: each loaded when reached), the chapter never holds
    more than the SAE in use and the one a loop is loading after it, rather than every SAE of the target
    (34 GB at Llama-3.1-8B's 32 layers); a rerun with every step cached loads only what `blocks` describes;
    and the alignment (the step that compares every SAE with every earlier MLP block) is the same whether the
    SAEs come lazily or in a list."""
    ctx = lazy_standin
    ctx.held_out_rows = lambda full, n, row_len: (torch.randint(0, 1000, (2, 16)), None)
    model, saes = ctx.load_model_and_saes(mlp=True)
    lazy = ch.alignment_rows(model, saes, CFG)
    listed = ch.alignment_rows(model, [saes[i] for i in range(len(saes))], CFG)
    pd.testing.assert_frame_equal(lazy, listed)
    sae_loads.reset()
    t = ch.run(ctx, CFG, model=model, saes=saes)
    assert set(t.alignment["layer"]) == {0, 1, 2, 3} and len(t.checks) == 3 * 4
    assert 1 <= sae_loads.most <= 2, f"{sae_loads.most} SAEs alive at once"
    sae_loads.reset()
    ch.run(ctx, CFG, model=model, saes=saes)  # every table cached: only `blocks` reads the SAEs
    assert len(sae_loads.alive) == len(saes)
