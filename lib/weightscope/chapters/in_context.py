"""Chapter 7 in one call: do the weights-only verdicts of chapters 1-3 hold on held-out text?

    config = in_context.Config(n_tokens=32768, ...)
    tables = in_context.run(ctx, config)

Reads chapter 1's `01_features`, chapter 2's `02_qk_pairs` and chapter 3's `03_labels`; runs the target's real
forward pass (`ctx.load_full_model()`) over held-out stories (`load.corpora.held_out_windows`) in batches,
keeping only each feature's strongest firings within the memory budget (`compute.in_context.firing_pass`);
then measures each verdict where the features fire, beside a base rate or a null, with bootstrap intervals.
`findings(tables)` states every result from the one `summary` table (claim, weights-only number, in-context
number, base rate, difference with its interval, agreement).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.chapters.context import HELD_OUT_TEXT, TableInput
from weightscope.chapters.findings import number
from weightscope.compute import in_context as ic
from weightscope.compute.lens import output_matrix, token_strings
from weightscope.compute.populations import bootstrap_ci, bootstrap_one, token_kind
from weightscope.compute.streaming import progress_bar
from weightscope.config.params import ParamsError
from weightscope.config.paths import progress_enabled
from weightscope.load.sae_sequence import described

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
STEM = "07_in_context"
MIN_ITEMS = 5  # a claim resting on fewer features (or pairs) is inconclusive, whatever its interval
DIRECT_CLAIM = ("output: the direct path (decoder x unembedding) is about a feature's whole effect on its "
                "top tokens")
N_CLAIMS = 10  # rows of the summary table (`summarise`)
SENSITIVITY_GRID = (4, 8, 16, 32, 64, 128)  # strongest firings per feature used, for the sensitivity table


@dataclass(frozen=True)
class Config:
    """Chapter 7's parameters (each a notebook parameter, defaults argued on the page)."""

    n_tokens: int = 32768  # held-out story tokens the model reads
    row_len: int = 128  # tokens per row (each story starts with BOS; rows run across stories)
    memory_mb: int = 256  # budget for activations held at once (one batch, and the kept firings)
    sae_memory_mb: float = 2048  # SAE weights held at once by the activation pass, at the dtype they are
    # loaded in: more SAEs run in stretches of blocks, a group of SAEs each, every block still once
    n_keep: int = 64  # strongest firing positions kept per feature (lowered to fit memory_mb)
    k_out: int = 5  # weights-only top output tokens a next token must be among (<= chapter 1's k)
    m_in: int = 5  # weights-only top input tokens the current token must be among (<= chapter 1's k)
    min_firings: int = 8  # features with fewer kept firings are left out of the comparisons
    n_ablate: int = 6  # features per SAE whose total effect is measured by ablation (half predicting)
    ablate_positions: int = 16  # firing positions per ablated feature
    n_random_pairs: int = 24  # random query-key feature pairs per checked head (the attention null)
    direct_majority: float = 0.5  # the direct path is "about the whole effect" when its share's interval
    # lies within [direct_majority, 1 / direct_majority]
    n_boot: int = 1000  # bootstrap resamples for every interval
    seed: int = 0  # seed of the bootstrap and of the random pairs

    def __post_init__(self):
        problems = []
        for name in ("n_tokens", "row_len", "memory_mb", "n_keep", "k_out", "m_in", "min_firings"):
            if getattr(self, name) < 1:
                problems.append(f"{name} = {getattr(self, name)}: use a positive number")
        if not self.sae_memory_mb > 0:
            problems.append(f"sae_memory_mb = {self.sae_memory_mb}: use a positive number of MB")
        if self.row_len < 2:
            problems.append(f"row_len = {self.row_len}: use at least 2 tokens (a token and its next one)")
        if self.n_tokens < self.row_len:
            problems.append(f"n_tokens = {self.n_tokens} is below row_len = {self.row_len}: ask for one row "
                            f"at least")
        for name in ("n_ablate", "ablate_positions", "n_random_pairs"):
            if getattr(self, name) < 0:
                problems.append(f"{name} = {getattr(self, name)}: use 0 (skip) or a positive number")
        if not 0.0 < self.direct_majority < 1.0:
            problems.append(f"direct_majority = {self.direct_majority} is a share: use a value in (0, 1)")
        if self.n_boot < 100:
            problems.append(f"n_boot = {self.n_boot}: use at least 100 bootstrap resamples")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def inputs(self) -> list:
        """What `run` reads besides the model and SAEs (checked by the pre-flight): held-out stories and the
        tables of chapters 1-3."""
        return [*HELD_OUT_TEXT, TableInput("01_features", produced_by="01_output_tokens"),
                TableInput("02_features", produced_by="02_attention"),
                TableInput("03_labels", produced_by="03_semantic_populations")]

    def problems(self, dims) -> list[str]:
        """Checks that need the model's sizes; `dims`: `model.cfg`, or the pre-flight's `ModelDims`."""
        out = []
        d_vocab, n_ctx = getattr(dims, "d_vocab", None), getattr(dims, "n_ctx", None)
        if d_vocab is not None and max(self.k_out, self.m_in) > d_vocab:
            out.append(f"k_out and m_in must not exceed d_vocab ({d_vocab}); got {self.k_out}, {self.m_in}")
        if n_ctx is not None and self.row_len > n_ctx:
            out.append(f"row_len = {self.row_len} exceeds the context length n_ctx = {n_ctx}")
        return out


@dataclass
class Tables:
    """What chapter 7 produces (every frame tidy)."""

    output: pd.DataFrame  # per feature: kept firings, next-token hits among its top output tokens, base rate
    input: pd.DataFrame  # per feature: current-token hits among its top input tokens, base rate
    effects: pd.DataFrame  # per ablated feature: direct and total effect on its top tokens, direct share
    pairs: pd.DataFrame  # per checked (head, pair): weights-only score, in-context contribution, co-firings
    words: pd.DataFrame  # per feature: chapter 3's labels, share of firing positions on a word token
    sensitivity: pd.DataFrame  # strongest firings used, claim, difference with its interval
    summary: pd.DataFrame  # claim, weights-only, in-context, base rate, difference, lo, hi, agreement
    text: pd.DataFrame  # one row: tokens read, rows, firings kept per feature, batch rows
    config: Config = field(repr=False, default_factory=Config)


FEATURE_COLUMNS = ["layer", "feature", "dec_top_ids", "enc_top_ids", "dec_predicts", "enc_predicts"]


def run(ctx, config: Config, *, model=None, saes=None, full=None) -> Tables:
    """Chapter 7 for ctx's target (tables cached together, keyed by the inputs chapters 1-3 wrote)."""
    target = ctx.params.target
    # only the columns read here: 01_features' other list columns hold most of its memory
    feats = io.require_table(target, "01_features", produced_by="01_output_tokens", columns=FEATURE_COLUMNS)
    labels = io.require_table(target, "03_labels", produced_by="03_semantic_populations")
    io.require_table(target, "02_features", produced_by="02_attention", columns=[])  # present and intact
    pairs = io.load_table(target, "02_qk_pairs")  # absent when chapter 2 checked no pairs
    if model is None:
        model, saes = ctx.load_model_and_saes()  # the SAEs, checked against it, and the processing flags
    if getattr(saes, "model", None) is model:
        saes.model = None  # checked on load already (as in chapter 6): the weights-only model can be freed
    del model  # the full model runs the text: one model at a time
    full = full if full is not None else ctx.load_full_model()
    problems = config.problems(full.cfg)
    k_have = len(feats["dec_top_ids"].iloc[0]) if len(feats) else 0
    if max(config.k_out, config.m_in) > k_have:
        problems.append(f"k_out and m_in must not exceed chapter 1's k ({k_have}); got {config.k_out}, "
                        f"{config.m_in}")
    if problems:
        raise ParamsError("; ".join(problems) + ".")
    inputs = {n: (io.table_meta(target, n) or {}).get("key")
              for n in ("01_features", "02_qk_pairs", "03_labels")}
    provenance = ctx.provenance(**dataclasses.asdict(config), inputs=inputs)
    names = ["07_output", "07_input", "07_effects", "07_pairs", "07_words", "07_sensitivity", "07_summary",
             "07_text"]
    settings = pair_settings((io.table_meta(target, "02_qk_pairs") or {}).get("params", {}).get("chapter"))

    def compute():
        text = ctx.held_out_rows(full, config.n_tokens, config.row_len)
        return dict(zip(names, measure(full, saes, feats, pairs, labels, config, text, settings)))

    tabs = io.cached_tables(target, names, provenance, compute, label=f"{STEM}: measuring on held-out text")
    return Tables(*(tabs[n] for n in names), config=config)


def head_correlations(pairs: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per head, and over all heads: Spearman's rho between weights-only scores and in-context terms, over
    all measured pairs and over chapter 2's top pairs alone, with the shuffled-pairs 95% range of the former.
    Columns head, pairs, rho, null_lo, null_hi, top pairs, rho (top only)."""
    rows = []
    measured = pairs[pairs["in context"].notna()]
    groups = [(h, g) for h, g in measured.groupby("head")] + [("all heads", measured)]
    for head, g in groups:
        top = g[g["kind"] == "chapter 2's top"]
        lo, hi = ic.shuffled_spearman(g["weights-only"].to_numpy(), g["in context"].to_numpy(),
                                      n_perm=config.n_boot, seed=config.seed)
        rows.append({"head": head, "pairs": len(g), "rho": ic.spearman(g["weights-only"], g["in context"]),
                     "null_lo": lo, "null_hi": hi, "top pairs": len(top),
                     "rho (top only)": ic.spearman(top["weights-only"], top["in context"])})
    return pd.DataFrame(rows, columns=["head", "pairs", "rho", "null_lo", "null_hi", "top pairs",
                                       "rho (top only)"])


def measure(full, saes, feats: pd.DataFrame, pairs: pd.DataFrame | None, labels: pd.DataFrame,
            config: Config, text: tuple[torch.Tensor, int | None], settings: dict | None = None
            ) -> list[pd.DataFrame]:
    """Every table of the chapter from one activation pass (see `Tables`), in its field order.

    saes: a list of `LoadedSAE`s or a lazy `SAESequence` (each loaded when a step reaches it); text:
    ([rows, row_len] held-out token ids, BOS id), `ctx.held_out_rows`; settings: chapter 2's QK-pair
    settings (`pair_settings`)."""
    tokens, bos = text
    budget = config.memory_mb * 2**20
    d_sae = max(s.d_sae for s in described(saes))
    n_keep = ic.keep_per_feature(budget // 2, len(saes), d_sae, config.n_keep)
    batch_rows = ic.batch_rows_for(budget // 2, config.row_len, d_sae, len(saes))
    heads = pair_heads(pairs)
    io.progress(f"{STEM}: activation pass: {tokens.numel():,} tokens in batches of {batch_rows} rows, "
                f"{n_keep} firings kept per feature, at most {config.sae_memory_mb:,g} MB of SAEs at a time")
    res = ic.firing_pass(full, saes, tokens, n_keep=n_keep, batch_rows=batch_rows, bos_id=bos,
                         attn_layers=sorted({h[0] for h in heads}), progress=progress_enabled(),
                         sae_budget_bytes=int(config.sae_memory_mb * 2**20))
    flat = res.tokens.reshape(-1)
    nxt = torch.cat([flat[1:], flat[:1]])  # next token (the last position is never evaluated)
    output = side_table(res, feats, "dec", nxt, config.k_out, full.cfg.d_vocab)
    inp = side_table(res, feats, "enc", flat, config.m_in, full.cfg.d_vocab)
    output = output.merge(direct_table(full, saes, res, feats, config), on=["layer", "feature"], how="left")
    io.progress(f"{STEM}: ablations: up to {config.n_ablate} features per SAE; query-key pairs of "
                f"{len(heads)} heads")
    effects = ablation_table(full, saes, res, feats, output, config)
    pair_rows = pair_table(full, saes, res, pairs, heads, config, settings or pair_settings(None))
    words = word_table(full, res, labels, config)
    sens = sensitivity(res, feats, nxt, full.cfg.d_vocab, config)
    summary = summarise(output, inp, effects, pair_rows, words, config)
    text = pd.DataFrame([{"tokens": int(flat.numel()), "rows": int(tokens.shape[0]),
                          "row_len": config.row_len, "evaluated positions": int(res.evaluated.sum()),
                          "firings kept per feature": n_keep,
                          "batch rows": batch_rows, "SAE groups": res.sae_groups}])
    return [output, inp, effects, pair_rows, words, sens, summary, text]


def _ids(feats: pd.DataFrame, layer: int, side: str, k: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top ids [d_sae, k] (rows of unanalysed features repeat token 0 and are masked), analysed mask)."""
    f = feats[feats["layer"] == layer]
    ids = torch.zeros(d_sae, k, dtype=torch.long)
    mask = torch.zeros(d_sae, dtype=torch.bool)
    idx = torch.tensor(f["feature"].to_numpy(), dtype=torch.long)
    ids[idx] = torch.as_tensor(np.stack([np.asarray(r[:k]) for r in f[f"{side}_top_ids"]]), dtype=torch.long)
    mask[idx] = True
    return ids, mask


def side_table(res: ic.PassResult, feats: pd.DataFrame, side: str, token: torch.Tensor, k: int, d_vocab: int,
               n_strongest: int | None = None) -> pd.DataFrame:
    """Per analysed feature: firings (its kept strongest, or the first `n_strongest` of them), hits (the
    `token` at the firing is among its top-k `side` ids), hit rate, and the base rate of its top set among the
    tokens at all evaluated positions. Columns layer, feature, verdict, n_active, firings, hits, rate,
    base."""
    verdict = "predicts" if side == "dec" else "reads"
    ev_tokens = token[res.evaluated]
    parts = []
    for layer, fir in res.firings.items():
        d_sae = len(fir.n_active)
        ids, mask = _ids(feats, layer, side, k, d_sae)
        feature, position = fir.feature, fir.position
        if n_strongest is not None:  # entries are sorted by feature, strongest first
            starts = torch.searchsorted(feature, feature)
            sel = (torch.arange(len(feature)) - starts) < n_strongest
            feature, position = feature[sel], position[sel]
        n, hits = ic.set_hit_rates(feature, token[position], ids, d_sae)
        base = ic.set_base_rates(ev_tokens, ids[mask], d_vocab)
        f = feats[feats["layer"] == layer].set_index("feature")
        idx = np.flatnonzero(mask.numpy())
        parts.append(pd.DataFrame({
            "layer": layer, "feature": idx, verdict: f.loc[idx, f"{side}_predicts"].to_numpy(bool),
            "n_active": fir.n_active[idx].numpy(), "firings": n[idx].numpy(), "hits": hits[idx].numpy(),
            "base": base.numpy()}))
    out = pd.concat(parts, ignore_index=True)
    out["rate"] = out["hits"] / out["firings"].where(out["firings"] > 0)
    return out


def direct_table(full, saes, res: ic.PassResult, feats: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per analysed feature: the mean direct effect (logits, against the vocabulary mean) of its kept firings
    on its top-k_out output tokens, through the final norm's actual scale (`ic.direct_effects`)."""
    M_out = output_matrix(full)[0].cpu()  # scored on the CPU: one copy, not one per chunk or feature
    parts = []
    for sae in saes:
        fir = res.firings[sae.layer]
        ids, mask = _ids(feats, sae.layer, "dec", config.k_out, sae.d_sae)
        idx = torch.nonzero(mask).squeeze(1)
        centred = torch.zeros(sae.d_sae)
        rows = max(1, config.memory_mb * 2**20 // (4 * config.k_out * M_out.shape[0]))  # [rows, k, d_model]
        for chunk in idx.split(rows):
            centred[chunk] = ic.centred_scores(sae.W_dec[chunk].cpu(), M_out, ids[chunk])
        eff = ic.direct_effects(fir.act, res.final_scale[fir.position], centred[fir.feature])
        total = torch.bincount(fir.feature, weights=eff.double(), minlength=sae.d_sae)
        n = torch.bincount(fir.feature, minlength=sae.d_sae).clamp(min=1)
        parts.append(pd.DataFrame({"layer": sae.layer, "feature": idx.numpy(),
                                   "weights-only score": centred[idx].numpy(),
                                   "direct effect": (total / n)[idx].numpy()}))
    return pd.concat(parts, ignore_index=True)


def ablation_table(full, saes, res: ic.PassResult, feats: pd.DataFrame, output: pd.DataFrame,
                   config: Config) -> pd.DataFrame:
    """Per ablated feature (per SAE the `n_ablate` most often firing, half predicting and half not): mean
    direct and total effect on its top-k_out tokens at up to `ablate_positions` of its strongest firings."""
    rows = []
    row_len = res.tokens.shape[1]
    M_out = output_matrix(full)[0].cpu()  # scored on the CPU: one copy, not one per chunk or feature
    for sae in saes:
        out = output[(output["layer"] == sae.layer) & (output["firings"] >= config.min_firings)]
        ranked = out.sort_values(["firings", "feature"], ascending=[False, True])
        chosen = pd.concat([ranked[ranked["predicts"]].head((config.n_ablate + 1) // 2),
                            ranked[~ranked["predicts"]].head(config.n_ablate // 2)])
        fir = res.firings[sae.layer]
        ids, _ = _ids(feats, sae.layer, "dec", config.k_out, sae.d_sae)
        picked = torch.tensor(chosen["feature"].to_numpy(), dtype=torch.long)
        # one call per SAE: each call reads all of M_out for the vocabulary mean
        centred_all = ic.centred_scores(sae.W_dec[picked].cpu(), M_out, ids[picked])  # [len(chosen)]
        for i, r in enumerate(chosen.itertuples()):
            sel = torch.nonzero(fir.feature == r.feature).squeeze(1)[: config.ablate_positions]
            pos, act = fir.position[sel], fir.act[sel]
            row_ids = torch.unique(pos // row_len)
            local = torch.searchsorted(row_ids, pos // row_len) * row_len + pos % row_len
            total = ic.ablation_effects(full, sae, int(r.feature), res.tokens[row_ids], local, ids[r.feature],
                                        clean=res.final_resid[pos])
            direct = ic.direct_effects(act, res.final_scale[pos], centred_all[i].expand(len(pos)))
            rows.append({"layer": sae.layer, "feature": int(r.feature), "predicts": bool(r.predicts),
                         "positions": len(pos), "direct": float(direct.mean()), "total": float(total.mean()),
                         "direct share": float(direct.sum() / total.sum()) if float(total.sum()) else np.nan})
    return pd.DataFrame(rows, columns=["layer", "feature", "predicts", "positions", "direct", "total",
                                       "direct share"])


def pair_heads(pairs: pd.DataFrame | None) -> list[tuple[int, int]]:
    """(layer, head) of every head chapter 2 listed query-key pairs for."""
    if pairs is None or len(pairs) == 0:
        return []
    return sorted({tuple(int(x) for x in h.split(".")) for h in pairs["head"]})


def pair_table(full, saes, res: ic.PassResult, pairs: pd.DataFrame | None, heads, config: Config,
               settings: dict) -> pd.DataFrame:
    """Chapter 2's top pairs and `n_random_pairs` random ones per head: weights-only score (chapter 2's, or
    recomputed the same way for the random pairs) and in-context contribution: the mean, over co-firings
    (query feature at i, key feature at j <= i in the same row), of the pair's term in the head's score."""
    cols = ["head", "SAE layer", "kind", "query feature", "key feature", "weights-only", "in context",
            "co-firings"]
    if not heads:
        return pd.DataFrame(columns=cols)
    meta = settings
    by_layer = {s.layer: i for i, s in enumerate(described(saes))}  # loaded when its heads are reached
    rng = np.random.default_rng(config.seed)
    row_len = res.tokens.shape[1]
    rows = []
    head_of = pairs["head"].map(lambda h: tuple(int(x) for x in h.split(".")))
    held = (None, None)
    bar = progress_bar(len(heads), progress_enabled(), "query-key pairs in context", unit="head")
    for (layer, head), part in pairs.groupby(head_of):
        bar.update(1)
        i = by_layer.get(int(part["SAE layer"].iloc[0]))
        if i is None:
            continue
        if i != held[0]:  # one SAE held (released before the next loads); heads mostly share it
            held = (i, None)
            held = (i, saes[i])
        sae = held[1]
        fir = res.firings[sae.layer]
        firing = torch.unique(fir.feature).numpy()
        chosen = [("chapter 2's top", int(q), int(k), float(s)) for q, k, s in
                  zip(part["query feature"], part["key feature"], part["score"])]
        if len(firing):
            qs, ks = rng.choice(firing, config.n_random_pairs), rng.choice(firing, config.n_random_pairs)
            chosen += [("random", int(q), int(k), np.nan) for q, k in zip(qs, ks)]
        feats_needed = sorted({c[1] for c in chosen} | {c[2] for c in chosen})
        D = sae.W_dec[feats_needed].detach().cpu()
        Q, K = ic.folded_projections(full, layer, head, D)
        where = {f: i for i, f in enumerate(feats_needed)}
        scale = res.attn_scale.get(layer, torch.ones_like(res.final_scale))
        offsets = list(range(meta["qk_max_offset"] + 1))
        for kind, fq, fk, score in chosen:
            q, k = Q[where[fq]], K[where[fk]]
            if np.isnan(score):  # weights-only, as chapter 2 scores its pairs (summary over offsets)
                score = float(ic.pair_weight_score(q, k, offsets, full.cfg, meta["qk_summary"]))
            sq, sk = fir.feature == fq, fir.feature == fk
            iq, ik = ic.co_firings(fir.position[sq], fir.position[sk], row_len, row_len)
            pq, pk = fir.position[sq][iq], fir.position[sk][ik]
            aq = (fir.act[sq][iq] / scale[pq])[:, None] * q
            ak = (fir.act[sk][ik] / scale[pk])[:, None] * k
            contrib = ic.pair_contributions(aq, ak, pq - pk, full.cfg) if len(iq) else torch.empty(0)
            rows.append({"head": f"{layer}.{head}", "SAE layer": sae.layer, "kind": kind, "query feature": fq,
                         "key feature": fk, "weights-only": score / float(full.cfg.attn_scale),
                         "in context": float(contrib.mean()) if len(contrib) else np.nan,
                         "co-firings": len(contrib)})
    bar.close()
    return pd.DataFrame(rows, columns=cols)


def pair_settings(chapter2: dict | None) -> dict:
    """Chapter 2's QK-pair settings (offset range, summary): its recorded parameters, else its defaults."""
    from weightscope.chapters.attention import Config as AttnConfig

    meta = chapter2 or {}
    return {"qk_max_offset": int(meta.get("qk_max_offset", AttnConfig.qk_max_offset)),
            "qk_summary": str(meta.get("qk_summary", AttnConfig.qk_summary))}


def word_table(full, res: ic.PassResult, labels: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Per labelled feature: chapter 3's two labels and the share of its kept firings whose current token is
    a word (chapter 3's `token_kind`), beside the word share of all evaluated positions (`base`)."""
    vocab = token_strings(full)
    flat = res.tokens.reshape(-1)
    is_word = torch.zeros(len(vocab), dtype=torch.bool)
    seen = torch.unique(flat)  # only the tokens of the text are classified (a few thousand, not the vocabulary)
    is_word[seen] = torch.tensor([token_kind(vocab[int(t)]) == "word" for t in seen])
    base = float(is_word[flat[res.evaluated]].double().mean())
    parts = []
    for layer, fir in res.firings.items():
        d_sae = len(fir.n_active)
        n = torch.bincount(fir.feature, minlength=d_sae)
        w = torch.bincount(fir.feature, weights=is_word[flat[fir.position]].double(), minlength=d_sae)
        lab = labels[labels["layer"] == layer]
        idx = np.array(lab["feature"].to_numpy())
        parts.append(pd.DataFrame({"layer": layer, "feature": idx, "dec_label": lab["dec_label"].astype(str),
                                   "enc_label": lab["enc_label"].astype(str), "firings": n[idx].numpy(),
                                   "word share": (w / n.clamp(min=1))[idx].numpy(), "base": base}))
    return pd.concat(parts, ignore_index=True)


def sensitivity(res: ic.PassResult, feats: pd.DataFrame, nxt: torch.Tensor, d_vocab: int,
                config: Config) -> pd.DataFrame:
    """The two output-side claims as the number of strongest firings per feature changes."""
    rows = []
    bar = progress_bar(len(SENSITIVITY_GRID), progress_enabled(), "sensitivity to the firings used",
                       unit="setting")
    for n in SENSITIVITY_GRID:
        out = side_table(res, feats, "dec", nxt, config.k_out, d_vocab, n_strongest=n)
        for claim, (d, lo, hi) in output_claims(out, dataclasses.replace(config, min_firings=min(
                config.min_firings, n))).items():
            rows.append({"strongest firings": n, "claim": claim, "difference": d, "lo": lo, "hi": hi})
        bar.update(1)
    bar.close()
    return pd.DataFrame(rows)


def output_claims(out: pd.DataFrame, config: Config) -> dict[str, tuple[float, float, float]]:
    """Excess hit rate (rate - base) of predicting features, and its excess over non-predicting features."""
    ok = out[out["firings"] >= config.min_firings]
    excess = (ok["rate"] - ok["base"]).to_numpy()
    pred = ok["predicts"].to_numpy(bool)
    return {"predicting features: rate above base": bootstrap_one(excess[pred], n_boot=config.n_boot,
                                                                   seed=config.seed),
            "predicting minus other features": bootstrap_ci(excess[pred], excess[~pred], n_boot=config.n_boot,
                                                            seed=config.seed)}


def early_layer_claim(effects: pd.DataFrame, config: Config) -> tuple:
    """Query Lens's reading: the lens misses more of the effect in early layers. The miss of one feature is
    |1 - direct share|; the claim compares its mean in the first and the last ablated SAE layer."""
    claim = ("output (Query Lens): the direct path misses more of the effect in the first SAE layer than in "
             "the last (mean |1 - direct share|)")
    e = effects.dropna(subset=["direct share"])
    if len(e) == 0 or e["layer"].nunique() < 2:
        return claim, np.nan, np.nan, np.nan, (np.nan,) * 3, len(e)
    miss = (1 - e["direct share"]).abs()
    first, last = (miss[e["layer"] == lay].to_numpy() for lay in (e["layer"].min(), e["layer"].max()))
    diff = bootstrap_ci(first, last, n_boot=config.n_boot, seed=config.seed)
    return claim, np.nan, float(first.mean()), float(last.mean()), diff, min(len(first), len(last))


def within(lo: float, hi: float, low: float, high: float, n: int) -> str:
    """holds when the interval [lo, hi] lies inside [low, high], does not hold when it lies wholly outside,
    else inconclusive (also on fewer than `MIN_ITEMS` items)."""
    if np.isnan(lo) or np.isnan(hi) or n < MIN_ITEMS:
        return UNSURE
    return HOLDS if low <= lo and hi <= high else FAILS if hi < low or lo > high else UNSURE


def agreement(lo: float, hi: float, *, above: float = 0.0, n: int = MIN_ITEMS) -> str:
    """holds when the interval lies above `above`, does not hold when at or below it, else inconclusive
    (also when it rests on fewer than `MIN_ITEMS` features or pairs)."""
    if np.isnan(lo) or np.isnan(hi) or n < MIN_ITEMS:
        return UNSURE
    return HOLDS if lo > above else FAILS if hi <= above else UNSURE


def summarise(output, inp, effects, pairs, words, config: Config) -> pd.DataFrame:
    """One row per claim: claim, weights-only, in context, base, difference, lo, hi, agreement, n."""
    rows = []
    b, s = config.n_boot, config.seed
    # ten claims, most with a bootstrap over every analysed feature (seconds each at a real SAE's width)
    bar = progress_bar(N_CLAIMS, progress_enabled(), "claims and their intervals", unit="claim")

    def add(claim, weights, context, base, diff, n, *, above=0.0):
        d, lo, hi = diff
        rows.append({"claim": claim, "weights-only": weights, "in context": context, "base": base,
                     "difference": d, "lo": lo, "hi": hi, "agreement": agreement(lo, hi, above=above, n=n),
                     "n": n})
        bar.update(1)

    for side, frame, verdict, what in (("output", output, "predicts", "next token"),
                                       ("input", inp, "reads", "current token")):
        ok = frame[frame["firings"] >= config.min_firings]
        yes, no = ok[ok[verdict]], ok[~ok[verdict]]
        ex_yes, ex_no = (yes["rate"] - yes["base"]).to_numpy(), (no["rate"] - no["base"]).to_numpy()
        share = float(ok[verdict].mean()) if len(ok) else np.nan
        add(f"{side}: where a '{verdict}' feature fires, its {what} is a top token more often than its base "
            f"rate", share, float(yes["rate"].mean()), float(yes["base"].mean()),
            bootstrap_one(ex_yes, n_boot=b, seed=s), len(yes))
        add(f"{side}: '{verdict}' features beat the other features (excess over base rate)",
            share, float(ex_yes.mean()) if len(yes) else np.nan, float(ex_no.mean()) if len(no) else np.nan,
            bootstrap_ci(ex_yes, ex_no, n_boot=b, seed=s), len(ok))
    share = effects["direct share"].dropna().to_numpy()
    median = bootstrap_one(share, "median", n_boot=b, seed=s)
    low, high = config.direct_majority, 1 / config.direct_majority
    add(f"{DIRECT_CLAIM} (median direct share of the ablation effect, within {number(low)} to "
        f"{number(high)})", 1.0, median[0], 1.0, tuple(v - 1 for v in median), len(share))
    rows[-1]["agreement"] = within(median[1], median[2], low, high, len(share))
    add(*early_layer_claim(effects, config))
    measured = pairs[pairs["in context"].notna()]
    top, rnd = (measured[measured["kind"] == k] for k in ("chapter 2's top", "random"))
    add("attention: chapter 2's top pairs contribute more to the score in context than random pairs (|term|)",
        float(top["weights-only"].abs().mean()) if len(top) else np.nan,
        float(top["in context"].abs().mean()) if len(top) else np.nan,
        float(rnd["in context"].abs().mean()) if len(rnd) else np.nan,
        bootstrap_ci(top["in context"].abs(), rnd["in context"].abs(), n_boot=b, seed=s), len(top))
    both = pairs[pairs["in context"].notna()]
    r = ic.spearman(both["weights-only"], both["in context"])
    lo, hi = ic.shuffled_spearman(both["weights-only"].to_numpy(), both["in context"].to_numpy(), n_perm=b,
                                  seed=s)
    rows.append({"claim": "attention: weights-only pair scores rank the in-context contributions (Spearman)",
                 "weights-only": np.nan, "in context": r, "base": 0.0, "difference": r, "lo": lo, "hi": hi,
                 "agreement": UNSURE if np.isnan(r) or np.isnan(hi) or len(both) < MIN_ITEMS
                 else HOLDS if r > hi else FAILS,
                 "n": len(both)})
    bar.update(1)
    for phase, col in (("output", "dec_label"), ("input", "enc_label")):
        ok = words[words["firings"] >= config.min_firings]
        sem, non = (ok.loc[ok[col] == lab, "word share"].to_numpy() for lab in ("semantic", "non-semantic"))
        add(f"populations ({phase} labels): semantic features fire on word tokens more than non-semantic "
            "ones",
            float((ok[col] == "semantic").mean()) if len(ok) else np.nan,
            float(sem.mean()) if len(sem) else np.nan, float(non.mean()) if len(non) else np.nan,
            bootstrap_ci(sem, non, n_boot=b, seed=s), len(sem) + len(non))
    bar.close()
    return pd.DataFrame(rows)


def findings(t: Tables) -> dict[str, list[str]]:
    """The page's result sentences, all from `t.summary` (and the text read), with the rule stated.

    Keys: "text" (what was read), "claims" (one sentence per claim), "tally" (how many hold).
    """
    text = t.text.iloc[0]
    groups = int(text["SAE groups"])
    held = "every SAE at once" if groups == 1 else f"the SAEs in {groups} groups of consecutive layers"
    out = {"text": [f"The model read {number(text['tokens'])} held-out tokens in rows of {text['row_len']}, "
                    f"holding {held}; each feature's {text['firings kept per feature']} strongest firings "
                    f"were kept."],
           "claims": [], "tally": []}
    for _, r in t.summary.iterrows():
        interval = f"[{number(r['lo'], 3)}, {number(r['hi'], 3)}]"
        if r["claim"].startswith("attention: weights-only pair scores"):
            out["claims"].append(f"{r['claim']}: rho = {number(r['in context'], 2)} over {r['n']} pairs; "
                                 f"shuffled pairs give {interval} (95%): {r['agreement']}.")
        else:
            out["claims"].append(f"{r['claim']}: {number(r['in context'], 3)} in context against "
                                 f"{number(r['base'], 3)} (difference {number(r['difference'], 3)}, 95% "
                                 f"interval {interval}, n = {r['n']}): {r['agreement']}.")
        if r["claim"].startswith(DIRECT_CLAIM) and not np.isnan(r["in context"]):
            out["claims"].append(direct_sentence(float(r["in context"])))
    counts = t.summary["agreement"].value_counts()
    holds, fails, unsure = (counts.get(v, 0) for v in (HOLDS, FAILS, UNSURE))
    verb = "holds" if holds == 1 else "hold"
    out["tally"].append(f"Of {len(t.summary)} claims, {holds} {verb} in context, "
                        f"{fails} {'does' if fails == 1 else 'do'} not and {unsure} "
                        f"{'is' if unsure == 1 else 'are'} inconclusive (a claim holds when its 95% interval "
                        f"lies above the base rate or null and rests on at least {MIN_ITEMS} features or "
                        f"pairs).")
    return out


def direct_sentence(share: float) -> str:
    """What a median direct share means: above 1 later layers cancel part of the direct effect, below 1 they
    add to it (a share within 10% of 1 counts as the direct path alone)."""
    if share > 1.1:
        return (f"The direct path overstates the effect: its median is {number(share, 2)} times the total "
                f"effect measured by ablation, so later layers cancel part of what the lens reads.")
    if share < 0.9:
        return (f"The direct path understates the effect: its median is {number(share, 2)} of the total "
                f"effect measured by ablation, so later layers add to what the lens reads.")
    return f"The direct path is about the whole effect (median share {number(share, 2)}, within 10% of 1)."

