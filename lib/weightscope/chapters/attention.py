"""Chapter 2 in one call: how strongly later heads read every SAE feature, against two nulls.

    config = attention.Config(q_null=0.99, ...)
    tables = attention.run(ctx, config, model=model, saes=saes)

`run` owns the per-layer caching of the reads and of the query-key pairs, the provenance, the `02_heads` and
`02_features` tables (chapter 3 reads the latter), the participation summary against the isotropic and the
decoder-covariance null, and the depth-shape rule; `findings(tables)` returns the page's result sentences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.chapters.context import TableInput, sae_metadata
from weightscope.chapters.findings import binomial_tolerance, curve_shape, number, percent, shape_words
from weightscope.compute import attention
from weightscope.config.params import ParamsError
from weightscope.config.paths import progress_enabled

SIDES = {"q": "query", "k": "key", "v": "value (OV)"}
NULLS = {"": "isotropic", "_cov": "decoder covariance"}
SUMMARIES = ("mean", "max_abs")


@dataclass(frozen=True)
class Config:
    """Chapter 2's parameters (each a notebook parameter, defaults argued on the page)."""

    q_null: float = 0.99  # a feature participates in a head when its read exceeds this quantile of the null
    n_null: int = 4096  # directions per SAE layer in each null
    max_features: int = 0  # analyse only the first N features of each SAE (0: all)
    n_pair_heads: int = 3  # heads per SAE (first reading layer, most key reads) for the QK pairs
    top_pairs: int = 12  # query-key feature pairs kept per head
    qk_max_offset: int = 32  # pairs are ranked over rotary offsets 0..qk_max_offset
    qk_summary: str = "mean"  # mean | max_abs: the summary of a pair's score over those offsets
    seed: int = 0  # seed of the null directions
    shape_se: float = 2.0  # a change of participation smaller than this many binomial standard errors is none

    def __post_init__(self):
        problems = []
        if not 0.0 < self.q_null < 1.0:
            problems.append(f"q_null = {self.q_null} is a quantile level: use a value in (0, 1)")
        if self.n_null < 100:
            problems.append(f"n_null = {self.n_null}: use at least 100 null directions")
        if self.max_features < 0:
            problems.append(f"max_features = {self.max_features}: use 0 (all features) or a positive number")
        if self.top_pairs < 1 or self.n_pair_heads < 0:
            problems.append(f"need top_pairs >= 1 and n_pair_heads >= 0; got {self.top_pairs}, {self.n_pair_heads}")
        if self.qk_max_offset < 0:
            problems.append(f"qk_max_offset = {self.qk_max_offset}: use 0 or a positive number of positions")
        if self.qk_summary not in SUMMARIES:
            problems.append(f"qk_summary {self.qk_summary!r}: use one of {', '.join(SUMMARIES)}")
        if self.shape_se < 0:
            problems.append(f"shape_se = {self.shape_se}: use a non-negative number of standard errors")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def problems(self, dims) -> list[str]:
        """Checks that need the model's context length; `dims`: `model.cfg`, or the pre-flight's `ModelDims`."""
        n_ctx = getattr(dims, "n_ctx", None)
        if n_ctx is not None and self.qk_max_offset >= n_ctx:
            return [f"qk_max_offset = {self.qk_max_offset} must be below the context length n_ctx = {n_ctx}"]
        return []

    def inputs(self) -> list:
        """What `run` reads besides the model and SAEs (checked by the pre-flight): chapter 1's features."""
        return [TableInput("01_features", produced_by="01_output_tokens")]


NO_READER_REASON = ("no attention layer of the model reads any of the target's SAEs: each sits where no "
                    "later block's attention sees it (`hook_resid_post` of the last block, say), so there are "
                    "no head reads to measure; add SAEs of earlier layers (`layers:`) to run it.")


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to the target: no attention layer reads any of its SAEs (read from the
    SAEs' cfg.json for a local folder or the demo; a hub release is not read here and is never skipped)."""
    metas = sae_metadata(target, dims)
    if metas and all(_never_read(m, dims.n_layers) for m in metas):
        return NO_READER_REASON
    return None


def _never_read(meta, n_layers: int) -> bool:
    if meta.layer is None:
        return False
    try:
        return attention.first_reading_layer(meta.layer, meta.hook_name) >= n_layers
    except ValueError:  # a hook chapter 2 cannot place: `run` says so
        return False


@dataclass
class Tables:
    """What chapter 2 produces."""

    n_reads: int  # (feature, reading layer, head) reads behind the tables (the long table is not kept)
    heads: pd.DataFrame  # participation per (SAE layer, reading layer, head) (saved as 02_heads)
    features: pd.DataFrame  # one attention profile per feature (saved as 02_features, read by chapter 3)
    participation: pd.DataFrame  # side, null, rate, chance: pooled participation against each null
    depth: pd.DataFrame  # read_layer, side, null, fraction: participation over reading depth
    pairs: pd.DataFrame  # top query-key feature pairs per selected head, over rotary offsets
    offset_corr: pd.DataFrame  # head, offset, correlation of pair scores with those at offset 0
    rotary: bool  # whether the model has rotary positions (pairs then depend on the offset)
    config: Config = field(repr=False, default_factory=Config)
    unread: list = field(default_factory=list)  # SAE layers no attention layer reads (resid_post of the last)


def run(ctx, config: Config, *, model=None, saes=None) -> Tables:
    """Chapter 2 for ctx's target; needs chapter 1's `01_features` table (for the pairs' token labels)."""
    if model is None:
        model, saes = ctx.load_model_and_saes()
    problems = config.problems(model.cfg)
    if problems:
        raise ParamsError("; ".join(problems) + ".")
    target = ctx.params.target
    labels = io.require_table(target, "01_features", produced_by="01_output_tokens",
                              columns=["layer", "feature", "dec_top_tokens"])  # all `label_pairs` reads
    provenance = ctx.provenance(**dataclasses.asdict(config))
    rotary = attention.rotary_inverse_frequencies(model.cfg) is not None
    offsets = list(range(config.qk_max_offset + 1)) if rotary else None

    def one_layer(sae) -> dict[str, pd.DataFrame]:
        W_dec, reads = sae_reads(model, sae, config, dtype=ctx.dtype, device=ctx.device)
        pairs, corr = qk_pairs_for_sae(model, W_dec, sae.layer, reads, config, offsets)
        # the long table (features x reading layers x heads rows) is aggregated here, one SAE at a time
        return {"heads": attention.reads_summary(reads), "features": feature_profiles(reads),
                "pairs": pairs, "offset_corr": corr}

    tabs = io.layer_tables(target, "02_attention_reads", saes, provenance, one_layer)
    heads, features = tabs["heads"], tabs["features"]
    key = io.cache_key(provenance=provenance)
    io.save_table(heads, target, "02_heads", key=key, params=provenance)
    io.save_table(features, target, "02_features", key=key, params=provenance)
    pairs = label_pairs(tabs["pairs"], labels)
    if len(pairs):
        io.save_table(pairs, target, "02_qk_pairs", key=key, params=provenance)
    return Tables(n_reads=int(heads["n_features"].sum()), heads=heads, features=features,
                  participation=participation(heads, config),
                  depth=depth_curves(heads), pairs=pairs, offset_corr=tabs["offset_corr"], rotary=rotary,
                  config=config, unread=sorted(set(saes.layers) - set(heads["layer"].tolist())))


def sae_reads(model, sae, config: Config, *, dtype, device):
    """Chapter 2's head reads of one SAE: (the decoder rows read [n, d_model], the reads table)."""
    W_dec = sae.W_dec if config.max_features <= 0 else sae.W_dec[: config.max_features]
    reads = attention.sae_attention_reads(model, W_dec, sae.layer, sae.hook_name, q=config.q_null,
                                          n_null=config.n_null, seed=config.seed + sae.layer,
                                          dtype=dtype, device=device)
    return W_dec, reads


def feature_profiles(reads: pd.DataFrame) -> pd.DataFrame:
    """Per feature and side: mean and max z-score and share of heads participating, against both nulls."""
    agg = {"n_heads": ("head", "size")}
    for s in SIDES:
        for suffix in NULLS:
            agg[f"{s}_z_mean{suffix}"] = (f"{s}_z{suffix}", "mean")
            agg[f"{s}_part_frac{suffix}"] = (f"{s}_part{suffix}", "mean")
        agg[f"{s}_z_max"] = (f"{s}_z", "max")
    return reads.groupby(["layer", "feature"]).agg(**agg).reset_index()


def participation(heads: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Share of (feature, head) pairs above each null's q_null quantile, per side: side, null, rate, chance.

    heads: `reads_summary` rows; each head's fraction weighted by its number of features, so the rate is the
    mean over every (feature, head) read without the long table.
    """
    n = heads["n_features"].to_numpy(dtype=float)
    rows = [{"side": name, "null": null_name,
             "rate": float((heads[f"{s}_frac{suffix}"].to_numpy(dtype=float) * n).sum() / n.sum()),
             "chance": 1.0 - config.q_null}
            for s, name in SIDES.items() for suffix, null_name in NULLS.items()]
    return pd.DataFrame(rows)


def depth_curves(heads: pd.DataFrame) -> pd.DataFrame:
    """Participation averaged over heads and SAE layers, per reading layer, side and null."""
    rows = []
    for s, name in SIDES.items():
        for suffix, null_name in NULLS.items():
            col = f"{s}_frac{suffix}"
            if col not in heads:
                continue
            for layer, value in heads.groupby("read_layer")[col].mean().items():
                rows.append({"read_layer": int(layer), "side": name, "null": null_name, "fraction": float(value)})
    return pd.DataFrame(rows, columns=["read_layer", "side", "null", "fraction"])


def depth_shapes(depth: pd.DataFrame, n_features: int, n_se: float) -> pd.DataFrame:
    """The depth-shape rule per side and null: side, null, shape, tolerance, n_layers.

    The tolerance is `n_se` binomial standard errors of a rate over `n_features` observations: the features,
    not the (feature, head) pairs, since one feature's reads by the heads of a layer are not independent.
    """
    rows = []
    for (side, null), part in depth.groupby(["side", "null"], sort=False):
        y = part.sort_values("read_layer")["fraction"].to_numpy()
        tol = binomial_tolerance(y, n_features, n_se)
        rows.append({"side": side, "null": null, "shape": curve_shape(y, tol), "tolerance": tol,
                     "n_layers": len(y)})
    return pd.DataFrame(rows, columns=["side", "null", "shape", "tolerance", "n_layers"])


@torch.no_grad()
def qk_pairs_for_sae(model, W_dec, sae_layer: int, reads: pd.DataFrame, config: Config, offsets):
    """Top QK pairs of one SAE's features for the `n_pair_heads` heads of its first reading layer whose keys
    read the most features, ranked by the `qk_summary` over `offsets`; and how scores at each offset correlate
    with those at offset 0 (on a sample of up to 256 x 256 pairs). Returns (pairs, offset_corr) frames."""
    pair_cols = ["head", "SAE layer", "score", "query feature", "key feature"]
    corr_cols = ["head", "offset", "correlation"]
    if len(reads) == 0 or config.n_pair_heads == 0:
        return pd.DataFrame(columns=pair_cols), pd.DataFrame(columns=corr_cols)
    first = int(reads["read_layer"].min())
    per_head = reads[reads["read_layer"] == first].groupby(["head", "kv_head"], as_index=False)["k_part"].mean()
    chosen = per_head.sort_values(["k_part", "head"], ascending=[False, True]).head(config.n_pair_heads)
    D = attention.read_by_layer(model, W_dec, first)
    W_Q, W_K, _, _ = attention.layer_weights(model, first)
    sample = torch.randperm(D.shape[0], generator=torch.Generator().manual_seed(config.seed))[:256]
    pairs, corr = [], []
    for h in chosen.itertuples():
        name = f"{first}.{h.head}"
        scores, qi, ki = attention.qk_pairs(D, D, W_Q[h.head], W_K[h.kv_head], top=config.top_pairs,
                                            offsets=offsets, cfg=model.cfg, summary=config.qk_summary,
                                            progress=progress_enabled())
        pairs += [{"head": name, "SAE layer": sae_layer, "score": s, "query feature": a, "key feature": b}
                  for s, a, b in zip(scores.tolist(), qi.tolist(), ki.tolist())]
        if offsets:
            Ds = D[sample].float()
            Q = attention.rotate_queries(Ds @ W_Q[h.head].float(), offsets, model.cfg)  # [n, n_off, d_head]
            S = (Q @ (Ds @ W_K[h.kv_head].float()).T).transpose(0, 1).reshape(len(offsets), -1)  # [n_off, pairs]
            r = np.corrcoef(S.cpu().numpy())[0]  # S is on the model's device
            corr += [{"head": name, "offset": o, "correlation": float(c)} for o, c in zip(offsets, r)]
    return pd.DataFrame(pairs, columns=pair_cols), pd.DataFrame(corr, columns=corr_cols)


def label_pairs(pairs: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Add each pair's features' top output tokens (chapter 1) as `query tokens` and `key tokens`."""
    if len(pairs) == 0:
        return pairs
    tokens = labels.set_index(["layer", "feature"])["dec_top_tokens"]

    def show(layer, feature):
        return " | ".join(list(tokens.get((layer, feature), []))[:5])

    out = pairs.copy()
    out["query tokens"] = [show(lay, f) for lay, f in zip(out["SAE layer"], out["query feature"])]
    out["key tokens"] = [show(lay, f) for lay, f in zip(out["SAE layer"], out["key feature"])]
    return out[["head", "SAE layer", "score", "query feature", "query tokens", "key feature", "key tokens"]]


def findings(t: Tables) -> dict[str, list[str]]:
    """The chapter's result sentences, computed from the tables (rules and tolerances stated).

    Keys: "participation" (against each null, per side), "depth" (the shape of each curve over reading
    depth), "pairs" (how QK pair scores drift with the rotary offset).
    """
    out: dict[str, list[str]] = {"participation": [], "depth": [], "pairs": []}
    part = t.participation.set_index(["side", "null"])["rate"]
    chance = 1.0 - t.config.q_null
    for side in SIDES.values():
        iso, cov = part[(side, NULLS[""])], part[(side, NULLS["_cov"])]
        out["participation"].append(
            f"{side}: {percent(iso)} of (feature, head) pairs beat the isotropic null, {percent(cov)} the "
            f"decoder-covariance null (chance: {percent(chance)}).")
    n_features = int(t.features.groupby("layer").size().min()) if len(t.features) else 0
    for r in depth_shapes(t.depth, n_features, t.config.shape_se).itertuples():
        out["depth"].append(f"{r.side} participation against the {r.null} null over {r.n_layers} reading layers "
                            f"{shape_words(r.shape)} (changes below {percent(r.tolerance)} ignored).")
    if not t.rotary:
        out["pairs"].append("this model has no rotary positions: one QK score per pair.")
    elif len(t.offset_corr):
        far = t.offset_corr[t.offset_corr["offset"] == t.offset_corr["offset"].max()]
        out["pairs"].append(
            f"QK pair scores at offset {int(far['offset'].iloc[0])} against offset 0: correlation from "
            f"{number(far['correlation'].min())} to {number(far['correlation'].max())} (median "
            f"{number(far['correlation'].median())}) over the {len(far)} selected heads.")
    return out
