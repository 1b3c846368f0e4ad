"""Chapter 3's labelling rule and population statistics against hand-written expectations and brute force."""

from __future__ import annotations

import functools
import math
import threading

import numpy as np
import pandas as pd
import pytest

from weightscope.compute import populations as P


@pytest.mark.parametrize(
    "token, kind",
    [
        (" Lily", "word"), ("ing", "word"), (" the", "word"), ("▁the", "word"), ("Ġthe", "word"),
        ("n't", "word"), ("日本", "word"),
        ("x", "fragment"), ("'s", "fragment"), (" A1", "fragment"), ("▁a", "fragment"),
        ("...", "punct"), (',"', "punct"), (" (", "punct"), ("ĠâĢĶ", "punct"),  # GPT-2 piece of ' —'
        (" ", "space"), ("", "space"), ("\n", "space"), ("▁▁", "space"), ("Ġ", "space"), ("Ċ", "space"),
        (" 42", "digit"), ("3.14", "digit"), ("1990", "digit"),
        ("<0x0A>", "byte_special"), ("<s>", "byte_special"), ("</s>", "byte_special"),
        ("<unk>", "byte_special"), ("<|endoftext|>", "byte_special"), ("\x00", "byte_special"),
        ("\ufffd", "byte_special"),
        ("âĢ", "byte_special"),  # GPT-2 piece of a partial UTF-8 character
    ],
)
def test_token_kind(token, kind):
    assert P.token_kind(token) == kind


def test_token_kind_min_letters():
    assert P.token_kind(" ox") == "word"
    assert P.token_kind(" ox", min_letters=3) == "fragment"
    with pytest.raises(TypeError):
        P.token_kind(None)


def frame(rows):
    """A chapter-1-like table from (dec_top_tokens, dec_coherent) pairs."""
    return pd.DataFrame({"dec_top_tokens": [r[0] for r in rows],
                         "dec_coherent": pd.array([r[1] for r in rows], dtype="boolean")})


HAND = [  # (top tokens, coherent, expected label): written by hand from the rule in the module docstring
    ([" Lily", " lily", "Lil", " LILY", "lily"], True, "semantic"),  # one word's variants
    ([" cat", " cats", " kitten", ".", ","], True, "semantic"),  # words exactly 0.6
    ([".", ",", " ;", "!", "?"], True, "non-semantic"),  # coherent punctuation is still punctuation
    (["<0x0A>", "<s>", " 42", " ", " the"], True, "non-semantic"),  # 4/5 non-word kinds
    ([" the", " dog", " ran", " blue", " France"], False, "non-semantic"),  # words, but no coherence
    (["x", "y", " z", "q", "k"], True, "unclear"),  # coherent fragments
    ([" cat", " dog", ".", ",", "x"], True, "unclear"),  # mixed: 0.4 words, 0.4 non-words
    ([" cat", " cats", " kitten", " Cat", " kitty"], None, "unclear"),  # coherence unknown
    ([], True, "unclear"),  # no tokens
    ([], False, "non-semantic"),
]


def test_label_side_hand_built():
    df = frame([(t, c) for t, c, _ in HAND])
    labels = P.label_side(df, "dec")
    assert labels.name == "dec_label" and list(labels.cat.categories) == list(P.LABELS)
    assert labels.tolist() == [e for _, _, e in HAND]


def test_label_side_reads_parquet_arrays_and_m():
    tokens = np.array([" cat", " cats", " kitten", " Cat", " kitty", ".", ",", ";", "!", "?"], dtype=object)
    df = frame([(tokens, True)])
    assert P.label_side(df, "dec").tolist() == ["semantic"]  # first 5: all words
    assert P.label_side(df, "dec", m=10).tolist() == ["unclear"]  # 0.5 words, 0.5 non-words
    assert P.label_side(df, "dec", m=10, min_nonword_share=0.5).tolist() == ["non-semantic"]
    assert P.label_side(df, "dec", m=10, min_word_share=0.5).tolist() == ["semantic"]


def test_label_side_coherence_margin():
    df = frame([([" cat", " cats", " kitten", " Cat", " kitty"], True)]).assign(
        dec_string_sim=0.50, dec_thr_string_sim=0.45, dec_emb_cos=0.10, dec_thr_emb_cos=0.20)
    assert P.label_side(df, "dec", coherence_margin=0.01).tolist() == ["semantic"]  # 0.05 above the threshold
    assert P.label_side(df, "dec", coherence_margin=0.1).tolist() == ["unclear"]  # only marginally coherent


def test_label_errors_name_column_and_chapter():
    with pytest.raises(ValueError, match=r"dec_coherent.*chapter 1"):
        P.label_side(pd.DataFrame({"dec_top_tokens": [[" a"]]}), "dec")
    with pytest.raises(ValueError, match="side"):
        P.label_side(frame([([" a"], True)]), "out")
    with pytest.raises(ValueError, match="min_word_share"):
        P.label_side(frame([([" a"], True)]), "dec", min_word_share=1.5)
    with pytest.raises(ValueError, match="Unknown labelling parameter"):
        P.label_features(frame([([" a"], True)]), sides=("dec",), min_share=0.5)


def test_label_features_adds_shares():
    df = frame([(t, c) for t, c, _ in HAND])
    df["enc_top_tokens"] = df["dec_top_tokens"][::-1].to_list()  # the enc side: the same rows reversed
    df["enc_coherent"] = df["dec_coherent"][::-1].to_list()
    out = P.label_features(df)
    assert out["dec_label"].tolist() == [e for _, _, e in HAND]
    assert out["enc_label"].tolist() == [e for _, _, e in HAND][::-1]
    np.testing.assert_allclose(out["dec_word_share"].iloc[:7], [1.0, 0.6, 0.0, 0.2, 1.0, 0.0, 0.4])
    np.testing.assert_allclose(out["dec_nonword_share"].iloc[:7], [0.0, 0.4, 1.0, 0.8, 0.0, 0.0, 0.4])
    assert math.isnan(out["dec_word_share"].iloc[8])
    assert "dec_label" not in df.columns  # input untouched


def test_label_sensitivity_counts_add_up():
    df = frame([(t, c) for t, c, _ in HAND])
    grid = {"min_word_share": [0.2, 0.6, 1.0], "m": [3, 5], "min_nonword_share": [0.3, 0.9]}
    out = P.label_sensitivity(df, grid, sides=("dec",))
    assert len(out) == 7 * len(P.LABELS)
    totals = out.groupby(["parameter", "value", "side"])["n"].sum()
    assert (totals == len(df)).all()
    n = out.set_index(["parameter", "value", "label"])["n"]
    assert n[("min_word_share", 0.6, "semantic")] == 2  # the defaults reproduce test_label_side_hand_built
    assert n[("min_word_share", 1.0, "semantic")] == 1  # only the all-word ' Lily' row is left
    assert n[("min_word_share", 0.2, "semantic")] == 3  # the mixed ' cat', ' dog', '.', ',', 'x' row joins
    with pytest.raises(ValueError, match="Unknown"):
        P.label_sensitivity(df, {"q": [1]})


def test_relabelling_reuses_the_token_kinds_and_gives_the_same_labels(monkeypatch):
    df = frame([(t, c) for t, c, _ in HAND])
    grid = {"min_word_share": [0.2, 0.6, 1.0], "m": [3, 5, 8], "min_letters": [1, 2]}
    uncached = {(k, v): P.label_side(df, "dec", **{**P.LABEL_DEFAULTS, k: v}).value_counts()
                for k, values in grid.items() for v in values}
    calls = []
    original = P.kind_shares
    monkeypatch.setattr(P, "kind_shares", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    out = P.label_sensitivity(df, grid, sides=("dec",))
    assert len(calls) == 4  # distinct (m, min_letters): (5, 2) shared by 5 settings, (3, 2), (8, 2), (5, 1)
    for (k, v), counts in uncached.items():
        got = out[(out["parameter"] == k) & (out["value"] == v)].set_index("label")["n"]
        assert got.to_dict() == counts.reindex(list(P.LABELS), fill_value=0).to_dict(), (k, v)
    cache = {}
    labelled = P.label_features(df, sides=("dec",), cache=cache, m=3)
    assert set(cache) == {("dec", 3, 2)}
    pd.testing.assert_frame_equal(labelled, P.label_features(df, sides=("dec",), m=3))


# --- statistics -------------------------------------------------------------------------------------------


def brute_u(x, y):
    return sum((a > b) + 0.5 * (a == b) for a in x for b in y)


def brute_delta(x, y):
    return np.sign(np.subtract.outer(x, y)).mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_and_cliffs_delta_brute_force(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, size=9), rng.integers(1, 8, size=13)  # small integers: many ties
    u, p, r = P.mann_whitney(x, y)
    assert u == pytest.approx(brute_u(x, y))
    assert r == pytest.approx(brute_delta(x, y))
    assert P.cliffs_delta(x, y) == pytest.approx(brute_delta(x, y))
    assert 0 <= p <= 1


def test_mann_whitney_p_values():
    # no ties: U = 0, mean 4.5, variance 3*3*7/12 = 5.25, z = (4.5 - 0.5) / sqrt(5.25) = 1.7457,
    # p = 2 P(Z > z) = 0.0809 (normal table)
    u, p, r = P.mann_whitney([1, 2, 3], [4, 5, 6])
    assert (u, r) == (0.0, -1.0)
    assert p == pytest.approx(0.0808556, abs=1e-6)
    assert P.mann_whitney([1, 1, 1], [1, 1])[1] == 1.0  # all tied: no evidence of a shift
    assert all(math.isnan(v) for v in P.mann_whitney([], [1, 2]))


def naive_mann_whitney_p(x, y):
    """Two-sided p of U by the normal approximation, written out: tie-corrected variance, continuity 0.5."""
    n1, n2 = len(x), len(y)
    n = n1 + n2
    _, tie_sizes = np.unique(np.concatenate([x, y]), return_counts=True)
    variance = n1 * n2 / 12 * ((n + 1) - (tie_sizes**3 - tie_sizes).sum() / (n * (n - 1)))
    z = (abs(brute_u(x, y) - n1 * n2 / 2) - 0.5) / math.sqrt(variance)
    return math.erfc(z / math.sqrt(2))  # 2 P(Z > z)


def test_mann_whitney_p_matches_the_written_out_normal_approximation():
    rng = np.random.default_rng(3)
    cases = [(rng.integers(0, 5, 30), rng.integers(0, 6, 25)), (rng.normal(size=40), rng.normal(0.5, 1, 35))]
    for x, y in cases:
        u, p, _ = P.mann_whitney(x, y)
        assert u == pytest.approx(brute_u(x, y))
        assert p == pytest.approx(naive_mann_whitney_p(x, y), rel=1e-9)


def test_resample_statistics_equal_explicit_resamples():
    rng = np.random.default_rng(4)
    for n1, n2 in [(11, 8), (10, 7)]:  # odd and even sizes: the median takes one or two middle values
        xs = np.sort(rng.integers(0, 10, n1).astype(float))  # integers: ties between and within samples
        ys = np.sort(rng.integers(0, 10, n2).astype(float))
        ix, iy = rng.integers(0, n1, (6, n1)), rng.integers(0, n2, (6, n2))
        below, above = np.searchsorted(ys, xs, "left"), np.searchsorted(ys, xs, "right")
        got = P._resample_statistics(ix, iy, xs=xs, ys=ys, names=P.BOOTSTRAP_STATS, below=below, above=above)
        assert got.shape == (len(P.BOOTSTRAP_STATS), 6)
        for row in range(6):
            xr, yr = xs[ix[row]], ys[iy[row]]
            assert got[0, row] == pytest.approx(xr.mean() - yr.mean())
            assert got[1, row] == pytest.approx(np.median(xr) - np.median(yr))
            assert got[2, row] == pytest.approx(brute_delta(xr, yr))


def naive_percentile_bootstrap(x, y, stat, n_boot, ci, seed):
    """Percentile interval from explicit resamples, one at a time."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        xr, yr = rng.choice(x, len(x)), rng.choice(y, len(y))
        values.append({"mean_diff": xr.mean() - yr.mean(), "median_diff": np.median(xr) - np.median(yr),
                       "cliffs_delta": brute_delta(xr, yr)}[stat])
    return np.quantile(values, [(1 - ci) / 2, (1 + ci) / 2])


@pytest.mark.parametrize("stat", P.BOOTSTRAP_STATS)
def test_bootstrap_ci_agrees_with_explicit_resamples(stat):
    rng = np.random.default_rng(9)
    x, y = rng.normal(0.3, 1.0, 80), rng.exponential(1.0, 60)
    est, lo, hi = P.bootstrap_ci(x, y, stat, n_boot=4000, ci=0.9, seed=2)
    ref_lo, ref_hi = naive_percentile_bootstrap(x, y, stat, 4000, 0.9, seed=11)  # other draws
    # two Monte-Carlo estimates of the same interval: the ends agree to within 4.5% of its width (a
    # coverage of 0.85 or 0.95 instead of 0.9 moves an end by 5-11% of it on these samples)
    assert lo == pytest.approx(ref_lo, abs=0.045 * (ref_hi - ref_lo))
    assert hi == pytest.approx(ref_hi, abs=0.045 * (ref_hi - ref_lo))
    assert est == pytest.approx({"mean_diff": x.mean() - y.mean(), "median_diff": np.median(x) - np.median(y),
                                 "cliffs_delta": brute_delta(x, y)}[stat])


def test_bootstrap_ci_covers_truth_and_is_deterministic():
    rng = np.random.default_rng(5)
    x, y = rng.normal(1.0, 1.0, 3000), rng.normal(0.5, 1.0, 2000)
    truth = {"mean_diff": 0.5, "median_diff": 0.5,
             "cliffs_delta": 2 * 0.5 * math.erfc(-0.5 / 2) - 1}  # 2 P(X > Y) - 1 = 2 Phi(0.5 / sqrt 2) - 1
    for stat, true in truth.items():
        est, lo, hi = P.bootstrap_ci(x, y, stat, n_boot=500, seed=1)
        assert lo < true < hi and lo < est < hi, stat
    est, lo, hi = P.bootstrap_ci(x, y, "mean_diff", n_boot=500, seed=1)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(1 / 3000 + 1 / 2000), rel=0.2)  # normal-theory width
    assert P.bootstrap_ci(x, y, n_boot=300, seed=7) == P.bootstrap_ci(x, y, n_boot=300, seed=7)
    assert P.bootstrap_ci(x, y, n_boot=300, seed=7) != P.bootstrap_ci(x, y, n_boot=300, seed=8)


@pytest.mark.parametrize("stat", sorted(P.ONE_SAMPLE_STATS))
def test_one_sample_bootstrap_agrees_with_explicit_resamples(stat):
    x, fn = np.random.default_rng(3).exponential(1.0, 90), P.ONE_SAMPLE_STATS[stat]
    est, lo, hi = P.bootstrap_one(x, stat, n_boot=4000, ci=0.9, seed=2)
    rng = np.random.default_rng(11)  # other draws, one resample at a time
    ref_lo, ref_hi = np.quantile([fn(rng.choice(x, len(x))) for _ in range(4000)], [0.05, 0.95])
    assert est == pytest.approx(fn(x))
    assert lo == pytest.approx(ref_lo, abs=0.05 * (ref_hi - ref_lo))  # as in the two-sample test
    assert hi == pytest.approx(ref_hi, abs=0.05 * (ref_hi - ref_lo))
    assert P.bootstrap_one(x, stat, n_boot=300, seed=7) == P.bootstrap_one(x, stat, n_boot=300, seed=7)


def test_one_sample_bootstrap_small_and_bad_input():
    est, lo, hi = P.bootstrap_one([2.0, np.nan])  # the NaN dropped: one value left
    assert est == 2.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in P.bootstrap_one([]))
    with pytest.raises(ValueError, match="statistic"):
        P.bootstrap_one([1.0, 2.0], "mode")
    with pytest.raises(ValueError, match="n_boot"):
        P.bootstrap_one([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="coverage"):
        P.bootstrap_one([1.0, 2.0], ci=95)


class Counter:
    """A progress bar that keeps its count (the `streaming.progress_bar` interface)."""

    def __init__(self):
        self.n, self.lock = 0, threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.n += n


@pytest.mark.parametrize("n_x, n_y", [(3000, 2000), (40, 30)])  # one resample a batch; many a batch
def test_a_bootstraps_bar_counts_each_resample_once_and_leaves_the_interval_alone(n_x, n_y):
    rng = np.random.default_rng(2)
    x, y = rng.normal(1.0, 1.0, n_x), rng.normal(0.5, 1.0, n_y)
    bar = Counter()
    assert P.bootstrap_ci(x, y, "cliffs_delta", n_boot=300, seed=3, bar=bar) == P.bootstrap_ci(
        x, y, "cliffs_delta", n_boot=300, seed=3)
    assert bar.n == 300
    frame = pd.DataFrame({"label": ["semantic"] * n_x + ["non-semantic"] * n_y, "a": np.r_[x, y],
                          "b": np.r_[y, x]})
    P.compare_populations(frame, ["a", "b"], "label", n_boot=200, bar=bar)  # two columns, side by side
    assert bar.n == 300 + 2 * 200


def test_bootstrap_ci_small_and_bad_input():
    est, lo, hi = P.bootstrap_ci([1.0], [0.0, 2.0])
    assert est == 0.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(v) for v in P.bootstrap_ci([], [1.0, 2.0]))
    with pytest.raises(ValueError, match="statistic"):
        P.bootstrap_ci([1, 2], [3, 4], "t_stat")


def population_frame(seed=6):
    rng = np.random.default_rng(seed)
    labels = pd.Categorical(["semantic"] * 60 + ["non-semantic"] * 40 + ["unclear"] * 5, categories=P.LABELS)
    score = np.r_[rng.normal(2.0, 1.0, 60), rng.normal(0.0, 1.0, 40), rng.normal(1.0, 1.0, 5)]
    return pd.DataFrame({"label": labels, "score": score, "other": score[::-1].copy()})


def test_compare_populations():
    df = population_frame()
    out = P.compare_populations(df, ["score", "other"], "label", n_boot=300)
    row = out.set_index("column").loc["score"]
    sem, non = df.loc[df["label"] == "semantic", "score"], df.loc[df["label"] == "non-semantic", "score"]
    assert (row["n_a"], row["n_b"]) == (60, 40)
    assert row["mean_a"] == pytest.approx(sem.mean()) and row["p75_b"] == pytest.approx(non.quantile(0.75))
    assert row["mean_diff"] == pytest.approx(sem.mean() - non.mean())
    assert row["mean_diff_lo"] < row["mean_diff"] < row["mean_diff_hi"]
    assert row["cliffs_delta"] == pytest.approx(brute_delta(sem.to_numpy(), non.to_numpy()))
    assert row["cliffs_delta_lo"] > 0 and row["p_value"] < 1e-6
    assert row["U"] == pytest.approx(brute_u(sem.to_numpy(), non.to_numpy()))
    assert (out["p_holm"] >= out["p_value"]).all()


def test_in_threads_runs_side_by_side_in_order():
    both = threading.Barrier(2, timeout=10)  # broken (an error) unless two calls run at once

    def meet(i):
        both.wait()
        return i * i, threading.get_ident()

    out = P.in_threads(meet, range(4), workers=2)
    assert [v for v, _ in out] == [0, 1, 4, 9]
    assert len({thread for _, thread in out}) == 2
    assert P.in_threads(lambda i: -i, [3], workers=8) == [-3] and P.in_threads(abs, []) == []


def test_compare_populations_in_threads_equals_one_at_a_time(monkeypatch):
    df = population_frame().assign(third=lambda d: d["score"] ** 2)
    cols = ["score", "other", "third"]
    sequential = functools.partial(P.in_threads, workers=1)
    monkeypatch.setattr(P, "in_threads", sequential)
    one = P.compare_populations(df, cols, "label", n_boot=300, seed=3)
    monkeypatch.setattr(P, "in_threads", functools.partial(sequential.func, workers=3))
    pd.testing.assert_frame_equal(P.compare_populations(df, cols, "label", n_boot=300, seed=3), one)
    assert list(one["column"]) == cols


@pytest.mark.parametrize("n_b", [0, 1])
def test_compare_populations_tiny_population_gives_nan(n_b):
    df = population_frame()
    df = pd.concat([df[df["label"] != "non-semantic"], df[df["label"] == "non-semantic"].head(n_b)])
    row = P.compare_populations(df, ["score"], "label", n_boot=50).iloc[0]
    assert row["n_b"] == n_b and row["n_a"] == 60
    assert not math.isnan(row["mean_a"])
    for col in ("mean_diff", "mean_diff_lo", "cliffs_delta_hi", "U", "p_value", "p_holm"):
        assert math.isnan(row[col]), col
    assert math.isnan(row["mean_b"]) == (n_b == 0)


def test_summary_by_population():
    df = population_frame()
    df["label"] = df["label"].cat.add_categories(["empty"])
    out = P.summary_by_population(df, ["score"], by="label").set_index("population")
    sem = df.loc[df["label"] == "semantic", "score"]
    assert out.loc["semantic", "n"] == 60
    assert out.loc["semantic", "median"] == pytest.approx(sem.median())
    assert out.loc["semantic", "p75"] == pytest.approx(sem.quantile(0.75))
    assert out.loc["empty", "n"] == 0 and math.isnan(out.loc["empty", "mean"])
    with pytest.raises(ValueError, match="q_z_mean.*chapter 2"):
        P.summary_by_population(df, ["q_z_mean"], by="label")


def test_share_above_pooled_p75():
    df = pd.DataFrame({"label": list("aaaabbbb"), "score": np.arange(1.0, 9.0)})
    out = P.share_above_pooled_p75(df, "score", "label").set_index("population")
    assert out["pooled_p75"].iloc[0] == pytest.approx(6.25)
    assert out.loc["a", "share_above"] == 0.0 and out.loc["b", "share_above"] == 0.5


def naive_holm(p):
    """Holm's step-down adjustment, written out: i-th smallest of m p-values times (m - i), running max."""
    out, valid = np.full(len(p), np.nan), [i for i in range(len(p)) if not np.isnan(p[i])]
    running = 0.0
    for rank, i in enumerate(sorted(valid, key=lambda i: p[i])):
        running = max(running, min(1.0, (len(valid) - rank) * p[i]))
        out[i] = running
    return out


def test_holm():
    np.testing.assert_allclose(P.holm([0.01, 0.04, 0.03, np.nan])[:3], [0.03, 0.06, 0.06])
    assert math.isnan(P.holm([0.01, np.nan])[1])
    assert np.isnan(P.holm([np.nan, np.nan])).all() and len(P.holm([])) == 0
    rng = np.random.default_rng(12)
    for _ in range(20):
        p = rng.uniform(0, 0.2, rng.integers(1, 12))
        p[rng.uniform(size=len(p)) < 0.2] = np.nan
        np.testing.assert_allclose(P.holm(p), naive_holm(p), equal_nan=True)


# ----------------------------------------------------------------------------------------------------------
# Within-layer effects and the layer-stratified test
# ----------------------------------------------------------------------------------------------------------


def _stratified_statistic(values, is_a, strata):
    """T of van Elteren's test computed the slow way: every pair, inside every stratum."""
    T = 0.0
    for s in np.unique(strata):
        x, y = values[(strata == s) & is_a], values[(strata == s) & ~is_a]
        if len(x) and len(y):
            u = sum((xi > yi) + 0.5 * (xi == yi) for xi in x for yi in y)
            T += (u - len(x) * len(y) / 2) / (len(x) + len(y) + 1)
    return T


def test_stratified_rank_test_against_a_brute_force_permutation():
    rng = np.random.default_rng(5)
    strata = np.repeat([0, 1, 2], [30, 24, 18])
    is_a = rng.random(len(strata)) < 0.4
    values = np.round(rng.normal(size=len(strata)) + 0.35 * is_a + strata, 1)  # ties on purpose
    result = P.stratified_rank_test(values, is_a, strata)
    observed = _stratified_statistic(values, is_a, strata)
    assert result["statistic"] == pytest.approx(observed)
    perm = []
    for _ in range(1500):  # permute the labels inside each stratum only
        shuffled = is_a.copy()
        for s in np.unique(strata):
            shuffled[strata == s] = rng.permutation(is_a[strata == s])
        perm.append(_stratified_statistic(values, shuffled, strata))
    p_perm = float(np.mean(np.abs(perm) >= abs(observed) - 1e-12))
    assert result["p_value"] == pytest.approx(p_perm, abs=0.03)
    assert result["n_strata"] == 3 and -1 <= result["cliffs_delta"] <= 1


def test_stratified_test_is_not_fooled_by_a_layer_confound():
    rng = np.random.default_rng(6)
    strata = np.repeat([0, 1], 400)
    is_a = np.where(strata == 0, rng.random(800) < 0.8, rng.random(800) < 0.2)  # a sits mostly in layer 0
    values = rng.normal(size=800) + 2.0 * (strata == 0)  # layer 0 reads more; no effect of the label
    from scipy.stats import mannwhitneyu

    assert mannwhitneyu(values[is_a], values[~is_a]).pvalue < 1e-10  # the pooled comparison "finds" a difference
    strat = P.stratified_rank_test(values, is_a, strata)
    assert strat["p_value"] > 0.01 and abs(strat["cliffs_delta"]) < 0.15
    effects = P.within_layer_effects(
        pd.DataFrame({"layer": strata, "label": np.where(is_a, "semantic", "non-semantic"), "v": values}),
        "v", "label")
    assert effects["layer"].tolist() == [0, 1] and effects["cliffs_delta"].abs().max() < 0.2
    assert (effects["n_a"] + effects["n_b"]).tolist() == [400, 400]


def test_kind_shares_equal_a_row_by_row_count():
    """The vectorised count (each distinct token classified once) equals classifying every row's tokens."""
    from weightscope.compute.populations import NONWORD_KINDS, kind_shares, token_kind

    vocab = [" the", "Ġcat", ",", " 42", "  ", "ing", "<s>", "x", "...", " Lily", "âĢ", "▁the"]
    rng = np.random.default_rng(1)
    cells = [list(rng.choice(vocab, size=rng.integers(0, 8))) for _ in range(300)] + [None, np.array(["ing"])]
    df = pd.DataFrame({"dec_top_tokens": cells})
    got = kind_shares(df, "dec", m=5, min_letters=2)
    for i, cell in enumerate(cells):
        kinds = [token_kind(str(t), 2) for t in ([] if cell is None else list(cell)[:5])]
        assert got["n_tokens"].iloc[i] == len(kinds)
        if kinds:
            assert got["word_share"].iloc[i] == sum(k == "word" for k in kinds) / len(kinds)
            assert got["nonword_share"].iloc[i] == sum(k in NONWORD_KINDS for k in kinds) / len(kinds)
        else:
            assert np.isnan(got["word_share"].iloc[i])
    # chapter 1's Arrow list columns (chunked, as concatenated layers are) give the same shares
    from weightscope.compute.token_scores import list_column

    lists = [[] if c is None else [str(t) for t in c] for c in cells]
    arrow = pd.concat([pd.DataFrame({"dec_top_tokens": list_column(lists[:150])}),
                       pd.DataFrame({"dec_top_tokens": list_column(lists[150:])})], ignore_index=True)
    assert isinstance(arrow["dec_top_tokens"].dtype, pd.ArrowDtype)
    pd.testing.assert_frame_equal(kind_shares(arrow, "dec", m=5, min_letters=2), got)
    ids = pd.DataFrame({"dec_top_tokens": list_column(np.arange(6).reshape(3, 2))})
    with pytest.raises(ValueError, match="lists of token strings"):
        kind_shares(ids, "dec")


def test_ecdf_points_are_exact_and_the_steps_stay_within_one_over_points():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=5000), np.full(700, 0.25), [np.nan] * 9])  # ties and NaNs
    clean = values[~np.isnan(values)]
    x, share = P.ecdf_points(values, points=50)
    assert len(x) <= 50 and x[0] == clean.min() and x[-1] == clean.max() and np.all(np.diff(x) > 0)
    assert np.allclose(share, [(clean <= v).mean() for v in x])  # exact at each point, ties counted
    grid = np.linspace(clean.min(), clean.max(), 20001)
    drawn = share[np.searchsorted(x, grid, side="right") - 1]  # the steps as drawn (line_shape="hv")
    full = np.searchsorted(np.sort(clean), grid, side="right") / len(clean)
    assert np.abs(drawn - full).max() <= 1 / 49
    small, _ = P.ecdf_points(np.array([3.0, 1.0, 2.0]), points=50)
    assert small.tolist() == [1.0, 2.0, 3.0]  # fewer values than points: every value
    assert len(P.ecdf_points(np.array([np.nan]))[0]) == 0
