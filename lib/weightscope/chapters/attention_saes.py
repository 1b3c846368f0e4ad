"""Chapter 4: attention-output SAEs (Kissane et al. 2024): head attribution, what features write, DFA and
recursive DFA. One function per step of `notebooks/04_attention_saes.md`; each returns tidy tables and saves
them under `data/results/<target>/04_*`.

    model, attn, resid = load(ctx)                        # full TransformerLens model (forward passes needed)
    shares = head_attribution(ctx, model, attn, cfg)      # weights only
    poly = polysemantic_heads(ctx, model, attn, cfg)      # weights only, with a same-share null
    writes = feature_writes(ctx, model, attn, resid, cfg) # weights only: token lens, next residual features
    text = held_out_text(ctx, model, cfg)                 # held-out TinyStories rows
    ex = dfa_examples(ctx, model, attn, text, cfg)        # activations: DFA of top-activating features
    fam = families(ctx, model, attn, text, cfg)           # activations: distance profiles and induction
    rd = recursive_dfa(ctx, model, attn, resid, text, ex, cfg)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.compute import dfa as dfa_k
from weightscope.compute import head_attribution as ha
from weightscope.compute.lens import output_matrix, token_strings

FAMILIES = ("induction", "short-range context", "long-range context")


@dataclass(frozen=True)
class AttnConfig:
    """The chapter's parameters (each a notebook parameter with the same name)."""

    top_k: int = 10  # features per head by share (the authors' dashboards show 10)
    q_link: float = (
        0.95  # two features are linked when their profiles agree more than this quantile of null pairs
    )
    mono_frac: float = (
        0.6  # a head is monosemantic when one group holds at least this share of its top features
    )
    n_null: int = 10  # same-share null draws per head
    text_rows: int = 48  # held-out rows of `text_ctx` tokens for the activation steps
    text_ctx: int = 128  # tokens per held-out row
    dfa_features: int = 4  # per layer: the features with the highest activation on the held-out text
    n_examples: int = 8  # top-activating positions per feature for the families
    min_fires: int = 5  # a feature needs this many activations on a text to be classified from it
    short_window: int = 3  # "short range": sources at most this many tokens before the destination
    short_mass_min: float = 0.5  # short-range family: at least this share of |DFA| within the window
    induction_len: int = 24  # length of the random token sequence that is repeated once
    induction_rows: int = 16  # repeated sequences
    induction_min: float = (
        0.3  # induction family: at least this share of |DFA| on the token after the earlier copy
    )
    seed: int = 0


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to `target`, or None: it needs attention-output SAEs."""
    if target.attn_saes is None:
        return ("the target names no attention-output SAEs; add `attn_saes: {source: ..., id_template: ...}` "
                "to its parameters file to run it (see params/gpt2-small.yaml).")
    return None


def _provenance(ctx, cfg: AttnConfig, **extra):
    return ctx.provenance(**asdict(cfg), attn_saes=ctx.target.attn_saes, **extra)


def _save(ctx, df: pd.DataFrame, name: str, cfg: AttnConfig) -> pd.DataFrame:
    prov = _provenance(ctx, cfg)
    io.save_table(df, ctx.target.target, name, key=io.cache_key(provenance=prov), params=prov)
    return df


# ------------------------------------------------------------------------------------------------------------
# Loading


def load(ctx):
    """(model, attention SAEs, residual SAEs by layer): the full TransformerLens model (the DFA steps need
    forward passes) with the processing the target's residual SAEs were trained with, one checked hook_z SAE
    per analysed layer, and the target's residual SAEs ({layer: LoadedSAE}) for the steps that join the two.
    """
    from weightscope.load.saes import check_fits, load_saes, require_attention_z

    t = ctx.target
    flags = ctx.processing_flags()
    ctx.processing = flags
    model = ctx.load_full_model()
    layers = t.resolve_layers(model.cfg.n_layers)
    dtype = str(ctx.dtype).removeprefix("torch.")
    attn_ids = t.attn_sae_ids(layers) or [f"layer_{layer}" for layer in layers]
    attn = load_saes(t.attn_saes["source"], attn_ids, device=str(ctx.device), dtype=dtype)
    for sae in attn:
        check_fits(sae, model)
        require_attention_z(sae, model.cfg)
    res_ids = t.sae_ids(layers) or [f"layer_{layer}" for layer in layers]
    resid = load_saes(t.sae_source, res_ids, device=str(ctx.device), dtype=dtype, model=model)
    return model, attn, {s.layer: s for s in resid}


def sae_quality(ctx) -> pd.DataFrame:
    """The demo attention SAEs' held-out metrics per layer (from their manifest), with the bar; an empty table
    for public releases, whose metrics their authors document."""
    source = ctx.target.attn_saes["source"]
    if not source.startswith("demo"):
        return pd.DataFrame()
    from weightscope.load.saes import demo_sae_folder
    from weightscope.prepare.demo_saes import TARGET_BAR, read_manifest

    manifest = read_manifest(demo_sae_folder(source.partition(":")[2] or "default"))
    cols = [
        "layer",
        "explained_variance",
        "mean_l0",
        "dead_fraction",
        "meets_bar",
        "tokens_seen",
        "training_time_s",
    ]
    df = pd.DataFrame(manifest["per_layer"].values())[cols]
    df["tokens_seen"] = df["tokens_seen"].map("{:,}".format)
    df.attrs.update(
        bar=TARGET_BAR,
        d_sae=manifest["width"],
        k=manifest["k"],
        distinct_tokens=manifest["distinct_training_tokens"],
        eval_tokens=manifest["n_eval_tokens"],
    )
    return df


def residual_sae_after(resid: dict, layer: int):
    """The residual SAE reading the stream right after block `layer`'s attention writes (resid_mid or
    resid_post of that block, or resid_pre of the next), else None."""
    for sae in resid.values():
        if sae.hook_name in (
            f"blocks.{layer}.hook_resid_mid",
            f"blocks.{layer}.hook_resid_post",
            f"blocks.{layer + 1}.hook_resid_pre",
        ):
            return sae
    return None


def residual_sae_before(resid: dict, layer: int):
    """The residual SAE on the stream block `layer`'s attention reads (resid_pre of it, resid_post of the one
    before), else None."""
    for sae in resid.values():
        if sae.hook_name in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer - 1}.hook_resid_post"):
            return sae
    return None


def vocab(model) -> list[str]:
    """Token strings (ids as text for a model without a tokenizer, e.g. a random test model)."""
    return token_strings(model) if model.tokenizer is not None else [str(i) for i in range(model.cfg.d_vocab)]


def _attn_weights(model, layer: int):
    attn = model.blocks[layer].attn
    return attn.W_O.detach().float(), model.cfg.n_heads, model.cfg.d_head


# ------------------------------------------------------------------------------------------------------------
# Weights only


@torch.no_grad()
def head_attribution(ctx, model, saes, cfg: AttnConfig) -> dict[str, pd.DataFrame]:
    """{"shares": one row per (layer, feature, head), "top": each head's top_k features by share, "heads": per
    head: kv_head, mean share of its top features, number of features whose largest share it holds}."""
    kv = ha.kv_heads(model.cfg.n_heads, model.cfg.n_key_value_heads)

    def compute(sae):
        shares = ha.head_shares(sae.W_dec.float().cpu(), model.cfg.n_heads, model.cfg.d_head)
        vals, idx = ha.top_features(shares, cfg.top_k)
        top = pd.DataFrame(
            {
                "layer": sae.layer,
                "head": np.repeat(np.arange(model.cfg.n_heads), idx.shape[1]),
                "rank": np.tile(np.arange(idx.shape[1]), model.cfg.n_heads),
                "feature": idx.reshape(-1).numpy(),
                "share": vals.reshape(-1).numpy(),
            }
        )
        return {"shares": ha.shares_table(shares, sae.layer, kv), "top": top}

    out = io.layer_tables(ctx.target.target, "04_head_shares", saes, _provenance(ctx, cfg), compute)
    shares = out["shares"]
    best = shares.loc[shares.groupby(["layer", "feature"])["share"].idxmax()]
    owned = best.groupby(["layer", "head"]).size().rename("features_owned")
    heads = (
        out["top"]
        .groupby(["layer", "head"])["share"]
        .mean()
        .rename("top_share_mean")
        .to_frame()
        .join(owned)
        .fillna({"features_owned": 0})
        .reset_index()
    )
    heads["kv_head"] = kv.numpy()[heads["head"].to_numpy()]
    out["heads"] = _save(ctx, heads, "04_heads", cfg)
    return out


def top_features_table(shares: dict[str, pd.DataFrame], writes: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """One row per head: its value head, its n top features by share ("f (share)"), and the output tokens of
    the first of them (from `feature_writes`)."""
    top = shares["top"][shares["top"]["rank"] < n].merge(
        writes[["layer", "feature", "top_tokens"]], on=["layer", "feature"]
    )
    top["item"] = top["feature"].astype(str) + " (" + top["share"].map("{:.2f}".format) + ")"
    out = (
        top.sort_values("rank")
        .groupby(["layer", "head"])
        .agg(features=("item", ", ".join), first_feature_tokens=("top_tokens", "first"))
        .reset_index()
    )
    out = out.merge(shares["heads"][["layer", "head", "kv_head"]], on=["layer", "head"])
    out.insert(0, "head_name", out["layer"].astype(str) + "." + out["head"].astype(str))
    return out[["head_name", "kv_head", "features", "first_feature_tokens"]]


@torch.no_grad()
def polysemantic_heads(ctx, model, saes, cfg: AttnConfig) -> dict[str, pd.DataFrame]:
    """{"groups": per (layer, head, tau, kind, draw) the groups among the head's top features, "heads": the
    verdict per head at the chosen tau, "curve": fraction of heads polysemantic against tau, real and null,
    "tau": the chosen tau (the null's q_link quantile of pairwise profile cosines), one row}."""
    M_out, _ = output_matrix(model)
    M_out = M_out.float().cpu()
    sims = {
        sae.layer: ha.head_similarities(
            sae.W_dec.float().cpu(),
            _attn_weights(model, sae.layer)[0].cpu(),
            M_out,
            k=cfg.top_k,
            n_null=cfg.n_null,
            seed=cfg.seed + sae.layer,
        )
        for sae in saes
    }
    tau = ha.null_link_threshold([s for layer_sims in sims.values() for s in layer_sims], cfg.q_link)
    taus = sorted(set(round(t, 2) for t in np.linspace(0.05, 0.95, 19)) | {tau})
    frames = [ha.polysemantic_heads(layer_sims, layer=layer, taus=taus) for layer, layer_sims in sims.items()]
    groups = pd.concat(frames, ignore_index=True)
    groups["polysemantic"] = groups["largest_group_frac"] < cfg.mono_frac
    curve = groups.groupby(["tau", "kind"], as_index=False)["polysemantic"].mean()
    at = groups[np.isclose(groups["tau"], tau)]
    heads = at[at["kind"] == "features"][["layer", "head", "n_groups", "largest_group_frac", "polysemantic"]]
    null_rate = (
        at[at["kind"] == "null"].groupby(["layer", "head"])["polysemantic"].mean().rename("null_poly_rate")
    )
    heads = heads.join(null_rate, on=["layer", "head"]).reset_index(drop=True)
    return {
        "groups": _save(ctx, groups, "04_head_groups", cfg),
        "heads": _save(ctx, heads, "04_poly_heads", cfg),
        "curve": curve,
        "tau": pd.DataFrame({"tau": [float(tau)], "q_link": [cfg.q_link]}),
    }


@torch.no_grad()
def feature_writes(
    ctx, model, saes, resid: dict, cfg: AttnConfig, *, n_tokens: int = 6, n_resid: int = 3
) -> pd.DataFrame:
    """One row per attention feature: its main head and share, the top output tokens of its write through W_O
    and the folded unembedding (the Neuronpedia view), and its strongest residual-SAE features just after the
    attention layer by weights (W_dec_attn W_O W_enc_res), with the null's 99% quantile of that connection
    (the same computation for same-share null rows)."""
    M_out, _ = output_matrix(model)
    vocab_ = vocab(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    for sae in saes:
        W_O, n_heads, d_head = _attn_weights(model, sae.layer)
        W_dec = sae.W_dec.float()
        shares = ha.head_shares(W_dec.cpu(), n_heads, d_head)
        writes = ha.residual_writes(W_dec, W_O)
        top_tok = (writes @ M_out.float()).topk(n_tokens, dim=-1).indices.cpu().numpy()
        res = residual_sae_after(resid, sae.layer)
        frame = pd.DataFrame(
            {
                "layer": sae.layer,
                "feature": np.arange(sae.d_sae),
                "top_head": shares.argmax(-1).numpy(),
                "top_share": shares.max(-1).values.numpy(),
                "write_norm": writes.norm(dim=-1).cpu().numpy(),
                "top_tokens": [" | ".join(vocab_[t] for t in r) for r in top_tok],
            }
        )
        if res is not None:
            conn = writes @ res.W_enc.float()
            vals, idx = conn.topk(n_resid, dim=-1)
            null = ha.residual_writes(
                ha.same_share_null(W_dec.cpu(), n_heads, d_head, gen).to(W_O.device), W_O
            )
            q99 = float(torch.quantile((null @ res.W_enc.float()).max(-1).values.cpu(), 0.99))
            frame["resid_hook"] = res.hook_name
            frame["resid_features"] = [", ".join(map(str, r)) for r in idx.cpu().numpy()]
            frame["resid_top_score"] = vals[:, 0].cpu().numpy()
            frame["null_q99"] = q99
            frame["above_null"] = frame["resid_top_score"] > q99
        rows.append(frame)
    return _save(ctx, pd.concat(rows, ignore_index=True), "04_feature_writes", cfg)


# ------------------------------------------------------------------------------------------------------------
# Activations on real text


def held_out_text(ctx, model, cfg: AttnConfig) -> torch.Tensor:
    """LongTensor [text_rows, text_ctx]: held-out TinyStories stories (none of the demo SAEs saw them), each
    tokenised by the model's tokenizer with BOS, concatenated and cut into rows."""
    from weightscope.prepare.demo_saes import held_out_stories

    ids: list[int] = []
    for story in held_out_stories():
        ids.extend(model.to_tokens(story, prepend_bos=True)[0].tolist())
        if len(ids) >= cfg.text_rows * cfg.text_ctx:
            break
    n = len(ids) // cfg.text_ctx
    return torch.tensor(ids[: n * cfg.text_ctx]).reshape(n, cfg.text_ctx)[: cfg.text_rows].to(ctx.device)


@torch.no_grad()
def _layer_pass(model, sae, tokens: torch.Tensor):
    """(cache of block sae.layer, W_eff, b_eff, pre-activations and activations, both [b, pos, d_sae])."""
    c = dfa_k.attention_cache(model, tokens, sae.layer)
    W_eff, b_eff = dfa_k.encoder_affine(sae)
    z = c["z"].flatten(2)
    pre = z @ W_eff.float() + b_eff.float()
    acts = sae.sae.encode(z if sae.sae.cfg.reshape_activations == "none" else c["z"])
    return c, W_eff.float(), b_eff.float(), pre, acts.float()


def _chunked_dfa(c, W_eff, b, d, f, chunk: int = 128) -> torch.Tensor:
    return (
        torch.cat(
            [
                dfa_k.dfa(c["pattern"], c["v"], W_eff, b[i : i + chunk], d[i : i + chunk], f[i : i + chunk])
                for i in range(0, len(b), chunk)
            ]
        )
        if len(b)
        else torch.zeros(0)
    )


@torch.no_grad()
def dfa_examples(ctx, model, saes, tokens: torch.Tensor, cfg: AttnConfig) -> dict[str, pd.DataFrame]:
    """DFA for the `dfa_features` features per layer with the highest activation on the held-out text, each at
    its top-activating position. {"examples": one row per (layer, feature): position, activation,
    pre-activation, bias, sum of parts and the exactness error; "parts": one row per (example, head, source)}.
    """
    vocab_ = vocab(model)
    ex_rows, part_rows = [], []
    for sae in saes:
        c, W_eff, b_eff, pre, acts = _layer_pass(model, sae, tokens)
        peak = acts.flatten(0, 1).max(0)
        feats = peak.values.topk(min(cfg.dfa_features, sae.d_sae)).indices
        where = peak.indices[feats]
        b, d = where // tokens.shape[1], where % tokens.shape[1]
        parts = _chunked_dfa(c, W_eff, b, d, feats)
        for i, f in enumerate(feats.tolist()):
            bi, di = int(b[i]), int(d[i])
            total = float(parts[i].sum() + b_eff[f])
            ex_rows.append(
                {
                    "layer": sae.layer,
                    "feature": f,
                    "row": bi,
                    "dest": di,
                    "dest_token": vocab_[int(tokens[bi, di])],
                    "activation": float(acts[bi, di, f]),
                    "pre_activation": float(pre[bi, di, f]),
                    "bias": float(b_eff[f]),
                    "sum_of_parts_plus_bias": total,
                    "abs_error": abs(total - float(pre[bi, di, f])),
                }
            )
            p = parts[i, :, : di + 1].cpu()
            h, s = np.meshgrid(np.arange(p.shape[0]), np.arange(p.shape[1]), indexing="ij")
            part_rows.append(
                pd.DataFrame(
                    {
                        "layer": sae.layer,
                        "feature": f,
                        "head": h.ravel(),
                        "src": s.ravel(),
                        "distance": di - s.ravel(),
                        "part": p.numpy().ravel(),
                        "src_token": [vocab_[int(t)] for t in tokens[bi, s.ravel()]],
                    }
                )
            )
    return {
        "examples": _save(ctx, pd.DataFrame(ex_rows), "04_dfa_examples", cfg),
        "parts": _save(ctx, pd.concat(part_rows, ignore_index=True), "04_dfa_parts", cfg),
    }


def repeated_tokens(model, cfg: AttnConfig) -> torch.Tensor:
    """[induction_rows, 1 + 2 * induction_len]: BOS, then a random token sequence twice (tokens drawn from the
    vocabulary above the special tokens)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    low = 3 if model.cfg.d_vocab > 3 else 0
    seq = torch.randint(low, model.cfg.d_vocab, (cfg.induction_rows, cfg.induction_len), generator=gen)
    bos = (
        model.tokenizer.bos_token_id
        if model.tokenizer is not None and model.tokenizer.bos_token_id is not None
        else 1
    )
    return torch.cat([torch.full((cfg.induction_rows, 1), bos), seq, seq], dim=1)


def _top_positions(acts: torch.Tensor, n: int, min_fires: int, allowed: torch.Tensor | None = None):
    """For every feature with at least `min_fires` active positions (within `allowed` [b, pos] if given): its
    top-n positions. Returns LongTensors (feature, row, dest) and the number of active positions per feature.
    """
    a = acts if allowed is None else acts * allowed[..., None]
    flat = a.flatten(0, 1)  # [b * pos, d_sae]
    fires = (flat > 0).sum(0)
    keep = torch.nonzero(fires >= min_fires).flatten()
    vals, idx = flat[:, keep].topk(min(n, flat.shape[0]), dim=0)  # [n, n_keep]
    f = keep.repeat(idx.shape[0], 1)
    ok = vals > 0
    pos = idx[ok]
    return f[ok], pos // acts.shape[1], pos % acts.shape[1], fires


@torch.no_grad()
def families(ctx, model, saes, tokens: torch.Tensor, cfg: AttnConfig) -> dict[str, pd.DataFrame]:
    """Each feature's DFA profile on its top activations: share of |DFA| within `short_window` tokens (and the
    share uniform attention over the same prefix would give: the null), and on repeated random sequences the
    share on the token after the earlier copy (null: 1 / (dest + 1)). The rule, in order: induction when that
    share reaches `induction_min` (with `min_fires` activations in the repeated half), short-range context
    when the short-window share reaches `short_mass_min`, else long-range context; features with fewer than
    `min_fires` activations on the held-out text stay unclassified. {"features": one row per classified
    feature, "summary": counts per layer and family}."""
    rep = repeated_tokens(model, cfg).to(tokens.device)
    T = cfg.induction_len
    second = torch.zeros(rep.shape, dtype=rep.dtype, device=rep.device)
    second[:, T + 1 :] = 1
    frames = []
    for sae in saes:
        c, W_eff, _, _, acts = _layer_pass(model, sae, tokens)
        f, b, d, _ = _top_positions(acts, cfg.n_examples, cfg.min_fires)
        mass = _chunked_dfa(c, W_eff, b, d, f).abs().sum(1)  # [n, src]
        dist = d[:, None] - torch.arange(mass.shape[1], device=mass.device)[None]
        short = (mass * ((dist >= 0) & (dist <= cfg.short_window))).sum(1) / mass.sum(1).clamp_min(1e-12)
        null_short = (torch.clamp(d, max=cfg.short_window) + 1).float() / (d + 1).float()
        text = (
            pd.DataFrame(
                {
                    "feature": f.cpu(),
                    "short": short.cpu(),
                    "null_short": null_short.cpu(),
                    "mean_distance": ((mass * dist.clamp_min(0)).sum(1) / mass.sum(1).clamp_min(1e-12)).cpu(),
                }
            )
            .groupby("feature")
            .mean()
        )
        cr, W_eff, _, _, acts_r = _layer_pass(model, sae, rep)
        fr, br, dr, fires_r = _top_positions(acts_r, cfg.n_examples, cfg.min_fires, allowed=second)
        mass_r = _chunked_dfa(cr, W_eff, br, dr, fr).abs().sum(1)
        induct = mass_r[torch.arange(len(dr)), dr - T + 1] / mass_r.sum(1).clamp_min(1e-12)
        ind = (
            pd.DataFrame(
                {
                    "feature": fr.cpu(),
                    "induction": induct.cpu(),
                    "null_induction": (1.0 / (dr + 1).float()).cpu(),
                }
            )
            .groupby("feature")
            .mean()
        )
        df = text.join(ind, how="left").reset_index()
        df["fires_repeated"] = fires_r.cpu().numpy()[df["feature"].to_numpy()]
        df["family"] = np.where(
            df["induction"].fillna(0) >= cfg.induction_min,
            FAMILIES[0],
            np.where(df["short"] >= cfg.short_mass_min, FAMILIES[1], FAMILIES[2]),
        )
        df.insert(0, "layer", sae.layer)
        frames.append(df)
    feats = pd.concat(frames, ignore_index=True)
    summary = (
        feats.groupby(["layer", "family"])
        .size()
        .unstack(fill_value=0)
        .reindex(columns=list(FAMILIES), fill_value=0)
    )
    summary["classified"] = summary.sum(1)
    summary["of_features"] = summary.index.map({sae.layer: sae.d_sae for sae in saes})
    return {
        "features": _save(ctx, feats, "04_families", cfg),
        "summary": _save(ctx, summary.reset_index(), "04_family_counts", cfg),
    }


@torch.no_grad()
def recursive_dfa(
    ctx,
    model,
    saes,
    resid: dict,
    tokens: torch.Tensor,
    examples: pd.DataFrame,
    cfg: AttnConfig,
    *,
    n_top: int = 5,
) -> pd.DataFrame:
    """One step up: for each DFA example, its largest (head, source) part is split over the residual SAE on
    the stream the attention layer reads (its active features, its b_dec, its error) plus the value bias, with
    the norm's scale frozen. One row per piece: layer, feature, head, src, part (the DFA part), piece,
    resid_feature (-1 for the non-feature pieces), contribution; the `n_top` features by |contribution| are
    kept, and a row "other features" holds the rest, so that the contributions of an example sum to its part.
    """
    rows = []
    by_layer = {sae.layer: sae for sae in saes}
    norm = model.cfg.normalization_type
    for layer, ex in examples.groupby("layer"):
        res = residual_sae_before(resid, int(layer))
        if res is None:
            continue
        sae = by_layer[int(layer)]
        c, W_eff, _, _, _ = _layer_pass(model, sae, tokens)
        block = model.blocks[int(layer)]
        attn = block.attn
        W_V = getattr(attn, "_W_V", attn.W_V).detach().float()
        b_V = getattr(attn, "_b_V", attn.b_V).detach().float()
        ln_w = getattr(block.ln1, "w", None)
        ln_w = ln_w.detach().float() if ln_w is not None else torch.ones(model.cfg.d_model, device=W_V.device)
        ln_b = getattr(block.ln1, "b", None)
        kv = ha.kv_heads(model.cfg.n_heads, model.cfg.n_key_value_heads)
        d_head = model.cfg.d_head
        for e in ex.itertuples():
            bi, di, f = int(e.row), int(e.dest), int(e.feature)
            part = dfa_k.dfa(
                c["pattern"], c["v"], W_eff, torch.tensor([bi]), torch.tensor([di]), torch.tensor([f])
            )[0]
            h, s = divmod(int(part.abs().argmax()), part.shape[1])
            pieces = dfa_k.value_decomposition(
                c["resid_pre"][bi, s],
                res,
                c["scale"][bi, s],
                ln_w,
                None if ln_b is None else ln_b.detach().float(),
                W_V,
                b_V,
                center=norm in ("LN", "LNPre"),
            )
            contrib = dfa_k.rdfa(
                pieces, float(c["pattern"][bi, h, di, s]), W_eff[h * d_head : (h + 1) * d_head, f], int(kv[h])
            )
            base = {
                "layer": int(layer),
                "feature": f,
                "head": h,
                "src": s,
                "dest": di,
                "part": float(part[h, s]),
            }
            order = contrib["feature"].abs().argsort(descending=True)
            for j in order[:n_top].tolist():
                rows.append(
                    {
                        **base,
                        "piece": "residual feature",
                        "resid_feature": int(contrib["features"][j]),
                        "contribution": float(contrib["feature"][j]),
                    }
                )
            rest = float(contrib["feature"][order[n_top:]].sum()) if len(order) > n_top else 0.0
            rows.append({**base, "piece": "other features", "resid_feature": -1, "contribution": rest})
            for key, label in (
                ("b_dec", "residual SAE b_dec"),
                ("error", "residual SAE error"),
                ("bias", "value bias"),
            ):
                rows.append(
                    {**base, "piece": label, "resid_feature": -1, "contribution": float(contrib[key])}
                )
    return _save(ctx, pd.DataFrame(rows), "04_rdfa", cfg)
