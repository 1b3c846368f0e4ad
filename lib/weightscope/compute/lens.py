"""Chapter 1: the token lens of SAE features, on both sides, and the "directly predicts tokens" rule.

* Output side (decoder-unembedding): scores = W_dec[f] @ M_out, with M_out the unembedding with the final norm
  folded in (`output_matrix`).
* Input side (encoder-embedding): scores = W_enc[:, f] @ W_E.T (`input_matrix`).

Both are streamed by `weightscope.compute.token_scores.token_score_stats`. The rule that calls a feature "token-predicting"
compares its statistics with the same statistics of **null directions** (random directions with the same norms),
so every threshold is a quantile of chance, never of the features themselves (which would make the fraction a
tautology). Introduced in chapter 1 (`notebooks/01_output_tokens.md`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from weightscope.compute.folding import fold_final_norm
from weightscope.compute.token_scores import (
    content_token_ids,
    mean_pairwise_cosine,
    mean_pairwise_string_similarity,
    random_directions_like,
    shuffled_rows,
    token_categories,
    token_column,
    token_score_stats,
)

SIDES = {"dec": "decoder-unembedding (output tokens)", "enc": "encoder-embedding (input tokens)"}


def output_matrix(model) -> tuple[Tensor, str]:
    """M_out: [d_model, d_vocab], the unembedding with the final norm folded in, and a note of what was folded
    (`fold_note`).

    TransformerLens stores norm weights as the multiplier actually applied (its Gemma conversion already adds
    the 1 of Gemma's `1 + weight`), so the stored weight is folded as is. Biases (b_U, the norm's bias) shift
    every feature's scores for a token by the same amount and are left out.
    """
    weight = getattr(model.ln_final, "w", None)
    M = fold_final_norm(model.W_U.detach(), None if weight is None else weight.detach(),
                        model.cfg.normalization_type)
    return M, fold_note(model)


def fold_note(model) -> str:
    """What `output_matrix` folds into the unembedding, in words (without building it: a [d_model, d_vocab]
    copy, 2.4 GB at Gemma-2-2B's width in fp32)."""
    norm = model.cfg.normalization_type
    notes = [f"final {norm} weight folded (as stored by TransformerLens)"
             if getattr(model.ln_final, "w", None) is not None
             else "final norm has no weight (already folded into W_U by the model's processing)"]
    if norm in ("LN", "LNPre"):
        notes.append("LayerNorm centring folded")
    return "; ".join(notes)


def input_matrix(model) -> Tensor:
    """M_in: [d_model, d_vocab] = W_E.T, the token embeddings as they enter the residual stream."""
    return model.W_E.detach().T


def token_strings(model) -> list[str]:
    """The text of every token id, [d_vocab] strings with leading spaces kept.

    Tokens whose text is not printable (byte-fallback pieces, control characters, partial UTF-8) are shown by
    their vocabulary piece instead, e.g. `<0x0A>`.
    """
    tok = model.tokenizer
    ids = list(range(model.cfg.d_vocab))
    texts = tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    pieces = tok.convert_ids_to_tokens(ids)
    return [t if t.isprintable() and "\ufffd" not in t else str(p) for t, p in zip(texts, pieces)]


@dataclass(frozen=True)
class LensConfig:
    """Parameters of the token lens and of the rule (each a chapter parameter)."""

    k: int = 10  # tokens kept at each end of each feature's score distribution
    m_coherence: int = 5  # top tokens whose mutual similarity measures coherence
    concentration_stat: str = "kurtosis"  # kurtosis | top_z | neg_entropy: how peaked the distribution is
    q_concentration: float = 0.95  # concentrated: stat above this quantile of the null directions
    q_coherence: float = 0.95  # coherent: string similarity or embedding cosine above this null quantile
    exclude_tokens: tuple[str, ...] = ("byte", "special")  # token kinds left out of every score distribution


def content_ids(model, exclude=("byte", "special")) -> Tensor:
    """int64 ids of the tokens the statistics are computed over: all but the `exclude` kinds (`token_categories`)."""
    return content_token_ids(token_categories(model.tokenizer, model.cfg.d_vocab), exclude)


def side_matrices(model, keep: Tensor | None = None) -> dict[str, Tensor]:
    """{"dec": M_out, "enc": M_in}, each [d_model, n_keep]: the two sides' matrices restricted to the `keep`
    columns (a copy each; all columns when keep is None). They depend on the model alone, so a chapter
    gathers them once and hands them to every `sae_sides` call (0.46 s a call at GPT-2 small)."""
    if keep is None:
        return {"dec": output_matrix(model)[0], "enc": input_matrix(model)}
    # one side at a time: the folded unembedding (a copy) is freed before the input side is gathered, so at
    # most two [d_model, d_vocab] copies exist at once (three held 2.4 GB more at Gemma-2-2B's width)
    dec = output_matrix(model)[0]
    dec = dec[:, keep.to(dec.device)]
    enc = input_matrix(model)
    return {"dec": dec, "enc": enc[:, keep.to(enc.device)]}


def side_frame(D: Tensor, M: Tensor, E: Tensor, vocab: list[str], cfg: LensConfig, *, prefix: str,
               keep: Tensor | None = None, feature_ids=None, progress: bool = True, dtype=None,
               rows: tuple[str, str] = ("features", "feature")) -> pd.DataFrame:
    """Statistics and top tokens of rows D [n, d_model] against M, columns `<prefix>_*`.

    M: [d_model, n_keep], the columns of the tokens `keep` (`side_matrices`), or [d_model, d_vocab] when keep
    is None. E: [d_vocab, d_model] embeddings used for the cosine coherence of the top tokens.
    keep: [n_keep] token ids the distribution is taken over (`content_ids`); None: every token. Top and bottom
    ids are reported in the full vocabulary's numbering. rows: what D's rows are, as the progress bar names
    them (what, unit).
    """
    if keep is not None and M.shape[1] != len(keep):
        raise ValueError(f"M has {M.shape[1]} columns but keep names {len(keep)} tokens: pass M's kept "
                         "columns (lens.side_matrices(model, keep)).")
    side = "output" if prefix == "dec" else "input"
    stats = token_score_stats(D, M, k=cfg.k, progress=progress, dtype=dtype, unit=rows[1],
                              desc=f"{side} token scores ({rows[0]})")
    if keep is not None:
        stats = dataclasses.replace(stats, top_ids=keep[stats.top_ids], bottom_ids=keep[stats.bottom_ids])
    df = stats.to_frame(feature_ids)
    m = min(cfg.m_coherence, cfg.k)
    top = stats.top_ids[:, :m]
    df["string_sim"] = [mean_pairwise_string_similarity([vocab[i] for i in row]) for row in top.tolist()]
    df["emb_cos"] = mean_pairwise_cosine(top, E).numpy()
    df["neg_entropy"] = -df["entropy"]
    df["top_tokens"] = token_column(vocab, stats.top_ids)
    df["bottom_tokens"] = token_column(vocab, stats.bottom_ids)
    return df.rename(columns={c: f"{prefix}_{c}" for c in df.columns if c != "feature"})


def null_directions(D: Tensor, kind: str, *, seed: int) -> Tensor:
    """Null rows like D: `random` (Gaussian, same norms) or `shuffled` (each row's entries permuted)."""
    if kind == "random":
        return random_directions_like(D, seed=seed)
    if kind == "shuffled":
        return shuffled_rows(D, seed=seed)
    raise ValueError(f"unknown null kind {kind!r}; use 'random' or 'shuffled'.")


def thresholds(null: pd.DataFrame, cfg: LensConfig, prefix: str) -> dict[str, float]:
    """The rule's thresholds on one side: quantiles of the null's statistics."""
    return {
        "concentration": float(np.nanquantile(null[f"{prefix}_{cfg.concentration_stat}"], cfg.q_concentration)),
        "string_sim": float(np.nanquantile(null[f"{prefix}_string_sim"], cfg.q_coherence)),
        "emb_cos": float(np.nanquantile(null[f"{prefix}_emb_cos"], cfg.q_coherence)),
    }


def apply_rule(df: pd.DataFrame, thr: dict[str, float], cfg: LensConfig, prefix: str) -> pd.DataFrame:
    """Add `<prefix>_concentrated`, `<prefix>_string_coherent`, `<prefix>_emb_coherent`, `<prefix>_coherent`
    (either) and `<prefix>_predicts` (concentrated and coherent) columns."""
    out = df.copy()
    out[f"{prefix}_concentrated"] = out[f"{prefix}_{cfg.concentration_stat}"] > thr["concentration"]
    out[f"{prefix}_string_coherent"] = out[f"{prefix}_string_sim"] > thr["string_sim"]
    out[f"{prefix}_emb_coherent"] = out[f"{prefix}_emb_cos"] > thr["emb_cos"]
    out[f"{prefix}_coherent"] = out[f"{prefix}_string_coherent"] | out[f"{prefix}_emb_coherent"]
    out[f"{prefix}_predicts"] = out[f"{prefix}_concentrated"] & out[f"{prefix}_coherent"]
    return out


def sae_sides(W_enc: Tensor, W_dec: Tensor, model, cfg: LensConfig, *, vocab: list[str], dtype=None,
              keep: Tensor | None = None, progress: bool = True,
              matrices: dict | None = None, rows: tuple[str, str] = ("features", "feature")) -> pd.DataFrame:
    """Both sides for one SAE: one row per feature, `dec_*` and `enc_*` columns.

    W_enc: [d_model, d_sae]; W_dec: [d_sae, d_model]; keep: the content token ids (see `side_frame`);
    matrices: `side_matrices(model, keep)` when the caller has them (else gathered here); rows: what the
    rows are, for the progress bar (`side_frame`).
    """
    mats = matrices if matrices is not None else side_matrices(model, keep)
    E = model.W_E.detach()
    opts = dict(keep=keep, progress=progress, dtype=dtype, rows=rows)
    dec = side_frame(W_dec, mats["dec"], E, vocab, cfg, prefix="dec", **opts)
    enc = side_frame(W_enc.T, mats["enc"], E, vocab, cfg, prefix="enc", **opts)
    return dec.merge(enc, on="feature")


def sweep(df: pd.DataFrame, null: pd.DataFrame, cfg: LensConfig, prefix: str, *, vary: str,
          values) -> pd.DataFrame:
    """Fraction of features (and of null rows) passing the rule as one quantile parameter moves.

    vary: "q_concentration" or "q_coherence". Returns rows (value, population, fraction).
    """
    rows = []
    for value in values:
        c = LensConfig(**{**cfg.__dict__, vary: float(value)})
        thr = thresholds(null, c, prefix)
        for population, frame in (("SAE features", df), ("null directions", null)):
            rows.append({"value": float(value), "population": population,
                         "fraction": float(apply_rule(frame, thr, c, prefix)[f"{prefix}_predicts"].mean())})
    return pd.DataFrame(rows)


def neuronpedia_url(template: str | None, layer: int, feature: int) -> str | None:
    """Link to a feature's Neuronpedia dashboard, from a target's `saes.neuronpedia` template."""
    if not template:
        return None
    return f"https://www.neuronpedia.org/{template.format(layer=layer)}/{feature}"


# the null samples of `analyse_sae`, each n_null rows: (role, kind, seed offset). `thr` sets the thresholds;
# `random` and `shuffled` are fresh samples scored by the same rule (the chance rates)
NULL_ROLES = (("thr", "random", 1), ("random", "random", 2), ("shuffled", "shuffled", 3))


def analyse_sae(sae, model, cfg: LensConfig, *, vocab: list[str], n_null: int, max_features: int = 0,
                seed: int = 0, dtype=None, keep: Tensor | None = None,
                matrices: dict | None = None) -> dict[str, pd.DataFrame]:
    """Chapter 1 for one SAE: both sides of its features, three null samples, and the rule's verdicts.

    keep: the content token ids every distribution is taken over (`content_ids`; None: all tokens).
    matrices: `side_matrices(model, keep)` when the caller has them (else gathered once here).
    Null roles: `thr` (random directions whose quantiles set the thresholds), `random` and `shuffled` (fresh
    samples scored by the same rule: the chance rate). Returns {"features": one row per feature,
    "nulls": one row per null direction of the `random` and `shuffled` samples}, both with a `layer` column.
    """
    n = sae.d_sae if max_features <= 0 else min(max_features, sae.d_sae)
    matrices = matrices if matrices is not None else side_matrices(model, keep)
    feats = sae_sides(sae.W_enc[:, :n], sae.W_dec[:n], model, cfg, vocab=vocab, dtype=dtype, keep=keep,
                      matrices=matrices)
    nulls = {}
    rows = torch.arange(n_null) % sae.d_sae  # n_null null rows, cycling over the SAE's rows for their norms
    for role, kind, offset in NULL_ROLES:
        dec = null_directions(sae.W_dec[rows], kind, seed=seed + offset)
        enc = null_directions(sae.W_enc.T[rows], kind, seed=seed + 10 + offset)
        nulls[role] = sae_sides(enc.T, dec, model, cfg, vocab=vocab, dtype=dtype, keep=keep,
                                matrices=matrices, rows=(f"null directions, {role}", "direction"))
    for side in SIDES:
        thr = thresholds(nulls["thr"], cfg, side)
        feats = apply_rule(feats, thr, cfg, side)
        for role in ("random", "shuffled"):
            nulls[role] = apply_rule(nulls[role], thr, cfg, side)
        for name, value in thr.items():
            feats[f"{side}_thr_{name}"] = value
    null_rows = pd.concat([nulls[r].assign(population=f"null: {r}") for r in ("random", "shuffled")])
    return {"features": feats.assign(population="SAE features", layer=sae.layer),
            "nulls": null_rows.assign(layer=sae.layer)}
