"""Chapter 6's steps on a tiny random model with stand-in SAEs: pairing, rule, reads, alignment, checks."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from weightscope.chapters import ffkv as ch
from weightscope.compute import ffkv

from test_ffkv import tiny_model


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


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))
    return SimpleNamespace(target=SimpleNamespace(target="test-ffkv"), dtype=torch.float32,
                           device=torch.device("cpu"), provenance=lambda **kw: {"chapter": kw})


VOCAB = [f"tok{i}" if i % 3 else f" word{i}" for i in range(50)]
CFG = ch.FFKVConfig(n_null=300, m_coherence=3, k=5)


def test_pairing_follows_the_site():
    assert ch.mlp_layer_for(StandInSAE(1)) == 1  # resid_post of L: written last by block L's MLP
    assert ch.mlp_layer_for(StandInSAE(1, hook="hook_resid_pre")) == 0
    assert ch.mlp_layer_for(StandInSAE(0, hook="hook_resid_pre")) is None


def test_config_errors_say_what_to_fix():
    with pytest.raises(ValueError, match="concentration_stat must be kurtosis or top_z"):
        replace(CFG, concentration_stat="neg_entropy").check(50)
    with pytest.raises(ValueError, match="key must be one of"):
        replace(CFG, key="down").check(50)


def test_rule_thresholds_are_null_quantiles():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"dec_kurtosis": rng.normal(size=50), "dec_string_sim": rng.random(50),
                       "dec_emb_cos": rng.random(50)})
    null = pd.DataFrame({c: rng.normal(size=400) for c in df.columns})
    out = ch._rule(df, null, CFG, "dec")
    t = {c: np.quantile(null[f"dec_{c}"], 0.95) for c in ("kurtosis", "string_sim", "emb_cos")}
    for i, row in df.iterrows():  # naive, row by row
        concentrated = row["dec_kurtosis"] > t["kurtosis"]
        coherent = row["dec_string_sim"] > t["string_sim"] or row["dec_emb_cos"] > t["emb_cos"]
        assert out.loc[i, "dec_predicts"] == (concentrated and coherent)
    assert out["dec_thr_stat"].iloc[0] == pytest.approx(t["kurtosis"])


def test_token_lens_rows_and_chance_level(ctx):
    model = tiny_model("swiglu")
    saes = [StandInSAE(0), StandInSAE(1)]
    rows = ch.token_lens(ctx, model, saes, CFG, VOCAB)
    counts = rows.groupby(["layer", "dictionary"]).size()
    assert counts[(0, "features")] == 40 and counts[(0, "neurons")] == 24 and counts[(0, "null")] == 300
    null = rows[rows["dictionary"] == "null"]
    # an independent null sample passes the concentration test at about its quantile's rate
    assert abs(null["dec_concentrated"].mean() - 0.05) < 0.03
    again = ch.token_lens(ctx, model, saes, CFG, VOCAB)  # read back from the per-layer cache
    pd.testing.assert_frame_equal(rows, again)


def test_reads_of_null_directions_beat_the_null_at_chance(ctx):
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


def test_reads_do_not_depend_on_a_directions_norm(ctx):
    model = tiny_model("swiglu")
    sae = StandInSAE(0)
    base = ch.reads_layer(model, sae, CFG)
    sae.W_dec = sae.W_dec * 7.0
    scaled = ch.reads_layer(model, sae, CFG)
    pd.testing.assert_frame_equal(base, scaled, rtol=1e-4, atol=1e-4)


def test_alignment_against_the_brute_force_cosine_matrix(ctx):
    model = tiny_model("gemma2")
    saes = [StandInSAE(0), StandInSAE(1)]
    out = ch.alignment(ctx, model, saes, CFG)
    values = {L: ffkv.value_vectors(ffkv.ff_block(model, L)) for L in (0, 1)}

    def cos(A, B):
        return torch.tensor([[float(F.cosine_similarity(a, b, dim=0)) for b in B] for a in A])

    rows = out["rows"]
    got = rows[(rows["direction"] == "SAE features vs value vectors") & (rows["layer"] == 1)]["max_cos"]
    expected = cos(saes[1].W_dec, torch.cat([values[0], values[1]])).max(1).values  # same and earlier blocks
    np.testing.assert_allclose(got.to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    got = rows[(rows["direction"] == "value vectors vs SAE features") & (rows["layer"] == 0)]["max_cos"]
    expected = cos(values[0], torch.cat([saes[0].W_dec, saes[1].W_dec])).max(1).values  # SAEs that see it
    np.testing.assert_allclose(got.to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    share = out["shares"].set_index(["direction", "layer"]).loc[("value vectors vs SAE features", 0)]
    assert share["unaligned"] == pytest.approx(float((expected < 0.3).float().mean()))
    assert share["aligned"] == pytest.approx(float((expected >= 0.9).float().mean()))


def test_activation_checks_are_exact_when_every_neuron_is_kept():
    model = tiny_model("gemma2")
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    checks = ch.activation_checks(model, [StandInSAE(0), StandInSAE(1)], tokens, replace(CFG, topk=24))
    neurons = checks[checks["dictionary"].str.startswith("neurons")]
    np.testing.assert_allclose(neurons["explained_variance"], 1.0, atol=1e-5)
    few = ch.activation_checks(model, [StandInSAE(1)], tokens, replace(CFG, topk=3), bos_id=int(tokens[0, 0]))
    row = few[few["dictionary"] == "neurons"].iloc[0]
    assert row["explained_variance"] < 1.0 and row["mean_l0"] == 3.0
    assert row["tokens"] == int((tokens != tokens[0, 0]).sum())  # BOS-like positions left out
    sae_row = few[few["dictionary"] == "features"].iloc[0]
    assert sae_row["mean_l0"] <= 4.0 and 0 < sae_row["alive"] <= 1


def test_summary_names_the_higher_dictionary_only_when_the_test_is_clear():
    n = 400
    lens_rows = pd.DataFrame({"dictionary": ["features"] * n + ["neurons"] * n + ["null"] * n,
                              "layer": 0, "row": list(range(n)) * 3,
                              "dec_predicts": [True] * 200 + [False] * 200 + [False] * 390 + [True] * 10
                              + [False] * n,
                              "enc_predicts": ([True] * 40 + [False] * 360) * 2 + [False] * n})
    reads = lens_rows[["dictionary", "layer", "row"]].assign(
        **{f"{r}_{s}": 0.0 for r in "qkv" for s in ("z_mean", "part_frac")})
    labels = lens_rows.assign(dec_label="non-semantic")
    directions = ["SAE features vs value vectors", "value vectors vs SAE features", "null vs value vectors"]
    align = {"rows": pd.DataFrame({"direction": directions, "max_cos": [0.5, 0.5, 0.5]})}
    out = ch.summary(lens_rows, reads, {"labels": labels}, align, None, CFG).set_index("measure")
    dec = out.loc["token lens, output side (decoder-unembedding): passes the rule"]
    assert dec["features"] == 0.5 and dec["neurons"] == 10 / n and dec["verdict"] == "features higher"
    enc = out.loc["token lens, input side (encoder-embedding): passes the rule"]
    assert enc["p"] > 0.5 and enc["verdict"] == "no clear difference"


def test_layer_measures_name_a_dictionary_only_when_every_layer_agrees():
    checks = pd.DataFrame({"dictionary": ["features", "neurons", "neurons (other TopK)"] * 3,
                           "layer": [0, 0, 0, 1, 1, 1, 2, 2, 2],
                           "explained_variance": [0.9, 0.5, 0.99, 0.8, 0.6, 0.99, 0.7, 0.4, 0.99],
                           "alive": [0.9, 1.0, 1.0, 1.0, 0.9, 1.0, 0.9, 1.0, 1.0]})
    ev = ch._layer_row("ev", checks, "explained_variance")
    assert ev["verdict"] == "features higher in every layer" and ev["neurons"] == pytest.approx(0.5)
    assert ch._layer_row("alive", checks, "alive")["verdict"] == "mixed across layers"
    shown = ch.for_people(pd.DataFrame([{**ev, "unit": "mean over layers"},
                                        {"measure": "m", "unit": "share of rows", "features": 0.0123,
                                         "neurons": 0.5, "null": np.nan, "p": 0.000123, "verdict": "x"}]))
    assert shown["features"].tolist() == ["0.80", "1.2%"] and shown["p"].tolist() == ["", "0.00012"]
