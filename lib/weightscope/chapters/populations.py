"""Chapter 3 in one call: label features semantic / non-semantic, compare their attention reads, within layers.

    config = populations.Config(m=5, ...)
    tables = populations.run(ctx, config)

Reads chapter 1's `01_features` and chapter 2's `02_features`; writes `03_labels` and `03_findings`. Besides the
pooled comparison it reports within-layer effects and van Elteren's layer-stratified test, because the label
shares and the reads both change with depth (the pooled comparison confounds layer with label).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from weightscope import io
from weightscope.chapters.context import TableInput
from weightscope.chapters.findings import number
from weightscope.compute import populations
from weightscope.compute.streaming import progress_bar
from weightscope.config.params import ParamsError

PHASES = {"dec": "decoder-unembedding", "enc": "encoder-embedding"}
ATTN = {"q_z_mean": "query", "k_z_mean": "key", "v_z_mean": "value (OV)"}
COMPARISONS = [(s, col) for s in PHASES for col in ATTN]  # (label column's prefix, read column): six
SENSITIVITY_GRID = {"min_word_share": [0.4, 0.6, 0.8], "min_nonword_share": [0.4, 0.6, 0.8], "m": [3, 5, 8]}


@dataclass(frozen=True)
class Config:
    """Chapter 3's parameters (each a notebook parameter, defaults argued on the page)."""

    m: int = 5  # top tokens of each side whose kinds decide the label
    min_word_share: float = 0.6  # semantic needs at least this share of word tokens (and coherence)
    min_nonword_share: float = 0.6  # non-semantic when non-word kinds reach this share
    n_boot: int = 2000  # bootstrap resamples for the confidence intervals
    seed: int = 0  # seed of the bootstrap

    def __post_init__(self):
        problems = []
        for name in ("min_word_share", "min_nonword_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} = {getattr(self, name)} is a share: use a value in [0, 1]")
        if self.m < 1:
            problems.append(f"m = {self.m}: use at least 1 top token")
        if self.n_boot < 100:
            problems.append(f"n_boot = {self.n_boot}: use at least 100 bootstrap resamples")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def problems(self, dims) -> list[str]:
        """The top tokens kept by chapter 1 are at most d_vocab; `dims`: `model.cfg`, or `ModelDims`."""
        d_vocab = dims.d_vocab
        if d_vocab is None:
            return []
        return [] if self.m <= d_vocab else [f"m = {self.m} exceeds d_vocab ({d_vocab})"]

    def inputs(self) -> list:
        """What `run` reads (checked by the pre-flight): the feature tables of chapters 1 and 2."""
        return [TableInput("01_features", produced_by="01_output_tokens"),
                TableInput("02_features", produced_by="02_attention")]

    def label_params(self) -> dict:
        return {"m": self.m, "min_word_share": self.min_word_share, "min_nonword_share": self.min_nonword_share}


@dataclass
class Tables:
    """What chapter 3 produces."""

    labelled: pd.DataFrame  # chapter 1's table with <phase>_label, word/non-word shares
    data: pd.DataFrame  # labels of the features a later head reads, with their chapter-2 profile
    findings: pd.DataFrame  # phase x attention side: pooled comparison and the layer-stratified test
    by_layer: pd.DataFrame  # phase, layer, label, column, n, mean, median, p75
    within_layer: pd.DataFrame  # phase, side, layer, n_a, n_b, means, Cliff's delta inside the layer
    share_above: pd.DataFrame  # each population's share above the pooled P75
    sensitivity: pd.DataFrame  # parameter, value, phase, side, Cliff's delta with its interval
    label_counts: pd.DataFrame  # how label counts move with the thresholds
    config: Config = field(repr=False, default_factory=Config)


def run(ctx, config: Config) -> Tables:
    """Chapter 3 for ctx's target, from the tables chapters 1 and 2 wrote."""
    target = ctx.params.target
    tokens, reads = read_inputs(target)
    io.progress(f"03_semantic_populations: labelling {len(tokens):,} features, then comparing the "
                "populations")
    kinds = {}  # the token kinds of `tokens`, shared by every relabelling below (`populations.cached_shares`)
    labelled = populations.label_features(tokens, cache=kinds, **config.label_params())
    label_cols = ["layer", "feature"] + [f"{s}_{c}" for s in PHASES
                                         for c in ("label", "word_share", "nonword_share")]
    # the labels only: merging chapter 1's list columns too would copy them (Arrow's take) for no reader
    data = labelled[label_cols].merge(reads, on=["layer", "feature"], how="inner")
    provenance = {"target": target, "chapter": dataclasses.asdict(config),
                  "inputs": {name: io.table_meta(target, name)["key"] for name in ("01_features", "02_features")}}
    key = io.cache_key(**provenance)
    io.save_table(labelled[label_cols], target, "03_labels", key=key, params=provenance)
    found = compare(data, config)
    io.save_table(found, target, "03_findings", key=key, params=provenance)
    return Tables(labelled=labelled, data=data, findings=found, by_layer=by_layer(data),
                  within_layer=within_layer(data), share_above=share_above(data),
                  sensitivity=sensitivity(tokens, reads, config, cache=kinds),
                  label_counts=populations.label_sensitivity(tokens, SENSITIVITY_GRID, cache=kinds),
                  config=config)


def read_inputs(target: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(chapter 1's `01_features`, the columns the labelling reads; chapter 2's `02_features`): the tables
    this chapter holds throughout (`bench/bench_book.py` measures their memory through this function)."""
    tokens = io.require_table(target, "01_features", produced_by="01_output_tokens",
                              columns=populations.label_columns())
    return tokens, io.require_table(target, "02_features", produced_by="02_attention")


def compare(data: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Semantic against non-semantic per phase and attention side: the pooled comparison (bootstrap intervals,
    Mann-Whitney, Holm over the six) and van Elteren's test within layers (`p_stratified`, Holm-adjusted too,
    and the layer-weighted Cliff's delta `cliffs_delta_within`)."""
    # the six comparisons' bootstraps side by side, one bar counting their resamples
    bar = progress_bar(len(COMPARISONS) * config.n_boot, True, "bootstraps of the comparisons",
                       unit="resample")
    out = pd.concat(populations.in_threads(functools.partial(_compare_one, data, config, bar=bar),
                                           COMPARISONS), ignore_index=True)
    bar.close()
    out["attention side"] = out["column"].map(ATTN)
    out["p_holm"] = populations.holm(out["p_value"].to_numpy())
    out["p_stratified_holm"] = populations.holm(out["p_stratified"].to_numpy())
    out["direction"] = np.select([out["cliffs_delta_lo"] > 0, out["cliffs_delta_hi"] < 0],
                                 ["semantic higher", "non-semantic higher"], "no clear difference")
    return out


def _compare_one(data: pd.DataFrame, config: Config, where: tuple[str, str], bar=None) -> pd.DataFrame:
    """`compare`'s row for one phase (its label column's prefix s) and attention side col (its p_holm is
    `compare`'s to set, over all six); bar counts the bootstrap's resamples."""
    s, col = where
    label = f"{s}_label"
    part = data[[label, col, "layer"]]
    cmp = populations.compare_populations(part, [col], label, n_boot=config.n_boot, seed=config.seed, bar=bar)
    sub = part[part[label].isin(["semantic", "non-semantic"])]
    test = populations.stratified_rank_test(sub[col], sub[label] == "semantic", sub["layer"])
    return cmp.assign(p_stratified=test["p_value"], cliffs_delta_within=test["cliffs_delta"],
                      n_layers_compared=float(test["n_strata"]), phase=PHASES[s])


def by_layer(data: pd.DataFrame) -> pd.DataFrame:
    """n, mean, median and P75 of every attention side per phase, layer and label (populations split)."""
    parts = []
    for s, phase in PHASES.items():
        frame = data.rename(columns={f"{s}_label": "label"})
        summary = populations.summary_by_population(frame, list(ATTN), by=("layer", "label"))
        parts.append(summary.assign(phase=phase, column=summary["column"].map(ATTN)))
    out = pd.concat(parts, ignore_index=True)
    return out[["phase", "layer", "label", "column", "n", "mean", "median", "p75"]]


def within_layer(data: pd.DataFrame) -> pd.DataFrame:
    """Cliff's delta of semantic against non-semantic inside each layer, per phase and attention side."""
    parts = []
    for s, phase in PHASES.items():
        eff = populations.within_layer_effects(data, list(ATTN), f"{s}_label")
        parts.append(eff.assign(phase=phase, side=eff["column"].map(ATTN)))
    out = pd.concat(parts, ignore_index=True)
    return out[["phase", "side", "layer", "n_a", "n_b", "mean_a", "mean_b", "cliffs_delta"]]


def share_above(data: pd.DataFrame) -> pd.DataFrame:
    """Each population's share above the pooled 75th percentile, per phase and side."""
    return pd.concat([populations.share_above_pooled_p75(data, col, f"{s}_label").assign(phase=phase, side=side)
                      for s, phase in PHASES.items() for col, side in ATTN.items()], ignore_index=True)


def sensitivity(tokens: pd.DataFrame, reads: pd.DataFrame, config: Config, *,
                cache: dict | None = None) -> pd.DataFrame:
    """Cliff's delta (with a bootstrap interval) as one labelling parameter moves, the others at default; each
    labelling's six bootstraps run side by side (`populations.in_threads`).
    cache: the token kinds of `tokens` (`populations.cached_shares`)."""
    rows, n_values = [], sum(len(values) for values in SENSITIVITY_GRID.values())
    bar = progress_bar(n_values * len(COMPARISONS) * _sensitivity_boot(config), True,
                       "bootstraps of the labelling sensitivity", unit="resample")
    for param, values in SENSITIVITY_GRID.items():
        for value in values:
            lab = populations.label_features(tokens, cache=cache, **{**config.label_params(), param: value})
            lab = lab[["layer", "feature", *(f"{s}_label" for s in PHASES)]]
            lab = lab.merge(reads, on=["layer", "feature"])
            # the selections here, in this thread; the bootstraps side by side
            pairs = [populations.population_values(lab, col, f"{s}_label") for s, col in COMPARISONS]
            deltas = populations.in_threads(functools.partial(_semantic_delta, config, bar=bar), pairs)
            for (s, col), (delta, lo, hi) in zip(COMPARISONS, deltas):
                rows.append({"parameter": param, "value": value, "phase": PHASES[s], "side": ATTN[col],
                             "cliffs_delta": delta, "lo": lo, "hi": hi})
    bar.close()
    return pd.DataFrame(rows)


def _sensitivity_boot(config: Config) -> int:
    """Resamples of each bootstrap of the sensitivity grid: n_boot / 10, at least 200."""
    return max(200, config.n_boot // 10)


def _semantic_delta(config: Config, pair: tuple[np.ndarray, np.ndarray],
                    bar=None) -> tuple[float, float, float]:
    """Cliff's delta of semantic against non-semantic values, with the sensitivity grid's bootstrap interval
    (`_sensitivity_boot` resamples); bar counts them."""
    return populations.bootstrap_ci(*pair, stat="cliffs_delta", n_boot=_sensitivity_boot(config),
                                    seed=config.seed, bar=bar)


def findings(t: Tables, alpha: float = 0.05) -> list[str]:
    """One sentence per phase and side: the pooled verdict (Cliff's delta interval) beside the within-layer
    one (Holm-adjusted stratified p below `alpha`), and whether they agree."""
    out = []
    for _, r in t.findings.iterrows():
        within = ("no clear difference" if not r["p_stratified_holm"] < alpha else
                  "semantic higher" if r["cliffs_delta_within"] > 0 else "non-semantic higher")
        agree = "agree" if within == r["direction"] else "disagree"
        out.append(f"{r['phase']} / {r['attention side']}: pooled, {r['direction']} (Cliff's delta "
                   f"{r['cliffs_delta']:+.2f} [{r['cliffs_delta_lo']:+.2f}, {r['cliffs_delta_hi']:+.2f}], "
                   f"n = {number(r['n_a'])} vs {number(r['n_b'])}); within layers, {within} (delta "
                   f"{r['cliffs_delta_within']:+.2f}, Holm p {r['p_stratified_holm']:.3f}): they {agree}.")
    return out


def label_examples(t: Tables, per_label: int = 4) -> pd.DataFrame:
    """A few random features of each label on each phase, with the quantities the rule used."""
    rows = []
    for s, phase in PHASES.items():
        for label in populations.LABELS:
            part = t.labelled[t.labelled[f"{s}_label"] == label]
            for _, row in part.sample(min(per_label, len(part)), random_state=t.config.seed).iterrows():
                tokens = list(row[f"{s}_top_tokens"])[: t.config.m]
                rows.append({"phase": phase, "label": label, "layer": row["layer"], "feature": row["feature"],
                             "top tokens": " | ".join(repr(tok)[1:-1] for tok in tokens),
                             "word share": row[f"{s}_word_share"], "non-word share": row[f"{s}_nonword_share"],
                             "coherent": bool(row[f"{s}_coherent"])})
    return pd.DataFrame(rows)


def read_ecdfs(t: Tables, points: int = 200) -> pd.DataFrame:
    """phase, side, label, mean z, share, features: each population's ECDF of the mean z-score of the read
    (`compute.populations.ecdf_points`: at most `points` exact points per curve), one curve per phase,
    attention side and label; a few hundred rows a curve, not one per feature (1.8M at 12 GPT-2 layers)."""
    rows = []
    for s, phase in PHASES.items():
        labels = t.data[f"{s}_label"].to_numpy()
        for col, side in ATTN.items():
            values = t.data[col].to_numpy()
            for label in populations.LABELS:
                mine = values[labels == label]
                x, share = populations.ecdf_points(mine, points)
                rows.append(pd.DataFrame({"phase": phase, "side": side, "label": label, "mean z": x,
                                          "share": share, "features": len(mine)}))
    return pd.concat(rows, ignore_index=True)


FINDINGS_COLUMNS = {
    "phase": "phase", "attention side": "side", "n_a": "n (sem)", "n_b": "n (non-sem)",
    "mean_a": "mean (sem)", "mean_b": "mean (non-sem)", "mean_diff": "mean diff",
    "cliffs_delta": "Cliff's delta", "cliffs_delta_lo": "delta lo", "cliffs_delta_hi": "delta hi",
    "p_holm": "p (Holm)", "direction": "pooled direction", "cliffs_delta_within": "delta within layers",
    "p_stratified_holm": "p within layers (Holm)",
}


def findings_table(t: Tables) -> pd.DataFrame:
    """The findings with reader-facing column names ("sem": semantic, "non-sem": non-semantic); medians and
    P75s stay in the saved `03_findings` table and in `by_layer`, so the page's table fits its width."""
    return t.findings[list(FINDINGS_COLUMNS)].rename(columns=FINDINGS_COLUMNS)


def label_counts_by_layer(t: Tables) -> pd.DataFrame:
    """layer, label, features, phase: how many features of each layer receive each label."""
    parts = []
    for s, phase in PHASES.items():
        counts = t.labelled.groupby(["layer", f"{s}_label"], observed=False).size().rename("features")
        parts.append(counts.reset_index().rename(columns={f"{s}_label": "label"}).assign(phase=phase))
    return pd.concat(parts, ignore_index=True)
