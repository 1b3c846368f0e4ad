"""Chapter 6: MLP neurons (FF-KV) as a baseline dictionary beside the SAE features and the null directions.

Each step is one call that returns tidy tables with a `dictionary` column ("features", "neurons", "null"):

    blocks(model, saes, cfg)                       -> how each SAE is paired with an MLP, and its FF-KV shape
    token_lens(ctx, model, saes, cfg)              -> chapter 1's token lens and rule, both sides, per row
    attention_reads(ctx, model, saes, cfg)         -> chapter 2's head reads, z-scored against one null
    key_choice(model, saes, cfg, vocab, lens_rows) -> the input side with the gate or the up projection as key
    populations(lens_rows, read_rows, cfg)         -> chapter 3's labels and semantic / non-semantic contrast
    alignment(ctx, model, saes, cfg)               -> max cosine of SAE decoder rows against value vectors
    activation_checks(model, saes, tokens, cfg)    -> TopK-FF and SAE explained variance, alive rates (demo)
    summary(lens_rows, reads, pops, align, checks, cfg) -> one table: each measure, features against neurons
    for_people(summary), save_tables(ctx, cfg, tables)  -> the summary as text; tables written to results

Pairing: an MLP at layer L writes into the residual stream after block L, where a residual SAE at
`blocks.L.hook_resid_post` reads it, so that SAE is paired with block L's MLP (an SAE at resid_pre or
resid_mid of L with block L - 1's). Only the lowest-level kernels are called (`token_score_stats`,
`head_reads`, `null_zscores`, `random_directions_like`, `fold_*`, and chapter 3's `label_side` and rank
statistics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from weightscope import io
from weightscope.compute import ffkv, populations as pops
from weightscope.compute.attention import head_reads, null_zscores
from weightscope.compute.folding import fold_final_norm, fold_pre_attention_norm
from weightscope.compute.token_scores import (
    mean_pairwise_cosine,
    mean_pairwise_string_similarity,
    random_directions_like,
    token_score_stats,
)

DICTIONARIES = ("features", "neurons", "null")
SIDES = {"dec": "output side (decoder-unembedding)", "enc": "input side (encoder-embedding)"}
READS = ("q", "k", "v")


@dataclass(frozen=True)
class FFKVConfig:
    """The chapter's parameters (each a notebook parameter with the same name)."""

    k: int = 10  # tokens kept at each end of a row's score distribution
    m_coherence: int = 5  # top tokens whose mutual similarity measures coherence
    concentration_stat: str = "kurtosis"  # kurtosis | top_z: scale-free, so one null serves every dictionary
    q_concentration: float = 0.95  # concentrated: above this quantile of the null
    q_coherence: float = 0.95  # coherent: string similarity or embedding cosine above this null quantile
    n_null: int = 1024  # null directions per layer (each for thresholds and for the reported null)
    q_null: float = 0.99  # a row takes part in a head when its read exceeds this null quantile
    key: str = "gate"  # gated MLPs: the encoder (key) direction, gate or up projection
    max_features: int = 0  # first N SAE features per layer (0: all)
    max_neurons: int = 0  # first N neurons per layer (0: all)
    topk: int = 10  # TopK-FF: neurons kept per token (the paper's k = 10)
    topk_of: str = "normalized"  # TopK over plain or value-normalised latents
    aligned: float = 0.9  # max cosine at or above: aligned (the paper's cut-off)
    unaligned: float = 0.3  # max cosine below: unaligned
    signed: bool = True  # max of the signed cosine (False: of |cos|)
    n_eval_tokens: int = 8192  # held-out tokens for the activation checks (demo)
    alpha: float = 0.01  # the summary names the higher dictionary when its rank test gives p below this
    seed: int = 0

    def check(self, d_vocab: int) -> None:
        """Raise one clear message for a parameter a user set wrongly."""
        problems = []
        if not (1 <= self.k <= d_vocab and 2 <= self.m_coherence <= self.k):
            problems.append(f"need 1 <= k <= d_vocab ({d_vocab}) and 2 <= m_coherence <= k")
        if self.concentration_stat not in ("kurtosis", "top_z"):
            problems.append("concentration_stat must be kurtosis or top_z (scale-free statistics)")
        if self.key not in ffkv.KEYS:
            problems.append(f"key must be one of {ffkv.KEYS}")
        if self.topk_of not in ("plain", "normalized"):
            problems.append("topk_of must be plain or normalized")
        if self.n_null < 100:
            problems.append("n_null must be at least 100")
        if not 0 < self.alpha < 1:
            problems.append("alpha is a p-value level strictly between 0 and 1")
        if not 0 <= self.unaligned <= self.aligned <= 1:
            problems.append("need 0 <= unaligned <= aligned <= 1")
        for name in ("q_concentration", "q_coherence", "q_null"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name} is a quantile strictly between 0 and 1")
        if problems:
            raise ValueError("chapter 6 parameters: " + "; ".join(problems) + f". Got {asdict(self)}.")


# ----------------------------------------------------------------------------------------------------------
# Pairing and the dictionaries


def mlp_layer_for(sae) -> int | None:
    """The MLP block whose write the SAE's site sees last: L for resid_post of L, else L - 1 (None at 0)."""
    layer = sae.layer
    if layer is None:
        return None
    return layer if sae.hook_name.endswith("hook_resid_post") else (layer - 1 if layer > 0 else None)


def _paired(saes) -> list:
    return [s for s in saes if mlp_layer_for(s) is not None]


def _first(n: int, limit: int) -> int:
    return n if limit <= 0 else min(limit, n)


def blocks(model, saes, cfg: FFKVConfig) -> pd.DataFrame:
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


def _directions(model, sae, cfg: FFKVConfig, offset: int) -> dict[str, dict[str, torch.Tensor]]:
    """{dictionary: {"dec": [n, d_model], "enc": [n, d_model]}} for one SAE and its paired MLP block."""
    b = ffkv.ff_block(model, mlp_layer_for(sae))
    n, m = _first(sae.d_sae, cfg.max_features), _first(b.d_mlp, cfg.max_neurons)
    rows = torch.arange(cfg.n_null) % sae.d_sae  # null rows take the norms of SAE rows, as in chapter 1
    seed = cfg.seed + 1000 * sae.layer + offset
    return {
        "features": {"dec": sae.W_dec[:n], "enc": sae.W_enc[:, :n].T},
        "neurons": {"dec": ffkv.value_vectors(b)[:m], "enc": ffkv.key_vectors(b, cfg.key)[:m]},
        "null": {"dec": random_directions_like(sae.W_dec[rows], seed=seed),
                 "enc": random_directions_like(sae.W_enc.T[rows], seed=seed + 1)},
    }


# ----------------------------------------------------------------------------------------------------------
# Chapter 1: the token lens


def _lens_matrices(model) -> dict[str, torch.Tensor]:
    ln = getattr(model.ln_final, "w", None)
    norm = model.cfg.normalization_type
    W_U = fold_final_norm(model.W_U.detach(), None if ln is None else ln.detach(), norm)
    return {"dec": W_U, "enc": model.W_E.detach().T}


def _side(D, M, E, vocab, cfg: FFKVConfig, side: str, dtype) -> pd.DataFrame:
    """Statistics, coherence and top tokens of the rows D [n, d_model] against M [d_model, d_vocab]."""
    stats = token_score_stats(D, M, k=cfg.k, dtype=dtype, progress=False)
    top = stats.top_ids[:, : cfg.m_coherence]
    return pd.DataFrame({
        f"{side}_{cfg.concentration_stat}": getattr(stats, cfg.concentration_stat).numpy(),
        f"{side}_string_sim": [mean_pairwise_string_similarity([vocab[i] for i in r]) for r in top.tolist()],
        f"{side}_emb_cos": mean_pairwise_cosine(top, E).numpy(),
        f"{side}_top_tokens": [[vocab[i] for i in r] for r in stats.top_ids.tolist()],
    })


def _rule(df: pd.DataFrame, thr: pd.DataFrame, cfg: FFKVConfig, side: str) -> pd.DataFrame:
    """Chapter 1's rule: concentrated (stat above the null quantile) and coherent (either similarity)."""
    q = {"stat": cfg.q_concentration, "string_sim": cfg.q_coherence, "emb_cos": cfg.q_coherence}
    cols = {"stat": f"{side}_{cfg.concentration_stat}", "string_sim": f"{side}_string_sim",
            "emb_cos": f"{side}_emb_cos"}
    t = {name: float(np.nanquantile(thr[col], q[name])) for name, col in cols.items()}
    out = df.assign(**{f"{side}_concentrated": df[cols["stat"]] > t["stat"],
                       f"{side}_coherent": (df[cols["string_sim"]] > t["string_sim"])
                       | (df[cols["emb_cos"]] > t["emb_cos"])})
    out[f"{side}_predicts"] = out[f"{side}_concentrated"] & out[f"{side}_coherent"]
    return out.assign(**{f"{side}_thr_{name}": value for name, value in t.items()})


def lens_layer(model, sae, cfg: FFKVConfig, vocab: list[str], dtype=None) -> pd.DataFrame:
    """Both sides for one SAE layer's features, its paired neurons and a null sample: one row per direction.

    Thresholds come from a second, independent null sample (as in chapter 1); the reported null is scored
    against them, so its pass rate is the rule's chance level.
    """
    M, E = _lens_matrices(model), model.W_E.detach()
    thr_dirs = _directions(model, sae, cfg, offset=10)["null"]
    thr = {s: _side(thr_dirs[s], M[s], E, vocab, cfg, s, dtype) for s in SIDES}
    frames = []
    for name, dirs in _directions(model, sae, cfg, offset=0).items():
        parts = [_rule(_side(dirs[s], M[s], E, vocab, cfg, s, dtype), thr[s], cfg, s) for s in SIDES]
        frame = pd.concat(parts, axis=1)
        frame.insert(0, "row", np.arange(len(frame)))
        frames.append(frame.assign(dictionary=name, layer=sae.layer, mlp_layer=mlp_layer_for(sae)))
    return pd.concat(frames, ignore_index=True)


def key_choice(model, saes, cfg: FFKVConfig, vocab: list[str], lens_rows: pd.DataFrame) -> pd.DataFrame:
    """The neurons' input side with each of a gated MLP's two input rows as the key, judged by the thresholds
    `token_lens` stored (same null, same rule). One row per (layer, key): the shares passing each test."""
    M, E, rows = _lens_matrices(model)["enc"], model.W_E.detach(), []
    for sae in _paired(saes):
        b = ffkv.ff_block(model, mlp_layer_for(sae))
        done = lens_rows[(lens_rows["layer"] == sae.layer) & (lens_rows["dictionary"] == "neurons")]
        thr = {n: float(done[f"enc_thr_{n}"].iloc[0]) for n in ("stat", "string_sim", "emb_cos")}
        for key in ffkv.KEYS if b.gated else ("up",):
            K = ffkv.key_vectors(b, key)[: _first(b.d_mlp, cfg.max_neurons)]
            df = _side(K, M, E, vocab, cfg, "enc", None)
            concentrated = df[f"enc_{cfg.concentration_stat}"] > thr["stat"]
            coherent = (df["enc_string_sim"] > thr["string_sim"]) | (df["enc_emb_cos"] > thr["emb_cos"])
            chosen = key == cfg.key or not b.gated
            rows.append({"layer": sae.layer, "key": key + (" (chosen)" if chosen else ""),
                         "concentrated": concentrated.mean(), "coherent": coherent.mean(),
                         "passes the rule": (concentrated & coherent).mean()})
    return pd.DataFrame(rows)


def token_lens(ctx, model, saes, cfg: FFKVConfig, vocab: list[str]) -> pd.DataFrame:
    """`lens_layer` for every paired SAE, cached per layer under `06_token_lens`."""
    provenance = ctx.provenance(**asdict(cfg), step="token_lens")
    return io.layer_tables(ctx.target.target, "06_token_lens", _paired(saes), provenance, lambda sae: {
        "rows": lens_layer(model, sae, cfg, vocab, dtype=ctx.dtype)})["rows"]


def lens_rates(rows: pd.DataFrame) -> pd.DataFrame:
    """Share of each dictionary passing each test, per layer and side: tidy rows."""
    cols = [f"{s}_{t}" for s in SIDES for t in ("concentrated", "coherent", "predicts")]
    long = rows.groupby(["dictionary", "layer"])[cols].mean().reset_index().melt(
        id_vars=["dictionary", "layer"], var_name="test", value_name="share")
    long["side"] = long["test"].str[:3].map(SIDES)
    long["test"] = long["test"].str[4:]
    return long


# ----------------------------------------------------------------------------------------------------------
# Chapter 2: attention reads


def _attention(model, layer: int):
    attn = model.blocks[layer].attn
    W_K = attn._W_K if hasattr(attn, "_W_K") else attn.W_K  # grouped-query: the raw kv heads
    W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V
    return attn.W_Q.detach(), W_K.detach(), W_V.detach(), attn.W_O.detach()


def _folded(model, D: torch.Tensor, layer: int) -> torch.Tensor:
    g = getattr(model.blocks[layer].ln1, "w", None)
    center = model.cfg.normalization_type in ("LN", "LNPre")
    return fold_pre_attention_norm(D, None if g is None else g.detach(), center=center)


def reads_layer(model, sae, cfg: FFKVConfig, dtype=None, device=None) -> pd.DataFrame:
    """Head reads of unit-norm feature, neuron and null directions by every later attention layer.

    One row per (dictionary, row, read_layer): mean z-score over that layer's heads and the share of heads
    whose read exceeds the q_null quantile of a separate null sample, for q, k and v. All directions are unit
    norm, so one null serves all three dictionaries and a neuron's large value vector counts for no more than
    its direction.
    """
    L = mlp_layer_for(sae)
    dirs = {name: d["dec"] for name, d in _directions(model, sae, cfg, offset=20).items()}
    thr = _directions(model, sae, cfg, offset=30)["null"]["dec"]
    names = [*dirs, "thr"]
    sizes = [len(dirs[n]) for n in dirs] + [len(thr)]
    stack = F.normalize(torch.cat([*dirs.values(), thr]).float(), dim=1).to(thr.dtype)
    frames = []
    for read_layer in range(L + 1, model.cfg.n_layers):
        reads = head_reads(_folded(model, stack, read_layer), *_attention(model, read_layer), dtype=dtype,
                           device=device, progress=False)
        split = {r: dict(zip(names, reads[r].split(sizes))) for r in READS}
        for name in dirs:
            cols = {"dictionary": name, "row": np.arange(len(dirs[name])), "layer": sae.layer,
                    "mlp_layer": L, "read_layer": read_layer, "distance": read_layer - L}
            for r in READS:
                z, part = null_zscores(split[r][name], split[r]["thr"], q=cfg.q_null)
                cols[f"{r}_z_mean"] = z.mean(1).numpy()
                cols[f"{r}_part_frac"] = part.float().mean(1).numpy()
            frames.append(pd.DataFrame(cols))
    if not frames:  # the last block: no later attention; typed, so that concatenation keeps numeric columns
        ints = ("row", "layer", "mlp_layer", "read_layer", "distance")
        dtypes = {"dictionary": object, **dict.fromkeys(ints, np.int64),
                  **{f"{r}_{s}": np.float32 for r in READS for s in ("z_mean", "part_frac")}}
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})
    return pd.concat(frames, ignore_index=True)


def attention_reads(ctx, model, saes, cfg: FFKVConfig) -> pd.DataFrame:
    """`reads_layer` for every paired SAE, cached per layer under `06_attention_reads`."""
    provenance = ctx.provenance(**asdict(cfg), step="attention_reads")
    return io.layer_tables(ctx.target.target, "06_attention_reads", _paired(saes), provenance, lambda sae: {
        "rows": reads_layer(model, sae, cfg, dtype=ctx.dtype, device=ctx.device)})["rows"]


def per_row_reads(reads: pd.DataFrame) -> pd.DataFrame:
    """Means over reading layers: one row per (dictionary, layer, row), as chapter 3 compares them."""
    value_cols = [c for c in reads.columns if c.endswith(("_z_mean", "_part_frac"))]
    return reads.groupby(["dictionary", "layer", "row"], as_index=False)[value_cols].mean()


# ----------------------------------------------------------------------------------------------------------
# Chapter 3: populations


def populations(lens_rows: pd.DataFrame, reads: pd.DataFrame, cfg: FFKVConfig, *, n_boot: int = 1000,
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
    rows = []
    for (name, col) in [(n, c) for n in DICTIONARIES for c in ("q_z_mean", "k_z_mean", "v_z_mean")]:
        part = merged[merged["dictionary"] == name]
        x = part.loc[part["dec_label"] == "semantic", col]
        y = part.loc[part["dec_label"] == "non-semantic", col]
        delta, lo, hi = pops.bootstrap_ci(x, y, "cliffs_delta", n_boot=n_boot, seed=cfg.seed)
        _, p, _ = pops.mann_whitney(x, y)
        rows.append({"dictionary": name, "read": col, "n semantic": len(x), "n non-semantic": len(y),
                     "cliffs_delta": delta, "ci_lo": lo, "ci_hi": hi, "p_value": p})
    return {"labels": labels, "shares": shares, "contrast": pd.DataFrame(rows)}


# ----------------------------------------------------------------------------------------------------------
# Alignment from weights


def alignment(ctx, model, saes, cfg: FFKVConfig) -> dict[str, pd.DataFrame]:
    """Max cosine of SAE decoder rows against the value vectors of their paired and earlier MLP blocks, and
    the reverse (each value vector against the SAEs that see its write), with null directions for chance.

    Returns {"rows": one row per direction (`direction`, `layer`, `max_cos`), "shares": aligned / unaligned
    shares per direction and layer}.
    """
    paired = _paired(saes)
    layers = sorted({mlp_layer_for(s) for s in paired})
    values = {L: ffkv.value_vectors(ffkv.ff_block(model, L)) for L in layers}
    values = {L: V[: _first(len(V), cfg.max_neurons)] for L, V in values.items()}
    opts = dict(signed=cfg.signed, device=ctx.device)
    decoders = {s.layer: s.W_dec[: _first(s.d_sae, cfg.max_features)] for s in paired}
    rows = []
    for sae in paired:
        W = decoders[sae.layer]
        earlier = [V for L, V in values.items() if L <= mlp_layer_for(sae)]
        null = random_directions_like(W[torch.arange(cfg.n_null) % len(W)], seed=cfg.seed + sae.layer)
        for name, A in (("SAE features", W), ("null", null)):
            rows.append(_cos_rows(f"{name} vs value vectors", sae.layer, _max_over(A, earlier, opts)))
    for L, V in values.items():
        later = [decoders[s.layer] for s in paired if mlp_layer_for(s) >= L]
        null = random_directions_like(V[torch.arange(cfg.n_null) % len(V)], seed=cfg.seed + 500 + L)
        for name, A in (("value vectors", V), ("null", null)):
            rows.append(_cos_rows(f"{name} vs SAE features", L, _max_over(A, later, opts)))
    table = pd.concat(rows, ignore_index=True)
    cuts = dict(aligned=cfg.aligned, unaligned=cfg.unaligned)
    shares = pd.DataFrame([{"direction": d, "layer": layer,
                            **ffkv.alignment_shares(torch.tensor(part["max_cos"].to_numpy()), **cuts)}
                           for (d, layer), part in table.groupby(["direction", "layer"])])
    return {"rows": table, "shares": shares}


def _max_over(A: torch.Tensor, Bs: list[torch.Tensor], opts: dict) -> torch.Tensor:
    """[n] the max cosine of each row of A over the rows of every matrix in Bs, one matrix at a time."""
    best = None
    for B in Bs:
        m = ffkv.max_cosine(A, B, **opts)[0]
        best = m if best is None else torch.maximum(best, m)
    return best


def _cos_rows(direction: str, layer: int, max_cos: torch.Tensor) -> pd.DataFrame:
    return pd.DataFrame({"direction": direction, "layer": layer, "row": np.arange(len(max_cos)),
                         "max_cos": max_cos.numpy()})


# ----------------------------------------------------------------------------------------------------------
# Activation checks (a forward pass: the demo)


def held_out_tokens(ctx, full, n_tokens: int, *, row_len: int = 128) -> tuple[torch.Tensor, int | None]:
    """([rows, ctx] token ids of about n_tokens held-out stories, BOS id): for the demo the rows its SAEs were
    evaluated on; for another target the same held-out stories, tokenised by its tokenizer in rows of
    `row_len` (each story starting with BOS)."""
    if ctx.target.sae_source == "demo":
        return demo_held_out_tokens(n_tokens, full.cfg.d_vocab), 1
    from weightscope.prepare.demo_saes import held_out_stories

    ids: list[int] = []
    for story in held_out_stories():
        ids.extend(full.to_tokens(story, prepend_bos=True)[0].tolist())
        if len(ids) >= n_tokens:
            break
    row_len = min(row_len, full.cfg.n_ctx)
    n = max(1, len(ids) // row_len)
    return torch.tensor(ids[: n * row_len]).reshape(n, row_len), full.tokenizer.bos_token_id


def demo_held_out_tokens(n_tokens: int, d_vocab: int) -> torch.Tensor:
    """[rows, ctx] token ids of the held-out stories the demo SAEs were evaluated on (about n_tokens)."""
    from weightscope.load.llama2c import load_encoder
    from weightscope.load.llama2c import TOKENIZER_FILE, stories260k_dir
    from weightscope.prepare.demo_saes import DEFAULT, build_datasets

    encoder = load_encoder(stories260k_dir() / TOKENIZER_FILE)
    rows = build_datasets(DEFAULT, lambda text: encoder.encode(text, bos=True), d_vocab)["eval"]
    return rows[: max(1, n_tokens // rows.shape[1])]


@torch.no_grad()
def activation_checks(model, saes, tokens: torch.Tensor, cfg: FFKVConfig, *, bos_id: int | None = None,
                      batch_rows: int = 64) -> pd.DataFrame:
    """Explained variance and alive rate of the TopK-FF dictionary and of each SAE on held-out tokens.

    model: a HookedTransformer (a forward pass is needed); tokens: [rows, ctx] held-out token ids. Per paired
    SAE: the TopK-FF reconstruction (k = cfg.topk over cfg.topk_of latents) of block L's MLP output
    (`hook_mlp_out`), and the SAE's reconstruction of its own site; EV = 1 - sum|y - y_hat|^2 / sum|y -
    mean|^2, alive = share of latents active on at least one token, L0 = active latents per token. BOS
    positions (bos_id) are left out, as in the SAEs' own evaluation.
    """
    variant = "topk" if cfg.topk_of == "plain" else "topk_normalized"  # the summary's TopK-FF
    paired = _paired(saes)
    hooks = {h for s in paired for h in (f"blocks.{mlp_layer_for(s)}.hook_resid_mid",
                                         f"blocks.{mlp_layer_for(s)}.hook_mlp_out", s.hook_name)}
    acts = hook_activations(model, tokens, sorted(hooks), bos_id=bos_id, batch_rows=batch_rows)
    rows = []
    for sae in paired:
        L = mlp_layer_for(sae)
        b = ffkv.ff_block(model, L)
        x, y, site = acts[f"blocks.{L}.hook_resid_mid"], acts[f"blocks.{L}.hook_mlp_out"], acts[sae.hook_name]
        a = ffkv.latents(b, model.blocks[L].ln2(x))
        for v in ("topk", "topk_normalized"):  # both TopK choices; the summary uses cfg.topk_of's
            z = ffkv.encode(b, a, v, k=cfg.topk)
            of = "plain" if v == "topk" else "normalised"
            rows.append(_check_row("neurons" if v == variant else "neurons (other TopK)", sae.layer, L,
                                   f"MLP output, TopK of {of} latents", y, ffkv.decode(b, z, v), z))
        f = sae.sae.encode(site.to(sae.W_dec.dtype))
        rows.append(_check_row("features", sae.layer, L, f"SAE site ({sae.hook_name.rsplit('.', 1)[-1]})",
                               site, sae.sae.decode(f).float(), f))
    return pd.DataFrame(rows)


@torch.no_grad()
def hook_activations(model, tokens: torch.Tensor, hooks: list[str], *, bos_id: int | None = None,
                     batch_rows: int = 64) -> dict[str, torch.Tensor]:
    """{hook: fp32 [n_tokens, d]} from one forward pass over token rows [rows, ctx], BOS positions dropped."""
    out: dict[str, list] = {h: [] for h in hooks}
    for batch in tokens.split(batch_rows):
        _, cache = model.run_with_cache(batch, names_filter=hooks)
        keep = (batch != bos_id).reshape(-1) if bos_id is not None else slice(None)
        for h in hooks:
            out[h].append(cache[h].reshape(-1, cache[h].shape[-1])[keep].float())
    return {h: torch.cat(parts) for h, parts in out.items()}


def _check_row(dictionary, layer, mlp_layer, what, y, y_hat, z) -> dict:
    active = z != 0
    return {"dictionary": dictionary, "layer": layer, "mlp_layer": mlp_layer, "reconstructs": what,
            "tokens": len(y), "latents": z.shape[1], "explained_variance": ffkv.explained_variance(y, y_hat),
            "alive": float(active.any(0).float().mean()), "mean_l0": float(active.sum(1).float().mean())}


# ----------------------------------------------------------------------------------------------------------
# The one-table answer


def summary(lens_rows, reads, pops_tables, align, checks, cfg: FFKVConfig) -> pd.DataFrame:
    """One row per measure: its mean for SAE features, MLP neurons and the null, and which of the first two
    is higher.

    Row measures (one value per direction): `p` is the two-sided Mann-Whitney p-value of features against
    neurons (for 0/1 values, a test of two proportions); `verdict` names the higher dictionary when
    p < cfg.alpha, else "no clear difference". Layer measures (the held-out checks, one value per layer, too
    few for a rank test): `verdict` names the higher dictionary when it is higher in every layer, else
    "mixed across layers"; `p` is NaN.
    """
    per_row, labels, arows = per_row_reads(reads), pops_tables["labels"], align["rows"]

    def by_dict(df, values):
        return {d: values[df["dictionary"] == d].to_numpy(dtype=float) for d in DICTIONARIES}

    measures = [(f"token lens, {name}: passes the rule", "share of rows",
                 by_dict(lens_rows, lens_rows[f"{side}_predicts"])) for side, name in SIDES.items()]
    measures += [(f"attention: later heads whose {name} read beats the null", "share of heads",
                  by_dict(per_row, per_row[f"{r}_part_frac"]))
                 for r, name in (("q", "query"), ("k", "key"), ("v", "value (OV)"))]
    measures.append(("populations: labelled semantic (output side)", "share of rows",
                     by_dict(labels, labels["dec_label"] == "semantic")))
    pick = {"features": "SAE features vs value vectors", "neurons": "value vectors vs SAE features",
            "null": "null vs value vectors"}
    cuts = ((f">= {cfg.aligned}", lambda c: c >= cfg.aligned),
            (f"< {cfg.unaligned}", lambda c: c < cfg.unaligned))
    for cut, test in cuts:
        measures.append((f"alignment: max cosine to the other dictionary {cut}", "share of rows",
                         {d: test(arows.loc[arows["direction"] == pick[d], "max_cos"].to_numpy())
                          .astype(float) for d in DICTIONARIES}))
    out = [_measure_row(m, unit, values, cfg.alpha) for m, unit, values in measures]
    if checks is not None and len(checks):
        for col in ("explained_variance", "alive"):
            out.append(_layer_row(f"held-out text: {col.replace('_', ' ')}", checks, col))
    return pd.DataFrame(out)


def _measure_row(measure: str, unit: str, values: dict, alpha: float) -> dict:
    means = {d: float(v.mean()) if len(v) else np.nan for d, v in values.items()}
    _, p, _ = pops.mann_whitney(values["features"], values["neurons"])
    higher = "features higher" if means["features"] > means["neurons"] else "neurons higher"
    verdict = "n/a" if np.isnan(p) else (higher if p < alpha else "no clear difference")
    return {"measure": measure, "unit": unit, **means, "p": p, "verdict": verdict}


def _layer_row(measure: str, checks: pd.DataFrame, col: str) -> dict:
    mine = checks[checks["dictionary"].isin(DICTIONARIES)]
    wide = mine.pivot(index="layer", columns="dictionary", values=col)
    diff = wide["features"] - wide["neurons"]
    verdict = ("features higher in every layer" if (diff > 0).all() else
               "neurons higher in every layer" if (diff < 0).all() else "mixed across layers")
    means = {d: float(wide[d].mean()) if d in wide else np.nan for d in DICTIONARIES}
    return {"measure": measure, "unit": "mean over layers", **means, "p": np.nan, "verdict": verdict}


def for_people(answer: pd.DataFrame) -> pd.DataFrame:
    """The summary with its numbers as text: shares as percentages, other means to two decimals, p to two
    significant digits (the stored table keeps the numbers)."""
    out = answer.copy()
    for d in DICTIONARIES:
        out[d] = [("" if np.isnan(v) else f"{v:.1%}" if u.startswith("share") else f"{v:.2f}")
                  for v, u in zip(answer[d], answer["unit"])]
    out["p"] = ["" if np.isnan(p) else f"{p:.2g}" for p in answer["p"]]
    return out


def save_tables(ctx, cfg: FFKVConfig, tables: dict[str, pd.DataFrame]) -> None:
    """Write each table to `data/results/<target>/06_<name>.parquet` with this run's parameters."""
    provenance = ctx.provenance(**asdict(cfg))
    key = io.cache_key(provenance=provenance)
    for name, df in tables.items():
        if df is not None:
            io.save_table(df, ctx.target.target, f"06_{name}", key=key, params=provenance)
