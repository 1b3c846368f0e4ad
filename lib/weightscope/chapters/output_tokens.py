"""Chapter 1 in one call: which SAE features directly predict (or read) tokens, with every rate beside a null.

    config = output_tokens.Config(k=10, ...)        # checks its parameters, all problems in one message
    tables = output_tokens.run(ctx, config, model=model, saes=saes)

`run` owns the caching (per layer), the provenance, the `01_features` table chapters 2 and 3 read, and the
derived tables the page plots: rates per layer, each test's rate beside the nulls', the rule read with
thresholds from the features' own quantiles (the paper's likely reading) beside the null-anchored one, and the
threshold sweeps. `findings(tables)` returns the page's result sentences, computed from those tables.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from weightscope import io
from weightscope.chapters.findings import binomial_tolerance, curve_shape, percent, ratio, shape_words
from weightscope.compute import lens
from weightscope.compute.token_scores import TOKEN_KINDS_EXCLUDABLE, token_categories
from weightscope.config.params import ParamsError

STATS = ("kurtosis", "top_z", "neg_entropy")
NULL, OWN = "null quantiles", "features' own quantiles"  # the two anchors of the rule's thresholds
SWEEP_GRID = (0.5, 0.75, 0.9, 0.95, 0.975, 0.99, 0.995)
TESTS = {"concentrated": "concentrated", "string_coherent": "coherent: spelling", "emb_coherent":
         "coherent: embedding", "coherent": "coherent: either", "predicts": "both (the rule)"}


@dataclass(frozen=True)
class Config:
    """Chapter 1's parameters (each a notebook parameter, defaults argued on the page)."""

    k: int = 10  # tokens kept at each end of every feature's score distribution
    m_coherence: int = 5  # top tokens whose mutual similarity measures coherence
    concentration_stat: str = "kurtosis"  # kurtosis | top_z | neg_entropy
    q_concentration: float = 0.95  # concentrated: the stat exceeds this quantile of the null
    q_coherence: float = 0.95  # coherent: spelling or embedding similarity exceeds this null quantile
    n_null: int = 2048  # null directions per layer and kind
    max_features: int = 0  # analyse only the first N features of each SAE (0: all)
    seed: int = 0  # seed of the null directions
    exclude_tokens: tuple[str, ...] = ("byte", "special")  # token kinds left out of every distribution
    shape_se: float = 2.0  # a change of a rate smaller than this many binomial standard errors is no rise or fall

    def __post_init__(self):
        object.__setattr__(self, "exclude_tokens", tuple(self.exclude_tokens))
        problems = []
        if not 2 <= self.m_coherence <= self.k:
            problems.append(f"need 2 <= m_coherence <= k; got m_coherence={self.m_coherence}, k={self.k}")
        if self.concentration_stat not in STATS:
            problems.append(f"concentration_stat {self.concentration_stat!r}: use one of {', '.join(STATS)}")
        for name in ("q_concentration", "q_coherence"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name} = {getattr(self, name)} is a quantile level: use a value in (0, 1)")
        if self.n_null < 100:
            problems.append(f"n_null = {self.n_null}: use at least 100 null directions")
        if self.max_features < 0:
            problems.append(f"max_features = {self.max_features}: use 0 (all features) or a positive number")
        unknown = sorted(set(self.exclude_tokens) - set(TOKEN_KINDS_EXCLUDABLE))
        if unknown:
            problems.append(f"exclude_tokens: unknown kinds {unknown}; use any of {list(TOKEN_KINDS_EXCLUDABLE)}")
        if self.shape_se < 0:
            problems.append(f"shape_se = {self.shape_se}: use a non-negative number of standard errors")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def problems(self, dims) -> list[str]:
        """Checks that need the model's sizes; `dims`: `model.cfg`, or the pre-flight's `ModelDims`."""
        d_vocab = dims.d_vocab
        if d_vocab is None:
            return []
        return [] if 1 <= self.k <= d_vocab else [f"need 1 <= k <= d_vocab ({d_vocab}); got k={self.k}"]

    def lens_config(self) -> lens.LensConfig:
        return lens.LensConfig(k=self.k, m_coherence=self.m_coherence, concentration_stat=self.concentration_stat,
                               q_concentration=self.q_concentration, q_coherence=self.q_coherence,
                               exclude_tokens=self.exclude_tokens)


@dataclass
class Tables:
    """What chapter 1 produces; every frame is tidy (one row per feature, or per population x layer x ...)."""

    features: pd.DataFrame  # one row per SAE feature: statistics, top tokens, verdicts (saved as 01_features)
    nulls: pd.DataFrame  # the same for the two scored null samples (population "null: random" / "null: shuffled")
    token_kinds: pd.DataFrame  # kind, tokens, excluded: the vocabulary the distributions are taken over
    rates: pd.DataFrame  # population, layer, side, fraction passing the rule
    tests: pd.DataFrame  # side, test, population, rate: each single test and the conjunction, SAE beside nulls
    readings: pd.DataFrame  # quantile, side, anchor (null / features' own), rate: the two readings of the rule
    sweeps: pd.DataFrame  # parameter, value, side, population, fraction (mean over layers)
    fold_note: str
    config: Config = field(repr=False, default_factory=Config)


def run(ctx, config: Config, *, model=None, saes=None) -> Tables:
    """Chapter 1 for ctx's target: per-layer lens tables (cached), `01_features`, and the derived tables."""
    if model is None:
        model, saes = ctx.load_model_and_saes()
    problems = config.problems(model.cfg)
    categories = token_categories(model.tokenizer, model.cfg.d_vocab)
    token_kinds = (pd.Series(categories).value_counts().rename_axis("kind").rename("tokens").reset_index())
    token_kinds["excluded"] = token_kinds["kind"].isin(config.exclude_tokens)
    n_kept = int(token_kinds.loc[~token_kinds["excluded"], "tokens"].sum())
    if n_kept < config.k:
        problems.append(f"only {n_kept} tokens remain after excluding {list(config.exclude_tokens)}; "
                        f"need k={config.k} <= that (lower k or exclude fewer kinds)")
    if problems:
        raise ParamsError("; ".join(problems) + ".")
    excluded = int(token_kinds.loc[token_kinds["excluded"], "tokens"].sum())
    print(f"token filter: {excluded:,} of {len(categories):,} tokens excluded "
          f"({', '.join(f'{r.tokens:,} {r.kind}' for r in token_kinds.itertuples() if r.excluded) or 'none'}); "
          f"statistics over {n_kept:,} tokens", flush=True)

    tabs, provenance = lens_tables(ctx, config, model, saes)
    fold_note, target, cfg = provenance["chapter"]["fold"], ctx.params.target, config.lens_config()
    features, nulls = tabs["features"], tabs["nulls"]
    io.progress(f"01_output_tokens: every layer's {len(features):,} features: table 01_features, the rule's "
                f"rates, readings and sweeps")
    features["neuronpedia"] = [lens.neuronpedia_url(ctx.params.neuronpedia, layer, f)
                               for layer, f in zip(features["layer"], features["feature"])]
    io.save_table(features, target, "01_features", key=io.cache_key(provenance=provenance), params=provenance)
    return Tables(features=features, nulls=nulls, token_kinds=token_kinds, rates=rates(features, nulls),
                  tests=per_test_rates(features, nulls), readings=readings(features, nulls, cfg),
                  sweeps=sweeps(features, nulls, cfg), fold_note=fold_note, config=config)


def lens_tables(ctx, config: Config, model, saes) -> tuple[dict[str, pd.DataFrame], dict]:
    """Chapter 1's per-layer lens tables, cached under `01_token_lens`: ({"features", "nulls"}, provenance).

    Chapter 6 calls this for the same features, nulls and thresholds (a shared cache: no second computation).
    """
    keep = lens.content_ids(model, config.exclude_tokens)
    vocab = lens.token_strings(model)
    provenance = ctx.provenance(**dataclasses.asdict(config), fold=lens.fold_note(model))
    matrices = functools.cache(lambda: lens.side_matrices(model, keep))  # once, if any layer is computed
    tabs = io.layer_tables(ctx.params.target, "01_token_lens", saes, provenance, lambda sae: analyse_one(
        sae, model, config, vocab=vocab, keep=keep, dtype=ctx.dtype, matrices=matrices()))
    return tabs, provenance


def analyse_one(sae, model, config: Config, *, vocab: list[str], keep, dtype,
                matrices: dict | None = None) -> dict[str, pd.DataFrame]:
    """Chapter 1's measurement of one SAE ({"features", "nulls"}), seeded by its layer as the chapter does.
    matrices: `lens.side_matrices(model, keep)`, gathered once for every layer (None: here)."""
    return lens.analyse_sae(sae, model, config.lens_config(), vocab=vocab, n_null=config.n_null,
                            max_features=config.max_features, seed=config.seed + 100 * sae.layer, dtype=dtype,
                            keep=keep, matrices=matrices)


def rates(features: pd.DataFrame, nulls: pd.DataFrame) -> pd.DataFrame:
    """Fraction passing the rule per population, layer and side: population, layer, side, fraction."""
    both = pd.concat([features, nulls], ignore_index=True)
    out = both.groupby(["population", "layer"])[[f"{s}_predicts" for s in lens.SIDES]].mean().reset_index()
    out = out.melt(id_vars=["population", "layer"], var_name="side", value_name="fraction")
    out["side"] = out["side"].str[:3].map(lens.SIDES)
    return out


def per_test_rates(features: pd.DataFrame, nulls: pd.DataFrame) -> pd.DataFrame:
    """Each single test's pass rate and the conjunction's, pooled over layers: side, test, population, rate."""
    both = pd.concat([features, nulls], ignore_index=True)
    rows = []
    for side, side_name in lens.SIDES.items():
        for test, name in TESTS.items():
            for population, rate in both.groupby("population")[f"{side}_{test}"].mean().items():
                rows.append({"side": side_name, "test": name, "population": population, "rate": float(rate)})
    return pd.DataFrame(rows)


def readings(features: pd.DataFrame, nulls: pd.DataFrame, cfg: lens.LensConfig,
             grid=SWEEP_GRID) -> pd.DataFrame:
    """The rule with every threshold at the q-quantile of the null, or of the features' own statistics.

    Both readings use the same three tests (concentration, spelling, embedding) at the same level q, layer by
    layer, then average over layers. Returns quantile, side, anchor, rate, and `by construction` = 1 - q, the
    share that the own-quantile reading calls concentrated whatever the weights.
    """
    rows = []
    features, nulls = _rule_inputs(features, cfg), _rule_inputs(nulls, cfg)
    for q in grid:
        c = dataclasses.replace(cfg, q_concentration=float(q), q_coherence=float(q))
        for side, side_name in lens.SIDES.items():
            anchored, own = [], []
            for layer, f_l in features.groupby("layer"):
                null_l = nulls[(nulls["layer"] == layer) & (nulls["population"] == "null: random")]
                anchored.append(lens.apply_rule(f_l, lens.thresholds(null_l, c, side), c, side)[f"{side}_predicts"]
                                .mean())
                own.append(lens.apply_rule(f_l, lens.thresholds(f_l, c, side), c, side)[f"{side}_predicts"].mean())
            for anchor, values in ((NULL, anchored), (OWN, own)):
                rows.append({"quantile": float(q), "side": side_name, "anchor": anchor,
                             "rate": float(np.mean(values)), "by construction": 1.0 - float(q)})
    return pd.DataFrame(rows)


def sweeps(features: pd.DataFrame, nulls: pd.DataFrame, cfg: lens.LensConfig, grid=SWEEP_GRID) -> pd.DataFrame:
    """Rates as one quantile threshold moves (the other at its default), thresholds re-derived per layer."""
    curves = []
    features, nulls = _rule_inputs(features, cfg), _rule_inputs(nulls, cfg)
    for vary in ("q_concentration", "q_coherence"):
        for side, side_name in lens.SIDES.items():
            parts = []
            for layer, f_l in features.groupby("layer"):
                n_l = nulls[(nulls["layer"] == layer) & (nulls["population"] == "null: random")]
                parts.append(lens.sweep(f_l, n_l, cfg, side, vary=vary, values=grid).assign(layer=layer))
            s = pd.concat(parts).groupby(["value", "population"], as_index=False)["fraction"].mean()
            curves.append(s.assign(parameter=vary, side=side_name))
    return pd.concat(curves, ignore_index=True)


def _rule_inputs(df: pd.DataFrame, cfg: lens.LensConfig) -> pd.DataFrame:
    """The columns the rule reads (`lens.apply_rule`), with layer and population: applied to every layer's
    rows hundreds of times, the rule copied the top-token lists too (readings and sweeps 6.7 s, now 4.7 s,
    at GPT-2 small's width on a 2-core CPU)."""
    stats = [f"{side}_{c}" for side in lens.SIDES for c in (cfg.concentration_stat, "string_sim", "emb_cos")]
    return df[[c for c in ("layer", "population") if c in df.columns] + stats]


def findings(t: Tables) -> dict[str, list[str]]:
    """The chapter's result sentences, computed from the tables (rules and tolerances stated).

    Keys: "rates" (SAE against null, per side), "tests" (which single tests beat the null), "depth" (the
    shape of the rate over layers), "readings" (the rule under the two readings of its quantiles).
    """
    out: dict[str, list[str]] = {"rates": [], "tests": [], "depth": [], "readings": []}
    tests = t.tests.pivot_table(index=["side", "test"], columns="population", values="rate")
    n = int(t.features.groupby("layer").size().min())
    for side in lens.SIDES.values():
        sae, null = (tests.loc[(side, TESTS["predicts"]), p] for p in ("SAE features", "null: random"))
        out["rates"].append(f"{side}: {percent(sae)} of SAE features pass the rule, against {percent(null)} of "
                            f"random directions ({ratio(sae, null)} the null rate).")
        singles = tests.loc[side].drop(TESTS["predicts"])
        above = [name for name, row in singles.iterrows() if row["SAE features"] > row["null: random"]]
        below = [name for name, row in singles.iterrows() if row["SAE features"] < row["null: random"]]
        out["tests"].append(f"{side}: single tests that SAE features pass more often than random directions: "
                            f"{', '.join(above) or 'none'}; less often: {', '.join(below) or 'none'}.")
        per_layer = t.rates[(t.rates["population"] == "SAE features") & (t.rates["side"] == side)]
        per_layer = per_layer.sort_values("layer")
        best = per_layer.loc[per_layer["fraction"].idxmax()]
        tol = binomial_tolerance(per_layer["fraction"], n, t.config.shape_se)
        out["depth"].append(
            f"{side}: over depth the rate {shape_words(curve_shape(per_layer['fraction'], tol))} (changes below "
            f"{percent(tol)}, {t.config.shape_se:g} binomial standard errors of a layer's rate, ignored); highest "
            f"in layer {int(best['layer'])} ({percent(best['fraction'])}).")
    at = t.readings[t.readings["quantile"] == 0.75]
    for side, part in at.groupby("side", sort=False):
        by = part.set_index("anchor")["rate"]
        out["readings"].append(f"{side}, every threshold at the 0.75 quantile: {percent(by[OWN])} with the "
                               f"features' own quantiles, {percent(by[NULL])} with the null's.")
    return out


def verdicts(t: Tables) -> pd.DataFrame:
    """Features and null rows in one frame with a `verdict` column: predicts / does not / the null's name."""
    feats = t.features.assign(verdict=t.features["dec_predicts"].map({True: "predicts", False: "does not"}))
    return pd.concat([feats, t.nulls.assign(verdict=t.nulls["population"])], ignore_index=True)


def examples(t: Tables, n: int = 6) -> pd.DataFrame:
    """Strongest predicting features, features nearest the threshold, and non-predicting ones (output side)."""
    f, stat = t.features, "dec_" + t.config.concentration_stat
    margin = (f[stat] - f["dec_thr_concentration"]).abs()
    rest = f[~f["dec_predicts"]]
    ex = pd.concat([
        f[f["dec_predicts"]].sort_values(stat, ascending=False).head(n + 2).assign(kind="strongest predicting"),
        f.loc[margin.sort_values().index].head(n).assign(kind="borderline (near the threshold)"),
        rest.sample(min(n, len(rest)), random_state=t.config.seed).assign(kind="not predicting"),
    ])

    def show(tokens, k=6):
        return " | ".join(repr(tok)[1:-1] for tok in list(tokens)[:k])

    out = pd.DataFrame({
        "kind": ex["kind"], "layer": ex["layer"], "feature": ex["feature"],
        "top output tokens": ex["dec_top_tokens"].map(show), "most suppressed": ex["dec_bottom_tokens"].map(show),
        "top input tokens": ex["enc_top_tokens"].map(show), f"{t.config.concentration_stat} (out)": ex[stat],
        "string sim (out)": ex["dec_string_sim"], "emb cos (out)": ex["dec_emb_cos"],
        "predicts": ex["dec_predicts"], "reads": ex["enc_predicts"]})
    if ex["neuronpedia"].notna().any():
        out["feature"] = [f'<a href="{u}">{i}</a>' if u else i for u, i in zip(ex["neuronpedia"], ex["feature"])]
    return out.reset_index(drop=True)
