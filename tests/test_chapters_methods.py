"""Chapters 1-3 as one call each: parameter checks, derived tables and computed findings on small tables."""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from weightscope.chapters import CHAPTERS, attention, findings, output_tokens, populations
from weightscope.config.params import ParamsError


def test_every_chapter_module_has_a_config_and_a_run():
    for notebook, module in CHAPTERS.items():
        mod = importlib.import_module(module)
        assert callable(mod.run) and callable(mod.Config().problems), notebook


@pytest.mark.parametrize("module,bad,expected", [
    (output_tokens, dict(k=3, m_coherence=5, q_coherence=1.5, exclude_tokens=["bytes"]),
     ["m_coherence", "q_coherence", "exclude_tokens"]),
    (attention, dict(q_null=0.0, n_null=10, qk_summary="median"), ["q_null", "n_null", "qk_summary"]),
    (populations, dict(m=0, min_word_share=2.0, n_boot=5), ["min_word_share", "m = 0", "n_boot"]),
])
def test_config_lists_every_problem_at_once(module, bad, expected):
    with pytest.raises(ParamsError) as err:
        module.Config(**bad)
    for name in expected:
        assert name in str(err.value)


def test_model_dependent_checks():
    model = SimpleNamespace(cfg=SimpleNamespace(d_vocab=50, n_ctx=16))
    assert output_tokens.Config(k=50).problems(model.cfg) == []
    assert "d_vocab (50)" in output_tokens.Config(k=51).problems(model.cfg)[0]
    assert "n_ctx = 16" in attention.Config(qk_max_offset=16).problems(model.cfg)[0]
    assert attention.Config(qk_max_offset=15).problems(model.cfg) == []


@pytest.mark.parametrize("y,tol,shape", [
    ([0.1, 0.2, 0.3, 0.4], 0.05, "rises"), ([0.4, 0.3, 0.1], 0.05, "falls"), ([0.1, 0.3, 0.1], 0.05, "inverted U"),
    ([0.3, 0.1, 0.3], 0.05, "U"), ([0.2, 0.21, 0.19, 0.2], 0.05, "flat"),
    ([0.1, 0.3, 0.1, 0.3, 0.1], 0.05, "mixed (changes direction 3 times)"),
    ([0.1, 0.13, 0.16, 0.19], 0.05, "rises"),  # small steps add up to a rise
    ([0.1, 0.3, 0.27, 0.31, 0.1], 0.05, "inverted U"),  # a wiggle inside the tolerance is no turn
])
def test_curve_shape(y, tol, shape):
    assert findings.curve_shape(y, tol) == shape


def test_binomial_tolerance_and_formatting():
    assert findings.binomial_tolerance([0.1, 0.3], 100, 2.0) == pytest.approx(2 * np.sqrt(0.2 * 0.8 / 100))
    assert findings.number(1_500_000) == "1,500,000" and findings.number(0.912) == "0.91"
    assert findings.percent(0.032) == "3.2%" and findings.ratio(0.1, 0.0).startswith("n/a")


def _labelled(rng, n=300):
    layer = np.repeat([0, 1, 2], n // 3)
    label = rng.choice(["semantic", "non-semantic", "unclear"], size=n)
    frame = pd.DataFrame({"layer": layer, "feature": np.arange(n)})
    for s in populations.PHASES:
        frame[f"{s}_label"] = label
    for col in populations.ATTN:
        frame[col] = rng.normal(size=n) + layer
    return frame


def test_summary_by_layer_splits_every_layer_by_population():
    data = _labelled(np.random.default_rng(0))
    table = populations.by_layer(data)
    one = table[(table["phase"] == "decoder-unembedding") & (table["column"] == "query")]
    assert sorted(set(one["label"])) == ["non-semantic", "semantic", "unclear"]
    assert len(one) == 3 * 3  # layers x labels
    for r in one.itertuples():
        values = data.loc[(data["layer"] == r.layer) & (data["dec_label"] == r.label), "q_z_mean"]
        assert r.n == len(values) and r.mean == pytest.approx(values.mean())


def test_read_ecdfs_give_each_population_its_own_curve_on_every_phase_and_side():
    data = _labelled(np.random.default_rng(2))
    data.loc[data.index[:7], "enc_label"] = "semantic"  # the phases label differently
    curves = populations.read_ecdfs(SimpleNamespace(data=data), points=20)
    assert len(curves.groupby(["phase", "side", "label"])) == 2 * 3 * 3
    for (phase, side, label), curve in curves.groupby(["phase", "side", "label"]):
        s = {v: k for k, v in populations.PHASES.items()}[phase]
        col = {v: k for k, v in populations.ATTN.items()}[side]
        values = data.loc[data[f"{s}_label"] == label, col]
        assert len(curve) <= 20 and (curve["features"] == len(values)).all()
        assert curve["share"].iloc[-1] == 1.0 and curve["mean z"].iloc[-1] == values.max()
        assert np.allclose(curve["share"], [(values <= x).mean() for x in curve["mean z"]])


def test_compare_reports_pooled_and_within_layer_results():
    rng = np.random.default_rng(1)
    data = _labelled(rng)
    data.loc[data["dec_label"] == "semantic", "v_z_mean"] += 1.0  # a real effect on one side
    found = populations.compare(data, populations.Config(n_boot=200))
    assert len(found) == 6 and {"p_stratified", "cliffs_delta_within", "p_stratified_holm"} <= set(found)
    v = found[(found["phase"] == "decoder-unembedding") & (found["attention side"] == "value (OV)")].iloc[0]
    assert v["p_stratified_holm"] < 0.01 and v["cliffs_delta_within"] > 0.3
    t = SimpleNamespace(findings=found)
    sentences = populations.findings(t)
    assert len(sentences) == 6 and "within layers, semantic higher" in sentences[2]


def test_compare_in_threads_equals_one_at_a_time(monkeypatch):
    from weightscope.compute import populations as compute

    data = _labelled(np.random.default_rng(3))
    data.loc[data["enc_label"] == "semantic", "q_z_mean"] -= 0.5
    config = populations.Config(n_boot=200, seed=5)
    threaded = populations.compare(data, config)
    monkeypatch.setattr(compute, "in_threads", functools.partial(compute.in_threads, workers=1))
    pd.testing.assert_frame_equal(threaded, populations.compare(data, config))
    assert list(zip(threaded["phase"], threaded["column"])) == [
        (phase, col) for phase in populations.PHASES.values() for col in populations.ATTN]


def _tiny_chapter1():
    rows = []
    for population, shift in (("SAE features", 1.0), ("null: random", 0.0), ("null: shuffled", 0.0)):
        for layer in (0, 1, 2):
            rng = np.random.default_rng(layer)
            n = 200
            frame = {"population": population, "layer": layer, "feature": np.arange(n)}
            for side in ("dec", "enc"):
                frame[f"{side}_kurtosis"] = rng.normal(size=n) + shift * (layer + 1)
                frame[f"{side}_string_sim"] = rng.random(n)
                frame[f"{side}_emb_cos"] = rng.random(n) + 0.2 * shift
            rows.append(pd.DataFrame(frame))
    both = pd.concat(rows, ignore_index=True)
    cfg = output_tokens.Config(n_null=100).lens_config()
    for side in ("dec", "enc"):
        null = both[both["population"] == "null: random"]
        from weightscope.compute import lens
        both = lens.apply_rule(both, lens.thresholds(null, cfg, side), cfg, side)
    return both[both["population"] == "SAE features"], both[both["population"] != "SAE features"], cfg


def test_chapter1_derived_tables_and_findings():
    features, nulls, cfg = _tiny_chapter1()
    tests = output_tokens.per_test_rates(features, nulls)
    conj = tests[(tests["test"] == "both (the rule)") & (tests["population"] == "SAE features")]
    assert conj["rate"].iloc[0] == pytest.approx(features["dec_predicts"].mean())
    readings = output_tokens.readings(features, nulls, cfg, grid=(0.75,))
    own = readings[readings["anchor"] == output_tokens.OWN]
    assert (own["rate"] <= 0.25 + 1e-9).all()  # concentrated by the features' own 0.75 quantile: at most 25%
    t = output_tokens.Tables(features=features, nulls=nulls, token_kinds=pd.DataFrame(), fold_note="",
                             rates=output_tokens.rates(features, nulls), tests=tests, readings=readings,
                             sweeps=pd.DataFrame(), config=output_tokens.Config())
    found = output_tokens.findings(t)
    assert "rises" in found["depth"][0]  # the SAE's concentration grows with the layer in this table
    rate = features["dec_predicts"].mean()
    assert findings.percent(rate) in found["rates"][0]
