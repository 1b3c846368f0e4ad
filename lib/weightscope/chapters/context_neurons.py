"""Chapter 5 in one call: context-sensitive neurons from weights and one calibration text (Gibson, arXiv
2510.03315), with every step's premise measured against a null that lets it fail.

    config = context_neurons.Config(layer=0, ...)   # checks its parameters, all problems in one message
    tables = context_neurons.run(ctx, config)       # cached; `findings(tables)` gives the page's sentences

Steps: (1) positional kernels of the layer's heads, their spread and content dependence, each TV beside the
kernel's split-half sampling noise; (2) the linear summary of the stable heads against their true output,
beside a position-only floor (token identity removed); (3) when some head is stable (or heads are listed),
neurons ranked by the share of their pre-activation's spread that the context bag carries; (4) checks on
held-out text: predictions, genre separation beside its base rate and a permutation test, firing. When no
head is stable the method's premise does not hold on the model: steps 1-2 are shown and no neuron is ranked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from weightscope import io
from weightscope.compute import context_neurons as cn
from weightscope.compute import positional_kernels as pk
from weightscope.compute.streaming import progress_bar
from weightscope.config.params import ParamsError
from weightscope.chapters.context import CorpusInput
from weightscope.load import corpora

STEM = "05_context_neurons"
PAPER = {"median_r": 0.95, "fvu": 0.14}  # Gibson's GPT-2 small layer-0 figures (reported, not seen)
NORM_SCALES = ("auto", "measured", "token")
STORIES = "tinystories/tinystories_cased.txt"
LABEL_SHUFFLES = 20  # genre-label shuffles giving the AUC rule's rate without genre signal
AUC_GRID = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
TV_MARGIN = 0.01  # a TV exceeds its split-half noise only by more than this (float noise is not signal)
NAMES = ["05_heads", "05_kernels", "05_denominators", "05_sensitivity", "05_scales", "05_quality",
         "05_neurons", "05_pushes", "05_check", "05_genres", "05_firing", "05_summary"]


@dataclass(frozen=True)
class Config:
    """Chapter 5's parameters (each a notebook parameter, defaults argued on the page)."""

    layer: int = 0  # block whose heads are summarised and whose MLP neurons are read
    calibration: str = STORIES  # the calibration text (a file of the corpora folder)
    heldout: dict = field(default_factory=lambda: {"stories": STORIES})  # genre: corpora file
    window: int = 128  # tokens per window (BOS first); the kernels' longest distance
    n_calibration: int = 64  # calibration windows (split in two halves for the kernel's noise)
    n_heldout: int = 32  # held-out windows per genre (the calibration file's from its second half)
    min_spread: float = 4.0  # a stable head attends to at least this many tokens (exp entropy)
    max_tv: float = 0.3  # ... and its held-out patterns are within this TV of the kernel
    heads: str | tuple = "stable"  # "stable" (none: the method does not apply), "all", or indices ("0,2")
    norm_scale: str = "auto"  # "token": each token's own scale; "measured": one; "auto": token where exact
    content_weights: bool = True  # weight tokens by the attention they draw (else kernel alone)
    fire_threshold: float = 0.0  # a neuron fires when its pre-activation exceeds this
    n_top: int = 20  # top context neurons examined
    k_tokens: int = 8  # context tokens shown per neuron and side
    auc_rule: float = 0.75  # separating a genre: AUC at least this, or at most 1 - this
    n_permutations: int = 1000  # random neuron sets in the permutation test of the top set
    seed: int = 0  # seed of the permutation tests
    batch: int = 16  # windows per forward pass

    def __post_init__(self):
        heads = self.heads
        if isinstance(heads, str) and heads not in ("stable", "all"):  # "0,2": a params file's list
            try:
                heads = tuple(int(h) for h in heads.split(","))
            except ValueError:
                pass  # reported below
        if not isinstance(heads, str):
            heads = tuple(int(h) for h in heads)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "heldout", dict(self.heldout))
        problems = []
        if not 8 <= self.window:
            problems.append(f"window = {self.window}: use at least 8 tokens")
        if self.n_calibration < 4 or self.n_heldout < 2:
            problems.append(f"n_calibration = {self.n_calibration}, n_heldout = {self.n_heldout}: need at "
                            f"least 4 calibration windows (two halves) and 2 held-out windows")
        if self.norm_scale not in NORM_SCALES:
            problems.append(f"norm_scale = {self.norm_scale!r}: use one of {', '.join(NORM_SCALES)}")
        if isinstance(heads, str) and heads not in ("stable", "all") or heads == ():
            problems.append(f"heads = {self.heads!r}: use 'stable', 'all' or head indices such as '0,2'")
        if not self.heldout:
            problems.append("heldout needs at least one genre")
        if self.min_spread < 1 or not 0 < self.max_tv <= 1:
            problems.append(f"need min_spread >= 1 and 0 < max_tv <= 1; got {self.min_spread}, {self.max_tv}")
        if self.n_top < 1 or self.k_tokens < 1 or self.batch < 1:
            problems.append("n_top, k_tokens and batch must be at least 1")
        if not 0.5 < self.auc_rule < 1:
            problems.append(f"auc_rule = {self.auc_rule}: use a value in (0.5, 1)")
        if self.n_permutations < 100:
            problems.append(f"n_permutations = {self.n_permutations}: use at least 100")
        if problems:
            raise ParamsError("; ".join(problems) + ".")

    def problems(self, dims) -> list[str]:
        """Checks that need the model's sizes (`model.cfg`, or the pre-flight's `ModelDims`; unknown sizes
        are skipped)."""
        out = []
        n_layers, n_ctx, n_heads = (getattr(dims, k, None) for k in ("n_layers", "n_ctx", "n_heads"))
        if n_layers is not None and not 0 <= self.layer < n_layers:
            out.append(f"layer = {self.layer}: the model has layers 0..{n_layers - 1}")
        if n_ctx is not None and self.window > n_ctx:
            out.append(f"window = {self.window} exceeds the model's context ({n_ctx})")
        if n_heads is not None and not isinstance(self.heads, str):
            bad = [h for h in self.heads if not 0 <= h < n_heads]
            if bad:
                out.append(f"heads {bad}: the model has heads 0..{n_heads - 1}")
        if self.norm_scale == "token" and _learned_positions(dims):
            out.append("norm_scale = 'token' needs a model without learned position embeddings (the norm's "
                       "scale then depends on the position too); use 'auto' or 'measured'")
        return out

    def inputs(self) -> list[CorpusInput]:
        """The corpora files the chapter reads (the pre-flight checks they are there)."""
        return [CorpusInput(name) for name in sorted({self.calibration, *self.heldout.values()})]


def _learned_positions(dims) -> bool:
    kind = getattr(dims, "positional_embedding_type", None)
    return kind == "standard" if kind is not None else getattr(dims, "model_type", None) == "gpt2"


POST_NORM_REASON = ("its linear summary adds each head's output to the residual stream as it is, and this "
                    "model (Gemma-2) normalises the attention output before adding it (a post-attention "
                    "RMSNorm); the chapter does not cover that architecture yet.")


def skip_reason(target, dims) -> str | None:
    """Why this chapter does not apply to the model (`ModelDims` or `model.cfg`), or None."""
    post_norm = getattr(dims, "use_normalization_before_and_after", False)
    return POST_NORM_REASON if post_norm or getattr(dims, "model_type", None) == "gemma2" else None


@dataclass
class Tables:
    """What chapter 5 produces, tidy frames; the neuron tables are empty where the method does not apply."""

    heads: pd.DataFrame  # per head: spread, content TV (per genre), split-half noise, translation TV, stable
    kernels: pd.DataFrame  # head, distance, attention: the long-context relative kernels
    denominators: pd.DataFrame  # head, position, std of the relative log denominator, true and summary
    sensitivity: pd.DataFrame  # min_spread, max_tv, stable_heads: the stable rule's thresholds swept
    scales: pd.DataFrame  # text, norm, mean, std, cv, p5, p95: the norms' scales
    quality: pd.DataFrame  # variant, genre: summary r and FVU beside the position-only floor
    neurons: pd.DataFrame  # per neuron: context and current-token std, context share, rank
    pushes: pd.DataFrame  # top neurons' context tokens pushing up and down
    check: pd.DataFrame  # per neuron: r of the prediction with and without the context term, maxima, AUCs
    genres: pd.DataFrame  # auc_rule, population, count, share, p_value: genre separation beside its nulls
    firing: pd.DataFrame  # threshold: top neurons silent on calibration, new on held-out, and all neurons
    summary: pd.DataFrame  # one row: applies, reason, heads summarised, how chosen, norm scale used
    config: Config = field(repr=False, default_factory=Config)

    @property
    def applies(self) -> bool:
        return bool(self.summary["applies"].iloc[0])


def run(ctx, config: Config, *, model=None) -> Tables:
    """Chapter 5 for ctx's target (its full model unless `model` is given): every table, cached."""
    if model is None:
        model = ctx.load_full_model()
    reason = skip_reason(None, model.cfg)
    problems = config.problems(model.cfg) + ([reason] if reason else [])
    if problems:
        raise ParamsError(f"chapter {STEM}: " + "; ".join(problems) + ".")
    provenance = ctx.provenance(**asdict(config))

    def compute():
        io.progress(f"{STEM}: forward passes up to block {config.layer}")
        tok = model.tokenizer
        cal = _windows(tok, config, config.calibration, heldout=False)
        held = {g: _windows(tok, config, name, heldout=True) for g, name in config.heldout.items()}
        return compute_tables(model, config, measure(model, config, cal, held))

    found = io.cached_tables(ctx.params.target, NAMES, provenance, compute, label=f"{STEM}: computing")
    return Tables(*(found[n] for n in NAMES), config=config)


def _windows(tokenizer, config: Config, name: str, *, heldout: bool) -> torch.Tensor:
    """[n, window] token ids of one corpus file; held-out windows of the calibration file come from its second
    half, so they never overlap the calibration windows."""
    start = 0.5 if heldout and name == config.calibration else 0.0
    n = config.n_heldout if heldout else config.n_calibration
    return corpora.token_windows(tokenizer, corpora.corpus_text(name), n=n, length=config.window,
                                 bos=tokenizer.bos_token_id, start_fraction=start, name=name)


# --- forward passes ---------------------------------------------------------------------------------------

@dataclass
class LayerPass:
    """What one forward pass up to the chosen block leaves behind, for a batch of windows [b, n]."""

    tokens: torch.Tensor  # [b, n]
    pattern: torch.Tensor  # [b, n_heads, n, n]
    rel_log_z: torch.Tensor  # [b, n_heads, n]: log softmax denominators relative to the row's mean score
    z: torch.Tensor  # [b, n, n_heads, d_head]: each head's mixed values (its output is z W_O)
    W_O: torch.Tensor  # [n_heads, d_head, d_model]
    rest: torch.Tensor  # [b, n, d_model]: the MLP's residual input (block input + attention output)
    scale1: torch.Tensor  # [b, n]: the attention norm's scale
    scale2: torch.Tensor  # [b, n]: the MLP norm's scale
    pre: torch.Tensor  # [b, n, d_mlp]: MLP pre-activations (the gate's for a gated MLP)

    def heads_output(self, heads: list[int]) -> torch.Tensor:
        """[b, n, d_model]: the combined output of `heads` (before b_O), sum_h z[h] W_O[h]."""
        return torch.einsum("bnhe,hem->bnm", self.z[:, :, heads], self.W_O[heads])


def layer_pass(model, tokens: torch.Tensor, layer: int, *, batch: int = 16, bar=None) -> LayerPass:
    """Run `model` up to block `layer` on windows [b, n] and keep that block's attention and MLP inputs.
    bar: a progress bar advanced by the windows run."""
    p = f"blocks.{layer}."
    names = {p + k for k in ("attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_z", "hook_resid_mid",
                             "ln1.hook_scale", "ln2.hook_scale", "mlp.hook_pre")}
    W_O = model.blocks[layer].attn.W_O.float().cpu()  # [n_heads, d_head, d_model]
    parts = []
    for lo in range(0, len(tokens), batch):
        _, c = model.run_with_cache(tokens[lo:lo + batch].to(model.cfg.device), stop_at_layer=layer + 1,
                                    names_filter=lambda name: name in names)
        parts.append(LayerPass(
            tokens=tokens[lo:lo + batch], pattern=c[p + "attn.hook_pattern"].float().cpu(),
            rel_log_z=pk.relative_log_denominators(c[p + "attn.hook_attn_scores"]).cpu(),
            z=c[p + "attn.hook_z"].float().cpu(), W_O=W_O,
            rest=c[p + "hook_resid_mid"].float().cpu(),
            scale1=c[p + "ln1.hook_scale"][..., 0].float().cpu(),
            scale2=c[p + "ln2.hook_scale"][..., 0].float().cpu(),
            pre=c[p + "mlp.hook_pre"].float().cpu()))
        if bar is not None:
            bar.update(len(parts[-1].tokens))
    return LayerPass(*(W_O if f == "W_O" else torch.cat([getattr(x, f) for x in parts])
                       for f in LayerPass.__dataclass_fields__))


@dataclass
class Measured:
    """The forward passes and what follows from them and the weights alone."""

    model: object
    calibration: LayerPass
    heldout: dict[str, LayerPass]
    kernel: torch.Tensor  # [n_heads, n, n]: the mean calibration pattern
    frequency: torch.Tensor  # [d_vocab]: token counts in the calibration windows (BOS included)
    tokenizer: object = None  # decodes the pushing tokens (the model's own by default)


def measure(model, config: Config, cal_tokens: torch.Tensor,
            held_tokens: dict[str, torch.Tensor]) -> Measured:
    """Forward passes of the calibration windows [n_cal, n] and every genre's held-out windows."""
    n = len(cal_tokens) + sum(len(t) for t in held_tokens.values())
    bar = progress_bar(n, True, f"forward passes up to block {config.layer}", unit="window")
    cal = layer_pass(model, cal_tokens, config.layer, batch=config.batch, bar=bar)
    held = {g: layer_pass(model, t, config.layer, batch=config.batch, bar=bar)
            for g, t in held_tokens.items()}
    bar.close()
    freq = torch.bincount(cal.tokens.flatten(), minlength=model.cfg.d_vocab).float()
    return Measured(model, cal, held, cal.pattern.double().mean(0).float(), freq, model.tokenizer)


# --- the linear summary -----------------------------------------------------------------------------------

def resolved_norm_scale(config: Config, cfg) -> str:
    """'token' where each token's own scale is exact (layer 0 of a model without position embeddings: the
    norm's input is the token's embedding alone), else 'measured'; an explicit choice is kept."""
    if config.norm_scale != "auto":
        return config.norm_scale
    return "token" if config.layer == 0 and not _learned_positions(cfg) else "measured"


def _centred(cfg) -> bool:
    return cfg.normalization_type.startswith("LN")


def _ln(module):
    return module.w.float().cpu(), (module.b.float().cpu() if hasattr(module, "b") else None)


def attention_scale(m: Measured, mode: str) -> torch.Tensor | float:
    """The attention norm's scale: each token's own ([d_vocab]) or one measured on the calibration text."""
    cfg = m.model.cfg
    if mode == "token":
        return cn.token_scales(m.model.W_E.float().cpu(), centred=_centred(cfg), eps=cfg.eps)
    return float(m.calibration.scale1[:, 1:].mean())


def extended(m: Measured, config: Config, heads: list[int], scale) -> tuple[cn.Extended, torch.Tensor | None]:
    """The chosen heads' extended embeddings: tokens (an `Extended`, holding the layer's normed token
    embeddings once) and positions [h, n, d_model] (None without learned position embeddings)."""
    cfg, attn = m.model.cfg, m.model.blocks[config.layer].attn
    ln_w, ln_b = _ln(m.model.blocks[config.layer].ln1)
    W_V, W_O = attn.W_V[heads].float().cpu(), attn.W_O[heads].float().cpu()
    b_V = attn.b_V[heads].float().cpu() if getattr(attn, "b_V", None) is not None else None
    normed = cn.normed_rows(m.model.W_E.float().cpu(), ln_w, ln_b, scale, centred=_centred(cfg))
    e_pos = None
    if _learned_positions(cfg):
        W_pos = m.model.W_pos[: config.window].float().cpu()
        e_pos = cn.extended_embeddings(W_pos, ln_w, ln_b, W_V, b_V, W_O, scale, centred=_centred(cfg),
                                       biases=False)
    return cn.Extended(normed, W_V, b_V, W_O), e_pos


def summary_parts(m: Measured, config: Config, heads: list[int], *, scale=None, weighted=None):
    """What the linear summary of `heads` is made of: (K [h, n, n] divided by the sampled denominators,
    Extended, e_pos [h, n, d_model] or None, token weights [h, d_vocab] or None)."""
    scale = attention_scale(m, resolved_norm_scale(config, m.model.cfg)) if scale is None else scale
    K = m.kernel[heads]
    ext, e_pos = extended(m, config, heads, scale)
    if not (config.content_weights if weighted is None else weighted):
        return K, ext, e_pos, None
    cal = m.calibration
    w = cn.token_weights(cal.tokens, cal.pattern[:, heads], K, m.model.cfg.d_vocab)
    N = cn.kernel_denominators(cal.tokens, K, w).mean(0)  # [h, n]: sampled on the calibration text
    return K / N[..., None], ext, e_pos, w


def position_only(tokens: torch.Tensor, parts, p: torch.Tensor) -> torch.Tensor:
    """[b, n, d_model]: the summary with every token replaced by the calibration text's average token (its
    frequency- and weight-averaged extended embedding): what the positions alone give, the summary's floor."""
    K, ext, e_pos, w = parts
    q = p[None].expand(ext.n_heads, -1) * (w if w is not None else 1.0)  # [h, d_vocab]
    e_bar = ext.mean(q)[:, None]  # [h, 1, d_model]
    w_bar = (q.sum(-1) / p.sum())[:, None]  # [h, 1]: the average token's weight
    return cn.linear_summary(torch.zeros_like(tokens), K, e_bar, e_pos, w_bar)


def reads(m: Measured, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP input through the linearised norm (scale measured on the calibration text): u, c."""
    cfg, blk = m.model.cfg, m.model.blocks[config.layer]
    U = (blk.mlp.W_gate if cfg.gated_mlp else blk.mlp.W_in).float().cpu()
    b_in = None if cfg.gated_mlp else blk.mlp.b_in.float().cpu()
    ln_w, ln_b = _ln(blk.ln2)
    s2 = float(m.calibration.scale2[:, 1:].mean())
    return cn.neuron_reads(U, ln_w, ln_b, b_in, s2, centred=_centred(cfg))


def predict(m: Measured, config: Config, lp: LayerPass, heads: list[int], parts, *,
            context: bool = True) -> torch.Tensor:
    """[b, n, d_mlp]: pre-activations with `heads` replaced by their linear summary and the MLP norm
    linearised; everything else (the block's input, the other heads, b_O) as in the forward pass.
    `context=False` drops the summary (the baseline: what the prediction knows without the context bag)."""
    u, c = reads(m, config)
    rest = lp.rest - lp.heads_output(heads)
    summary = cn.linear_summary(lp.tokens, *parts) if context else torch.zeros_like(rest)
    return cn.predicted_preactivations(rest, summary, u, c)


# --- the tables -------------------------------------------------------------------------------------------

def compute_tables(model, config: Config, m: Measured) -> dict[str, pd.DataFrame]:
    """Every table of the chapter from the forward passes `m`."""
    io.progress(f"{STEM}: kernels, spreads, content and translation TVs with their split-half nulls")
    out = head_tables(m, config)
    heads, how, applies = chosen_heads(out["05_heads"], config)
    mode = resolved_norm_scale(config, model.cfg)
    io.progress(f"{STEM}: linear summary of heads {heads} and its position-only floor")
    out.update(summary_tables(m, config, heads, how))
    if applies:
        io.progress(f"{STEM}: {model.cfg.d_mlp} neurons: context shares, pushes, held-out checks, genre nulls")
        out.update(neuron_tables(m, config, heads))
    else:
        out.update({n: pd.DataFrame() for n in ("05_neurons", "05_pushes", "05_check", "05_genres",
                                                 "05_firing")})
    n_stable = int(out["05_heads"]["stable"].sum())
    reason = "" if applies else (
        f"no head of layer {config.layer} is stable (spread >= {config.min_spread:g} and content TV <= "
        f"{config.max_tv:g}): the heads' patterns depend on the text, so their output is not a fixed "
        f"positional bag of tokens and a summary of them would rank neurons on a premise that does not hold")
    out["05_summary"] = pd.DataFrame([{
        "layer": config.layer, "applies": applies, "reason": reason, "stable_heads": n_stable,
        "n_heads": len(out["05_heads"]), "heads": ",".join(map(str, heads)), "chosen": how,
        "norm_scale": mode, "positions": model.cfg.positional_embedding_type}])
    return out


def chosen_heads(heads: pd.DataFrame, config: Config) -> tuple[list[int], str, bool]:
    """(heads summarised, how they were chosen, whether neurons are ranked). With `heads="stable"` and no
    stable head the summary of all heads is measured (to show how far it is off) but no neuron is ranked."""
    n_heads = len(heads)
    if not isinstance(config.heads, str):
        return sorted(set(config.heads)), "listed in the parameters", True
    if config.heads == "all":
        return list(range(n_heads)), "all heads (asked for in the parameters)", True
    stable = heads.loc[heads["stable"], "head"].astype(int).tolist()
    if stable:
        return stable, "stable by the rule", True
    return list(range(n_heads)), "all heads, for the measurement only (none is stable)", False


def head_tables(m: Measured, config: Config) -> dict[str, pd.DataFrame]:
    """Per head: spread, content TV (per genre), split-half noise, translation TV and its null, the stable
    rule; relative kernels; denominators (like with like); the rule's sensitivity to its thresholds."""
    K, cal = m.kernel, m.calibration
    held = torch.stack([pk.content_tv(lp.pattern, K) for lp in m.heldout.values()])  # [genres, heads]
    heads = pd.DataFrame({"layer": config.layer, "head": np.arange(K.shape[0]),
                          "spread": pk.effective_tokens(cal.pattern).numpy(),
                          "content_tv": held.mean(0).numpy(),
                          "kernel_noise_tv": pk.split_half_tv(cal.pattern).numpy(),
                          "translation_tv": pk.translation_tv(K).numpy(),
                          "translation_noise_tv": pk.split_half_translation_tv(cal.pattern).numpy()})
    for g, genre in enumerate(m.heldout):
        heads[f"content_tv {genre}"] = held[g].numpy()
    heads["stable"] = (heads["spread"] >= config.min_spread) & (heads["content_tv"] <= config.max_tv)
    k = pk.relative_kernel(K, min_query=config.window // 2)
    kern = pd.DataFrame({"head": np.repeat(np.arange(k.shape[0]), k.shape[1]),
                         "distance": np.tile(np.arange(k.shape[1]), k.shape[0]),
                         "attention": k.flatten().numpy()})
    spreads = sorted({1.0, 2.0, config.min_spread, 2 * config.min_spread, 4 * config.min_spread})
    grid = [(s, t) for s in spreads for t in np.round(np.linspace(0.05, 1.0, 20), 2)]
    sens = pd.DataFrame([{"min_spread": s, "max_tv": t,
                          "stable_heads": int(((heads["spread"] >= s) & (heads["content_tv"] <= t)).sum())}
                         for s, t in grid])
    return {"05_heads": heads, "05_kernels": kern, "05_denominators": denominators(m),
            "05_sensitivity": sens}


def denominators(m: Measured) -> pd.DataFrame:
    """Per head and query position: the spread across calibration windows of the log softmax denominator
    relative to the row's mean score, for the true scores and for the summary's implied scores log(K w)
    (like with like: both unchanged by a constant added to a row). head, position, std_true, std_summary."""
    cal, K = m.calibration, m.kernel
    w = cn.token_weights(cal.tokens, cal.pattern, K, m.model.cfg.d_vocab)  # [h, d_vocab]
    implied = pk.relative_log_denominators(pk.log_kernel_scores(K, w[:, cal.tokens].transpose(0, 1)))
    h_idx, i_idx = np.meshgrid(np.arange(K.shape[0]), np.arange(1, K.shape[-1]), indexing="ij")
    return pd.DataFrame({"head": h_idx.ravel(), "position": i_idx.ravel(),
                         "std_true": cal.rel_log_z[:, :, 1:].std(0).flatten().numpy(),
                         "std_summary": implied[:, :, 1:].std(0).flatten().numpy()})


def summary_tables(m: Measured, config: Config, heads: list[int], how: str) -> dict[str, pd.DataFrame]:
    """Norm scales per text; the summary of `heads` against their true combined output per genre and variant
    (one scale or each token's own; token weights or not), each beside its position-only floor."""
    texts = {"calibration": m.calibration, **m.heldout}
    scales = pd.DataFrame([{"text": name, "norm": norm, "mean": float(s.mean()), "std": float(s.std()),
                            "cv": float(s.std() / s.mean()), "p5": float(s.quantile(0.05)),
                            "p95": float(s.quantile(0.95))}
                           for name, lp in texts.items()
                           for norm, s in (("attention", lp.scale1[:, 1:].flatten()),
                                           ("mlp", lp.scale2[:, 1:].flatten()))])
    cfg = m.model.cfg
    modes = ["measured"] + ([] if _learned_positions(cfg) else ["token"])
    chosen = resolved_norm_scale(config, cfg)
    rows = []
    bar = progress_bar(len(modes) * 2 * (1 + len(m.heldout)), True, "linear summaries", unit="step")
    for mode in modes:
        scale = attention_scale(m, mode)
        for weighted in (False, True):
            parts = summary_parts(m, config, heads, scale=scale, weighted=weighted)
            bar.update(1)
            for genre, lp in m.heldout.items():
                y = lp.heads_output(heads)[:, 1:]
                r, fvu = cn.summary_quality(y, cn.linear_summary(lp.tokens, *parts)[:, 1:])
                r0, fvu0 = cn.summary_quality(y, position_only(lp.tokens, parts, m.frequency)[:, 1:])
                rows.append({"norm_scale": mode, "token_weights": weighted, "genre": genre,
                             "heads": len(heads), "chosen": how,
                             "configured": mode == chosen and weighted == config.content_weights,
                             "exact_scale": mode == "token" and config.layer == 0,
                             "median_r": float(r.median()), "p10_r": float(r.quantile(0.1)), "fvu": fvu,
                             "median_r position-only": float(r0.median()), "fvu position-only": fvu0,
                             "paper median_r (reported)": PAPER["median_r"],
                             "paper fvu (reported)": PAPER["fvu"]})
                bar.update(1)
            # freed before the next variant builds its own normed embeddings ([d_vocab, d_model], 2.1 GB at
            # Llama-3.1-8B's width): two at once were the chapter's peak
            del parts
    bar.close()
    return {"05_scales": scales, "05_quality": pd.DataFrame(rows)}


def neuron_tables(m: Measured, config: Config, heads: list[int]) -> dict[str, pd.DataFrame]:
    """Neurons ranked by context share, their pushing tokens, the check on held-out text, genre separation
    beside its nulls, and firing."""
    bar = progress_bar(4, True, "neuron tables", unit="step")  # context shares, check, pushes, genres
    parts = summary_parts(m, config, heads)
    K, ext, _, w = parts
    u, _ = reads(m, config)
    k = pk.relative_kernel(K, min_query=config.window // 2)  # [h, n]: the long-context kernel
    x_tok = m.model.W_E.float().cpu()  # the block's direct input per token (exact at layer 0)
    table = cn.context_stats(ext, x_tok, u, m.frequency, k, weights=w)
    table = table.sort_values("context_share", ascending=False, ignore_index=True)
    table.insert(0, "layer", config.layer)
    table["rank"] = np.arange(1, len(table) + 1)
    bar.update(1)
    check = check_table(m, config, heads, parts, table)
    bar.update(1)
    pushed = pushes(m, config, ext, w, k, table)
    bar.update(1)
    genres = genre_separation(m, config, check)
    bar.update(1)
    bar.close()
    return {"05_neurons": table, "05_pushes": pushed, "05_check": check, "05_genres": genres,
            "05_firing": firing(check, config)}


def pushes(m: Measured, config: Config, ext, w, k, table: pd.DataFrame) -> pd.DataFrame:
    """The tokens whose presence throughout the context moves each top neuron most, up and down."""
    tok = m.tokenizer
    special = {tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id} - {None}
    keep = torch.ones(m.model.cfg.d_vocab, dtype=torch.bool)
    keep[list(special)] = False
    u, _ = reads(m, config)
    top = table.head(config.n_top)
    C = ext.scores(u[:, torch.tensor(top["neuron"].tolist())])  # [h, d_vocab, n_top]
    if w is not None:
        C = C * w[..., None]
    rows = []
    for col, r in enumerate(top.itertuples()):
        push = cn.token_pushes(C[..., col], m.frequency, k.sum(1))
        order = torch.argsort(torch.where(keep, push, 0.0))
        for side, ids in (("up", order.flip(0)[: config.k_tokens]), ("down", order[: config.k_tokens])):
            for o, t in enumerate(ids.tolist()):
                rows.append({"neuron": int(r.neuron), "rank": int(r.rank), "side": side, "order": o + 1,
                             "token": tok.decode([t]), "token_id": t, "push": float(push[t]),
                             "count": int(m.frequency[t])})
    return pd.DataFrame(rows)


def check_table(m: Measured, config: Config, heads: list[int], parts, neurons: pd.DataFrame) -> pd.DataFrame:
    """Per neuron: r of the predicted against the true pre-activations on held-out text, with and without the
    context term; largest pre-activation on the calibration text and each genre; genre AUCs."""
    d_mlp = m.model.cfg.d_mlp
    out = pd.DataFrame({"neuron": np.arange(d_mlp)})
    true = torch.cat([lp.pre[:, 1:].reshape(-1, d_mlp) for lp in m.heldout.values()])
    for column, context in (("r_pred", True), ("r_no_context", False)):
        pred = torch.cat([predict(m, config, lp, heads, parts, context=context)[:, 1:].reshape(-1, d_mlp)
                          for lp in m.heldout.values()])
        a, b = true - true.mean(0), pred - pred.mean(0)
        out[column] = ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-30)).numpy()
    out["max_calibration"] = m.calibration.pre[:, 1:].amax((0, 1)).numpy()
    genres = list(m.heldout)
    for genre, lp in m.heldout.items():
        out[f"max {genre}"] = lp.pre[:, 1:].amax((0, 1)).numpy()
    out["max_heldout"] = out[[f"max {g}" for g in genres]].max(1)
    if len(genres) > 1:
        aucs = cn.genre_aucs(_window_means(m))
        for g, genre in enumerate(genres[1:]):
            out[f"auc {genre} vs {genres[0]}"] = aucs[g]
    out = neurons[["neuron", "rank", "context_share"]].merge(out, on="neuron")
    return out.sort_values("rank", ignore_index=True)


def _window_means(m: Measured) -> list[np.ndarray]:
    """Per genre: [windows, d_mlp] window-mean pre-activations (BOS left out)."""
    return [lp.pre[:, 1:].mean(1).numpy() for lp in m.heldout.values()]


def genre_separation(m: Measured, config: Config, check: pd.DataFrame) -> pd.DataFrame:
    """How many of the top `n_top` neurons separate a genre, beside the base rate (all neurons), the
    `n_top` neurons with the lowest context share, the rule's rate with the genre labels shuffled, and a
    permutation p-value (random sets of `n_top` neurons), for a sweep of AUC thresholds.
    auc_rule, population, count, of, share, p_value."""
    if len(m.heldout) < 2:
        return pd.DataFrame(columns=["auc_rule", "population", "count", "of", "share", "p_value"])
    means = _window_means(m)
    aucs = cn.genre_aucs(means)  # [genres - 1, d_mlp], columns by neuron index
    rank = check.set_index("neuron")["rank"].sort_index().to_numpy()
    top, bottom = np.flatnonzero(rank <= config.n_top), np.flatnonzero(rank > len(rank) - config.n_top)
    rng = np.random.default_rng(config.seed)
    shuffled = [cn.shuffled_aucs(means, rng) for _ in range(LABEL_SHUFFLES)]
    rows = []
    for rule in sorted({config.auc_rule, *AUC_GRID}):
        hits = cn.separated(aucs, rule)
        p = cn.set_count_pvalue(hits, top, config.n_permutations, np.random.default_rng(config.seed))
        null = float(np.mean([cn.separated(a, rule).mean() for a in shuffled]))
        for population, idx, p_value in (("top by context share", top, p),
                                         ("lowest context share", bottom, np.nan),
                                         ("all neurons (base rate)", np.arange(len(hits)), np.nan)):
            rows.append({"auc_rule": rule, "population": population, "count": int(hits[idx].sum()),
                         "of": len(idx), "share": float(hits[idx].mean()), "p_value": p_value})
        rows.append({"auc_rule": rule, "population": "genre labels shuffled", "count": np.nan,
                     "of": len(hits), "share": null, "p_value": np.nan})
    return pd.DataFrame(rows)


def firing(check: pd.DataFrame, config: Config) -> pd.DataFrame:
    """For a sweep of firing thresholds: top neurons that never exceed it on the calibration text and, of
    those, the ones that do on held-out text; the same counts for all neurons (the base rate)."""
    thresholds = sorted({config.fire_threshold, *np.round(np.linspace(-1, 3, 17), 2)})
    top = check[check["rank"] <= config.n_top]

    def counts(d, t):
        silent = d["max_calibration"] <= t
        return int(silent.sum()), int((silent & (d["max_heldout"] > t)).sum())

    rows = []
    for t in thresholds:
        (s_top, n_top), (s_all, n_all) = counts(top, t), counts(check, t)
        rows.append({"threshold": t, "top_neurons": len(top), "silent_on_calibration": s_top,
                     "new_on_heldout": n_top, "all_neurons": len(check),
                     "all_silent_on_calibration": s_all, "all_neurons_new_on_heldout": n_all})
    return pd.DataFrame(rows)


# --- findings ---------------------------------------------------------------------------------------------

def findings(t: Tables) -> dict[str, list[str]]:
    """The page's result sentences, computed from the tables (rules and nulls stated).

    Keys: "heads" (stable rule and its nulls), "denominators", "summary" (r and FVU beside the position-only
    floor), "positions" (the translation check against its null), "applies", and where neurons are ranked
    "neurons", "genres", "firing".
    """
    c, h, s = t.config, t.heads, t.summary.iloc[0]
    n = len(h)
    out: dict[str, list[str]] = {}
    above = int((h["content_tv"] > h["kernel_noise_tv"] + TV_MARGIN).sum())
    out["heads"] = [
        f"{int(h['stable'].sum())} of {n} heads of layer {c.layer} are stable (spread >= {c.min_spread:g} "
        f"tokens, content TV <= {c.max_tv:g}); content TV {h['content_tv'].min():.2f}-"
        f"{h['content_tv'].max():.2f}, spread {h['spread'].min():.1f}-{h['spread'].max():.1f}.",
        f"The kernels' own sampling noise (TV between the kernels of two halves of the calibration "
        f"windows) is {h['kernel_noise_tv'].min():.3f}-{h['kernel_noise_tv'].max():.3f}; content TV exceeds "
        f"it by more than {TV_MARGIN:g} for {above} of {n} heads, and the rule can call a head stable only "
        f"where the noise is below max_tv ({int((h['kernel_noise_tv'] < c.max_tv).sum())} of {n} heads).",
        "Paper (reported, GPT-2 small layer 0): six stable heads about 0.05 TV from their kernel."]
    d = t.denominators
    out["denominators"] = [
        f"Median spread across windows of the log denominator relative to the row's mean score: true "
        f"softmax {d['std_true'].median():.2f}, the summary's kernel × token weight "
        f"{d['std_summary'].median():.2f} (the summary fixes it; a true spread well above the summary's "
        f"is variation the summary cannot follow)."]
    q = t.quality[t.quality["configured"]]
    out["summary"] = [
        f"{r['genre']}: median r {r['median_r']:.2f} (position-only floor "
        f"{r['median_r position-only']:.2f}), FVU {r['fvu']:.2f} (floor {r['fvu position-only']:.2f}); "
        f"paper (reported) {PAPER['median_r']:.2f}, {PAPER['fvu']:.2f}." for _, r in q.iterrows()]
    out["summary"].append(f"Summarised: heads {s['heads']} ({s['chosen']}); norm scale {s['norm_scale']}.")
    noisy = int((h["translation_tv"] > h["translation_noise_tv"] + TV_MARGIN).sum())
    out["positions"] = [
        f"Positions are {s['positions']}; translation TV {h['translation_tv'].min():.3f}-"
        f"{h['translation_tv'].max():.3f} against its split-half null {h['translation_noise_tv'].min():.3f}-"
        f"{h['translation_noise_tv'].max():.3f}: {noisy} of {n} heads depend on absolute position beyond "
        f"the kernel's sampling noise (by more than {TV_MARGIN:g})."]
    if not t.applies:
        out["applies"] = [f"The method does not apply to this model at layer {c.layer}: {s['reason']}. No "
                          f"context neurons are ranked; the measurements above show why."]
        return out
    out["applies"] = [f"Neurons are ranked from the summary of heads {s['heads']} ({s['chosen']})."]
    ch, top = t.check, t.check[t.check["rank"] <= c.n_top]
    out["neurons"] = [
        f"Prediction of held-out pre-activations, median r: all neurons {ch['r_pred'].median():.2f} (without "
        f"the context term {ch['r_no_context'].median():.2f}); top {c.n_top} {top['r_pred'].median():.2f} "
        f"(without {top['r_no_context'].median():.2f})."]
    out["genres"] = _genre_sentences(t)
    f = t.firing[t.firing["threshold"] == c.fire_threshold].iloc[0]
    out["firing"] = [
        f"Threshold {c.fire_threshold:g}: {int(f['silent_on_calibration'])} of the top {c.n_top} never fire "
        f"on the calibration text and {int(f['new_on_heldout'])} of those do on held-out text; of all "
        f"{int(f['all_neurons'])} neurons, {int(f['all_silent_on_calibration'])} and "
        f"{int(f['all_neurons_new_on_heldout'])}."]
    return out


def _genre_sentences(t: Tables) -> list[str]:
    c, g = t.config, t.genres
    if g.empty:
        return ["Genre separation needs at least two held-out genres."]
    at = g[g["auc_rule"] == c.auc_rule].set_index("population")
    top, low, base, shuf = (at.loc[p] for p in ("top by context share", "lowest context share",
                                                 "all neurons (base rate)", "genre labels shuffled"))
    verdict = "more often than" if top["p_value"] < 0.05 else "no more often than"
    return [f"{int(top['count'])} of the top {c.n_top} separate a genre (AUC >= {c.auc_rule:g} or <= "
            f"{1 - c.auc_rule:.2f}), against {int(low['count'])} of the {c.n_top} with the lowest context "
            f"share, {base['share']:.0%} of all neurons (base rate) and {shuf['share']:.0%} with the genre "
            f"labels shuffled; permutation p = {top['p_value']:.3f}: the ranking picks genre-separating "
            f"neurons {verdict} chance."]
