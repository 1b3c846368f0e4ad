"""Chapter 7: SAE features measured on real text, to check the weights-only verdicts of chapters 1-3.

One streaming pass (`firing_pass`) runs the model over held-out token rows in batches, encodes every SAE's
site, and keeps, per feature, only its `n_keep` strongest firing positions (`TopFirings`), so memory
is bounded by `n_keep x d_sae` entries per SAE whatever the length of the text. It also keeps the norms'
scales at every position (the final norm's, and the pre-attention norm's of the layers whose heads are
checked), which the direct-effect and attention measurements need. The measurements then read those positions:

* `set_hit_rates`: the share of a feature's firing positions whose next (or current) token is one of its
  weights-only top tokens, beside the base rate of that token set on the same text (`set_base_rates`);
* `direct_effects`: activation x decoder row through the final norm's actual scale and the unembedding;
* `ablation_effects`: the same logits' change when the feature is removed at its site (every downstream path);
* `pair_contributions`: a query-key feature pair's term in a head's attention score, with the rotation of
  the actual offset and the actual pre-attention norm scales.

Introduced in chapter 7 (`notebooks/07_in_context.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from weightscope.compute.attention import read_by_layer, rotate_queries
from weightscope.compute.passes import BlockStream, final_logits
from weightscope.compute.ranking import rank_key
from weightscope.compute.streaming import CHUNK_ELEMENTS, progress_bar
from weightscope.load.sae_sequence import SAESequence, described
from weightscope.load.saes import ONE_FEATURE_ARCHITECTURES, feature_activation, hook_layer, sae_architecture

ENTRY_BYTES = 16  # one kept firing: feature (int32), position (int64), activation (fp32)


@dataclass
class Firings:
    """One SAE's strongest firing positions on the text, at most `n_keep` per feature.

    feature, position: int64 [m] (position indexes the flattened token rows); act: fp32 [m] (> 0);
    n_active: int64 [d_sae], how many evaluated positions each feature was active at (any activation > 0).
    """

    feature: Tensor
    position: Tensor
    act: Tensor
    n_active: Tensor


@dataclass
class PassResult:
    """What `firing_pass` keeps: the tokens, the norms' scales, and every SAE's `Firings`.

    tokens: int64 [rows, row_len]; final_scale: fp32 [rows * row_len], the final norm's divisor per position
    (1 without a norm); attn_scale: {layer: fp32 [rows * row_len]}, `blocks.{layer}.ln1`'s divisor;
    firings: {SAE layer: Firings}; evaluated: bool [rows * row_len], positions that may count as firings
    (not BOS, not the last of a row, whose next token is unknown); final_resid: [rows * row_len, d_model] in
    the model's dtype on the CPU, the last block's output (the clean side of `ablation_effects`); sae_groups:
    how many groups of SAEs the pass held in turn (`sae_groups`).
    """

    tokens: Tensor
    final_scale: Tensor
    attn_scale: dict[int, Tensor]
    firings: dict[int, Firings]
    evaluated: Tensor
    final_resid: Tensor
    sae_groups: int = 1


class TopFirings:
    """Each feature's `n_keep` strongest firings so far, dense: act fp32 [d_sae, n_keep] (0: an empty slot),
    pos int64 [d_sae, n_keep], each row strongest first; n_active int64 [d_sae]. Strength is `rank_key`;
    equal strengths keep the earlier position: batches arrive in position order and every sort is stable."""

    def __init__(self, d_sae: int, n_keep: int, device=None):
        self.act = torch.zeros(d_sae, n_keep, device=device)
        self.pos = torch.full((d_sae, n_keep), -1, dtype=torch.long, device=device)
        self.n_active = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, acts: Tensor, first: int, chunk: int = 4096) -> None:
        """acts: fp32 [tokens, d_sae], the activations at positions first, first + 1, ... (0 where a feature
        does not fire or the position is not evaluated). Only features whose peak in the batch beats their
        weakest kept firing are merged (an equal one loses: the kept firing is earlier); those `chunk` at a
        time, so the working set is [chunk, tokens + n_keep] whatever d_sae."""
        n_keep = self.act.shape[1]
        self.n_active += (acts > 0).sum(0)
        # a sparse code's features mostly do not fire in a batch, and once a reservoir holds the strongest
        # of many batches a new one seldom beats it: at 12 GPT-2-width layers the full merge sorted every
        # feature of every batch (42 of the activation pass's 278 s)
        need = torch.nonzero(rank_key(acts.amax(0)) > rank_key(self.act[:, -1])).squeeze(1)
        for lo in range(0, len(need), chunk):
            f = need[lo:lo + chunk]
            cand = torch.cat([self.act[f], acts[:, f].T], 1)  # the kept ones first: earlier positions
            order = torch.sort(rank_key(cand), dim=1, descending=True, stable=True).indices[:, :n_keep]
            kept = order < n_keep  # a kept firing, else the batch's position first + (order - n_keep)
            old = self.pos[f].gather(1, order.clamp(max=n_keep - 1))
            self.act[f] = cand.gather(1, order)
            self.pos[f] = torch.where(kept, old, order - n_keep + first)

    def firings(self) -> Firings:
        """The kept firings as `Firings` on the CPU, sorted by feature, then strongest first (`rank_key`)."""
        keep = self.act > 0
        feature = torch.arange(self.act.shape[0], device=self.act.device)[:, None].expand_as(keep)[keep]
        return Firings(feature.cpu(), self.pos[keep].cpu(), self.act[keep].cpu(), self.n_active.cpu())


def keep_per_feature(budget_bytes: int, n_saes: int, d_sae: int, requested: int) -> int:
    """Firings kept per feature: `requested`, lowered so that every SAE's reservoir (and one batch's
    candidates, as many again) fits `budget_bytes`. At least 1."""
    fits = budget_bytes // max(1, 2 * n_saes * d_sae * ENTRY_BYTES)
    return max(1, min(requested, int(fits)))


def batch_rows_for(budget_bytes: int, row_len: int, d_sae: int, n_saes: int) -> int:
    """Token rows per forward batch so that the SAE activations of one batch ([rows * row_len, d_sae] fp32
    per SAE, twice for temporaries) fit `budget_bytes`. At least 1."""
    return max(1, int(budget_bytes // max(1, 8 * row_len * d_sae * n_saes)))


def _scale_hook(name: str) -> str:
    return f"{name}.hook_scale"


def sae_groups(layers: list[int], sizes: list[int], budget_bytes: int) -> list[list[int]]:
    """The SAEs, indexed 0..n-1, in groups held at once by `firing_pass`, [[i, ...], ...]: in order of
    `layers`, consecutive SAEs while their `sizes` (bytes) fit `budget_bytes` (an SAE over it alone)."""
    groups, total = [], 0
    for i in sorted(range(len(layers)), key=layers.__getitem__):
        if not groups or total + sizes[i] > budget_bytes:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += sizes[i]
    return groups


def sae_bytes(sae, element_bytes: int = 4) -> int:
    """An SAE's encoder and decoder at `element_bytes` per weight (4: fp32), from its description."""
    return 2 * sae.d_in * sae.d_sae * element_bytes


def held_element_bytes(saes) -> int:
    """Bytes per weight of `saes` as the pass will hold them: a lazy `SAESequence`'s dtype (None: sae-lens's
    fp32), or the first loaded SAE's decoder's. On a GPU the book loads SAEs in bf16: counted in fp32, a
    group would hold half the SAEs its budget allows."""
    if isinstance(saes, SAESequence):
        return getattr(torch, saes.dtype).itemsize if saes.dtype else 4
    first = described(saes)[0]
    return first.W_dec.element_size()


@torch.no_grad()
def firing_pass(model, saes, tokens: Tensor, *, n_keep: int, batch_rows: int, attn_layers=(),
                bos_id: int | None = None, progress: bool = True, sae_budget_bytes: int | None = None
                ) -> PassResult:
    """Stream `tokens` [rows, row_len] through the model in batches of `batch_rows` rows; per SAE keep each
    feature's `n_keep` strongest firings at evaluated positions (see `PassResult`).

    model: a HookedTransformer; saes: `LoadedSAE`s of residual sites, a list or a lazy `SAESequence`;
    attn_layers: layers whose `ln1` scale is kept (for `pair_contributions`); sae_budget_bytes: the SAE
    weights held at once, at the dtype they are loaded in (`held_element_bytes`; None: every SAE). With more
    SAEs than the budget holds, the pass runs in stretches of blocks, one group of SAEs each (`sae_groups`):
    each batch's residual stream waits between stretches ([rows * row_len, d_model] in all), and every block
    still runs once per token.
    """
    metas = described(saes)
    if any(m.layer is None for m in metas):
        raise ValueError("firing_pass reads SAEs of block hooks (`blocks.{L}.…`) only")
    element_bytes = held_element_bytes(saes)
    sizes = [sae_bytes(m, element_bytes) for m in metas]
    groups = sae_groups([m.layer for m in metas], sizes, sum(sizes) if sae_budget_bytes is None
                        else sae_budget_bytes)
    rows, row_len = tokens.shape
    evaluated = torch.ones(rows, row_len, dtype=torch.bool)
    evaluated[:, -1] = False
    if bos_id is not None:
        evaluated &= tokens != bos_id
    evaluated = evaluated.reshape(-1)
    weight = next(model.parameters())
    res = PassResult(tokens=tokens, final_scale=torch.ones(rows * row_len),
                     attn_scale={lay: torch.ones(rows * row_len) for lay in attn_layers}, firings={},
                     evaluated=evaluated,
                     final_resid=torch.empty(rows * row_len, model.cfg.d_model, dtype=weight.dtype))
    kept = {m.layer: TopFirings(m.d_sae, n_keep, weight.device) for m in metas}
    streams: dict[int, BlockStream] = {}  # each batch's residual stream, kept while a later group reads on
    bar = progress_bar(rows * row_len * len(groups), progress, "activation pass", unit="token")
    try:
        for g, group in enumerate(groups):
            held = [saes[i] for i in group]  # this group's weights only
            last = model.cfg.n_layers - 1 if g == len(groups) - 1 else max(s.layer for s in held)
            for start in range(0, rows, batch_rows):
                batch = tokens[start : start + batch_rows]
                stream = streams.pop(start, None) or BlockStream(model, batch.to(weight.device))
                _stretch(model, stream, held, last, res, kept, start * row_len)
                if last < model.cfg.n_layers - 1:
                    streams[start] = stream
                bar.update(batch.numel())
            del held
    finally:
        bar.close()
    res.firings, res.sae_groups = {lay: top.firings() for lay, top in kept.items()}, len(groups)
    return res


def _stretch(model, stream: BlockStream, saes: list, last: int, res: PassResult, kept: dict,
             first: int) -> None:
    """Runs one batch's `stream` on through block `last`, adds `saes`' firings to `kept` and, for the blocks
    run, the norms' scales to `res`; after the last block, its output and the final norm's scale.
    first: the batch's first position in the flattened rows."""
    n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
    scales = {f"blocks.{lay}.ln1": lay for lay in res.attn_scale
              if stream.next_block <= lay <= last and hasattr(model.blocks[lay].ln1, "hook_scale")}
    end = f"blocks.{n_layers - 1}.hook_resid_post"
    hooks = sorted({s.hook_name for s in saes} | {_scale_hook(n) for n in scales}
                   | ({end} if last == n_layers - 1 else set()))
    cache = stream.run_to(last, hooks)
    n = stream.tokens.numel()
    span = slice(first, first + n)
    for name, lay in scales.items():
        res.attn_scale[lay][span] = cache[_scale_hook(name)].reshape(-1).float().cpu()
    if last == n_layers - 1:
        res.final_resid[span] = cache[end].reshape(-1, d_model).cpu()
        if hasattr(model.ln_final, "hook_scale"):  # no blocks left: the final norm runs, no unembedding
            _, fin = model.run_with_cache(stream.residual, start_at_layer=n_layers, return_type=None,
                                          names_filter=[_scale_hook("ln_final")])
            res.final_scale[span] = fin[_scale_hook("ln_final")].reshape(-1).float().cpu()
    ok = res.evaluated[span].to(stream.residual.device)
    for sae in saes:
        site = cache[sae.hook_name].reshape(-1, sae.d_in)
        acts = sae.sae.encode(site.to(sae.W_dec.dtype)).float()  # [batch tokens, d_sae]
        kept[sae.layer].add(acts.mul_(ok[:, None]), first)  # in place: encode's output is new


def set_hit_rates(feature: Tensor, token: Tensor, top_ids: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Per feature: (firings counted [d_sae], hits [d_sae]), a hit being a firing whose `token` is one of
    the feature's `top_ids`.

    feature, token: int64 [m], one entry per firing (the token at or after the firing, as the caller
    chooses); top_ids: int64 [d_sae, k] each feature's weights-only top tokens.
    """
    hit = (top_ids[feature] == token[:, None]).any(1)
    n = torch.bincount(feature, minlength=d_sae)
    hits = torch.bincount(feature[hit], minlength=d_sae)
    return n, hits


def set_base_rates(tokens: Tensor, top_ids: Tensor, d_vocab: int) -> Tensor:
    """fp64 [d_sae]: the share of `tokens` [n] (the text's next or current tokens at evaluated positions) that
    fall in each feature's top-token set `top_ids` [d_sae, k] (duplicates in a set counted once)."""
    freq = torch.bincount(tokens, minlength=d_vocab).double() / max(1, len(tokens))
    ids = top_ids.sort(1).values
    vals = freq[ids]  # [d_sae, k]
    vals[:, 1:][ids[:, 1:] == ids[:, :-1]] = 0  # a repeated id counts once
    return vals.sum(1)


def centred_scores(W_dec: Tensor, M_out: Tensor, top_ids: Tensor) -> Tensor:
    """fp32 [n]: each row's weights-only score on its top tokens minus its mean score over the vocabulary.

    W_dec: [n, d_model] decoder rows; M_out: [d_model, d_vocab] the unembedding with the final norm folded
    (chapter 1's `output_matrix`); top_ids: [n, k]. A logit change common to every token moves no probability,
    so effects are measured against the vocabulary mean. The gather is [n, k, d_model]: callers pass rows in
    chunks that fit their budget.
    """
    W, M = W_dec.float(), M_out.float()
    top = torch.einsum("nd,nkd->nk", W, M.T[top_ids])  # the k scores alone: no [n, d_vocab] product
    return top.mean(1) - W @ M.mean(1)  # the mean over the vocabulary is linear: mean the columns first


def direct_effects(act: Tensor, scale: Tensor, centred: Tensor) -> Tensor:
    """fp32 [m]: the direct effect in logits of each firing on its feature's top tokens (against the vocab
    mean): activation / final-norm scale at that position x the feature's `centred_scores` entry.

    act, scale, centred: [m] per firing."""
    return act.float() / scale.float() * centred.float()


def stream_start(model, hook_name: str) -> int | None:
    """The block whose input is the stream at `hook_name`: L for blocks.L.hook_resid_pre, L + 1 for
    blocks.L.hook_resid_post (n_layers: the final residual); None for any other hook."""
    layer = hook_layer(hook_name)
    if layer is None or not hook_name.endswith(("hook_resid_pre", "hook_resid_post")):
        return None  # hook_resid_mid and the sublayers' hooks are no block's input
    return layer + hook_name.endswith("hook_resid_post")


def _final_residual(model, inp: Tensor, where, hooks=(), **kwargs) -> Tensor:
    """[m, d_model]: the last block's output at (row, column) pairs `where` (two int64 [m]) of a pass on `inp`
    (tokens [r, n], or a residual [r, n, d_model] with start_at_layer); `hooks` run first."""
    got = {}

    def grab(resid, hook):
        got["x"] = resid[where]

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    model.run_with_hooks(inp, return_type=None, fwd_hooks=[*hooks, (final, grab)], **kwargs)
    return got["x"]


def _ablated(model, hook_name: str, tokens: Tensor, where, remove, start: int | None) -> Tensor:
    """Final residuals [m, d_model] at (row, column) pairs `where` of token rows [r, n] with `remove` applied
    at `hook_name`. A residual site (`stream_start`: block `start` reads it) is reached by a pass that stops
    there, and only the blocks after it run on the changed stream; any other site, one hooked pass."""
    if start is None:
        return _final_residual(model, tokens, where, [(hook_name, remove)])
    site = model(tokens, stop_at_layer=start)  # [r, n, d_model]: the stream block `start` reads
    if start == model.cfg.n_layers:
        return remove(site, None)[where]
    return _final_residual(model, remove(site, None), where, start_at_layer=start)


def ablation_width(model, sae, row_len: int) -> int:
    """Floats per position that one ablation pass on rows of `row_len` holds at its widest: the SAE's code
    [.., d_sae] where the whole SAE encodes (`feature_activation`), else the model's own widest activation
    (the MLP's, or a position's attention scores over the row in every head)."""
    if sae_architecture(sae) not in ONE_FEATURE_ARCHITECTURES:
        return sae.d_sae
    return max(model.cfg.d_model, model.cfg.d_mlp or 0, model.cfg.n_heads * row_len)


@torch.no_grad()
def ablation_effects(model, sae, feature: int, rows: Tensor, positions: Tensor, top_ids: Tensor, *,
                     clean: Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """fp32 [len(positions)]: the change of the top tokens' logits (against the vocabulary mean) at
    `positions` when `feature` is removed from the SAE's site at every position of `rows`.

    rows: int64 [r, row_len] token rows; positions: int64 [m] indices into rows.reshape(-1); clean:
    [m, d_model] the unchanged model's final residuals there (`PassResult.final_resid`: the activation pass
    ran the whole model over these rows already). Removing means subtracting activation x decoder row at
    the site (the SAE's reconstruction error and other features stay), so the change is the feature's total
    effect through every later layer, not only the direct path. The feature's activation at the site is
    its own (`feature_activation`: one encoder column where the architecture allows, not the whole code).
    The rows with a wanted position run together, as many per pass as keep a pass's widest activation
    ([rows, columns, `ablation_width`]) within `chunk_elements`, cut after the group's last wanted column
    (a causal model's earlier positions do not see later ones); on a residual site a pass stops at the site
    and the ablated one starts there (`_ablated`).
    (One pass per row cost 120 of the chapter's 458 s at 12 GPT-2-width layers: 1,526 single-row passes;
    a clean pass through every block, besides the activation pass's, 35% of the ablations' FLOPs.)
    """
    device = next(model.parameters()).device
    d = sae.W_dec[feature].to(device)
    start = stream_start(model, sae.hook_name)
    rows, positions = rows.to(device), positions.to(device)
    if clean.shape[0] != len(positions):
        raise ValueError(f"clean has {clean.shape[0]} final residuals for {len(positions)} positions; pass "
                         "the activation pass's `final_resid` at those positions.")
    row_of, col = positions // rows.shape[1], positions % rows.shape[1]
    order, ablated = [], []

    def remove(resid, hook):
        a = feature_activation(sae, resid.to(sae.W_dec.dtype), feature)  # [r, pos]
        return resid - (a[..., None] * d).to(resid.dtype)

    used = torch.unique(row_of)  # sorted
    per_row = rows.shape[1] * ablation_width(model, sae, rows.shape[1])
    for group in used.split(max(1, chunk_elements // per_row)):
        sel = torch.nonzero(torch.isin(row_of, group)).squeeze(1)
        width = int(col[sel].max()) + 1
        where = (torch.searchsorted(group, row_of[sel]), col[sel])
        ablated.append(_ablated(model, sae.hook_name, rows[group, :width], where, remove, start))
        order.append(sel)
    changed = ablated[0].new_empty(len(positions), ablated[0].shape[1])
    changed[torch.cat(order)] = torch.cat(ablated)  # back in the order of `positions`
    # one unembedding for every group
    clean = clean.to(device=device, dtype=changed.dtype)
    logits = final_logits(model, torch.cat([clean, changed]))  # [2m, d_vocab]
    diff = logits[:len(positions)] - logits[len(positions):]
    return (diff[:, top_ids.to(device)].mean(1) - diff.mean(1)).cpu()


def folded_projections(model, layer: int, head: int, D: Tensor) -> tuple[Tensor, Tensor]:
    """(queries, keys) [n, d_head] of decoder rows D [n, d_model] in one head: folded with `blocks[layer].ln1`
    as chapter 2 folds them (`read_by_layer`), times W_Q and W_K of the head (biases left out), on D's
    device."""
    attn = model.blocks[layer].attn
    Df = read_by_layer(model, D.float(), layer).float()
    W_Q, W_K = (W[head].detach().to(device=Df.device, dtype=torch.float32) for W in (attn.W_Q, attn.W_K))
    return Df @ W_Q, Df @ W_K


def pair_contributions(q: Tensor, k: Tensor, offsets: Tensor, cfg) -> Tensor:
    """fp32 [m]: the weight part of the attention logit of query vectors q [m, d_head] and key vectors k
    [m, d_head] at the given query-minus-key offsets [m], divided by `cfg.attn_scale`: rot(q, o) . k / scale.

    With q = a_q / s_i (fold(d_q) W_Q) and k = a_k / s_j (fold(d_k) W_K) (activations, pre-attention norm
    scales at positions i and j) this is the pair's term in the head's score (before any soft-capping).
    """
    out = torch.empty(len(q))
    for o in torch.unique(offsets).tolist():
        sel = offsets == o
        out[sel] = (rotate_queries(q[sel].double(), [o], cfg)[:, 0] * k[sel].double()).sum(1).float()
    return out / float(cfg.attn_scale)


def co_firings(pos_q: Tensor, pos_k: Tensor, row_len: int, max_offset: int) -> tuple[Tensor, Tensor]:
    """Index pairs (iq, ik) of query positions pos_q [a] and key positions pos_k [b] in the same row with
    0 <= pos_q - pos_k <= max_offset (the key at or before the query, as causal attention sees it)."""
    dq, dk = pos_q[:, None], pos_k[None, :]
    ok = (dq // row_len == dk // row_len) & (dq >= dk) & (dq - dk <= max_offset)
    iq, ik = torch.nonzero(ok, as_tuple=True)
    return iq, ik


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with under 3 points or a constant side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return float("nan")
    import pandas as pd

    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def shuffled_spearman(x: np.ndarray, y: np.ndarray, *, n_perm: int, seed: int) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of Spearman's correlation after shuffling y against x (the null of no
    relation between the weights-only and the in-context numbers); NaN where `spearman` is.

    Ranking commutes with shuffling, so x and y are ranked once and each shuffle is one dot product of the
    standardised ranks, in the order `rng.permutation(y)` would give (ranking every shuffle made chapter 7's
    per-head table a 16.7 s cell at GPT-2 small's width)."""
    import pandas as pd

    x, y = np.asarray(x, float), np.asarray(y, float)
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if len(x) < 3 or np.isnan(rx).any() or np.isnan(ry).any() or rx.std() == 0 or ry.std() == 0:
        return float("nan"), float("nan")
    zx, zy = (rx - rx.mean()) / rx.std(), (ry - ry.mean()) / ry.std()
    rng = np.random.default_rng(seed)
    rs = np.array([zy[rng.permutation(len(y))] @ zx for _ in range(n_perm)]) / len(x)
    return float(np.quantile(rs, 0.025)), float(np.quantile(rs, 0.975))


def pair_weight_score(q: Tensor, k: Tensor, offsets, cfg, summary: str) -> float:
    """Chapter 2's weights-only score of one pair: rot(q, o) . k summarised over `offsets` ("mean" or
    "max_abs", `attention.summarise_offsets`); one position-free score without rotary positions.
    q, k: [d_head] folded query and key projections (`folded_projections`)."""
    from weightscope.compute.attention import rotary_inverse_frequencies, summarise_offsets

    if rotary_inverse_frequencies(cfg) is None:
        return float(q.double() @ k.double())
    S = rotate_queries(q[None].double(), list(offsets), cfg) @ k.double()  # [1, n_offsets]
    return float(summarise_offsets(S[:, :, None], summary)[0, 0])
