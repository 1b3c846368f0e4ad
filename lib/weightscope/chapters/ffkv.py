"""Chapter 6 in one call: MLP neurons (FF-KV) as a baseline dictionary beside the SAE features.

    config = ffkv.Config(topk=10, ...)        # chapter 1's rule parameters and this chapter's, all checked at once
    tables = ffkv.run(ctx, config)            # loads the weights, then (alone) the full model for held-out text

Every measure is taken for three dictionaries, a `dictionary` column naming them: "features" (each SAE's rows),
"neurons" (the paired MLP block's value and key vectors) and "null" (random directions). `run` owns the caching
(per layer through `io.layer_tables`, whole tables through `io.cached_tables`), the provenance and the derived
tables; `findings(tables)` writes the page's result sentences from them.

* Token lens: chapter 1's rule, called (`output_tokens.lens_tables`): the features' rows, thresholds and null are
  chapter 1's own, so the SAE-feature rates equal chapter 1's; the neurons are judged by the same thresholds over
  the same content tokens.
* Attention reads: chapter 2's kernels (`head_reads`, `null_zscores`) on unit directions, one null for all.
* Populations: chapter 3's labels and its semantic / non-semantic contrast.
* Alignment: max cosine of SAE rows against value vectors and back, each beside random directions compared with
  the same sets (same set sizes, same dimension), reported as excess over them.
* Held-out text (`load.corpora.held_out_windows`): explained variance and active latents of the TopK-FF code of
  each MLP output and of each SAE's code of its site, each beside a random dictionary of the same size coding the
  same activations with the same k.

Pairing: an MLP at layer L writes into the residual stream after block L, where a residual SAE at
`blocks.L.hook_resid_post` reads it, so that SAE is paired with block L's MLP (an SAE at resid_pre or
resid_mid of L with block L - 1's).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

from weightscope import io
from weightscope.chapters.context import HELD_OUT_TEXT, sae_metadata
from weightscope.chapters import output_tokens
from weightscope.chapters.findings import percent
from weightscope.compute import ffkv, lens, populations as pops
from weightscope.compute.attention import head_reads, layer_weights, null_zscores, read_by_layer
from weightscope.compute.passes import BlockStream
from weightscope.compute.streaming import CHUNK_ELEMENTS, progress_bar
from weightscope.compute.token_scores import random_directions_like
from weightscope.config.params import ParamsError
from weightscope.load import corpora
from weightscope.load.sae_sequence import SAESequence, described
from weightscope.load.saes import hook_layer, sae_decode

DICTIONARIES = ("features", "neurons", "null")
SIDES = {"dec": "output side (decoder-unembedding)", "enc": "input side (encoder-embedding)"}
READS = ("q", "k", "v")
ROW_LEN = 128  # held-out rows as long as the demo SAEs' evaluation rows (shorter where the context is)
SCALE_FREE = ("kurtosis", "top_z")  # statistics that do not change when a row is scaled
GROWN = ("lens_rows", "reads", "alignment")  # the tables that grow with layers x rows (1.1 GB at GPT-2 small)
LENS_FIELDS = ("k", "m_coherence", "concentration_stat", "q_concentration", "q_coherence", "n_null",
               "max_features", "seed", "exclude_tokens")  # chapter 1's parameters, with chapter 1's defaults


@dataclass(frozen=True)
class Config:
    """Chapter 6's parameters (each a notebook parameter of the same name)."""

    k: int = 10  # chapter 1: tokens kept at each end of a row's score distribution
    m_coherence: int = 5  # chapter 1: top tokens whose mutual similarity measures coherence
    concentration_stat: str = "kurtosis"  # chapter 1's statistic; kurtosis | top_z (scale-free)
    q_concentration: float = 0.95  # chapter 1: concentrated above this quantile of the null
    q_coherence: float = 0.95  # chapter 1: coherent above this null quantile
    n_null: int = 2048  # null directions per layer (chapter 1's, the reads' and the alignment's)
    max_features: int = 0  # first N SAE features per layer (0: all)
    seed: int = 0  # seed of the null directions and the bootstrap
    exclude_tokens: tuple[str, ...] = ("byte", "special")  # chapter 1's token filter
    q_null: float = 0.99  # a row takes part in a head when its read exceeds this null quantile
    key: str = "gate"  # gated MLPs: the encoder (key) direction, gate or up projection
    max_neurons: int = 0  # first N neurons per layer (0: all)
    topk: int = 10  # TopK-FF: neurons kept per token (the paper's k = 10)
    topk_of: str = "normalized"  # TopK over plain or value-normalised latents
    aligned: float = 0.9  # max cosine at or above: aligned (the paper's cut-off)
    unaligned: float = 0.3  # max cosine below: unaligned
    signed: bool = True  # max of the signed cosine (False: of |cos|)
    n_eval_tokens: int = 8192  # held-out tokens for the activation checks
    alive_share: float = 0.001  # a latent is active when in the code on at least this share of tokens
    alpha: float = 0.01  # the summary names the higher dictionary when its test gives p below this

    def __post_init__(self):
        object.__setattr__(self, "exclude_tokens", tuple(self.exclude_tokens))
        problems = []
        try:
            self.lens_config()
        except ParamsError as err:
            problems.append(str(err).rstrip("."))
        if self.concentration_stat not in SCALE_FREE:
            problems.append(f"concentration_stat {self.concentration_stat!r}: use one of {', '.join(SCALE_FREE)} "
                            "(value vectors and SAE rows differ in norm; only a scale-free statistic is fair)")
        if self.key not in ffkv.KEYS:
            problems.append(f"key {self.key!r}: use one of {', '.join(ffkv.KEYS)}")
        if self.topk_of not in ("plain", "normalized"):
            problems.append(f"topk_of {self.topk_of!r}: use plain or normalized")
        if self.topk < 1:
            problems.append(f"topk = {self.topk}: use a positive number of neurons per token")
        if not 0 < self.q_null < 1:
            problems.append(f"q_null = {self.q_null} is a quantile level: use a value in (0, 1)")
        if not 0 < self.alpha < 1:
            problems.append(f"alpha = {self.alpha} is a p-value level: use a value in (0, 1)")
        if not 0 <= self.unaligned <= self.aligned <= 1:
            problems.append(f"need 0 <= unaligned <= aligned <= 1; got {self.unaligned}, {self.aligned}")
        if not 0 < self.alive_share < 1:
            problems.append(f"alive_share = {self.alive_share}: use a share of tokens in (0, 1)")
        if self.max_neurons < 0 or self.n_eval_tokens < 1:
            problems.append(f"need max_neurons >= 0 and n_eval_tokens >= 1; got {self.max_neurons}, "
                            f"{self.n_eval_tokens}")
        if problems:
            raise ParamsError("chapter 6: " + "; ".join(problems) + ".")

    def lens_config(self) -> output_tokens.Config:
        """Chapter 1's `Config` with these values (the rule, its nulls and its token filter)."""
        return output_tokens.Config(**{name: getattr(self, name) for name in LENS_FIELDS})

    def inputs(self) -> list:
        """What `run` reads besides the model and SAEs (checked by the pre-flight): held-out stories."""
        return list(HELD_OUT_TEXT)

    def problems(self, dims) -> list[str]:
        """Checks that need the model's sizes; `dims`: `model.cfg`, or the pre-flight's `ModelDims`."""
        return self.lens_config().problems(dims)


@dataclass
class Tables:
    """What chapter 6 produces; tidy frames with a `dictionary` column where three dictionaries are compared."""

    pairing: pd.DataFrame  # one row per SAE: its site, paired MLP block and that block's dictionary
    lens_rows: pd.DataFrame  # one row per (dictionary, layer, row): chapter 1's statistics and verdicts
    lens_rates: pd.DataFrame  # dictionary, layer, side, test, share
    key_choice: pd.DataFrame  # layer, key, shares passing each test (input side, neurons)
    reads: pd.DataFrame  # one row per (dictionary, row, read layer): mean z and share of heads beyond the null
    labels: pd.DataFrame  # label shares per dictionary (chapter 3)
    contrast: pd.DataFrame  # semantic against non-semantic reads per dictionary (chapter 3)
    alignment: pd.DataFrame  # one row per (direction, population, layer, row): max cosine
    alignment_shares: pd.DataFrame  # direction, layer: aligned / unaligned / median beside the null's, excess
    checks: pd.DataFrame  # dictionary, layer: explained variance and active share beside a random dictionary's
    summary: pd.DataFrame  # one row per measure: each dictionary beside its null, excess, test, verdict
    d_model: int = 0
    config: Config = field(repr=False, default_factory=Config)


# ----------------------------------------------------------------------------------------------------------
# The chapter in one call


def run(ctx, config: Config, *, model=None, saes=None, full=None) -> Tables:
    """Chapter 6 for ctx's target. Weights first (the weights-only model), then the held-out checks with the
    full model, loaded only after the weights-only one is released (one copy of the model at a time), while
    the largest weights-only tables wait on disk (`io.set_aside`).

    model, saes: pass them to reuse loaded ones (the caller then holds the model); full: a HookedTransformer
    for the held-out checks (else `ctx.load_full_model()`, only when the checks are not cached).
    """
    if model is None:
        model, saes = ctx.load_model_and_saes(mlp=True)
    problems = config.problems(model.cfg)
    if problems:
        raise ParamsError("chapter 6: " + "; ".join(problems) + ".")
    weights = weight_tables(ctx, config, model, saes)
    d_model = int(model.cfg.d_model)
    if getattr(saes, "model", None) is model:
        saes.model = None  # checked on load already; dropping it lets the weights be freed
    del model
    gc.collect()
    grown = {name: weights.pop(name) for name in GROWN}
    with io.set_aside(grown, ctx.params.target):  # on disk while the full model runs the held-out text
        checks = held_out_checks(ctx, config, saes, full=full)
    weights.update(grown)
    provenance = ctx.provenance(**dataclasses.asdict(config), step="summary")
    answer = io.cached_tables(ctx.params.target, None, provenance, lambda: {"06_summary": summary(
        weights, checks, config)})["06_summary"]
    return Tables(**weights, checks=checks, summary=answer, d_model=d_model, config=config)


def weight_tables(ctx, config: Config, model, saes) -> dict[str, pd.DataFrame]:
    """Every weights-only table of the chapter (see `Tables`), each step cached."""
    # once, and only if a layer of the lens or of the key choice is computed (not when both are cached)
    matrices = functools.cache(
        lambda: lens.side_matrices(model, lens.content_ids(model, config.exclude_tokens)))
    lens_rows = token_lens(ctx, config, model, saes, matrices=matrices)
    keys = key_choice(ctx, config, model, saes, lens_rows, matrices=matrices)
    matrices.cache_clear()  # two [d_model x content tokens] matrices, freed before the reads and alignment
    reads = attention_reads(ctx, config, model, saes)
    pop = populations(lens_rows, reads, config)
    align = alignment(ctx, config, model, saes)
    return {"pairing": blocks(model, saes, config), "lens_rows": lens_rows, "lens_rates": lens_rates(lens_rows),
            "key_choice": keys, "reads": reads, "labels": pop["shares"],
            "contrast": pop["contrast"], "alignment": align, "alignment_shares": alignment_shares(align, config)}


# ----------------------------------------------------------------------------------------------------------
# Pairing and the dictionaries


def mlp_layer_for(sae) -> int | None:
    """The MLP block whose write the SAE's site sees last: L for resid_post of L, else L - 1 (None at 0)."""
    layer = sae.layer
    if layer is None:
        return None
    return layer if sae.hook_name.endswith("hook_resid_post") else (layer - 1 if layer > 0 else None)


NO_MLP_BEFORE_REASON = ("every SAE of the target reads the stream before block 0's MLP (`hook_resid_pre` of "
                        "block 0), where no MLP block has written yet, so none has a dictionary to compare with; "
                        "add SAEs of later layers (`layers:`) to run it.")


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to the target: none of its SAEs sees an MLP block's write (read from
    the SAEs' cfg.json for a local folder or the demo; a hub release is not read here and is never skipped)."""
    metas = sae_metadata(target, dims)
    if metas and all(m.layer is not None and mlp_layer_for(m) is None for m in metas):
        return NO_MLP_BEFORE_REASON
    return None


def _paired(saes):
    """The SAEs that see an MLP block's write. A lazy `SAESequence` gives a lazy subset, chosen from the SAEs'
    descriptions (so each SAE is loaded only where a step uses its weights, and one at a time); a list is
    filtered."""
    if isinstance(saes, SAESequence):
        return saes.subset([i for i, m in enumerate(saes.describe()) if mlp_layer_for(m) is not None])
    return [s for s in saes if mlp_layer_for(s) is not None]


def _first(n: int, limit: int) -> int:
    return n if limit <= 0 else min(limit, n)


def blocks(model, saes, cfg: Config) -> pd.DataFrame:
    """One row per SAE: its site, the MLP block paired with it and that block's FF-KV dictionary (gated or
    not, activation, which input rows are the keys, whether a post-norm applies on decode, and the median
    norms of the value vectors and of the SAE's decoder rows)."""
    rows = []
    for sae in saes:
        L = mlp_layer_for(sae)
        row = {"SAE layer": sae.layer, "site": sae.hook_name.rsplit(".", 1)[-1], "features": sae.d_sae,
               "MLP layer": L}
        if L is not None:
            b = ffkv.ff_block(model, L)
            V = ffkv.value_vectors(b)
            row.update({"neurons": b.d_mlp, "gated": b.gated, "act": b.act_fn,
                        "keys": "W_gate" if b.gated and cfg.key == "gate" else "W_in",
                        "post-norm": b.ln2_post_w is not None,
                        "value norm": float(V.float().norm(dim=1).median()),
                        "decoder norm": float(sae.W_dec.float().norm(dim=1).median())})
        rows.append(row)
    return pd.DataFrame(rows)


def _directions(model, sae, cfg: Config, offset: int) -> dict[str, torch.Tensor]:
    """{dictionary: [n, d_model] decoder (write) directions} for one SAE and its paired MLP block."""
    b = ffkv.ff_block(model, mlp_layer_for(sae))
    n, m = _first(sae.d_sae, cfg.max_features), _first(b.d_mlp, cfg.max_neurons)
    rows = torch.arange(cfg.n_null) % sae.d_sae  # null rows take the norms of SAE rows, as in chapter 1
    return {"features": sae.W_dec[:n], "neurons": ffkv.value_vectors(b)[:m],
            "null": random_directions_like(sae.W_dec[rows], seed=cfg.seed + 1000 * sae.layer + offset)}


# ----------------------------------------------------------------------------------------------------------
# Chapter 1: the token lens, called


def token_lens(ctx, config: Config, model, saes, *, matrices=None) -> pd.DataFrame:
    """Chapter 1's rule on the three dictionaries: one row per (dictionary, layer, row), `dec_*`, `enc_*`.

    features and null: chapter 1's own rows (`output_tokens.lens_tables`; its "null: random" sample, scored by
    the rule, is the chance level); neurons: their value (output side) and key (input side) vectors over the same
    content tokens, judged by the same per-layer thresholds (chapter 1's `thr` null sample). matrices: a
    function returning `lens.side_matrices(model, keep)` (called only if a layer is computed).
    """
    ch1 = config.lens_config()
    tabs, _ = output_tokens.lens_tables(ctx, ch1, model, saes)
    keep, vocab = lens.content_ids(model, ch1.exclude_tokens), lens.token_strings(model)
    provenance = ctx.provenance(**dataclasses.asdict(config), step="token_lens")
    matrices = matrices or functools.cache(lambda: lens.side_matrices(model, keep))  # once, if needed
    paired = described(_paired(saes))  # neuron_lens reads only the SAE's layer: no weights loaded
    neurons = io.layer_tables(ctx.params.target, "06_token_lens", paired, provenance, lambda sae: {
        "rows": neuron_lens(model, sae, config, tabs["features"], vocab=vocab, keep=keep, dtype=ctx.dtype,
                            matrices=matrices())})
    feats = tabs["features"].rename(columns={"feature": "row"}).assign(dictionary="features")
    null = tabs["nulls"][tabs["nulls"]["population"] == "null: random"]
    null = null.assign(row=null.groupby("layer").cumcount(), dictionary="null")
    rows = pd.concat([feats, neurons.get("rows"), null], ignore_index=True)
    rows = rows[rows["layer"].isin([s.layer for s in paired])]
    return rows.drop(columns=["population", "neuronpedia"], errors="ignore").reset_index(drop=True)


def _thresholds(features: pd.DataFrame, layer: int, side: str) -> dict[str, float]:
    """Chapter 1's thresholds of one layer and side, as stored with its features."""
    row = features[features["layer"] == layer].iloc[0]
    return {name: float(row[f"{side}_thr_{name}"]) for name in ("concentration", "string_sim", "emb_cos")}


def neuron_lens(model, sae, config: Config, features: pd.DataFrame, *, vocab, keep, dtype=None,
                key: str | None = None, matrices: dict | None = None) -> pd.DataFrame:
    """Both sides of the neurons paired with one SAE, judged by chapter 1's thresholds for that SAE's layer.

    Output side: value vectors against the folded unembedding; input side: key vectors (`key`, default the
    config's) against the embeddings. One row per neuron, chapter 1's columns. matrices: as `lens.sae_sides`.
    """
    b = ffkv.ff_block(model, mlp_layer_for(sae))
    m = _first(b.d_mlp, config.max_neurons)
    V, K = ffkv.value_vectors(b)[:m], ffkv.key_vectors(b, key or config.key)[:m]
    cfg = config.lens_config().lens_config()
    df = lens.sae_sides(K.T, V, model, cfg, vocab=vocab, dtype=dtype, keep=keep, matrices=matrices,
                        rows=(f"MLP neurons of block {b.layer}", "neuron"))
    for side in SIDES:
        df = lens.apply_rule(df, _thresholds(features, sae.layer, side), cfg, side)
    return df.rename(columns={"feature": "row"}).assign(dictionary="neurons", layer=sae.layer)


def lens_rates(rows: pd.DataFrame) -> pd.DataFrame:
    """Share of each dictionary passing each test, per layer and side: dictionary, layer, side, test, share."""
    tests = ("concentrated", "coherent", "predicts")
    cols = [f"{s}_{t}" for s in SIDES for t in tests]
    long = rows.groupby(["dictionary", "layer"])[cols].mean().reset_index().melt(
        id_vars=["dictionary", "layer"], var_name="test", value_name="share")
    long["side"] = long["test"].str[:3].map(SIDES)
    long["test"] = long["test"].str[4:]
    return long


def key_choice(ctx, config: Config, model, saes, lens_rows: pd.DataFrame, *, matrices) -> pd.DataFrame:
    """The neurons' input side with each of a gated MLP's two input rows as the key, by chapter 1's
    thresholds: one row per (layer, key), the shares passing each test; cached per layer under `06_key_choice`
    (the other key's lens costs as much as the chosen one's). matrices: as `token_lens`."""
    feats = lens_rows[lens_rows["dictionary"] == "features"]
    provenance = ctx.provenance(**dataclasses.asdict(config), step="key_choice")
    # what the other key's lens reads, made only if a layer is computed (a 256,000-token vocabulary's strings
    # take seconds)
    tokens = functools.cache(
        lambda: (lens.content_ids(model, config.exclude_tokens), lens.token_strings(model)))

    def layer(sae) -> dict[str, pd.DataFrame]:
        b, rows = ffkv.ff_block(model, mlp_layer_for(sae)), []
        for key in ffkv.KEYS if b.gated else ("up",):
            chosen = key == config.key or not b.gated
            if chosen:  # already in lens_rows
                df = lens_rows[(lens_rows["dictionary"] == "neurons") & (lens_rows["layer"] == sae.layer)]
            else:
                keep, vocab = tokens()
                df = neuron_lens(model, sae, config, feats, vocab=vocab, keep=keep, key=key, dtype=ctx.dtype,
                                 matrices=matrices())
            rows.append({"layer": sae.layer, "key": key + (" (chosen)" if chosen else ""),
                         "concentrated": df["enc_concentrated"].mean(), "coherent": df["enc_coherent"].mean(),
                         "passes the rule": df["enc_predicts"].mean()})
        return {"rows": pd.DataFrame(rows)}

    paired = described(_paired(saes))  # neuron_lens reads only the SAE's layer: no weights loaded
    return io.layer_tables(ctx.params.target, "06_key_choice", paired, provenance, layer).get(
        "rows", pd.DataFrame(columns=["layer", "key", "concentrated", "coherent", "passes the rule"]))


# ----------------------------------------------------------------------------------------------------------
# Chapter 2: attention reads


def reads_layer(model, sae, cfg: Config, dtype=None, device=None) -> pd.DataFrame:
    """Head reads of unit-norm feature, neuron and null directions by every later attention layer.

    One row per (dictionary, row, read_layer): mean z-score over that layer's heads and the share of heads
    whose read exceeds the q_null quantile of a separate null sample, for q, k and v. All directions are unit
    norm, so one null serves all three dictionaries and a neuron's large value vector counts for no more than
    its direction.
    """
    L = mlp_layer_for(sae)
    dirs = _directions(model, sae, cfg, offset=20)
    thr = _directions(model, sae, cfg, offset=30)["null"]
    names = [*dirs, "thr"]
    sizes = [len(dirs[n]) for n in dirs] + [len(thr)]
    stack = F.normalize(torch.cat([*dirs.values(), thr]).float(), dim=1).to(thr.dtype)
    frames, later = [], range(L + 1, model.cfg.n_layers)
    bar = progress_bar(len(later), True, f"attention reads of block {L}'s directions", unit="layer")
    for read_layer in later:
        reads = head_reads(read_by_layer(model, stack, read_layer), *layer_weights(model, read_layer),
                           dtype=dtype, device=device, progress=False)
        split = {r: dict(zip(names, reads[r].split(sizes))) for r in READS}
        for name in dirs:
            cols = {"dictionary": name, "row": np.arange(len(dirs[name])), "layer": sae.layer,
                    "mlp_layer": L, "read_layer": read_layer, "distance": read_layer - L}
            for r in READS:
                z, part = null_zscores(split[r][name], split[r]["thr"], q=cfg.q_null)
                cols[f"{r}_z_mean"] = z.mean(1).numpy()
                cols[f"{r}_part_frac"] = part.float().mean(1).numpy()
            frames.append(pd.DataFrame(cols))
        bar.update(1)
    bar.close()
    return pd.concat(frames, ignore_index=True) if frames else reads_layer_empty()


def reads_layer_empty() -> pd.DataFrame:
    """The reads of the last block (no later attention), typed so that concatenation keeps numeric columns."""
    ints = ("row", "layer", "mlp_layer", "read_layer", "distance")
    dtypes = {"dictionary": object, **dict.fromkeys(ints, np.int64),
              **{f"{r}_{s}": np.float32 for r in READS for s in ("z_mean", "part_frac")}}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


def attention_reads(ctx, cfg: Config, model, saes) -> pd.DataFrame:
    """`reads_layer` for every paired SAE, cached per layer under `06_attention_reads`."""
    provenance = ctx.provenance(**dataclasses.asdict(cfg), step="attention_reads")
    tabs = io.layer_tables(ctx.params.target, "06_attention_reads", _paired(saes), provenance, lambda sae: {
        "rows": reads_layer(model, sae, cfg, dtype=ctx.dtype, device=ctx.device)})
    return tabs["rows"] if tabs else reads_layer_empty()


def per_row_reads(reads: pd.DataFrame) -> pd.DataFrame:
    """Means over reading layers: one row per (dictionary, layer, row), as chapter 3 compares them."""
    value_cols = [c for c in reads.columns if c.endswith(("_z_mean", "_part_frac"))]
    return reads.groupby(["dictionary", "layer", "row"], as_index=False)[value_cols].mean()


def reads_by_distance(reads: pd.DataFrame) -> pd.DataFrame:
    """Share of heads beating the null by distance from the MLP: dictionary, distance, read, share."""
    by = reads.groupby(["dictionary", "distance"])[[f"{r}_part_frac" for r in READS]].mean().reset_index()
    long = by.melt(id_vars=["dictionary", "distance"], var_name="read", value_name="share")
    long["read"] = long["read"].map({"q_part_frac": "query", "k_part_frac": "key", "v_part_frac": "value (OV)"})
    return long


# ----------------------------------------------------------------------------------------------------------
# Chapter 3: populations


def populations(lens_rows: pd.DataFrame, reads: pd.DataFrame, cfg: Config, *, n_boot: int = 1000,
                **label_params) -> dict[str, pd.DataFrame]:
    """Chapter 3 on every dictionary: output-side labels, then semantic against non-semantic reads.

    Returns {"labels": rows with `dec_label`, "shares": label shares per dictionary, "contrast": per
    dictionary and read column, Cliff's delta (semantic minus non-semantic) with a bootstrap interval and the
    Mann-Whitney p-value}. label_params: chapter 3's labelling parameters (`populations.label_side`).
    """
    labels = lens_rows.assign(dec_label=pops.label_side(lens_rows, "dec", **label_params))
    shares = (labels.groupby("dictionary")["dec_label"].value_counts(normalize=True)
              .rename("share").reset_index())
    merged = labels[["dictionary", "layer", "row", "dec_label"]].merge(per_row_reads(reads),
                                                                       on=["dictionary", "layer", "row"])
    rows, contrasts = [], [(n, c) for n in DICTIONARIES for c in ("q_z_mean", "k_z_mean", "v_z_mean")]
    bar = progress_bar(len(contrasts) * n_boot, True, "bootstraps of the label contrasts", unit="resample")
    for (name, col) in contrasts:
        part = merged[merged["dictionary"] == name]
        x = part.loc[part["dec_label"] == "semantic", col]
        y = part.loc[part["dec_label"] == "non-semantic", col]
        delta, lo, hi = pops.bootstrap_ci(x, y, "cliffs_delta", n_boot=n_boot, seed=cfg.seed, bar=bar)
        _, p, _ = pops.mann_whitney(x, y)
        rows.append({"dictionary": name, "read": col, "n semantic": len(x), "n non-semantic": len(y),
                     "cliffs_delta": delta, "ci_lo": lo, "ci_hi": hi, "p_value": p})
    bar.close()
    return {"labels": labels, "shares": shares, "contrast": pd.DataFrame(rows)}


# ----------------------------------------------------------------------------------------------------------
# Alignment from weights, against a null of the same set sizes


FEATURES_SIDE, NEURONS_SIDE = "SAE features vs value vectors", "value vectors vs SAE features"


def alignment(ctx, cfg: Config, model, saes) -> pd.DataFrame:
    """`alignment_rows`, cached under `06_alignment`."""
    provenance = ctx.provenance(**dataclasses.asdict(cfg), step="alignment")
    return io.cached_tables(ctx.params.target, ["06_alignment"], provenance, lambda: {
        "06_alignment": alignment_rows(model, saes, cfg, device=ctx.device)},
        label="06_ffkv_baseline: alignment")["06_alignment"]


def alignment_rows(model, saes, cfg: Config, *, device=None) -> pd.DataFrame:
    """Max cosine of SAE decoder rows against the value vectors of their paired and earlier MLP blocks, and of
    each value vector against the SAEs that see its write; beside each, random directions (as many as the rows,
    at least n_null) compared with the very same set, so set size and dimension are the null's too.

    One draw of random directions per side serves every layer: it is compared with each block's value vectors
    (or each SAE's decoder) once, and a layer's null is the running maximum over the sets that layer sees, so
    the null changes with depth only as the set does (and costs one product per set, not one per pair).
    One row per compared direction: direction, population ("real" / "null"), layer, row, set_size, max_cos.
    """
    paired = _paired(saes)
    metas = described(paired)
    layers = sorted({mlp_layer_for(s) for s in metas})
    values = {L: ffkv.value_vectors(ffkv.ff_block(model, L)) for L in layers}
    values = {L: V[: _first(len(V), cfg.max_neurons)] for L, V in values.items()}
    n_rows = {s.layer: _first(s.d_sae, cfg.max_features) for s in metas}
    opts = dict(signed=cfg.signed, device=device)
    d = int(model.cfg.d_model)
    null_for_values = _null_atoms(max(n_rows.values()), d, cfg, seed=cfg.seed)
    null_for_decoders = _null_atoms(max(len(V) for V in values.values()), d, cfg, seed=cfg.seed + 500)
    null_rows = {L: ffkv.max_cosine(null_for_values, V, **opts)[0] for L, V in values.items()}
    # one SAE at a time: each (SAE, block) pair's cosines once, read both ways (the two sides' real rows share
    # every product), and the decoder's null maxima, before the next SAE is loaded
    best_rows, best_cols, null_cols = {}, {}, {}
    n_pairs = sum(1 + sum(L <= mlp_layer_for(s) for L in values) for s in metas)  # each with its null
    bar = progress_bar(n_pairs, True, "max cosines of decoders and value vectors", unit="product")
    for sae in paired:
        decoder = sae.W_dec[: n_rows[sae.layer]]
        for L in [L for L in values if L <= mlp_layer_for(sae)]:
            r, c = ffkv.max_cosine_both(decoder, values[L], **opts)
            best_rows[sae.layer] = torch.maximum(best_rows.get(sae.layer, r), r)
            best_cols[L] = torch.maximum(best_cols.get(L, c), c)
            bar.update(1)
        null_cols[sae.layer] = ffkv.max_cosine(null_for_decoders, decoder, **opts)[0]
        bar.update(1)
        del decoder, sae
    bar.close()
    rows = []
    for sae in metas:
        seen = [L for L in values if L <= mlp_layer_for(sae)]
        rows += _frames(FEATURES_SIDE, sae.layer, best_rows[sae.layer], _running_max(null_rows, seen, cfg,
                        n_rows[sae.layer]), sum(len(values[L]) for L in seen))
    for L, V in values.items():
        seen = [s.layer for s in metas if mlp_layer_for(s) >= L]
        rows += _frames(NEURONS_SIDE, L, best_cols[L], _running_max(null_cols, seen, cfg, len(V)),
                        sum(n_rows[k] for k in seen))
    return pd.concat(rows, ignore_index=True)


def _null_atoms(n_longest: int, d: int, cfg: Config, *, seed: int) -> torch.Tensor:
    """[n, d] random unit directions, n = max(n_null, n_longest): the most null rows any one set of real rows
    compared with them needs (each set's null takes its first rows, `_running_max`)."""
    return ffkv.random_atoms(max(cfg.n_null, n_longest), d, seed=seed)


def _running_max(maxima: dict, keys: list, cfg: Config, n_real: int) -> torch.Tensor:
    """[max(n_null, n_real)] the null rows' max cosine over the sets `keys` (a layer's null like its n_real
    rows: as many, at least n_null)."""
    best = torch.stack([maxima[k] for k in keys]).amax(0)
    return best[: max(cfg.n_null, n_real)]


def _frames(direction, layer, real: torch.Tensor, null: torch.Tensor, size: int) -> list[pd.DataFrame]:
    """The real rows' max cosines beside the null's, compared with the very same set (of `size` rows)."""
    return [pd.DataFrame({"direction": direction, "population": pop, "layer": layer,
                          "row": np.arange(len(values)), "set_size": size, "max_cos": values.numpy()})
            for pop, values in (("real", real), ("null", null))]


def alignment_shares(rows: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Per direction and layer: aligned / unaligned shares and the median max cosine of the real rows, the same
    of the null rows (same set, same dimension), and the excess of each over its null."""
    out = []
    for (direction, layer), part in rows.groupby(["direction", "layer"]):
        row = {"direction": direction, "layer": layer, "rows": int((part["population"] == "real").sum()),
               "set_size": int(part["set_size"].iloc[0])}
        for pop, suffix in (("real", ""), ("null", " (null)")):
            cos = torch.tensor(part.loc[part["population"] == pop, "max_cos"].to_numpy())
            shares = ffkv.alignment_shares(cos, aligned=cfg.aligned, unaligned=cfg.unaligned)
            row.update({f"{name}{suffix}": value for name, value in shares.items()})
        for name in ("aligned", "unaligned", "median"):
            row[f"{name} excess"] = row[name] - row[f"{name} (null)"]
        out.append(row)
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------------------------------------
# Held-out text: each dictionary's code beside a random dictionary of the same size and k


def held_out_checks(ctx, cfg: Config, saes, *, full=None) -> pd.DataFrame:
    """`activation_checks` on held-out stories, cached under `06_activation_checks`; the full model is loaded
    only when the table must be computed."""
    provenance = ctx.provenance(**dataclasses.asdict(cfg), step="held_out_checks")

    def compute():
        model = full if full is not None else ctx.load_full_model()
        tokens, bos = ctx.held_out_rows(model, cfg.n_eval_tokens, row_len=min(ROW_LEN, model.cfg.n_ctx))
        return {"06_activation_checks": activation_checks(model, saes, tokens, cfg, bos_id=bos)}

    return io.cached_tables(ctx.params.target, ["06_activation_checks"], provenance, compute,
                            label="06_ffkv_baseline: held-out checks")["06_activation_checks"]


@torch.no_grad()
def activation_checks(model, saes, tokens: torch.Tensor, cfg: Config, *, bos_id: int | None = None,
                      batch_rows: int = 64) -> pd.DataFrame:
    """Explained variance and active latents of each dictionary's code on held-out tokens, each beside a random
    dictionary of the same size coding the same activations with the same k (`ffkv.random_dictionary_code`).

    model: a HookedTransformer; tokens: [rows, ctx]. Per paired SAE: the TopK-FF code (k = cfg.topk over
    cfg.topk_of latents; "neurons (other TopK)" the other choice) of block L's MLP output, and the SAE's code of
    its own site (the null's k: the SAE's mean L0, rounded). explained_variance = 1 - sum|y - y_hat|^2 /
    sum|y - mean|^2; active = share of latents in the code on at least cfg.alive_share of the tokens. BOS
    positions (bos_id) are left out, as in the SAEs' own evaluation.
    """
    chosen = "topk" if cfg.topk_of == "plain" else "topk_normalized"
    paired = _paired(saes)  # lazy where `saes` is: SAE i is loaded when its blocks have run
    hooks = [[f"blocks.{L}.hook_resid_mid", f"blocks.{L}.hook_mlp_out", s.hook_name]
             for s, L in ((s, mlp_layer_for(s)) for s in described(paired))]
    rows: dict[int, list[dict]] = {}
    # three codes per SAE, each beside its null: seconds apiece at a real width
    bar = progress_bar(CHECKS_PER_SAE * len(paired), True, "held-out checks", unit="code")
    try:
        for i, acts in hooks_in_turn(model, tokens, hooks, bos_id=bos_id, batch_rows=batch_rows):
            rows[i] = _sae_checks(model, paired[i], acts, chosen, cfg, bar)
            del acts  # released before the next stretch of blocks runs
    finally:
        bar.close()
    return pd.DataFrame([r for i in sorted(rows) for r in rows[i]])


CHECKS_PER_SAE = 3  # the rows `_sae_checks` returns


def _sae_checks(model, sae, acts: dict[str, torch.Tensor], chosen: str, cfg: Config, bar) -> list[dict]:
    """The three check rows of one paired SAE (both TopK-FF codes of its MLP block, its own code) from the
    activations of its hooks, {hook: [n, d]}; bar (`streaming.progress_bar`) counts the rows."""
    L = mlp_layer_for(sae)
    b = ffkv.ff_block(model, L)
    x, y, site = acts[f"blocks.{L}.hook_resid_mid"], acts[f"blocks.{L}.hook_mlp_out"], acts[sae.hook_name]
    a = ffkv.latents(b, model.blocks[L].ln2(x.to(b.W_out.dtype)))
    rows, nulls = [], {}  # both TopK codes reconstruct y: one random dictionary code per k serves both
    for v in ("topk", "topk_normalized"):
        z = ffkv.encode(b, a, v, k=min(cfg.topk, b.d_mlp))
        of = "plain" if v == "topk" else "normalised"
        rows.append(_check_row("neurons" if v == chosen else "neurons (other TopK)", sae.layer, L,
                               f"MLP output, TopK of {of} latents", y, ffkv.decode(b, z, v).float(),
                               (z != 0).sum(0), cfg, nulls))
        bar.update(1)
    site_hat, uses = sae_code(sae, site)
    rows.append(_check_row("features", sae.layer, L, f"SAE site ({sae.hook_name.rsplit('.', 1)[-1]})",
                           site, site_hat, uses, cfg, {}))
    bar.update(1)
    return rows


@torch.no_grad()
def sae_code(sae, site: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor,
                                                                                         torch.Tensor]:
    """The SAE's reconstruction of site [n, d_in], encoded a chunk of tokens at a time: the code [n, d_sae]
    is never held whole (805 MB at 8,192 tokens x 24,576 features, and sae-lens's temporaries as much again).
    Returns (reconstruction [n, d_in] fp32, uses [d_sae] int64: on how many tokens each feature fires)."""
    rows = max(1, chunk_elements // sae.d_sae)
    site_hat = torch.empty(site.shape, dtype=torch.float32, device=site.device)
    uses = torch.zeros(sae.d_sae, dtype=torch.long, device=site.device)
    for i in range(0, len(site), rows):
        f = sae.sae.encode(site[i:i + rows].to(sae.W_dec.dtype))
        site_hat[i:i + rows] = sae_decode(sae, f).float()
        uses += (f != 0).sum(0)
    return site_hat, uses


@torch.no_grad()
def hooks_in_turn(model, tokens: torch.Tensor, groups: list[list[str]], *, bos_id: int | None = None,
                  batch_rows: int = 64):
    """Yields (i, {hook: fp32 [n_tokens, d]}) for each group i of `blocks.{L}.…` hook names, in the order of
    the last block each group reads, BOS positions dropped. tokens: [rows, ctx].

    One forward pass, run a stretch of blocks at a time: each stretch starts from the residual stream the
    last one left ([rows, ctx, d_model], kept for every row), so every block runs once, as in a single pass,
    and only the activations a later group still reads are held between stretches (a block or two, not every
    block's: 0.9 GB at GPT-2 small's 12 blocks x 3 hooks x 8,192 tokens). No logits are computed."""
    layers = {h: hook_layer(h) for g in groups for h in g}
    if None in layers.values():
        raise ValueError(f"hooks_in_turn reads block hooks only (`blocks.{{L}}.…`), got "
                         f"{sorted(h for h, L in layers.items() if L is None)}")
    last = [max(layers[h] for h in g) for g in groups]
    order = sorted(range(len(groups)), key=last.__getitem__)
    streams = [BlockStream(model, b) for b in tokens.split(batch_rows)]  # the work before block 0, per batch
    kept = [(s.tokens != bos_id).reshape(-1) if bos_id is not None else slice(None) for s in streams]
    held: dict[str, torch.Tensor] = {}
    start = 0
    for j, i in enumerate(order):
        if last[i] >= start:
            wanted = sorted({h for k in order[j:] for h in groups[k] if start <= layers[h] <= last[i]})
            held.update(_run_blocks(streams, kept, last[i], wanted))
            start = last[i] + 1
        yield i, {h: held[h] for h in groups[i]}
        later = {h for k in order[j + 1:] for h in groups[k]}
        for h in set(held) - later:
            del held[h]


def _run_blocks(streams: list[BlockStream], kept: list, last: int,
                hooks: list[str]) -> dict[str, torch.Tensor]:
    """Runs each batch's stream on through block `last` and returns {hook: fp32 [n_tokens, d]} at the kept
    positions."""
    out: dict[str, list] = {h: [] for h in hooks}
    for stream, keep in zip(streams, kept):
        cache = stream.run_to(last, hooks)
        for h in hooks:
            out[h].append(cache[h].reshape(-1, cache[h].shape[-1])[keep].float())
    # each hook's batches are released as they are joined: the set is never held twice
    return {h: torch.cat(out.pop(h)) for h in list(out)}


def checks_long(checks: pd.DataFrame) -> pd.DataFrame:
    """Each code's explained variance and its random dictionary's, one row each: layer, code, explained
    variance, and the row's other columns (for hover text)."""
    real = checks.assign(code=checks["dictionary"], **{"explained variance": checks["explained_variance"]})
    null = checks.assign(code=checks["dictionary"] + ": random dictionary",
                         **{"explained variance": checks["explained_variance (null)"]})
    return pd.concat([real, null], ignore_index=True)


def _check_row(dictionary, layer, mlp_layer, what, y, y_hat, uses, cfg: Config, nulls: dict) -> dict:
    """One dictionary's measures on y [n, d] beside a random dictionary with as many atoms and the same k.
    uses: [m] on how many of the n tokens each latent is in the code; nulls: the random dictionary codes of
    this y computed so far, by (atoms, k), filled here (the null depends on nothing else)."""
    n, m = len(y), len(uses)
    l0 = float(uses.sum()) / max(1, n)  # the mean number of latents per token
    k = max(1, min(m, round(l0)))
    if (m, k) not in nulls:
        atoms = ffkv.random_atoms(m, y.shape[1], seed=cfg.seed + 7000 + layer)
        nulls[m, k] = ffkv.random_dictionary_code(y, atoms, k)
    y_null, null_uses = nulls[m, k]
    return {"dictionary": dictionary, "layer": layer, "mlp_layer": mlp_layer, "reconstructs": what,
            "tokens": n, "latents": m, "mean_l0": l0, "null k": k,
            "explained_variance": ffkv.explained_variance(y, y_hat),
            "explained_variance (null)": ffkv.explained_variance(y, y_null),
            "active": ffkv.alive_share(uses, n, cfg.alive_share),
            "active (null)": ffkv.alive_share(null_uses, n, cfg.alive_share)}


# ----------------------------------------------------------------------------------------------------------
# The one-table answer: each dictionary beside its own null


def summary(w: dict[str, pd.DataFrame], checks: pd.DataFrame | None, cfg: Config) -> pd.DataFrame:
    """One row per measure: the mean for SAE features and for MLP neurons, each beside its null, the excess
    over it, a test of the two dictionaries and the verdict.

    Only measures defined alike for both dictionaries are counted. Token lens, reads and labels: one null
    (random directions judged by the same rule) for both, so the Mann-Whitney test of features against neurons
    (for 0/1 values a test of two proportions) compares their excesses. Alignment: each direction against random
    directions compared with the same set; the two excesses are compared by a z-test of the difference of two
    differences of proportions. Held-out checks (one value per layer): each code against a random dictionary of
    its size and k; the verdict names a dictionary only when its excess is higher in every layer. `verdict`
    names the higher dictionary when p < cfg.alpha, else "no clear difference".
    """
    lens_rows, per_row = w["lens_rows"], per_row_reads(w["reads"])
    labels = lens_rows.assign(dec_label=pops.label_side(lens_rows, "dec"))
    out = []
    for side, name in SIDES.items():
        out.append(_shared_null_row(f"token lens, {name}: passes chapter 1's rule", "share of rows",
                                    _by_dict(lens_rows, lens_rows[f"{side}_predicts"]), cfg.alpha))
    for r, name in (("q", "query"), ("k", "key"), ("v", "value (OV)")):
        out.append(_shared_null_row(f"attention: later heads whose {name} read beats the null",
                                    "share of heads", _by_dict(per_row, per_row[f"{r}_part_frac"]), cfg.alpha))
    out.append(_shared_null_row("populations: labelled semantic (output side)", "share of rows",
                                _by_dict(labels, labels["dec_label"] == "semantic"), cfg.alpha))
    rows = w["alignment"]
    for cut, test in ((f">= {cfg.aligned}", lambda c: c >= cfg.aligned),
                      (f"< {cfg.unaligned}", lambda c: c < cfg.unaligned)):
        values = {(d, pop): test(rows.loc[(rows["direction"] == side) & (rows["population"] == pop),
                                          "max_cos"].to_numpy()).astype(float)
                  for d, side in (("features", FEATURES_SIDE), ("neurons", NEURONS_SIDE))
                  for pop in ("real", "null")}
        out.append(_own_null_row(f"alignment: max cosine to the other dictionary {cut}", values, cfg.alpha))
    if checks is not None and len(checks):
        out.append(_layer_row("held-out text: explained variance", checks, "explained_variance"))
        out.append(_layer_row(f"held-out text: latents active on >= {cfg.alive_share:g} of tokens", checks,
                              "active"))
    return pd.DataFrame(out)


def _by_dict(df: pd.DataFrame, values: pd.Series) -> dict[str, np.ndarray]:
    return {d: values[df["dictionary"] == d].to_numpy(dtype=float) for d in DICTIONARIES}


def _mean(v) -> float:
    return float(np.mean(v)) if len(v) else np.nan


def _verdict(p: float, higher: bool, alpha: float) -> str:
    if np.isnan(p):
        return "n/a"
    return ("features higher" if higher else "neurons higher") if p < alpha else "no clear difference"


def _shared_null_row(measure: str, unit: str, values: dict, alpha: float) -> dict:
    f, n, null = (_mean(values[d]) for d in DICTIONARIES)
    _, p, _ = pops.mann_whitney(values["features"], values["neurons"])
    return {"measure": measure, "unit": unit, "features": f, "features null": null, "neurons": n,
            "neurons null": null, "features excess": f - null, "neurons excess": n - null, "p": p,
            "verdict": _verdict(p, f > n, alpha)}


def _own_null_row(measure: str, values: dict, alpha: float) -> dict:
    """Shares of two dictionaries, each against its own null: z-test of (f - f0) - (n - n0)."""
    m = {key: _mean(v) for key, v in values.items()}
    ex_f, ex_n = m[("features", "real")] - m[("features", "null")], m[("neurons", "real")] - m[("neurons", "null")]
    var = sum(m[key] * (1 - m[key]) / len(v) for key, v in values.items() if len(v))
    diff = ex_f - ex_n
    p = (1.0 if diff == 0 else 0.0) if var == 0 else float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))
    return {"measure": measure, "unit": "share of rows", "features": m[("features", "real")],
            "features null": m[("features", "null")], "neurons": m[("neurons", "real")],
            "neurons null": m[("neurons", "null")], "features excess": ex_f, "neurons excess": ex_n, "p": p,
            "verdict": _verdict(p, diff > 0, alpha)}


def _layer_row(measure: str, checks: pd.DataFrame, col: str) -> dict:
    """Mean over layers of a held-out measure and of its null, for features and neurons; a verdict only when
    one dictionary's excess over its null is higher in every layer."""
    mine = checks[checks["dictionary"].isin(("features", "neurons"))]
    real = mine.pivot(index="layer", columns="dictionary", values=col)
    null = mine.pivot(index="layer", columns="dictionary", values=f"{col} (null)")
    excess = real - null
    diff = excess["features"] - excess["neurons"]
    verdict = ("features higher in every layer" if (diff > 0).all() else
               "neurons higher in every layer" if (diff < 0).all() else "mixed across layers")
    return {"measure": measure, "unit": "mean over layers", "features": float(real["features"].mean()),
            "features null": float(null["features"].mean()), "neurons": float(real["neurons"].mean()),
            "neurons null": float(null["neurons"].mean()), "features excess": float(excess["features"].mean()),
            "neurons excess": float(excess["neurons"].mean()), "p": np.nan, "verdict": verdict}


VALUE_COLUMNS = ("features", "features null", "neurons", "neurons null", "features excess", "neurons excess")


def for_people(answer: pd.DataFrame) -> pd.DataFrame:
    """The summary with its numbers as text: shares as percentages (excesses signed), other means to two
    decimals, p to two significant digits (the stored table keeps the numbers)."""
    out = answer.copy()
    for col in VALUE_COLUMNS:
        signed = "+" if col.endswith("excess") else ""
        out[col] = [("" if np.isnan(v) else f"{v:{signed}.1%}" if u.startswith("share") else f"{v:{signed}.2f}")
                    for v, u in zip(answer[col], answer["unit"])]
    out["p"] = ["" if np.isnan(p) else f"{p:.2g}" for p in answer["p"]]
    return out


# ----------------------------------------------------------------------------------------------------------
# Findings: every result sentence of the page


def findings(t: Tables) -> dict[str, list[str]]:
    """The chapter's result sentences, computed from the tables.

    Keys: "lens" (chapter 1's rule per side), "reads" (chapter 2), "alignment" (each direction beside its
    null), "held_out" (each code beside a random dictionary), "summary" (the tally of verdicts).
    """
    out: dict[str, list[str]] = {"lens": [], "reads": [], "alignment": [], "held_out": [], "summary": []}
    rates = t.lens_rates[t.lens_rates["test"] == "predicts"].groupby(["side", "dictionary"])["share"].mean()
    n = t.lens_rows.groupby("dictionary").size()
    for side in SIDES.values():
        r = rates.loc[side]
        out["lens"].append(f"{side}: {percent(r['features'])} of {n['features']:,} SAE features and "
                           f"{percent(r['neurons'])} of {n['neurons']:,} MLP neurons pass chapter 1's rule, "
                           f"against {percent(r['null'])} of {n['null']:,} random directions.")
    s = t.summary.set_index("measure")
    for measure, row in s.iterrows():
        if measure.startswith("attention"):
            out["reads"].append(f"{measure}: features {percent(row['features'])}, neurons "
                                f"{percent(row['neurons'])}, random directions {percent(row['features null'])} "
                                f"(chance {percent(1 - t.config.q_null)}); {row['verdict']}.")
    for direction, part in t.alignment_shares.groupby("direction"):
        m = part[["aligned", "aligned (null)", "median", "median (null)", "set_size"]].mean()
        out["alignment"].append(
            f"{direction}: {percent(m['aligned'])} at cosine >= {t.config.aligned:g}, against "
            f"{percent(m['aligned (null)'])} for random directions compared with the same "
            f"{m['set_size']:,.0f} rows on average; median max cosine {m['median']:.2f} against "
            f"{m['median (null)']:.2f} (excess {m['median'] - m['median (null)']:+.2f}).")
    checks = t.checks[t.checks["dictionary"].isin(("features", "neurons"))]
    for name, part in checks.groupby("dictionary"):
        m = part.mean(numeric_only=True)
        out["held_out"].append(
            f"{name}: explained variance {m['explained_variance']:.2f} against {m['explained_variance (null)']:.2f}"
            f" for a random dictionary of the same size and k; {percent(m['active'])} of latents active "
            f"(null {percent(m['active (null)'])}), {m['mean_l0']:.1f} per token on average.")
    tally = t.summary["verdict"].value_counts()
    out["summary"].append(f"Of {len(t.summary)} measures, each taken against its null: "
                          + "; ".join(f"{v}: {c}" for v, c in tally.items()) + ".")
    return out
