"""Chapter-1 lens: the folded output matrix, the null-anchored rule, and one SAE end to end on a tiny model."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.compute import lens


def tiny(norm: str) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=40, act_fn="gelu",
                                  normalization_type=norm, seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.ln_final.w.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_output_matrix_matches_the_norm_applied_to_a_direction(norm):
    model = tiny(norm)
    M, note = lens.output_matrix(model)
    d = torch.randn(16)
    x = d - d.mean() if norm == "LN" else d  # LayerNorm centres; the 1/scale factor is common to all tokens
    expected = (x * model.ln_final.w) @ model.W_U
    torch.testing.assert_close(d @ M, expected, rtol=1e-5, atol=1e-5)
    assert ("centring" in note) == (norm == "LN")
    assert lens.fold_note(model) == note  # the chapters' provenance note, without building M


def test_rule_uses_null_quantiles_and_both_tests():
    cfg = lens.LensConfig(q_concentration=0.9, q_coherence=0.9)
    null = pd.DataFrame({"dec_kurtosis": np.arange(100.0), "dec_string_sim": np.linspace(0, 0.5, 100),
                         "dec_emb_cos": np.linspace(0, 0.2, 100)})
    thr = lens.thresholds(null, cfg, "dec")
    assert thr["concentration"] == pytest.approx(np.quantile(np.arange(100.0), 0.9))
    feats = pd.DataFrame({"dec_kurtosis": [200.0, 200.0, 200.0, 1.0],
                          "dec_string_sim": [0.9, 0.0, 0.0, 0.9],
                          "dec_emb_cos": [0.0, 0.9, 0.0, 0.9]})
    out = lens.apply_rule(feats, thr, cfg, "dec")
    assert out["dec_concentrated"].tolist() == [True, True, True, False]
    assert out["dec_coherent"].tolist() == [True, True, False, True]
    assert out["dec_predicts"].tolist() == [True, True, False, False]


def test_analyse_sae_on_a_tiny_model():
    model = tiny("RMS")
    vocab = [f"t{i}" for i in range(model.cfg.d_vocab)]
    g = torch.Generator().manual_seed(0)
    sae = SimpleNamespace(d_sae=24, layer=0, W_enc=torch.randn(16, 24, generator=g), W_dec=torch.randn(24, 16, generator=g))
    out = lens.analyse_sae(sae, model, lens.LensConfig(k=5, m_coherence=3), vocab=vocab, n_null=50, seed=1)
    feats, nulls = out["features"], out["nulls"]
    assert len(feats) == 24 and set(nulls["population"]) == {"null: random", "null: shuffled"} and len(nulls) == 100
    for side in lens.SIDES:
        assert feats[f"{side}_predicts"].dtype == bool
        assert (feats[f"{side}_predicts"] <= feats[f"{side}_concentrated"]).all()
        # thresholds are constant within a layer and come from the null, not from the features
        assert feats[f"{side}_thr_concentration"].nunique() == 1
    # the top output token of feature 0 is the argmax of its folded scores
    M, _ = lens.output_matrix(model)
    assert feats.loc[0, "dec_top_tokens"][0] == vocab[int((sae.W_dec[0] @ M).argmax())]


def test_side_frame_takes_every_statistic_over_the_kept_tokens_only():
    g = torch.Generator().manual_seed(4)
    D, M, E = torch.randn(6, 8, generator=g), torch.randn(8, 30, generator=g), torch.randn(30, 8, generator=g)
    M[:, :10] = 5.0 * M[:, :1]  # ten near-identical tokens (like byte pieces), which would dominate the top
    keep = torch.arange(10, 30)
    vocab = [f"t{i}" for i in range(30)]
    cfg = lens.LensConfig(k=3, m_coherence=3)
    df = lens.side_frame(D, M[:, keep], E, vocab, cfg, prefix="dec", keep=keep, progress=False)
    with pytest.raises(ValueError, match="side_matrices"):  # all columns with a keep list: refused
        lens.side_frame(D, M, E, vocab, cfg, prefix="dec", keep=keep, progress=False)
    S = (D @ M)[:, keep].double().numpy()
    for row, s in zip(df.itertuples(), S):
        assert set(row.dec_top_ids) == set((keep[np.argsort(-s)[:3]]).tolist())
        assert min(row.dec_bottom_ids) >= 10
        c = s - s.mean()
        assert row.dec_kurtosis == pytest.approx((c**4).mean() / (c**2).mean() ** 2 - 3, rel=1e-4)
        assert row.dec_top_tokens == [vocab[i] for i in row.dec_top_ids]
    full = lens.side_frame(D, M, E, vocab, cfg, prefix="dec", progress=False)
    assert not np.allclose(full["dec_kurtosis"], df["dec_kurtosis"])


def test_side_matrices_are_gathered_once_per_sae_and_change_nothing(monkeypatch):
    model = tiny("LN")
    vocab = [f"t{i}" for i in range(model.cfg.d_vocab)]
    g = torch.Generator().manual_seed(2)
    sae = SimpleNamespace(d_sae=12, layer=0, W_enc=torch.randn(16, 12, generator=g),
                          W_dec=torch.randn(12, 16, generator=g))
    keep, cfg = torch.arange(5, 40), lens.LensConfig(k=4, m_coherence=3)
    folds, output_matrix = [], lens.output_matrix
    monkeypatch.setattr(lens, "output_matrix", lambda m: folds.append(1) or output_matrix(m))
    once = lens.analyse_sae(sae, model, cfg, vocab=vocab, n_null=20, seed=3, keep=keep)
    assert len(folds) == 1  # the features' and the three nulls' sides share one fold and gather
    given = lens.analyse_sae(sae, model, cfg, vocab=vocab, n_null=20, seed=3, keep=keep,
                             matrices=lens.side_matrices(model, keep))
    assert len(folds) == 2  # only side_matrices' own
    mats = lens.side_matrices(model, keep)
    assert mats["dec"].shape == mats["enc"].shape == (16, 35)
    torch.testing.assert_close(mats["enc"], model.W_E.T[:, keep])
    per_call = lens.sae_sides(sae.W_enc, sae.W_dec, model, cfg, vocab=vocab, keep=keep, progress=False)
    for name in ("features", "nulls"):
        pd.testing.assert_frame_equal(once[name], given[name])
    cols = [c for c in per_call.columns if c.endswith(("_kurtosis", "_top_tokens", "_entropy"))]
    pd.testing.assert_frame_equal(per_call[cols], once["features"][cols])
