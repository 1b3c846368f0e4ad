"""Context neurons from weights: stable heads as a linear bag of tokens, composed with the next MLP's input.

For a set S of heads whose positional kernel K (see `positional_kernels`) describes their patterns, the
combined output at position i is approximated by a kernel-weighted sum of per-token *extended embeddings*:

    y(i) = sum_{h in S} sum_{j <= i} K[h, i, j] e_h(t_j),   e_h(t) = (norm(x_t) W_V[h] + b_V[h]) W_O[h],

with the norm linearised: norm(x) = centre(x) / s * w + b, where s is one scale measured on a calibration
text (or, with no position embedding, each token's own scale, exact at layer 0). A neuron reads its MLP input
through the (linearised) next norm, so its pre-activation is linear in that bag: per token t and head h, the
context score C[h, t, n] = e_h(t) . u_n, with u_n the neuron's folded input row.

The extended embeddings of every token are never held per head ([n_heads, d_vocab, d_model] is 1.9 GB at
GPT-2 small's width): `Extended` keeps the layer's normed token embeddings once ([d_vocab, d_model]) and the
heads' value and output maps, and forms e_h(t) for the tokens asked for, or the scores e_h(t) . u in chunks.

Shapes: tokens [batch, n]; K [n_heads_S, n, n]; W_E [d_vocab, d_model]; W_V [n_heads, d_model, d_head];
W_O [n_heads, d_head, d_model]; e [n_heads_S, d_vocab, d_model]; U (MLP input) [d_model, d_mlp].
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata


def centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (d_model) axis, as LayerNorm does before scaling."""
    return x - x.mean(-1, keepdim=True)


def token_scales(X: torch.Tensor, *, centred: bool, eps: float) -> torch.Tensor:
    """[rows]: the norm's own scale of each row of X [rows, d_model] (RMS; centred first for LayerNorm)."""
    X = centre(X) if centred else X
    return (X.pow(2).mean(-1) + eps).sqrt()


def extended_embeddings(X: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor | None, W_V: torch.Tensor,
                        b_V: torch.Tensor | None, W_O: torch.Tensor, scale: torch.Tensor | float, *,
                        centred: bool, biases: bool = True) -> torch.Tensor:
    """[n_heads, rows, d_model]: each row of X [rows, d_model] through the linearised norm, W_V and W_O.

    `scale`: a number or [rows]. `biases=False` drops the norm's and W_V's biases (for the position part of a
    GPT-2 input, whose biases are already counted once with the token part). W_V, b_V, W_O: the chosen heads.
    """
    normed = normed_rows(X, ln_w, ln_b, scale, centred=centred, bias=biases)
    v = torch.einsum("rd,hde->hre", normed, W_V)  # [n_heads, rows, d_head]
    if biases and b_V is not None:
        v = v + b_V[:, None, :]
    return torch.einsum("hre,hem->hrm", v, W_O)


class Extended:
    """Extended embeddings e_h(t) = (normed(x_t) W_V[h] + b_V[h]) W_O[h] of chosen heads, formed on demand.

    normed: [d_vocab, d_model] the token embeddings through the linearised norm (its bias included);
    W_V [h, d_model, d_head], b_V [h, d_head] or None, W_O [h, d_head, d_model].
    """

    def __init__(self, normed: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor | None, W_O: torch.Tensor):
        self.normed, self.W_V, self.b_V, self.W_O = normed, W_V, b_V, W_O
        self.n_heads, self.d_vocab = W_V.shape[0], normed.shape[0]

    def at(self, ids: torch.Tensor) -> torch.Tensor:
        """[h, *ids.shape, d_model]: the extended embeddings of the token ids `ids`."""
        return torch.stack([self.head_at(h, ids) for h in range(self.n_heads)])

    def head_at(self, h: int, ids: torch.Tensor) -> torch.Tensor:
        """[*ids.shape, d_model]: head h's extended embeddings of the token ids `ids`."""
        v = self.normed[ids] @ self.W_V[h]
        if self.b_V is not None:
            v = v + self.b_V[h]
        return v @ self.W_O[h]

    def full(self) -> torch.Tensor:
        """[h, d_vocab, d_model]: every token's extended embedding (small models and tests only)."""
        return self.at(torch.arange(self.d_vocab))

    def scores(self, u: torch.Tensor) -> torch.Tensor:
        """[h, d_vocab, m]: e_h(t) . u[:, n] for the columns of u [d_model, m], without forming e."""
        read = torch.einsum("hem,mn->hen", self.W_O, u)  # [h, d_head, m]
        out = torch.einsum("vd,hdn->hvn", self.normed, torch.einsum("hde,hen->hdn", self.W_V, read))
        if self.b_V is not None:
            out = out + torch.einsum("he,hen->hn", self.b_V, read)[:, None]
        return out

    def mean(self, q: torch.Tensor) -> torch.Tensor:
        """[h, d_model]: the q-weighted mean extended embedding per head; q [h, d_vocab] (rows normalised)."""
        q = (q / q.sum(-1, keepdim=True)).to(self.normed.dtype)
        v = torch.einsum("hv,vd,hde->he", q, self.normed, self.W_V)
        if self.b_V is not None:
            v = v + self.b_V
        return torch.einsum("he,hem->hm", v, self.W_O)


def normed_rows(X: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor | None,
                scale: torch.Tensor | float, *, centred: bool, bias: bool = True) -> torch.Tensor:
    """[rows, d_model]: rows of X through the linearised norm, centre(x) / scale * w (+ b); `scale` a number
    or [rows]."""
    x = centre(X) if centred else X
    s = scale if isinstance(scale, float) else torch.as_tensor(scale, dtype=X.dtype).reshape(-1, 1)
    out = x / s  # a new tensor (X is never written); the rest in place: at a 50k vocabulary each copy of
    del x  # W_E is 154 MB, and chained out-of-place steps held four at once (chapter 5's peak)
    out = out.mul_(ln_w) if torch.result_type(out, ln_w) == out.dtype else out * ln_w
    if bias and ln_b is not None:
        out = out.add_(ln_b) if torch.result_type(out, ln_b) == out.dtype else out + ln_b
    return out


def token_weights(tokens: torch.Tensor, pattern: torch.Tensor, K: torch.Tensor, d_vocab: int, *,
                  prior: float = 1.0) -> torch.Tensor:
    """[n_heads, d_vocab]: how much more (> 1) or less (< 1) attention a token gets than the kernel gives its
    position: sum of its true attention over the sum of its kernel attention, over all its occurrences as a
    key in `tokens` [b, n] with patterns [b, n_heads, n, n]. `prior` pseudo-counts of weight 1 shrink rare
    tokens towards 1 (and give unseen tokens exactly 1)."""
    got = pattern.double().sum(2)  # [b, h, n]: attention each key position received
    expected = K.double().sum(1)[None].expand_as(got)  # [b, h, n]: what the kernel gives that position
    idx = tokens[:, None, :].expand_as(got).transpose(0, 1).reshape(K.shape[0], -1)  # [h, b * n]
    num = torch.zeros(K.shape[0], d_vocab, dtype=torch.float64).scatter_add_(
        1, idx, got.transpose(0, 1).reshape(K.shape[0], -1))
    den = torch.zeros_like(num).scatter_add_(1, idx, expected.transpose(0, 1).reshape(K.shape[0], -1))
    return ((num + prior) / (den + prior)).float()


def kernel_denominators(tokens: torch.Tensor, K: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[b, n_heads, n]: N(i) = sum_j K[h, i, j] w[h, t_j], the denominator of the kernel-times-token-weight
    pattern on each window. Its mean over calibration windows is the sampled, fixed denominator."""
    return torch.einsum("hij,hbj->bhi", K.double(), weights[:, tokens].double()).float()


def linear_summary(tokens: torch.Tensor, K: torch.Tensor, e_tok: torch.Tensor,
                   e_pos: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, n, d_model]: sum_h sum_j K[h, i, j] w[h, t_j] (e_tok[h, t_j] + e_pos[h, j]) for every window
    and position; `weights` w [n_heads, d_vocab] (token weights; None = all 1). `e_tok`: [n_heads, d_vocab,
    d_model] or an `Extended`.

    Head by head: the whole [n_heads, batch, n, d_model] gather is never held (one head's slice at a time).
    """
    n, n_heads = tokens.shape[1], K.shape[0]
    if n_heads == 0:  # the sum over heads would be empty: say so rather than return nothing
        raise ValueError("linear_summary needs at least one head: K has shape "
                         f"{tuple(K.shape)} (n_heads = 0); pass the heads whose kernels to sum.")
    out = None
    for h in range(n_heads):
        # [batch, n, d_model]
        E = e_tok.head_at(h, tokens) if isinstance(e_tok, Extended) else e_tok[h, tokens]
        if e_pos is not None:
            E = E + e_pos[h, :n]
        if weights is not None:
            E = E * weights[h, tokens][..., None]
        term = torch.matmul(K[h, :n, :n].to(E.dtype), E)  # [n, n] @ [batch, n, d_model]
        out = term if out is None else out.add_(term)
    return out


def summary_quality(y: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-position Pearson r over d_model ([batch, n]) and the fraction of variance unexplained of y_hat
    (sum |y - y_hat|^2 over sum |y - mean_position(y)|^2). y, y_hat: [batch, n, d_model]."""
    a, b = centre(y.double()), centre(y_hat.double())
    r = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    flat, flat_hat = y.reshape(-1, y.shape[-1]).double(), y_hat.reshape(-1, y.shape[-1]).double()
    fvu = (flat - flat_hat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum()
    return r.float(), float(fvu)


def neuron_reads(U: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor | None, b_in: torch.Tensor | None,
                 scale: float, *, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP input through the linearised norm: pre-activation(r) = r @ u + c for a residual vector r.

    U: [d_model, d_mlp] (W_gate for a gated MLP, W_in otherwise). Returns u [d_model, d_mlp] (norm weight and
    1/scale folded in, centred over d_model for LayerNorm, since centre(r) . v = r . centre(v)) and c [d_mlp].
    """
    u = ln_w[:, None] * U / scale
    if centred:
        u = u - u.mean(0, keepdim=True)
    c = torch.zeros(U.shape[1], dtype=U.dtype) if ln_b is None else ln_b @ U
    if b_in is not None:
        c = c + b_in
    return u, c


def predicted_preactivations(rest: torch.Tensor, summary: torch.Tensor, u: torch.Tensor,
                             c: torch.Tensor) -> torch.Tensor:
    """[batch, n, d_mlp]: (rest + summary) @ u + c, where `rest` [batch, n, d_model] is the MLP's residual
    input without the summarised heads (the block's input, the other heads' outputs and b_O)."""
    return (rest + summary) @ u + c


def context_stats(e_tok, x_tok: torch.Tensor, u: torch.Tensor, p: torch.Tensor, k: torch.Tensor, *,
                  weights: torch.Tensor | None = None, chunk: int | None = None,
                  budget_bytes: int = 2 ** 28) -> pd.DataFrame:
    """Per neuron: how much its pre-activation varies with the bag of context tokens versus the current token.

    Tokens are drawn independently from the distribution p [d_vocab] (the calibration text's token
    frequencies); the context term at a long-context query is sum_h sum_d k[h, d] C[h, t_d, n], with k
    [n_heads, D] the relative kernels and C[h, t, n] = w[h, t] e_h(t) . u_n (`weights` w [h, d_vocab], None =
    1). Its variance is sum_d k_d^T Cov_p(C[:, t, n]) k_d; the current token's is Var_p(x_t . u_n), x_tok
    [d_vocab, d_model] the block's direct input per token. `e_tok`: an `Extended` or [h, d_vocab, d_model].
    Streams over neurons in chunks whose [h, d_vocab, chunk] scores fit `budget_bytes` (unless `chunk`).
    """
    n_heads, d_vocab = (e_tok.n_heads, e_tok.d_vocab) if isinstance(e_tok, Extended) else e_tok.shape[:2]
    if chunk is None:
        chunk = max(1, min(u.shape[1], budget_bytes // (3 * 4 * n_heads * d_vocab)))
    p = (p / p.sum()).to(u.dtype)
    KK = k.to(u.dtype) @ k.to(u.dtype).T  # [h, h]: sum_d k[h, d] k[g, d]
    rows = []
    for lo in range(0, u.shape[1], chunk):
        uc = u[:, lo:lo + chunk]
        C = e_tok.scores(uc) if isinstance(e_tok, Extended) else torch.einsum("htd,dn->htn", e_tok, uc)
        if weights is not None:
            C = C * weights.to(C.dtype)[..., None]
        Cc = C - torch.einsum("htn,t->hn", C, p)[:, None]
        # sum_{h,g} KK[h, g] Cov_p(C[h], C[g]) = sum_t p_t sum_h Cc[h] (KK Cc)[h]: no [n, h, h] products
        var_ctx = torch.einsum("htn,htn,t->n", Cc, torch.einsum("hg,gtn->htn", KK, Cc), p)
        del C, Cc
        D = x_tok @ uc  # [V, chunk]
        var_cur = ((D - p @ D) ** 2 * p[:, None]).sum(0)
        rows.append(pd.DataFrame({"neuron": np.arange(lo, lo + uc.shape[1]),
                                  "context_std": var_ctx.clamp_min(0).sqrt().numpy(),
                                  "current_std": var_cur.sqrt().numpy()}))
    out = pd.concat(rows, ignore_index=True)
    total = (out["context_std"] ** 2 + out["current_std"] ** 2).clip(lower=1e-30)
    out["context_share"] = out["context_std"] ** 2 / total
    return out


def token_pushes(C: torch.Tensor, p: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """[d_vocab]: how much filling the context with token t moves one neuron's pre-activation, relative to the
    calibration average: sum_h mass[h] (C[h, t] - E_p C[h, .]). C: [h, d_vocab] the neuron's context scores
    (w e_h(t) . u_n, see `context_stats`); mass: [n_heads] kernel mass.
    """
    p = (p / p.sum()).to(C.dtype)
    return mass.to(C.dtype) @ (C - (C @ p)[:, None])


def auc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Area under the ROC curve of scores a [n_a, m] against b [n_b, m], per column: the probability that a
    draw from a exceeds one from b (ties count one half). 1 = a always higher, 0.5 = no separation."""
    n_a, n_b = len(a), len(b)
    ranks = rankdata(np.concatenate([a, b]), axis=0)
    return (ranks[:n_a].sum(0) - n_a * (n_a + 1) / 2) / (n_a * n_b)


def separated(aucs: np.ndarray, rule: float) -> np.ndarray:
    """[m] bool: a column separates some genre from the reference, AUC >= rule or <= 1 - rule in any row of
    aucs [genres, m]."""
    return ((aucs >= rule) | (aucs <= 1 - rule)).any(0)


def genre_aucs(means: list[np.ndarray]) -> np.ndarray:
    """[genres - 1, m]: AUC of each genre's window means [windows, m] against the first genre's."""
    return np.stack([auc(g, means[0]) for g in means[1:]])


def shuffled_aucs(means: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """`genre_aucs` after shuffling the windows between each genre and the reference (no genre signal)."""
    out = []
    for g in means[1:]:
        both = np.concatenate([g, means[0]])[rng.permutation(len(g) + len(means[0]))]
        out.append(auc(both[: len(g)], both[len(g):]))
    return np.stack(out)


def set_count_pvalue(hits: np.ndarray, chosen: np.ndarray, n_draws: int, rng: np.random.Generator) -> float:
    """P(a random set of len(chosen) columns holds at least as many hits as `chosen` does): a permutation
    test of a ranking's top set against sets drawn without regard to the ranking (add-one estimate)."""
    observed = int(hits[chosen].sum())
    draws = np.array([hits[rng.choice(len(hits), len(chosen), replace=False)].sum() for _ in range(n_draws)])
    return float((1 + (draws >= observed).sum()) / (1 + n_draws))
