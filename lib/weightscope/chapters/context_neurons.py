"""Chapter 5: context-sensitive neurons from weights and one calibration text (Gibson, arXiv 2510.03315).

    study = open_study(ctx, Config(...))       # the model and the token windows; nothing computed yet
    heads = kernels(study)                     # step 1: positional kernels, spread, content dependence
    summary = linear_summary(study)            # step 2: norm scales, denominators, approximation quality
    neurons = context_neurons(study)           # step 3: per-neuron context share and the tokens that push
    check = check_on_text(study)               # step 4: predictions, genre AUCs, firing on held-out text

Each step returns a dict of tidy tables and saves them under data/results/<target>/05_*.parquet, keyed by the
target, the parameters, the code and the versions: a rerun with the same inputs reads them back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.compute import context_neurons as cn
from weightscope.compute import positional_kernels as pk
from weightscope.config.params import ParamsError
from weightscope.config.paths import progress_enabled
from weightscope.load import corpora

# Gibson's GPT-2 small layer-0 figures (reported, not seen; PAPERS.md)
PAPER = {"median_r": 0.95, "fvu": 0.14}
NORM_SCALES = ("measured", "token")


@dataclass
class Config:
    """The chapter's parameters (the notebook's parameters cell)."""

    layer: int = 0
    calibration: str = "tinystories/tinystories_cased.txt"
    heldout: dict[str, str] = field(default_factory=lambda: {"stories": "tinystories/tinystories_cased.txt"})
    window: int = 128
    n_calibration: int = 64
    n_heldout: int = 32
    min_spread: float = 4.0
    max_tv: float = 0.3
    norm_scale: str = "measured"
    content_weights: bool = True
    heads: str | list = "stable"
    fire_threshold: float = 0.0
    n_top: int = 20
    k_tokens: int = 8
    batch: int = 16

    def check(self, n_layers: int, n_ctx: int) -> None:
        """Refuse impossible values with one message saying what to change."""
        problems = []
        if not 0 <= self.layer < n_layers:
            problems.append(f"layer={self.layer} (the model has layers 0..{n_layers - 1})")
        if not 8 <= self.window <= n_ctx:
            problems.append(f"window={self.window} (between 8 and the model's context, {n_ctx})")
        if self.n_calibration < 2 or self.n_heldout < 2:
            problems.append("n_calibration and n_heldout must be at least 2")
        if self.norm_scale not in NORM_SCALES:
            problems.append(f"norm_scale={self.norm_scale!r} (one of {NORM_SCALES})")
        if not (self.heads in ("stable", "all") or isinstance(self.heads, list)):
            problems.append(f"heads={self.heads!r} ('stable', 'all' or a list of head indices)")
        if not self.heldout:
            problems.append("heldout needs at least one genre")
        if self.min_spread < 1 or not 0 < self.max_tv <= 1 or self.n_top < 1 or self.k_tokens < 1:
            problems.append("need min_spread >= 1, 0 < max_tv <= 1, n_top >= 1, k_tokens >= 1")
        if problems:
            raise ParamsError("chapter 05_context_neurons: fix " + "; ".join(problems) + ".")


POST_NORM_REASON = ("its linear summary adds each head's output to the residual stream as it is, and this "
                    "model (Gemma-2) normalises the attention output before adding it (a post-attention "
                    "RMSNorm); the chapter does not cover that architecture yet.")


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to `target` (its model's pre-flight `ModelDims`), or None."""
    return POST_NORM_REASON if getattr(dims, "model_type", None) == "gemma2" else None


@dataclass
class LayerPass:
    """What one forward pass up to the chosen block leaves behind, for a batch of windows [b, n]."""

    tokens: torch.Tensor  # [b, n]
    pattern: torch.Tensor  # [b, n_heads, n, n]
    log_z: torch.Tensor  # [b, n_heads, n]: log softmax denominators
    head_out: torch.Tensor  # [b, n, n_heads, d_model]: each head's z W_O
    resid_pre: torch.Tensor  # [b, n, d_model]
    attn_out: torch.Tensor  # [b, n, d_model]
    scale1: torch.Tensor  # [b, n]: the attention norm's scale
    scale2: torch.Tensor  # [b, n]: the MLP norm's scale
    pre: torch.Tensor  # [b, n, d_mlp]: MLP pre-activations (the gate's for a gated MLP)


def layer_pass(model, tokens: torch.Tensor, layer: int, *, batch: int = 16) -> LayerPass:
    """Run `model` up to block `layer` on windows [b, n] and keep that block's attention and MLP inputs."""
    p = f"blocks.{layer}."
    names = {p + k for k in ("attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_z", "hook_resid_pre",
                             "hook_attn_out", "ln1.hook_scale", "ln2.hook_scale", "mlp.hook_pre")}
    W_O = model.blocks[layer].attn.W_O  # [n_heads, d_head, d_model]
    parts = []
    for lo in range(0, len(tokens), batch):
        _, c = model.run_with_cache(tokens[lo:lo + batch].to(model.cfg.device), stop_at_layer=layer + 1,
                                    names_filter=lambda name: name in names)
        parts.append(LayerPass(
            tokens=tokens[lo:lo + batch], pattern=c[p + "attn.hook_pattern"].float().cpu(),
            log_z=pk.log_denominators(c[p + "attn.hook_attn_scores"]).cpu(),
            head_out=torch.einsum("bnhe,hem->bnhm", c[p + "attn.hook_z"], W_O).float().cpu(),
            resid_pre=c[p + "hook_resid_pre"].float().cpu(), attn_out=c[p + "hook_attn_out"].float().cpu(),
            scale1=c[p + "ln1.hook_scale"][..., 0].float().cpu(),
            scale2=c[p + "ln2.hook_scale"][..., 0].float().cpu(),
            pre=c[p + "mlp.hook_pre"].float().cpu()))
    return LayerPass(*(torch.cat([getattr(x, f) for x in parts]) for f in LayerPass.__dataclass_fields__))


class Study:
    """One chapter run: the model, the windows of every text and their forward passes (computed on demand)."""

    def __init__(self, ctx, config: Config, model, *, save: bool = True):
        self.ctx, self.config, self.model, self.save = ctx, config, model, save
        self.tokenizer = model.tokenizer
        if getattr(model.cfg, "use_normalization_before_and_after", False):
            raise ParamsError(f"chapter 05_context_neurons: {POST_NORM_REASON}")
        config.check(model.cfg.n_layers, model.cfg.n_ctx)
        self.centred = model.cfg.normalization_type.startswith("LN")
        self.learned_positions = model.cfg.positional_embedding_type == "standard"
        if config.norm_scale == "token" and self.learned_positions:
            raise ParamsError("chapter 05_context_neurons: norm_scale='token' needs a model without learned "
                              "position embeddings (the norm's scale then depends on the position too); "
                              "use 'measured'.")
        self.provenance = ctx.provenance(**asdict(config))
        self.tables: dict[str, pd.DataFrame] = {}

    # --- inputs ------------------------------------------------------------------------------------------
    def windows(self, name: str, *, heldout: bool) -> torch.Tensor:
        """[n, window] token ids of one corpus file; held-out windows of the calibration file come from its
        second half, so they never overlap the calibration windows."""
        cfg = self.config
        start = 0.5 if heldout and name == cfg.calibration else 0.0
        n = cfg.n_heldout if heldout else cfg.n_calibration
        return corpora.token_windows(self.tokenizer, corpora.corpus_text(name), n=n, length=cfg.window,
                                     bos=self.tokenizer.bos_token_id, start_fraction=start, name=name)

    @cached_property
    def calibration(self) -> LayerPass:
        return layer_pass(self.model, self.windows(self.config.calibration, heldout=False), self.config.layer,
                          batch=self.config.batch)

    @cached_property
    def heldout(self) -> dict[str, LayerPass]:
        return {genre: layer_pass(self.model, self.windows(name, heldout=True), self.config.layer,
                                  batch=self.config.batch) for genre, name in self.config.heldout.items()}

    @cached_property
    def kernel(self) -> torch.Tensor:
        """[n_heads, n, n]: the mean calibration pattern."""
        acc = pk.KernelAccumulator(self.model.cfg.n_heads, self.config.window)
        acc.add(self.calibration.pattern)
        return acc.kernel()

    def stable(self) -> list[int]:
        """The heads the summary replaces: the stable ones (all heads when none passes), or as asked."""
        return self.summary_heads()[0]

    def summary_heads(self) -> tuple[list[int], str]:
        """(heads, how they were chosen)."""
        chosen, n_heads = self.config.heads, self.model.cfg.n_heads
        if isinstance(chosen, list):
            bad = [h for h in chosen if not 0 <= h < n_heads]
            if bad or not chosen:
                raise ParamsError(f"chapter 05_context_neurons: heads={chosen} must be indices "
                                  f"0..{n_heads - 1}.")
            return sorted(set(chosen)), "listed in the parameters"
        table = kernels(self)["05_heads"]
        stable = table.loc[table["stable"], "head"].astype(int).tolist()
        if chosen == "stable" and stable:
            return stable, "stable by the rule"
        how = "all heads, since none is stable by the rule" if chosen == "stable" else "all heads"
        return list(range(n_heads)), how

    def summary_parts(self, heads: list[int], *, scale=None, weighted: bool | None = None):
        """What the linear summary of `heads` is made of: (K [h, n, n] divided by the sampled denominators,
        e_tok [h, d_vocab, d_model], e_pos [h, n, d_model] or None, token weights [h, d_vocab] or None)."""
        K = self.kernel[heads]
        e_tok, e_pos = self.extended(heads, scale)
        if not (self.config.content_weights if weighted is None else weighted):
            return K, e_tok, e_pos, None
        cal = self.calibration
        w = cn.token_weights(cal.tokens, cal.pattern[:, heads], K, self.model.cfg.d_vocab)
        N = cn.kernel_denominators(cal.tokens, K, w).mean(0)  # [h, n]: sampled on the calibration text
        return K / N[..., None], e_tok, e_pos, w

    @cached_property
    def token_frequency(self) -> torch.Tensor:
        """[d_vocab]: how often each token occurs in the calibration windows (BOS included)."""
        return torch.bincount(self.calibration.tokens.flatten(), minlength=self.model.cfg.d_vocab).float()

    # --- weights ------------------------------------------------------------------------------------------
    def scale1(self) -> torch.Tensor | float:
        """The attention norm's scale: one number measured on the calibration text, or each token's own."""
        if self.config.norm_scale == "token":
            return cn.token_scales(self.model.W_E.float().cpu(), centred=self.centred, eps=self.model.cfg.eps)
        return float(self.calibration.scale1[:, 1:].mean())

    def extended(self, heads: list[int], scale=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Extended embeddings of the chosen heads: tokens [h, d_vocab, d_model] and positions [h, n, d_model]
        (None without learned position embeddings)."""
        blk, scale = self.model.blocks[self.config.layer], self.scale1() if scale is None else scale
        ln, attn = blk.ln1, blk.attn
        w = {k: getattr(attn, k)[heads].float().cpu() for k in ("W_V", "b_V", "W_O")}
        ln_b = ln.b.float().cpu() if hasattr(ln, "b") else None
        args = (ln.w.float().cpu(), ln_b, w["W_V"], w["b_V"], w["W_O"])
        e_tok = cn.extended_embeddings(self.model.W_E.float().cpu(), *args, scale, centred=self.centred)
        e_pos = None
        if self.learned_positions:
            W_pos = self.model.W_pos[: self.config.window].float().cpu()
            e_pos = cn.extended_embeddings(W_pos, *args, scale, centred=self.centred, biases=False)
        return e_tok, e_pos

    def reads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP input through the linearised norm (scale measured on the calibration text): u, c."""
        mlp, ln = self.model.blocks[self.config.layer].mlp, self.model.blocks[self.config.layer].ln2
        U = (mlp.W_gate if self.model.cfg.gated_mlp else mlp.W_in).float().cpu()
        b_in = None if self.model.cfg.gated_mlp else mlp.b_in.float().cpu()
        ln_b = ln.b.float().cpu() if hasattr(ln, "b") else None
        s2 = float(self.calibration.scale2[:, 1:].mean())
        return cn.neuron_reads(U, ln.w.float().cpu(), ln_b, b_in, s2, centred=self.centred)

    # --- caching ------------------------------------------------------------------------------------------
    def step(self, names: list[str], compute) -> dict[str, pd.DataFrame]:
        """Several tables made by one computation: from this run, else all read back from disk when their key
        matches, else all computed together (and saved)."""
        if all(n in self.tables for n in names):
            return {n: self.tables[n] for n in names}
        key = io.cache_key(provenance=self.provenance, table=names)
        found = {n: io.load_table(self.ctx.target.target, n, key=key) for n in names} if self.save else {}
        if not self.save or any(t is None for t in found.values()):
            if progress_enabled():
                print(f"05_context_neurons: computing {', '.join(names)} ...", flush=True)
            found = compute()
            if self.save:
                for n in names:
                    io.save_table(found[n], self.ctx.target.target, n, key=key, params=self.provenance)
        self.tables.update(found)
        return found


def open_study(ctx, config: Config, *, model=None, save: bool = True) -> Study:
    """The model (the target's full `HookedTransformer`, for the forward passes, unless given) and the inputs."""
    if model is None:
        model = ctx.load_full_model()
    return Study(ctx, config, model, save=save)


# --- step 1 -------------------------------------------------------------------------------------------------

def kernels(study: Study) -> dict[str, pd.DataFrame]:
    """Per head: spread, content dependence, the stable rule; relative kernels; denominators; sensitivity."""
    names = ["05_heads", "05_kernels", "05_denominators", "05_sensitivity"]
    return study.step(names, lambda: _kernels(study))


def _kernels(study: Study) -> dict[str, pd.DataFrame]:
    cfg, K, cal = study.config, study.kernel, study.calibration
    spread = pk.effective_tokens(cal.pattern)
    held = torch.stack([pk.content_tv(p.pattern, K) for p in study.heldout.values()])  # [genres, heads]
    heads = pd.DataFrame({"layer": cfg.layer, "head": np.arange(K.shape[0]), "spread": spread.numpy(),
                          "content_tv": held.mean(0).numpy(), "translation_tv": pk.translation_tv(K).numpy()})
    for g, genre in enumerate(study.heldout):
        heads[f"content_tv {genre}"] = held[g].numpy()
    heads["stable"] = (heads["spread"] >= cfg.min_spread) & (heads["content_tv"] <= cfg.max_tv)
    k = pk.relative_kernel(K, min_query=cfg.window // 2)
    kern = pd.DataFrame({"head": np.repeat(np.arange(k.shape[0]), k.shape[1]),
                         "distance": np.tile(np.arange(k.shape[1]), k.shape[0]),
                         "attention": k.flatten().numpy()})
    w = cn.token_weights(cal.tokens, cal.pattern, K, study.model.cfg.d_vocab)
    log_n = cn.kernel_denominators(cal.tokens, K, w).log()  # [b, h, n]
    h_idx, i_idx = np.meshgrid(np.arange(K.shape[0]), np.arange(1, cfg.window), indexing="ij")
    denoms = pd.DataFrame({"head": h_idx.ravel(), "position": i_idx.ravel(),
                           "mean_log_z": cal.log_z[:, :, 1:].mean(0).flatten().numpy(),
                           "std_log_z": cal.log_z[:, :, 1:].std(0).flatten().numpy(),
                           "std_log_n": log_n[:, :, 1:].std(0).flatten().numpy()})
    grid = [(s, t) for s in sorted({1.0, 2.0, cfg.min_spread, 2 * cfg.min_spread, 4 * cfg.min_spread})
            for t in np.round(np.linspace(0.05, 1.0, 20), 2)]
    sens = pd.DataFrame([{"min_spread": s, "max_tv": t,
                          "stable_heads": int(((heads["spread"] >= s) & (heads["content_tv"] <= t)).sum())}
                         for s, t in grid])
    return {"05_heads": heads, "05_kernels": kern, "05_denominators": denoms, "05_sensitivity": sens}


# --- step 2 -------------------------------------------------------------------------------------------------

def linear_summary(study: Study) -> dict[str, pd.DataFrame]:
    """Norm scales per text, and the summarised heads' linear summary against their true combined output,
    with the configured choices and the alternatives (one scale or each token's own; token weights or not)."""
    return study.step(["05_scales", "05_quality"], lambda: _linear_summary(study))


def _linear_summary(study: Study) -> dict[str, pd.DataFrame]:
    cfg = study.config
    texts = {"calibration": study.calibration, **study.heldout}
    scales = pd.DataFrame([{"text": name, "norm": norm, "mean": float(s.mean()), "std": float(s.std()),
                            "cv": float(s.std() / s.mean()), "p5": float(s.quantile(0.05)),
                            "p95": float(s.quantile(0.95))}
                           for name, lp in texts.items()
                           for norm, s in (("attention", lp.scale1[:, 1:].flatten()),
                                           ("mlp", lp.scale2[:, 1:].flatten()))])
    heads, how = study.summary_heads()
    measured = float(study.calibration.scale1[:, 1:].mean())
    modes = {"measured": measured}
    if not study.learned_positions:
        modes["token"] = cn.token_scales(study.model.W_E.float().cpu(), centred=study.centred,
                                         eps=study.model.cfg.eps)
    rows = []
    for mode, scale in modes.items():
        for weighted in (False, True):
            K, e_tok, e_pos, w = study.summary_parts(heads, scale=scale, weighted=weighted)
            for genre, lp in study.heldout.items():
                y = lp.head_out[:, :, heads].sum(2)
                r, fvu = cn.summary_quality(y[:, 1:], cn.linear_summary(lp.tokens, K, e_tok, e_pos, w)[:, 1:])
                configured = mode == cfg.norm_scale and weighted == cfg.content_weights
                rows.append({"norm_scale": mode, "token_weights": weighted, "genre": genre,
                             "heads": len(heads), "chosen": how, "configured": configured,
                             "median_r": float(r.median()), "p10_r": float(r.quantile(0.1)), "fvu": fvu,
                             "paper median_r (reported)": PAPER["median_r"],
                             "paper fvu (reported)": PAPER["fvu"]})
    return {"05_scales": scales, "05_quality": pd.DataFrame(rows)}


# --- step 3 -------------------------------------------------------------------------------------------------

def context_neurons(study: Study) -> dict[str, pd.DataFrame]:
    """Per neuron: context and current-token spread of the pre-activation; the top neurons' pushing tokens."""
    return study.step(["05_neurons", "05_pushes"], lambda: _context_neurons(study))


def _context_neurons(study: Study) -> dict[str, pd.DataFrame]:
    cfg, heads = study.config, study.stable()
    K, e_tok, _, w = study.summary_parts(heads)
    if w is not None:
        e_tok = e_tok * w[..., None]  # a token's extended embedding, weighted by the attention it draws
    u, _ = study.reads()
    k = pk.relative_kernel(K, min_query=cfg.window // 2)  # [h, n]: the long-context kernel
    p = study.token_frequency
    x_tok = study.model.W_E.float().cpu()  # the block's direct input per token (exact at layer 0)
    table = cn.context_stats(e_tok, x_tok, u, p, k)
    table = table.sort_values("context_share", ascending=False, ignore_index=True)
    table.insert(0, "layer", cfg.layer)
    table["rank"] = np.arange(1, len(table) + 1)
    special = {study.tokenizer.bos_token_id, study.tokenizer.eos_token_id,
               study.tokenizer.unk_token_id, study.tokenizer.pad_token_id} - {None}
    keep = torch.tensor([t not in special for t in range(study.model.cfg.d_vocab)])
    rows = []
    for _, r in table.head(cfg.n_top).iterrows():
        push = cn.token_pushes(e_tok, u[:, int(r["neuron"])], p, k.sum(1))
        push = torch.where(keep, push, torch.nan)
        order = torch.argsort(torch.nan_to_num(push, nan=0.0))
        for side, ids in (("up", order.flip(0)[: cfg.k_tokens]), ("down", order[: cfg.k_tokens])):
            for o, t in enumerate(ids.tolist()):
                rows.append({"neuron": int(r["neuron"]), "rank": int(r["rank"]), "side": side, "order": o + 1,
                             "token": study.tokenizer.decode([t]), "token_id": t, "push": float(push[t]),
                             "count": int(p[t])})
    return {"05_neurons": table, "05_pushes": pd.DataFrame(rows)}


# --- step 4 -------------------------------------------------------------------------------------------------

def check_on_text(study: Study) -> dict[str, pd.DataFrame]:
    """Predicted against true pre-activations on held-out text; genre AUCs; firing on held-out text only."""
    return study.step(["05_check", "05_firing"], lambda: _check(study))


def predict(study: Study, lp: LayerPass, heads: list[int], *, context: bool = True,
            parts=None) -> torch.Tensor:
    """[b, n, d_mlp]: pre-activations with the stable heads replaced by their linear summary and the MLP norm
    linearised; everything else (the block's input, the other heads, b_O) as in the forward pass.
    `context=False` drops the summary (the baseline: what the prediction knows without the context bag).
    `parts`: `study.summary_parts(heads)`, when already computed."""
    K, e_tok, e_pos, w = parts or study.summary_parts(heads)
    u, c = study.reads()
    rest = lp.attn_out - lp.head_out[:, :, heads].sum(2) + lp.resid_pre
    summary = cn.linear_summary(lp.tokens, K, e_tok, e_pos, w) if context else torch.zeros_like(rest)
    return cn.predicted_preactivations(rest, summary, u, c)


def _check(study: Study) -> dict[str, pd.DataFrame]:
    cfg, heads = study.config, study.stable()
    neurons = context_neurons(study)["05_neurons"]
    d_mlp = study.model.cfg.d_mlp
    out = pd.DataFrame({"neuron": np.arange(d_mlp)})
    true = torch.cat([lp.pre[:, 1:].reshape(-1, d_mlp) for lp in study.heldout.values()])
    parts = study.summary_parts(heads)
    for column, context in (("r_pred", True), ("r_no_context", False)):
        pred = torch.cat([predict(study, lp, heads, context=context, parts=parts)[:, 1:].reshape(-1, d_mlp)
                          for lp in study.heldout.values()])
        a, b = true - true.mean(0), pred - pred.mean(0)
        out[column] = ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)).numpy()
    out["max_calibration"] = study.calibration.pre[:, 1:].amax((0, 1)).numpy()
    genres = list(study.heldout)
    for genre, lp in study.heldout.items():
        out[f"max {genre}"] = lp.pre[:, 1:].amax((0, 1)).numpy()
    out["max_heldout"] = out[[f"max {g}" for g in genres]].max(1)
    means = {g: lp.pre[:, 1:].mean(1).numpy() for g, lp in study.heldout.items()}  # [windows, d_mlp]
    ref = genres[0]
    for genre in genres[1:]:
        out[f"auc {genre} vs {ref}"] = cn.auc(means[genre], means[ref])
    out = neurons[["neuron", "rank", "context_share"]].merge(out, on="neuron")
    thresholds = sorted({cfg.fire_threshold, *np.round(np.linspace(-1, 3, 17), 2)})
    top = out[out["rank"] <= cfg.n_top]
    firing = pd.DataFrame([{"threshold": t, "top_neurons": len(top),
                            "silent_on_calibration": int((top["max_calibration"] <= t).sum()),
                            "new_on_heldout": int(((top["max_calibration"] <= t)
                                                   & (top["max_heldout"] > t)).sum()),
                            "all_neurons_new_on_heldout": int(((out["max_calibration"] <= t)
                                                               & (out["max_heldout"] > t)).sum())}
                           for t in thresholds])
    return {"05_check": out.sort_values("rank", ignore_index=True),
            "05_firing": firing}
