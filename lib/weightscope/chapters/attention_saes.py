"""Chapter 4 in one call: attention-output SAEs (Kissane et al. 2024): head attribution, what features write,
DFA and recursive DFA, each with its null.

    config = attention_saes.Config(top_k=10, ...)   # checks its parameters, all problems in one message
    tables = attention_saes.run(ctx, config)        # loads the full model and both kinds of SAE itself

`run` owns the loading (the processing the residual SAEs record, `processing: auto` included), the caching
(per layer for the head shares, per step otherwise), the provenance and the derived tables the page plots;
`findings(tables)` returns the page's result sentences, computed from those tables. `skip_reason` says when
the chapter does not apply, `target_problems` what the pre-flight checks of the attention SAEs before any
work.

What a feature writes goes through each head's output map, and on models with a post-attention norm
(Gemma-2) through that norm's weight too (`output_maps`); the norm's division by the output's scale is a
positive factor per position, common to every feature and token, so it changes no ranking. Token rankings
are over chapter 1's content tokens (its `exclude_tokens`), and every [features x vocabulary] or [features x
features] product is taken in row chunks of bounded size (`chunked_topk`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.chapters.context import HELD_OUT_TEXT
from weightscope.chapters.findings import percent
from weightscope.compute import dfa as dfa_k
from weightscope.compute import head_attribution as ha
from weightscope.compute.lens import content_ids, fold_note, output_matrix, token_strings
from weightscope.compute.passes import BlockStream
from weightscope.compute.ranking import rank_key, top_earliest
from weightscope.compute.streaming import CHUNK_ELEMENTS, NoBar, auto_chunk_size, progress_bar, scores_buffer
from weightscope.compute.token_scores import topk_rows
from weightscope.config.params import ParamsError
from weightscope.config.paths import progress_enabled
from weightscope.load.sae_sequence import SAESequence, described

FAMILIES = ("induction", "short-range context", "long-range context")
_QUANTILES = ("q_link", "mono_frac", "own_share_min", "short_mass_min", "induction_min")
_POSITIVE = ("top_k", "n_null", "n_null_reads", "text_rows", "text_ctx", "dfa_features", "n_examples",
             "min_fires", "induction_len", "induction_rows", "min_sources")


@dataclass(frozen=True)
class Config:
    """Chapter 4's parameters (each a notebook parameter with the same name)."""

    top_k: int = 10  # features per head by share (the authors' dashboards show 10)
    q_link: float = 0.95  # features link when their profiles agree above this quantile of null pairs
    mono_frac: float = 0.6  # monosemantic head: one group holds at least this share of its top features
    own_share_min: float = 0.5  # a head's features are its own: its top features' mean share reaches this
    n_null: int = 10  # same-share null draws per head
    n_null_reads: int = 4096  # same-share null rows per layer for the residual reads (chapter 2's null size)
    text_rows: int = 48  # held-out rows of `text_ctx` tokens for the activation steps
    text_ctx: int = 128  # tokens per held-out row (stories are concatenated and cut at this length)
    dfa_features: int = 4  # per layer: the features with the highest activation on the held-out text
    min_sources: int = 4  # DFA examples only at destinations with at least this many source positions
    n_examples: int = 8  # top-activating positions per feature for the families
    min_fires: int = 5  # a feature needs this many activations on a text to be classified from it
    short_window: int = 3  # "short range": sources at most this many tokens before the destination
    short_mass_min: float = 0.5  # short-range family: at least this share of |DFA| within the window
    induction_len: int = 24  # length of the random token sequence that is repeated once
    induction_rows: int = 16  # repeated sequences
    induction_min: float = 0.3  # induction family: at least this share of |DFA| after the earlier copy
    seed: int = 0

    def __post_init__(self):
        problems = [f"{name} = {getattr(self, name)} is a share: use a value in (0, 1)"
                    for name in _QUANTILES if not 0.0 < getattr(self, name) < 1.0]
        problems += [f"{name} = {getattr(self, name)}: use a whole number of at least 1"
                     for name in _POSITIVE if not (isinstance(getattr(self, name), int)
                                                   and getattr(self, name) >= 1)]
        if not (isinstance(self.short_window, int) and self.short_window >= 0):
            problems.append(f"short_window = {self.short_window}: use a whole number of at least 0")
        if isinstance(self.text_ctx, int) and isinstance(self.min_sources, int) \
                and self.min_sources > self.text_ctx:
            problems.append(f"min_sources = {self.min_sources} exceeds text_ctx = {self.text_ctx}: a "
                            "destination has at most text_ctx sources")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def inputs(self) -> list:
        """What `run` reads besides the model and SAEs (checked by the pre-flight): held-out stories."""
        return list(HELD_OUT_TEXT)

    def problems(self, dims) -> list[str]:
        """Checks that need the model's sizes; `dims`: `model.cfg`, or the pre-flight's `ModelDims`."""
        out = []
        n_ctx = getattr(dims, "n_ctx", None)
        for name, length in (("text_ctx", self.text_ctx), ("induction_len", 1 + 2 * self.induction_len)):
            if n_ctx and length > n_ctx:
                out.append(f"{name}: rows of {length} tokens exceed the model's context ({n_ctx})")
        return out


@dataclass
class Tables:
    """What chapter 4 produces; every frame is tidy."""

    quality: pd.DataFrame  # demo attention SAEs' held-out metrics per layer (empty for public releases)
    shares: pd.DataFrame  # layer, feature, head, kv_head, share
    top: pd.DataFrame  # layer, head, rank, feature, share: each head's top_k features by share
    heads: pd.DataFrame  # layer, head, kv_head, top_share_mean, features_owned
    groups: pd.DataFrame  # per (layer, head, tau, kind, draw): groups among the head's top features
    poly_heads: pd.DataFrame  # the verdict per head at the chosen tau, with the null's rate
    curve: pd.DataFrame  # tau, kind, polysemantic: fraction of heads polysemantic, features and null
    tau: pd.DataFrame  # one row: the chosen tau and q_link
    slice_heads: pd.DataFrame  # per head, profiles from its own slice: verdict, null rate, qualifies
    slice_tau: pd.DataFrame  # one row: tau of the slice profiles' null, and q_link
    writes: pd.DataFrame  # one row per feature: main head, write's top tokens, residual connections
    examples: pd.DataFrame  # DFA examples: one row per (layer, feature)
    parts: pd.DataFrame  # DFA parts: one row per (example, head, source)
    families: pd.DataFrame  # one row per classified feature: DFA profile shares and family
    family_counts: pd.DataFrame  # per layer: features per family, classified, of_features
    head_profiles: pd.DataFrame  # per head: locality of its own attention, induction score, uniform nulls
    rdfa: pd.DataFrame  # recursive DFA pieces
    info: dict = field(default_factory=dict)  # n_heads, n_kv_heads, d_head, d_sae, text tokens, notes
    config: Config = field(repr=False, default_factory=Config)


# ------------------------------------------------------------------------------------------------------------
# Where the chapter applies, and what the pre-flight checks


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to `target`, or None: it needs attention-output SAEs."""
    if target.attn_saes is None:
        return ("the target names no attention-output SAEs; add `attn_saes: {source: ..., id_template: ...}` "
                "to its parameters file to run it (see params/gpt2-small.yaml).")
    return None


def target_problems(target, dims) -> list[str]:
    """Problems with the target's attention SAEs, from their configs only (no weights): the folder or
    release exists, and every SAE reads `blocks.L.attn.hook_z` of a layer the model has."""
    from weightscope.load.saes import SAEError, demo_sae_folder, hook_layer, is_attention_z_hook, \
        validate_release

    if target.attn_saes is None:
        return []
    source = target.attn_saes["source"]
    layers = _known_layers(target, dims)
    if source.startswith("demo"):
        try:
            folder = demo_sae_folder(source.partition(":")[2] or "default")
        except SAEError:
            return []  # not prepared yet: the prepare stage trains them
    elif Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            return [f"attn_saes.source: SAE folder {folder} does not exist. Pass a folder of hook_z SAEs "
                    "saved by `sae.save_model(path)`, one `layer_L/` per layer."]
    else:
        try:
            validate_release(source, target.attn_sae_ids(layers) if layers is not None else None)
        except SAEError as err:
            return [f"attn_saes: {err}"] if layers is not None else []
        return []
    ids = target.attn_sae_ids(layers) if layers is not None else None
    names = ids or ([f"layer_{layer}" for layer in layers] if layers is not None else
                    sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file()))
    out = []
    for name in names:
        cfg_file = folder / name / "cfg.json"
        if not cfg_file.is_file():
            out.append(f"attn_saes: {folder / name} holds no SAE (no cfg.json). Check `attn_saes.source` "
                       "and `attn_saes.id_template`.")
            continue
        try:
            cfg = json.loads(cfg_file.read_text())
        except ValueError as err:
            out.append(f"attn_saes: {cfg_file} is not valid JSON ({err}). Save the SAE again.")
            continue
        hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name") or ""
        if not is_attention_z_hook(hook):
            out.append(f"attn_saes: the SAE in {folder / name} reads {hook or 'no recorded hook'}, not "
                       "blocks.L.attn.hook_z; chapter 4 needs attention-output SAEs on hook_z (a residual "
                       "SAE belongs under `saes:`).")
        elif dims is not None and dims.n_layers and not 0 <= hook_layer(hook) < dims.n_layers:
            out.append(f"attn_saes: the SAE in {folder / name} reads {hook}, but the model has "
                       f"{dims.n_layers} layers.")
    return out


def _known_layers(target, dims) -> list[int] | None:
    if target.layers != "all":
        return list(target.layers)
    if dims is None or dims.n_layers is None:
        return None
    return target.resolve_layers(dims.n_layers)


# ------------------------------------------------------------------------------------------------------------
# The chapter


def run(ctx, config: Config, *, model=None, attn=None, resid=None, text=None) -> Tables:
    """Chapter 4 for ctx's target. model, attn (hook_z `LoadedSAE`s: a list, or a lazy `SAESequence` as
    `load` gives), resid (residual SAEs: {layer: LoadedSAE}, or a lazy `SAESequence`) and text (LongTensor
    [rows, text_ctx]) are loaded when not given; lazy SAEs are read one at a time, where a step uses them."""
    if model is None:
        model, attn, resid = load(ctx)
    problems = config.problems(model.cfg)
    if problems:
        raise ParamsError("; ".join(problems) + ".")
    target = ctx.params.target
    metas = described(attn)
    maps = {sae.layer: output_maps(model, sae.layer) for sae in metas}
    keep = chapter1_content_ids(ctx.params, model)
    notes = {"fold": fold_note(model), "post_attention_norm": has_post_attention_norm(model),
             "content_tokens": None if keep is None else int(len(keep))}
    prov = ctx.provenance(**dataclasses.asdict(config), attn_saes=ctx.params.attn_saes, **notes)

    def cached(names, compute, label):
        return io.cached_tables(target, names, prov, compute, label=f"04_attention_saes: computing {label}")

    sh = io.layer_tables(target, "04_head_shares", attn, prov,
                         lambda sae: head_attribution(model, sae, config))
    # the model's alone: made once for both tables (at most), not per table
    gram = functools.cache(lambda: ha.profile_gram(output_matrix(model)[0].float().cpu(), keep))
    poly = cached(["04_head_groups", "04_poly_heads", "04_poly_curve", "04_tau"],
                  lambda: polysemantic_heads(attn, maps, gram(), config), "polysemantic heads")
    own = cached(["04_slice_heads", "04_slice_tau"],
                 lambda: polysemantic_heads(attn, maps, gram(), config, own_slice=True),
                 "polysemantic heads, from each head's own slice")
    heads = heads_table(sh["shares"], sh["top"], model.cfg)
    slice_heads = own["04_slice_heads"].merge(heads[["layer", "head", "top_share_mean"]],
                                              on=["layer", "head"])
    slice_heads["qualifies"] = slice_heads["top_share_mean"] >= config.own_share_min
    writes = cached(["04_feature_writes"], lambda: {"04_feature_writes": feature_writes(
        model, attn, maps, resid, keep, config)}, "what features write")["04_feature_writes"]
    if text is None:
        text = ctx.held_out_rows(model, config.text_rows * config.text_ctx, config.text_ctx)[0].to(ctx.device)
    ex = cached(["04_dfa_examples", "04_dfa_parts", "04_families", "04_family_counts", "04_head_profiles",
                 "04_rdfa"], lambda: text_analyses(model, attn, resid, text, config, keep),
                "DFA examples, feature families and recursive DFA")
    info = {"n_heads": model.cfg.n_heads, "n_kv_heads": model.cfg.n_key_value_heads or model.cfg.n_heads,
            "d_head": model.cfg.d_head, "d_sae": metas[0].d_sae, "d_in": metas[0].d_in,
            "n_attn_saes": len(attn), "n_resid_saes": len(resid), "text_rows": int(text.shape[0]),
            "text_ctx": int(text.shape[1]), "source": ctx.params.attn_saes["source"],
            "resid_hook": min(described(resid), key=lambda s: s.layer).hook_name if len(resid) else None,
            "processing_mismatch": processing_mismatch(getattr(ctx, "processing", None), metas[0]), **notes}
    return Tables(quality=sae_quality(ctx), shares=sh["shares"], top=sh["top"],
                  heads=heads, groups=poly["04_head_groups"], poly_heads=poly["04_poly_heads"],
                  curve=poly["04_poly_curve"], tau=poly["04_tau"], slice_heads=slice_heads,
                  slice_tau=own["04_slice_tau"],
                  writes=writes, examples=ex["04_dfa_examples"], parts=ex["04_dfa_parts"],
                  families=ex["04_families"], family_counts=ex["04_family_counts"],
                  head_profiles=ex["04_head_profiles"], rdfa=ex["04_rdfa"],
                  info=info, config=config)


# ------------------------------------------------------------------------------------------------------------
# Loading


def load(ctx):
    """(model, attention SAEs, residual SAEs): the full TransformerLens model (the DFA steps need forward
    passes) with the processing the target's residual SAEs were trained with (`processing: auto` reads it
    from their configs), one hook_z SAE per analysed layer and the target's residual SAEs for the steps that
    join the two. Both are lazy `SAESequence`s: each SAE is loaded where a step uses it, so the chapter holds
    one or two at a time, not every layer's; both are checked against the model before any work (every SAE's
    config, for a folder)."""
    t = ctx.params
    dtype = str(ctx.dtype).removeprefix("torch.")
    model = ctx.load_full_model()
    layers = t.resolve_layers(model.cfg.n_layers)
    attn_ids = t.attn_sae_ids(layers) or [f"layer_{layer}" for layer in layers]
    attn = SAESequence(t.attn_saes["source"], attn_ids, layers, device=str(ctx.device), dtype=dtype,
                       model=model, site="attention_z")
    resid = SAESequence(t.sae_source, t.sae_names(layers), layers, device=str(ctx.device), dtype=dtype,
                        model=model)
    attn.check()
    resid.check()
    return model, attn, resid


def sae_quality(ctx) -> pd.DataFrame:
    """The demo attention SAEs' held-out metrics per layer (from their manifest), with the bar in `attrs`; an
    empty table for public releases, whose metrics their authors document."""
    source = ctx.params.attn_saes["source"]
    if not source.startswith("demo"):
        return pd.DataFrame()
    from weightscope.load.saes import demo_sae_folder
    from weightscope.load.saes import TARGET_BAR, read_manifest

    manifest = read_manifest(demo_sae_folder(source.partition(":")[2] or "default"))
    cols = ["layer", "explained_variance", "mean_l0", "dead_fraction", "meets_bar", "tokens_seen",
            "training_time_s"]
    df = pd.DataFrame(manifest["per_layer"].values())[cols]
    df["tokens_seen"] = df["tokens_seen"].map("{:,}".format)
    df["misses"] = [", ".join(name for name, bad in (
        ("explained variance", r.explained_variance < TARGET_BAR["explained_variance_min"]),
        ("L0", r.mean_l0 > TARGET_BAR["mean_l0_max"]),
        ("dead fraction", r.dead_fraction > TARGET_BAR["dead_fraction_max"])) if bad)
        for r in df.itertuples()]
    df = df[["layer", "meets_bar", "misses", *cols[1:4], *cols[5:]]]  # the verdict first: it fits on a page
    df.attrs.update(bar=TARGET_BAR, d_sae=manifest["width"], k=manifest["k"],
                    distinct_tokens=manifest["distinct_training_tokens"],
                    eval_tokens=manifest["n_eval_tokens"])
    return df


def training_sweep(ctx) -> pd.DataFrame:
    """The demo attention SAEs' training sweep (`python -m weightscope.prepare.demo_saes --sweep attn`), one row
    per variant: width, k, training tokens, held-out explained variance per swept layer and how many layers meet
    the bar. Empty for public releases and when no sweep was recorded."""
    source = ctx.params.attn_saes["source"]
    from weightscope.load.saes import sweep_path

    path = sweep_path(source.partition(":")[2] or "default") if source.startswith("demo") else None
    if path is None or not path.is_file():
        return pd.DataFrame()
    rows = pd.DataFrame(json.loads(path.read_text())["rows"])
    keys = ["variant", "d_sae", "k", "training_tokens", "train_rows"]
    ev = rows.pivot_table(index=keys, columns="layer", values="explained_variance", sort=False)
    ev.columns = [f"EV_layer_{c}" for c in ev.columns]
    met = rows.groupby(keys, sort=False)["meets_bar"].agg(["sum", "size"])
    out = ev.join(met).reset_index()
    out["all_meet"] = out["sum"] == out["size"]
    out["layers_meeting_bar"] = [f"{int(a)} of {int(b)}" for a, b in zip(out.pop("sum"), out.pop("size"))]
    return out


def sweep_sentence(sweep: pd.DataFrame) -> str:
    """Which training variants meet the bar at every swept layer, from `training_sweep`'s table."""
    ok = sweep.loc[sweep["all_meet"], "variant"].tolist()
    short = sweep.loc[~sweep["all_meet"], "variant"].tolist()
    ev = sweep.filter(like="EV_layer_")
    return (f"Training sweep at layers {', '.join(c.rsplit('_', 1)[1] for c in ev.columns)}: "
            f"{len(ok)} of {len(sweep)} variants meet the bar at every layer"
            + (f" ({'; '.join(ok)})" if ok else "")
            + (f"; short of it: {'; '.join(short)}" if short else "")
            + f". Held-out explained variance spans {ev.min().min():.3f} to {ev.max().max():.3f}.")


def _residual_sae_at(resid, hooks: tuple[str, ...]):
    """The residual SAE (of a {layer: SAE} dict or a lazy sequence, then loaded) reading one of `hooks`."""
    for i, meta in enumerate(described(resid)):
        if meta.hook_name in hooks:
            return meta if isinstance(resid, dict) else resid[i]
    return None


def residual_sae_after(resid, layer: int):
    """The residual SAE reading the stream right after block `layer`'s attention writes (resid_mid or
    resid_post of that block, or resid_pre of the next), else None."""
    return _residual_sae_at(resid, (f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_resid_post",
                                    f"blocks.{layer + 1}.hook_resid_pre"))


def residual_sae_before(resid, layer: int):
    """The residual SAE on the stream block `layer`'s attention reads (resid_pre of it, resid_post of the one
    before), else None."""
    return _residual_sae_at(resid, (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer - 1}.hook_resid_post"))


def vocab(model) -> list[str]:
    """Token strings (ids as text for a model without a tokenizer, e.g. a random test model)."""
    return token_strings(model) if model.tokenizer is not None else [str(i) for i in range(model.cfg.d_vocab)]


def chapter1_content_ids(target, model) -> torch.Tensor | None:
    """The token ids chapter 1's statistics are taken over (its `exclude_tokens`, this target's override
    included); None for a model without a tokenizer (every token counts)."""
    from weightscope.chapters.output_tokens import Config as Chapter1Config

    if model.tokenizer is None:
        return None
    override = target.chapter_params("01_output_tokens") if hasattr(target, "chapter_params") else {}
    exclude = override.get("exclude_tokens", Chapter1Config().exclude_tokens)
    return content_ids(model, tuple(exclude))


def processing_mismatch(used: dict | None, attn_sae) -> dict[str, tuple[bool, bool]]:
    """{flag: (recorded by the attention SAEs, used for the model)} for the processing flags on which the
    attention SAEs' record differs from the flags the model runs with (the residual SAEs'); {} when they agree
    or the attention SAEs record none."""
    from weightscope.config.params import PROCESSING_FLAGS

    recorded = getattr(attn_sae, "model_from_pretrained_kwargs", None) or {}
    if used is None or not recorded:
        return {}
    return {f: (bool(recorded.get(f, False)), bool(used.get(f, False))) for f in PROCESSING_FLAGS
            if bool(recorded.get(f, False)) != bool(used.get(f, False))}


def has_post_attention_norm(model) -> bool:
    """Whether the attention output passes a norm before it joins the residual stream (Gemma-2's
    post-attention RMSNorm, TransformerLens's `ln1_post`)."""
    return getattr(model.blocks[0], "ln1_post", None) is not None


def output_maps(model, layer: int) -> torch.Tensor:
    """[n_heads, d_head, d_model]: what each head's output writes into the residual stream, W_O with the
    post-attention norm's weight folded in where the model has one. The norm also divides by the output's
    scale at each position: a positive factor common to all features and tokens, left out."""
    W_O = model.blocks[layer].attn.W_O.detach().float()
    post = getattr(model.blocks[layer], "ln1_post", None)
    if post is None:
        return W_O
    weight = getattr(post, "w", None)
    return W_O if weight is None else W_O * weight.detach().float()


def chunked_topk(rows: torch.Tensor, M: torch.Tensor, n: int, *, keep: torch.Tensor | None = None,
                 chunk_elements: int | None = None,
                 desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [n_rows, n] of the largest entries of rows [n_rows, d] @ M [d, m] (restricted to the
    columns `keep`, indices in M's numbering), computed in row chunks within the streaming budget
    (`auto_chunk_size`, as chapter 1's lens: at GPT-2 width 6-8% faster than chunks of 64 MB), or of at most
    `chunk_elements` scores; M is neither copied nor cut (the columns left out are set to -inf in each
    chunk's scores, which costs far less than gathering the kept ones). desc: a progress bar's name (a
    minute a layer at GPT-2 width), None for none."""
    drop = None
    if keep is not None:
        mask = torch.ones(M.shape[1], dtype=torch.bool, device=M.device)
        mask[keep.to(M.device)] = False
        drop = mask.nonzero().squeeze(1)
    n = min(n, M.shape[1] - (0 if drop is None else len(drop)))
    step = (auto_chunk_size(M.shape[1], torch.float32, M.device) if chunk_elements is None
            else max(1, chunk_elements // max(1, M.shape[1])))
    vals, idx = [], []
    # one scores buffer for every chunk on a CPU (a fresh one per chunk is mapped and faulted in anew), its
    # rows on 64-byte lines (`scores_buffer`)
    buffer = scores_buffer(min(step, len(rows)), M.shape[1], M.dtype) if M.device.type == "cpu" else None
    bar = progress_bar(len(rows), desc is not None and progress_enabled(), desc or "")
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step].to(M.device, M.dtype)
        scores = torch.matmul(chunk, M, out=None if buffer is None else buffer[:len(chunk)]).float()
        if drop is not None:
            scores.index_fill_(1, drop, float("-inf"))
        v, j = topk_rows(scores, n, largest=True)  # two-stage, as chapter 1's lens (fast on CPU rows)
        vals.append(v)
        idx.append(j)
        bar.update(len(scores))
    bar.close()
    vals = torch.cat(vals) if vals else torch.zeros(0, n)
    idx = torch.cat(idx) if idx else torch.zeros(0, n, dtype=torch.long)
    return vals, idx


# ------------------------------------------------------------------------------------------------------------
# Weights only


@torch.no_grad()
def head_attribution(model, sae, config: Config) -> dict[str, pd.DataFrame]:
    """One layer: {"shares": one row per (layer, feature, head), "top": each head's top_k features by
    share}."""
    H, d_head = model.cfg.n_heads, model.cfg.d_head
    kv = ha.kv_heads(H, model.cfg.n_key_value_heads)
    shares = ha.head_shares(sae.W_dec.float().cpu(), H, d_head)
    vals, idx = ha.top_features(shares, config.top_k)
    top = pd.DataFrame({"layer": sae.layer, "head": np.repeat(np.arange(H), idx.shape[1]),
                        "rank": np.tile(np.arange(idx.shape[1]), H), "feature": idx.reshape(-1).numpy(),
                        "share": vals.reshape(-1).numpy()})
    return {"shares": ha.shares_table(shares, sae.layer, kv), "top": top}


def heads_table(shares: pd.DataFrame, top: pd.DataFrame, model_cfg) -> pd.DataFrame:
    """Per head: kv_head, mean share of its top features, number of features whose largest share it holds."""
    best = shares.loc[shares.groupby(["layer", "feature"])["share"].idxmax()]
    owned = best.groupby(["layer", "head"]).size().rename("features_owned")
    heads = (top.groupby(["layer", "head"])["share"].mean().rename("top_share_mean").to_frame().join(owned)
             .fillna({"features_owned": 0}).reset_index())
    kv = ha.kv_heads(model_cfg.n_heads, model_cfg.n_key_value_heads)
    heads["kv_head"] = kv.numpy()[heads["head"].to_numpy()]
    return heads


def share_summary(t: Tables) -> dict[str, float]:
    """A feature's largest head share: its median, the even spread 1/H, the share of features with at least
    half their decoder norm in one head."""
    best = t.shares.groupby(["layer", "feature"])["share"].max()
    return {"median": float(best.median()), "even": 1 / t.info["n_heads"],
            "half": float((best >= 0.5).mean())}


def top_features_table(t: Tables, n: int = 5) -> pd.DataFrame:
    """One row per head: its value head, its n top features by share ("f (share)"), and the output tokens of
    the first of them."""
    top = t.top[t.top["rank"] < n].merge(t.writes[["layer", "feature", "top_tokens"]],
                                         on=["layer", "feature"])
    top["item"] = top["feature"].astype(str) + " (" + top["share"].map("{:.2f}".format) + ")"
    out = (top.sort_values("rank").groupby(["layer", "head"])
           .agg(features=("item", ", ".join), first_feature_tokens=("top_tokens", "first")).reset_index())
    out = out.merge(t.heads[["layer", "head", "kv_head"]], on=["layer", "head"])
    out.insert(0, "head_name", out["layer"].astype(str) + "." + out["head"].astype(str))
    return out[["head_name", "kv_head", "features", "first_feature_tokens"]]


@torch.no_grad()
def polysemantic_heads(saes, maps: dict, gram: torch.Tensor, config: Config, *,
                       own_slice: bool = False) -> dict[str, pd.DataFrame]:
    """{"04_head_groups": per (layer, head, tau, kind, draw) the groups among the head's top features,
    "04_poly_heads": the verdict per head at the chosen tau, "04_poly_curve": fraction of heads polysemantic
    against tau, real and null, "04_tau": the chosen tau (the null's q_link quantile of pairwise profile
    cosines), one row}. Profiles are over the content tokens (`gram`: `ha.profile_gram` of the model's folded
    unembedding over them): each feature's whole write through every head, or with `own_slice` what head h
    itself writes for it (then {"04_slice_heads", "04_slice_tau"} only)."""
    similarities = ha.head_slice_similarities if own_slice else ha.head_similarities
    sims, bar = {}, progress_bar(len(saes), True, "head profile cosines", unit="SAE")
    try:
        for sae in saes:
            sims[sae.layer] = similarities(sae.W_dec.float().cpu(), maps[sae.layer].cpu(), gram,
                                           k=config.top_k, n_null=config.n_null, seed=config.seed + sae.layer)
            bar.update(1)
    finally:
        bar.close()
    tau = ha.null_link_threshold([s for layer_sims in sims.values() for s in layer_sims], config.q_link)
    taus = sorted(set(round(t, 2) for t in np.linspace(0.05, 0.95, 19)) | {tau})
    groups = pd.concat([ha.polysemantic_heads(s, layer=layer, taus=taus) for layer, s in sims.items()],
                       ignore_index=True)
    groups["polysemantic"] = groups["largest_group_frac"] < config.mono_frac
    curve = groups.groupby(["tau", "kind"], as_index=False)["polysemantic"].mean()
    at = groups[np.isclose(groups["tau"], tau)]
    heads = at[at["kind"] == "features"][["layer", "head", "n_groups", "largest_group_frac", "polysemantic"]]
    null_rate = (at[at["kind"] == "null"].groupby(["layer", "head"])["polysemantic"].mean()
                 .rename("null_poly_rate"))
    heads = heads.join(null_rate, on=["layer", "head"]).reset_index(drop=True)
    tau_table = pd.DataFrame({"tau": [float(tau)], "q_link": [config.q_link]})
    if own_slice:
        return {"04_slice_heads": heads, "04_slice_tau": tau_table}
    return {"04_head_groups": groups, "04_poly_heads": heads, "04_poly_curve": curve,
            "04_tau": pd.DataFrame({"tau": [float(tau)], "q_link": [config.q_link]})}


def head_level_sentence(t: Tables) -> str:
    """The head-level verdict (profiles from each head's own slice), stated only for the heads whose top
    features are their own (mean share >= own_share_min); says how many heads qualify."""
    sh, c = t.slice_heads, t.config
    q = sh[sh["qualifies"]]
    rule = (f"{len(q)} of {len(sh)} heads qualify for a head-level statement (their top {c.top_k} features "
            f"hold on average at least {c.own_share_min:.0%} of their decoder norm in that head; the highest "
            f"mean share is {sh['top_share_mean'].max():.2f})")
    if not len(q):
        return rule + ": no verdict about heads is made; the whole-write verdict above is about features."
    tau = float(t.slice_tau["tau"].iloc[0])
    return (rule + f". Of these, {int(q['polysemantic'].sum())} ({percent(q['polysemantic'].mean(), 0)}) are "
            f"polysemantic by what the head itself writes (tau = {tau:.2f}, the same-share null's "
            f"{c.q_link:.0%} quantile), against {percent(q['null_poly_rate'].mean(), 0)} for null slices.")


def poly_gap(t: Tables) -> pd.DataFrame:
    """Per tau: fraction polysemantic for the features and the null, and the gap null - features."""
    gap = t.curve.pivot(index="tau", columns="kind", values="polysemantic")
    return gap.assign(gap=gap["null"] - gap["features"])


@torch.no_grad()
def feature_writes(model, saes, maps: dict, resid: dict, keep, config: Config, *, n_tokens: int = 6,
                   n_resid: int = 3) -> pd.DataFrame:
    """One row per attention feature: its main head and share, the top content tokens of its write through
    the output maps and the folded unembedding (the Neuronpedia view), and its strongest residual-SAE
    features just after the attention layer by weights (W_dec_attn W_O W_enc_res), with the null's 99%
    quantile of that connection (the same computation for same-share null rows). Every product with the
    vocabulary or the residual SAE's features is taken in bounded row chunks."""
    M_out = output_matrix(model)[0]
    vocab_ = vocab(model)
    gen = torch.Generator().manual_seed(config.seed)
    rows = []
    for sae in saes:
        W_O = maps[sae.layer]
        n_heads, d_head, _ = W_O.shape
        W_dec = sae.W_dec.float()
        shares = ha.head_shares(W_dec.cpu(), n_heads, d_head)
        writes = ha.residual_writes(W_dec, W_O.to(W_dec.device))
        _, top_tok = chunked_topk(writes, M_out, n_tokens, keep=keep, desc=f"layer {sae.layer} write lens")
        frame = pd.DataFrame({"layer": sae.layer, "feature": np.arange(sae.d_sae),
                              "top_head": shares.argmax(-1).numpy(),
                              "top_share": shares.max(-1).values.numpy(),
                              "write_norm": writes.norm(dim=-1).cpu().numpy(),
                              "top_tokens": [" | ".join(vocab_[t] for t in r)
                                             for r in top_tok.cpu().tolist()]})
        res = residual_sae_after(resid, sae.layer)
        if res is not None:
            vals, idx = chunked_topk(writes, res.W_enc.float(), n_resid,
                                     desc=f"layer {sae.layer} residual reads")
            null_rows = ha.same_share_null(_null_sample(W_dec, config.n_null_reads, gen), n_heads, d_head,
                                           gen).to(W_O.device)
            null = ha.residual_writes(null_rows, W_O)
            null_top, _ = chunked_topk(null, res.W_enc.float(), 1)
            q99 = float(torch.quantile(null_top[:, 0].cpu(), 0.99))
            frame["resid_hook"] = res.hook_name
            frame["resid_features"] = [", ".join(map(str, r)) for r in idx.cpu().numpy()]
            frame["resid_top_score"] = vals[:, 0].cpu().numpy()
            frame["null_q99"] = q99
            frame["above_null"] = frame["resid_top_score"] > q99
        rows.append(frame)
        del W_dec, writes, res  # before the next layer's SAEs load: one layer's at a time
    return pd.concat(rows, ignore_index=True)


def _null_sample(W_dec: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """[min(n, d_sae), d_in] on the CPU: the rows a same-share null copies, a random subset of W_dec's rows
    when the SAE is wider than n (the null is a distribution for one quantile, so its size need not grow with
    the SAE's width: at 24,576 features a full-size null was 10 of the chapter's 48 TFLOP); W_dec itself when
    not (no draw, so narrower SAEs' nulls are unchanged)."""
    if W_dec.shape[0] <= n:
        return W_dec.cpu()
    return W_dec.cpu()[torch.randperm(W_dec.shape[0], generator=gen)[:n]]


def connections_per_layer(t: Tables) -> pd.Series:
    """Per layer: share of features whose strongest residual connection exceeds the null's 99% quantile."""
    if "above_null" not in t.writes:
        return pd.Series(dtype=float)
    return t.writes.dropna(subset=["above_null"]).groupby("layer")["above_null"].mean()


# ------------------------------------------------------------------------------------------------------------
# Activations on real text


# DFA items per chunk: [chunk, n_heads, src] parts at a time (25 MB at GPT-2 small's 12 heads and 128 sources);
# `dfa_k.dfa` loops over the chunk's text rows, so small chunks repeat that loop (128 cost 55 s at GPT-2 width)
DFA_CHUNK = 4096


@torch.no_grad()
def _layer_pass(model, sae, tokens: torch.Tensor, stream: BlockStream | None = None):
    """(cache of block sae.layer, W_eff, b_eff, activations [b, pos, d_sae] from sae-lens's own encode). The
    pre-activations are not kept whole ([b, pos, d_sae] again): `pre_activations` reads the few needed.
    stream: the tokens' `BlockStream`, standing at or before the layer (None: a pass from the embedding)."""
    c = dfa_k.attention_cache(model, tokens, sae.layer, stream=stream)
    W_eff, b_eff = dfa_k.encoder_affine(sae)
    z = c["z"].flatten(2) if sae.sae.cfg.reshape_activations == "none" else c["z"]
    rows = max(1, CHUNK_ELEMENTS // (tokens.shape[1] * sae.d_sae))  # sae-lens's temporaries: one chunk's
    acts = torch.empty(*tokens.shape, sae.d_sae, device=z.device)
    for i in range(0, len(z), rows):
        acts[i:i + rows] = sae.sae.encode(z[i:i + rows])
    return c, W_eff.float(), b_eff.float(), acts


def pre_activations(c, W_eff, b_eff, b, d, f) -> torch.Tensor:
    """fp64 [n]: the encoder pre-activation of feature f[i] at (row b[i], position d[i]) of a `_layer_pass`
    (in fp64: the reference the DFA parts' sum is checked against)."""
    z = c["z"][b, d].flatten(1).double()  # [n, d_in]
    return (z * W_eff[:, f].T.double()).sum(1) + b_eff[f].double()


def _chunked_dfa(c, W_eff, b, d, f, chunk: int = DFA_CHUNK) -> torch.Tensor:
    """[n, heads, src]: `dfa_k.dfa` of n (row, dest, feature) items in chunks; [0, heads, src] for none."""
    if not len(b):
        _, heads, _, src = c["pattern"].shape
        return torch.zeros(0, heads, src, device=c["pattern"].device)
    return torch.cat([dfa_k.dfa(c["pattern"], c["v"], W_eff, b[i:i + chunk], d[i:i + chunk], f[i:i + chunk])
                      for i in range(0, len(b), chunk)])


@torch.no_grad()
def text_analyses(model, saes, resid: dict, tokens: torch.Tensor, config: Config,
                  keep=None) -> dict[str, pd.DataFrame]:
    """The analyses of the held-out text, layer by layer in increasing order (`_layer_pass`): DFA examples
    (`dfa_examples`), feature families (`families`) and recursive DFA (`recursive_dfa`). The held-out text and
    the repeated sequences each go through the model once, a stretch of blocks per layer (`BlockStream`).
    {"04_dfa_examples", "04_dfa_parts", "04_families", "04_family_counts", "04_head_profiles", "04_rdfa"}."""
    rep = repeated_tokens(model, config, keep).to(tokens.device)
    text_stream, rep_stream = BlockStream(model, tokens), BlockStream(model, rep)
    out = {k: [] for k in ("examples", "parts", "families", "profiles", "rdfa")}
    metas = described(saes)
    order = sorted(range(len(metas)), key=lambda j: metas[j].layer)  # the streams run forward only
    # four steps a layer, each counted: the layer pass, DFA, families, recursive DFA
    bar = progress_bar(4 * len(order), progress_enabled(), "held-out text analyses", unit="step")
    for i, j in enumerate(order, 1):
        io.progress(f"04_attention_saes: DFA, families and recursive DFA, layer {metas[j].layer} "
                    f"({i}/{len(order)})")
        sae = saes[j]  # loaded here when `saes` is lazy
        lp = _layer_pass(model, sae, tokens, text_stream)
        bar.update(1)
        ex, parts = dfa_examples(model, sae, lp, tokens, config)
        bar.update(1)
        fam, prof = families(model, sae, lp, tokens, rep, config, rep_stream)
        bar.update(1)
        out["examples"].append(ex)
        out["parts"].append(parts)
        out["families"].append(fam)
        out["profiles"].append(prof)
        out["rdfa"].append(recursive_dfa(model, sae, lp, resid, ex))
        bar.update(1)
        del lp, sae  # else the next layer's activations (and SAE) are allocated while these are still held
    bar.close()
    feats = pd.concat(out["families"], ignore_index=True)
    summary = (feats.groupby(["layer", "family"]).size().unstack(fill_value=0)
               .reindex(columns=list(FAMILIES), fill_value=0))
    summary.columns.name = None
    summary["classified"] = summary.sum(1)
    summary["of_features"] = summary.index.map({sae.layer: sae.d_sae for sae in metas})
    return {"04_dfa_examples": pd.concat(out["examples"], ignore_index=True),
            "04_dfa_parts": pd.concat(out["parts"], ignore_index=True),
            "04_families": feats, "04_family_counts": summary.reset_index(),
            "04_head_profiles": pd.concat(out["profiles"], ignore_index=True),
            "04_rdfa": pd.concat([r for r in out["rdfa"] if len(r)] or [pd.DataFrame()], ignore_index=True)}


def _dfa_peaks(acts: torch.Tensor, lo: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `n` features of acts [b, pos, d_sae] with the highest peak at a destination from `lo` on, and
    where: (row [n], dest [n], feature [n]). Peaks rank by `rank_key`; near-equal ones go to the earlier row,
    then destination (max returns the first index of the maximum), and the lower feature id (`top_earliest`).
    """
    per_row = [rank_key(acts[r, lo:]).max(0) for r in range(acts.shape[0])]  # a row's copy at a time
    key = torch.stack([m.values for m in per_row])  # [b, d_sae]: each feature's peak per row
    dest = torch.stack([m.indices for m in per_row])  # [b, d_sae]: where, from lo on
    peak = key.max(0)  # [d_sae]: over rows
    feats = top_earliest(peak.values[:, None], n)[1][:, 0]
    b = peak.indices[feats]
    return b, lo + dest[b, feats], feats


def dfa_examples(model, sae, lp, tokens: torch.Tensor, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DFA for the `dfa_features` features of one layer with the highest activation on the held-out text at
    a destination with at least `min_sources` sources, each at that position; lp: the layer's `_layer_pass`.
    (examples: one row per feature: position, activation (sae-lens's encode), pre-activation, bias, sum of
    parts and the error against sae-lens's activation; parts: one row per (example, head, source))."""
    vocab_ = vocab(model)
    ex_rows, part_rows = [], []
    lo = config.min_sources - 1  # the first destination with min_sources sources
    c, W_eff, b_eff, acts = lp
    b, d, feats = _dfa_peaks(acts, lo, config.dfa_features)
    parts = _chunked_dfa(c, W_eff, b, d, feats)
    pre = pre_activations(c, W_eff, b_eff, b, d, feats)
    for i, f in enumerate(feats.tolist()):
        bi, di = int(b[i]), int(d[i])
        total = float(parts[i].sum() + b_eff[f])
        ex_rows.append({"layer": sae.layer, "feature": f, "row": bi, "dest": di, "sources": di + 1,
                        "dest_token": vocab_[int(tokens[bi, di])], "activation": float(acts[bi, di, f]),
                        "pre_activation": float(pre[i]), "bias": float(b_eff[f]),
                        "sum_of_parts_plus_bias": total, "abs_error": abs(total - float(pre[i])),
                        "error_vs_sae_lens": abs(total - float(acts[bi, di, f]))})
        p = parts[i, :, :di + 1].cpu()
        h, s = np.meshgrid(np.arange(p.shape[0]), np.arange(p.shape[1]), indexing="ij")
        part_rows.append(pd.DataFrame({"layer": sae.layer, "feature": f, "head": h.ravel(),
                                       "src": s.ravel(), "distance": di - s.ravel(),
                                       "part": p.numpy().ravel(),
                                       "src_token": [vocab_[t] for t in tokens[bi, s.ravel()].tolist()]}))
    return pd.DataFrame(ex_rows), pd.concat(part_rows, ignore_index=True)


# DFA's split is exact in real arithmetic; in fp32 the parts' sum differs from the pre-activation by rounding,
# a few units in the last place, whose digits depend on the processor. A split counts as exact within this
# share of max(1, |pre-activation|), far above rounding (~1e-7) and far below any real term of the sum.
EXACT_TOLERANCE = 1e-5


def within_rounding(error: pd.Series, reference: pd.Series) -> pd.Series:
    """bool: |error| <= `EXACT_TOLERANCE` x max(1, |reference|), elementwise."""
    return error.abs() <= np.maximum(1.0, reference.abs()) * EXACT_TOLERANCE


def exact_splits(examples: pd.DataFrame) -> pd.Series:
    """bool per DFA example: parts + bias equal the pre-activation, and (where the feature is active)
    sae-lens's activation, `within_rounding` of the pre-activation."""
    pre = examples["pre_activation"]
    inactive = examples["activation"] <= 0  # sae-lens returns 0 there, not the pre-activation
    return within_rounding(examples["abs_error"], pre) & (
        inactive | within_rounding(examples["error_vs_sae_lens"], pre))


def exactness_sentence(examples: pd.DataFrame) -> str:
    """Whether every DFA split is exact (`exact_splits`); the largest errors only where one is not."""
    ok = exact_splits(examples)
    rule = (f"parts + bias equal the pre-activation and sae-lens's activation within {EXACT_TOLERANCE:.0e} x "
            f"max(1, |pre-activation|), fp32 rounding")
    if ok.all():
        return f"The split is exact in all {len(examples)} examples ({rule})."
    bad = examples[~ok]
    return (f"The split is NOT exact in {len(bad)} of {len(examples)} examples ({rule}): largest "
            f"|parts + bias - pre-activation| {bad['abs_error'].max():.2e}, largest |parts + bias - "
            f"sae-lens's activation| {bad['error_vs_sae_lens'].max():.2e}.")


def examples_table(t: Tables) -> pd.DataFrame:
    """The DFA examples as the page shows them: the two rounding-level errors replaced by `exact_splits`'
    verdict (the errors stay in the stored table `04_dfa_examples`)."""
    shown = t.examples.drop(columns=["abs_error", "error_vs_sae_lens"])
    shown["exact"] = exact_splits(t.examples)
    return shown


def head_parts(t: Tables) -> pd.DataFrame:
    """Per DFA example and head: the DFA part summed over sources, with a label "L<layer> f<feature>"."""
    hb = t.parts.groupby(["layer", "feature", "head"], as_index=False)["part"].sum()
    hb["label"] = "L" + hb["layer"].astype(str) + " f" + hb["feature"].astype(str)
    return hb


def repeated_tokens(model, config: Config, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[induction_rows, 1 + 2 * induction_len]: BOS, then a random token sequence twice, drawn from the
    content tokens `keep` (None: the vocabulary above the first three ids)."""
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.induction_rows, config.induction_len)
    if keep is not None:
        seq = keep.cpu()[torch.randint(0, len(keep), shape, generator=gen)]
    else:
        seq = torch.randint(3 if model.cfg.d_vocab > 3 else 0, model.cfg.d_vocab, shape, generator=gen)
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else 1
    return torch.cat([torch.full((config.induction_rows, 1), bos), seq, seq], dim=1)


def _top_positions(acts: torch.Tensor, n: int, min_fires: int, allowed: torch.Tensor | None = None):
    """For every feature with at least `min_fires` active positions (within `allowed` [b, pos] if given): its
    top-n positions (`top_earliest`: near-equal activations rank as equal and the earlier position wins).
    Returns LongTensors (feature, row, dest) and the number of active positions per feature.
    """
    flat = acts.flatten(0, 1)  # [b * pos, d_sae]
    mask = None if allowed is None else allowed.reshape(-1, 1).to(flat.dtype)

    def cols(j):  # feature columns j (a slice or ids), masked: no whole-width copy is ever made
        return flat[:, j] if mask is None else flat[:, j] * mask

    step = max(1, CHUNK_ELEMENTS // flat.shape[0])
    # counted in int32 (exact below 2**31 positions): an int64 sum of the comparisons took twice as long
    fires = torch.cat([(cols(slice(j, j + step)) > 0).sum(0, dtype=torch.int32)
                       for j in range(0, flat.shape[1], step)]).long()
    keep = torch.nonzero(fires >= min_fires).flatten()
    half = max(1, step // 2)  # the ranking key is fp64: half the columns for the same bytes
    top = [top_earliest(cols(keep[j:j + half]), n) for j in range(0, len(keep), half)]
    vals = torch.cat([t[0] for t in top], 1) if top else flat.new_zeros(min(n, flat.shape[0]), 0)
    idx = torch.cat([t[1] for t in top], 1) if top else vals.new_zeros(vals.shape, dtype=torch.long)
    # vals, idx: [n, n_keep]
    f = keep.repeat(idx.shape[0], 1)
    ok = vals > 0
    pos = idx[ok]
    return f[ok], pos // acts.shape[1], pos % acts.shape[1], fires


def _dfa_profiles(c, W_eff, b, d, f, window: int, chunk: int = DFA_CHUNK, bar=NoBar()):
    """Per example i (feature f[i] at row b[i], destination d[i]), from |DFA| per source summed over heads:
    (short [n]: the share of it within `window` tokens before the destination; mean_distance [n]: its mean
    distance back; heads_null [n]: the share within `window` tokens that the feature's heads' own attention
    gives, each head weighted by its |DFA|). In chunks of n: the [n, heads, src] parts are never whole.
    bar: advanced by each chunk's examples (over 100,000 examples a layer at GPT-2 small's width)."""
    short, distance, null = [], [], []
    for i in range(0, len(b), chunk):
        bi, di = b[i:i + chunk], d[i:i + chunk]
        parts = dfa_k.dfa(c["pattern"], c["v"], W_eff, bi, di, f[i:i + chunk]).abs()  # [m, H, src]
        pattern = c["pattern"][bi, :, di, :]  # [m, H, src]
        dist = di[:, None] - torch.arange(pattern.shape[-1], device=pattern.device)[None]  # [m, src]
        near = (dist >= 0) & (dist <= window)
        local = (pattern * near[:, None]).sum(-1)  # [m, H]
        weight = parts.sum(-1)
        mass = parts.sum(1)  # [m, src]
        total = mass.sum(1).clamp_min(1e-12)
        short.append((mass * near).sum(1) / total)
        distance.append((mass * dist.clamp_min(0)).sum(1) / total)
        null.append((weight * local).sum(1) / weight.sum(1).clamp_min(1e-12))
        bar.update(len(bi))
    if not short:
        return torch.zeros(0), torch.zeros(0), torch.zeros(0)
    return torch.cat(short), torch.cat(distance), torch.cat(null)


def head_profiles(c_text, c_rep, layer: int, config: Config) -> pd.DataFrame:
    """Per head: its own attention's locality on the held-out text (mean mass within `short_window` tokens
    over destinations with more sources than the window, beside uniform attention's) and its induction
    score on repeated random sequences (mean attention from the second copy to the token after the earlier
    copy of the current token, beside uniform attention's 1 / (dest + 1))."""
    pat = c_text["pattern"]  # [b, H, dest, src]
    n = pat.shape[-1]
    dest = torch.arange(n, device=pat.device)
    dist = dest[:, None] - dest[None]
    window = (dist >= 0) & (dist <= config.short_window)
    rows = dest > config.short_window
    locality = (pat * window).sum(-1)[:, :, rows].mean((0, 2))
    uniform = ((config.short_window + 1) / (dest[rows] + 1).float()).mean()
    T = config.induction_len
    rp = c_rep["pattern"]
    second = torch.arange(T + 1, rp.shape[-1], device=rp.device)
    induction = rp[:, :, second, second - T + 1].mean((0, 2))
    return pd.DataFrame({"layer": layer, "head": np.arange(pat.shape[1]), "locality": locality.cpu().numpy(),
                         "locality_uniform": float(uniform), "induction_score": induction.cpu().numpy(),
                         "induction_uniform": float((1.0 / (second + 1).float()).mean())})


@torch.no_grad()
def families(model, sae, lp, tokens: torch.Tensor, rep: torch.Tensor, config: Config,
             rep_stream: BlockStream | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each feature's DFA profile on its top activations: share of |DFA| within `short_window` tokens, beside
    two nulls: uniform attention over the same prefix, and the share its own heads' attention puts there
    (each head weighted by its |DFA|); and on repeated random content-token sequences `rep`
    (`repeated_tokens`) the share on the token after the earlier copy (null: 1 / (dest + 1)). The rule, in
    order: induction when that share reaches `induction_min` (with `min_fires` activations in the repeated
    half); short-range context when the short-window share reaches `short_mass_min` and exceeds its heads'
    own attention's; else long-range context; features with fewer than `min_fires` activations on the
    held-out text stay unclassified. lp: the layer's `_layer_pass` on `tokens`; rep_stream: rep's
    `BlockStream`, at or before the layer (None: a pass from the embedding). (one row per classified
    feature of the layer, per head its locality and induction score (`head_profiles`))."""
    T = config.induction_len
    second = torch.zeros(rep.shape, dtype=rep.dtype, device=rep.device)
    second[:, T + 1:] = 1
    c, W_eff, _, acts = lp
    f, b, d, _ = _top_positions(acts, config.n_examples, config.min_fires)
    bar = progress_bar(len(b), progress_enabled(), f"DFA profiles, layer {sae.layer}", unit="example")
    short, mean_distance, heads_null = _dfa_profiles(c, W_eff, b, d, f, config.short_window, bar=bar)
    bar.close()
    null_short = (torch.clamp(d, max=config.short_window) + 1).float() / (d + 1).float()
    text = pd.DataFrame({"feature": f.cpu(), "short": short.cpu(), "null_short": null_short.cpu(),
                         "null_short_heads": heads_null.cpu(), "mean_distance": mean_distance.cpu()})
    text = text.groupby("feature").mean()
    cr, W_eff, _, acts_r = _layer_pass(model, sae, rep, rep_stream)
    profile = head_profiles(c, cr, sae.layer, config)
    fr, br, dr, fires_r = _top_positions(acts_r, config.n_examples, config.min_fires, allowed=second)
    mass_r = _chunked_dfa(cr, W_eff, br, dr, fr).abs().sum(1)
    induct = mass_r[torch.arange(len(dr)), dr - T + 1] / mass_r.sum(1).clamp_min(1e-12)
    ind = pd.DataFrame({"feature": fr.cpu(), "induction": induct.cpu(),
                        "null_induction": (1.0 / (dr + 1).float()).cpu()}).groupby("feature").mean()
    df = text.join(ind, how="left").reset_index()
    df["fires_repeated"] = fires_r.cpu().numpy()[df["feature"].to_numpy()]
    short_range = (df["short"] >= config.short_mass_min) & (df["short"] > df["null_short_heads"])
    df["family"] = np.where(df["induction"].fillna(0) >= config.induction_min, FAMILIES[0],
                            np.where(short_range, FAMILIES[1], FAMILIES[2]))
    df.insert(0, "layer", sae.layer)
    return df, profile


def head_profile_sentence(t: Tables) -> str:
    """Whether the model has induction heads (score >= induction_min), and the heads' own locality."""
    hp, c = t.head_profiles, t.config
    by_layer = hp.groupby("layer")["locality"].mean()
    best = hp.loc[hp["induction_score"].idxmax()]
    n_ind = int((hp["induction_score"] >= c.induction_min).sum())
    verdict = (f"{n_ind} of {len(hp)} heads reach the induction threshold {c.induction_min:g}"
               + ("" if n_ind else ": the model shows no induction attention, so a count of induction "
                  "features says nothing about the SAEs"))
    return (f"The heads' own attention puts {by_layer.min():.2f} to {by_layer.max():.2f} of its mass (mean "
            f"per layer) within {c.short_window} tokens, against {hp['locality_uniform'].iloc[0]:.2f} for "
            f"uniform attention. Induction score per head (attention to the token after the earlier copy on "
            f"repeated random sequences): highest {best['induction_score']:.2f} at head "
            f"{int(best['layer'])}.{int(best['head'])}, against {hp['induction_uniform'].iloc[0]:.2f} for "
            f"uniform attention; {verdict}.")


def family_examples(t: Tables, n: int = 3) -> pd.DataFrame:
    """The n features of each family with the highest induction share, with their main head and tokens."""
    ex = t.families.sort_values("induction", ascending=False).groupby("family").head(n)
    return ex.merge(t.writes[["layer", "feature", "top_head", "top_tokens"]], on=["layer", "feature"])


@torch.no_grad()
def recursive_dfa(model, sae, lp, resid: dict, examples: pd.DataFrame, *, n_top: int = 5) -> pd.DataFrame:
    """One step up: for each DFA example of the layer (lp: its `_layer_pass`), its largest (head, source)
    part is split over the residual SAE on the stream the attention layer reads (its active features, its
    b_dec, its error) plus the value bias, with the norm's scale frozen. One row per piece: layer, feature,
    head, src, part (the DFA part), piece, resid_feature (-1 for the non-feature pieces), contribution; the
    `n_top` features by |contribution| are kept, and a row "other features" holds the rest, so that the
    contributions of an example sum to its part. No rows where no residual SAE reads the layer's stream.
    """
    rows = []
    layer = sae.layer
    res = residual_sae_before(resid, layer)
    if res is None:
        return pd.DataFrame(rows)
    c, W_eff, _, _ = lp
    norm = model.cfg.normalization_type
    block = model.blocks[layer]
    attn = block.attn
    W_V = getattr(attn, "_W_V", attn.W_V).detach().float()
    b_V = getattr(attn, "_b_V", attn.b_V).detach().float()
    ln_w = getattr(block.ln1, "w", None)
    ln_w = ln_w.detach().float() if ln_w is not None else torch.ones(model.cfg.d_model, device=W_V.device)
    ln_b = getattr(block.ln1, "b", None)
    kv = ha.kv_heads(model.cfg.n_heads, model.cfg.n_key_value_heads)
    d_head = model.cfg.d_head
    for e in examples.itertuples():
        bi, di, f = int(e.row), int(e.dest), int(e.feature)
        part = dfa_k.dfa(c["pattern"], c["v"], W_eff, torch.tensor([bi]), torch.tensor([di]),
                         torch.tensor([f]))[0]
        h, s = divmod(int(part.abs().argmax()), part.shape[1])
        pieces = dfa_k.value_decomposition(c["resid_pre"][bi, s], res, c["scale"][bi, s], ln_w,
                                           None if ln_b is None else ln_b.detach().float(), W_V, b_V,
                                           center=norm in ("LN", "LNPre"))
        contrib = dfa_k.rdfa(pieces, float(c["pattern"][bi, h, di, s]),
                             W_eff[h * d_head:(h + 1) * d_head, f], int(kv[h]))
        base = {"layer": layer, "feature": f, "head": h, "src": s, "dest": di, "part": float(part[h, s])}
        order = contrib["feature"].abs().argsort(descending=True)
        for j in order[:n_top].tolist():
            rows.append({**base, "piece": "residual feature", "resid_feature": int(contrib["features"][j]),
                         "contribution": float(contrib["feature"][j])})
        rest = float(contrib["feature"][order[n_top:]].sum()) if len(order) > n_top else 0.0
        rows.append({**base, "piece": "other features", "resid_feature": -1, "contribution": rest})
        for key, label in (("b_dec", "residual SAE b_dec"), ("error", "residual SAE error"),
                           ("bias", "value bias")):
            rows.append({**base, "piece": label, "resid_feature": -1, "contribution": float(contrib[key])})
    return pd.DataFrame(rows)


def rdfa_check(t: Tables) -> dict[str, float]:
    """Recursive DFA's exactness and the residual SAE's error share: examples, how many sum to their part
    (`within_rounding`, "exact"), largest |sum of pieces - part|, median |error piece| / |part|."""
    if not len(t.rdfa):
        return {"examples": 0}
    check = t.rdfa.groupby(["layer", "feature"]).agg(part=("part", "first"), total=("contribution", "sum"))
    err = t.rdfa[t.rdfa["piece"] == "residual SAE error"].set_index(["layer", "feature"])["contribution"]
    gap = (check["part"] - check["total"]).abs()
    exact = within_rounding(gap, check["part"])
    return {"examples": len(check), "exact": int(exact.sum()), "max_error": float(gap.max()),
            "error_share": float((err.abs() / check["part"].abs()).median())}


def rdfa_sentence(r: dict[str, float]) -> str:
    """`rdfa_check`'s result in words: the largest error is named only where a sum is not exact (below the
    tolerance it is fp32 rounding, whose digits move between processors)."""
    if not r["examples"]:
        return "No residual SAE reads the stream these attention layers read; recursive DFA is skipped."
    rule = f"within {EXACT_TOLERANCE:.0e} x max(1, |part|), fp32 rounding"
    if r["exact"] == r["examples"]:
        sums = f"in all {r['examples']} the pieces sum to the DFA part ({rule})"
    else:
        sums = (f"in {r['examples'] - r['exact']} of {r['examples']} the pieces do NOT sum to the DFA part "
                f"({rule}): largest |sum of pieces - DFA part| = {r['max_error']:.2e}")
    return (f"{r['examples']} examples decomposed; {sums}; the residual SAE's error term carries a median "
            f"{percent(r['error_share'], 0)} of the part's size.")


# ------------------------------------------------------------------------------------------------------------
# Findings


def findings(t: Tables) -> dict[str, list[str]]:
    """The chapter's result sentences, computed from the tables. Keys: "saes", "shares", "poly", "writes",
    "dfa", "families", "rdfa"."""
    keys = ("saes", "shares", "poly", "writes", "dfa", "families", "rdfa")
    out: dict[str, list[str]] = {k: [] for k in keys}
    i, c = t.info, t.config
    out["saes"].append(f"{i['n_attn_saes']} attention SAEs on hook_z (d_in = {i['n_heads']} heads x "
                       f"{i['d_head']} = {i['d_in']}, {i['d_sae']:,} features each); {i['n_resid_saes']} "
                       f"residual SAEs ({i['resid_hook']}, ...).")
    if len(t.quality):
        bar, q = t.quality.attrs.get("bar"), t.quality
        missing = {int(r.layer): r.misses for r in q.itertuples() if r.misses}
        out["saes"].append(
            f"{int(q['meets_bar'].sum())} of {len(q)} layers meet the bar (explained variance >= "
            f"{bar['explained_variance_min']}, L0 <= {bar['mean_l0_max']}, dead <= "
            f"{bar['dead_fraction_max']:.0%}); explained variance ranges "
            f"{q['explained_variance'].min():.2f} to "
            f"{q['explained_variance'].max():.2f}"
            + (f"; missing: {'; '.join(f'layer {k}: {v}' for k, v in missing.items())}." if missing else "."))
    else:
        out["saes"].append(f"Public release {i['source']}; its metrics are documented by its authors.")
    if i.get("processing_mismatch"):
        out["saes"].append("The attention SAEs were trained with other processing than the model runs with "
                           "(the residual SAEs'): " + ", ".join(f"{k} {a} (here {b})" for k, (a, b)
                                                                in i["processing_mismatch"].items())
                           + "; their activations here may differ from those they were trained on.")
    if i.get("post_attention_norm"):
        out["saes"].append("The model normalises the attention output before it joins the residual stream: "
                           "every write below includes that norm's weight (its per-position scale is a "
                           "positive factor and changes no ranking).")
    s = share_summary(t)
    out["shares"].append(f"A feature's largest head share: median {s['median']:.2f} (even spread would be "
                         f"{s['even']:.2f}); {percent(s['half'])} of features have at least half their "
                         "decoder norm in one head.")
    if i["n_kv_heads"] < i["n_heads"]:
        out["shares"].append(f"Grouped-query attention: {i['n_heads']} query heads share {i['n_kv_heads']} "
                             "value heads; the query heads of one group weight the same value vectors.")
    ph, tau = t.poly_heads, float(t.tau["tau"].iloc[0])
    gap = poly_gap(t)
    at_tau = float(gap.loc[gap.index[np.isclose(gap.index, tau)], "gap"].iloc[0])
    out["poly"].append(f"tau = {tau:.2f} (the null's {c.q_link:.0%} quantile of profile cosines). By their "
                       f"top features' whole writes (through every head), "
                       f"{percent(ph['polysemantic'].mean(), 0)} of the {len(ph)} heads are polysemantic "
                       f"({int(ph['polysemantic'].sum())} heads); same-share null features would make "
                       f"{percent(ph['null_poly_rate'].mean(), 0)} polysemantic. The paper reports at least "
                       "90% for GPT-2 small.")
    out["poly"].append(f"Over the tau grid the SAE features are less polysemantic than the null by at most "
                       f"{percent(gap['gap'].max(), 0)} (at tau = {gap['gap'].idxmax():.2f}); at the chosen "
                       f"tau by {percent(at_tau, 0)}.")
    out["poly"].append(head_level_sentence(t))
    per = connections_per_layer(t)
    if len(per):
        out["writes"].append("Share of attention features whose strongest residual connection exceeds the "
                             "null's 99% quantile: " + ", ".join(f"layer {k}: {percent(v, 0)}"
                                                                 for k, v in per.items()) + ".")
    e = t.examples
    out["dfa"].append(f"{len(e)} examples on {i['text_rows'] * i['text_ctx']:,} held-out tokens "
                      f"({i['text_rows']} rows of {i['text_ctx']} tokens: stories concatenated and cut at "
                      f"that "
                      f"length), each at a "
                      f"destination with at least {c.min_sources} sources. " + exactness_sentence(e))
    out["families"].append(head_profile_sentence(t))
    f = t.families
    counts = f["family"].value_counts(normalize=True)
    out["families"].append(f"{len(f):,} features classified (at least {c.min_fires} activations): "
                           + ", ".join(f"{percent(counts.get(k, 0), 0)} {k}" for k in FAMILIES)
                           + f". Mean short-window share {f['short'].mean():.2f} against "
                           f"{f['null_short'].mean():.2f} under uniform attention and "
                           f"{f['null_short_heads'].mean():.2f} under the features' own heads' attention; "
                           f"{percent((f['short'] > f['null_short_heads']).mean(), 0)} of features exceed "
                           f"the latter. Mean induction share "
                           f"{f['induction'].mean():.2f} against {f['null_induction'].mean():.2f}.")
    out["rdfa"].append(rdfa_sentence(rdfa_check(t)))
    return out
