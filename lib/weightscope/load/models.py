"""Full models for the forward passes (chapters 0, 4, 5, 6), as TransformerLens `HookedTransformer`s.

`load_model("stories260K")` builds Karpathy's llama2.c tinyllamas model (260K parameters, trained on
TinyStories) from its two `.bin` files, found under `WEIGHTSCOPE_MODELS/stories260K/`, else in the download
cache, else downloaded from the Hugging Face hub. A TransformerLens name goes to
`HookedTransformer.from_pretrained`. `load_full_model(name)` also takes a local folder or hub id, which it
builds as a `HookedTransformer` from the folder's tensors (`weightscope.load.hooked`).
Chapters 1–3 do not build a model: they read `weightscope.load.weights_model`.

Weights are loaded *unprocessed* by default (no LayerNorm folding, no centering): the book folds norms
explicitly where it needs to. The processing requested is recorded in `model.weightscope_processing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from weightscope.config.params import PROCESSING_FLAGS  # TransformerLens processing options; all off unless asked for
from weightscope.config.paths import progress_enabled
from weightscope.load import sources
from weightscope.load.hooked import forward_layout, hooked_from_folder
from weightscope.load.llama2c import (CHECKPOINT_FILE, DEMO_MODEL, KNOWN_SHA256, Llama2cCheckpoint,
                                      llama2c_state_dict, read_checkpoint, stories260k_dir)
from weightscope.load.tokenizer import stories260k_tokenizer

if TYPE_CHECKING:  # TransformerLens is imported only where a full model is built
    from transformer_lens import HookedTransformer, HookedTransformerConfig


def load_model(
    name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **flags
) -> HookedTransformer:
    """A `HookedTransformer` in eval mode with its tokenizer attached.

    `name` is "stories260K" (the offline demo model) or a TransformerLens model name or alias (e.g.
    "gpt2-small", "gemma-2-2b", "meta-llama/Llama-3.1-8B"). `flags` are TransformerLens processing flags
    (`PROCESSING_FLAGS`, all False by default) and, for TransformerLens models, any other
    `HookedTransformer.from_pretrained` keyword.
    The processing flags used are stored in `model.weightscope_processing`.
    """
    processing = {flag: bool(flags.pop(flag, False)) for flag in PROCESSING_FLAGS}
    if name.lower() == DEMO_MODEL.lower():
        if flags:
            raise ValueError(
                f"load_model({DEMO_MODEL!r}) accepts only the processing flags {PROCESSING_FLAGS}; "
                f"got {sorted(flags)}."
            )
        model = _load_stories260k(device=device, dtype=dtype, processing=processing)
    else:
        model = _load_transformer_lens(name, device=device, dtype=dtype, processing=processing, **flags)
    model.weightscope_processing = processing
    return forward_layout(model.eval())


# ----------------------------------------------------------------------------------------------------
# stories260K


def llama2c_config(ckpt: Llama2cCheckpoint, *, device="cpu", dtype=torch.float32) -> HookedTransformerConfig:
    """TransformerLens config of a llama2.c model (RMSNorm, SwiGLU, GQA, rotary on adjacent pairs)."""
    from transformer_lens import HookedTransformerConfig

    c = ckpt.config
    return HookedTransformerConfig(
        model_name=DEMO_MODEL if c.dim == 64 and c.n_layers == 5 else "llama2c",
        original_architecture="LlamaForCausalLM",
        d_model=c.dim,
        d_head=c.head_size,
        n_heads=c.n_heads,
        n_key_value_heads=c.n_kv_heads if c.n_kv_heads != c.n_heads else None,
        d_mlp=c.hidden_dim,
        n_layers=c.n_layers,
        n_ctx=c.seq_len,
        d_vocab=c.vocab_size,
        d_vocab_out=c.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=1e-5,
        positional_embedding_type="rotary",
        rotary_dim=c.head_size,
        rotary_base=10000,
        rotary_adjacent_pairs=True,  # llama2.c rotates dims (2i, 2i+1) together, not (i, i + d/2) as HF Llama
        tie_word_embeddings=c.shared_classifier,
        default_prepend_bos=True,
        init_weights=False,  # every parameter is overwritten from the checkpoint
        device=str(device),
        dtype=dtype,
    )


def _load_stories260k(*, device, dtype, processing: dict[str, bool]) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    folder = stories260k_dir()
    ckpt = read_checkpoint(folder / CHECKPOINT_FILE, expected_sha256=KNOWN_SHA256[CHECKPOINT_FILE])
    cfg = llama2c_config(ckpt, device=device, dtype=dtype)
    tokenizer = stories260k_tokenizer(folder, model_max_length=cfg.n_ctx)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    state_dict = llama2c_state_dict(ckpt, cfg)
    expected = {name for name, _ in model.named_parameters()}
    if set(state_dict) != expected:  # load_and_process_state_dict would skip mismatched keys silently
        raise RuntimeError(
            "llama2c_state_dict does not match this TransformerLens version's parameters: missing "
            f"{sorted(expected - set(state_dict))}, unexpected {sorted(set(state_dict) - expected)}."
        )
    state_dict = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    model.load_and_process_state_dict(state_dict, **processing)
    return model.to(device, print_details=False)


# ----------------------------------------------------------------------------------------------------
# TransformerLens models


def transformer_lens_name(name: str) -> str:
    """Official TransformerLens name of `name` (an official name or alias); ValueError, before any download,
    when TransformerLens does not know it."""
    official = sources.transformer_lens_official_name(name)
    if official is None:
        raise ValueError(
            f"Unknown model {name!r}: it is neither {DEMO_MODEL!r} (the offline demo model) nor a model "
            "TransformerLens knows. Valid names are in "
            "`transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES` (aliases in "
            "`transformer_lens.supported_models.MODEL_ALIASES`), e.g. 'gpt2-small', 'gemma-2-2b', "
            "'meta-llama/Llama-3.1-8B'."
        )
    return official


def _load_transformer_lens(name, *, device, dtype, processing: dict[str, bool], **flags) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    official = transformer_lens_name(name)
    return HookedTransformer.from_pretrained(official, device=device, dtype=dtype, **processing, **flags)


# ----------------------------------------------------------------------------------------------------
# Describing a model (chapter 0)

# Public configurations of the paper's models, for the side-by-side architecture table (from their
# Hugging Face config.json files; they cannot be read offline, so they are written out here).
PAPER_MODELS = {
    "Gemma-2-2B": dict(d_model=2304, n_layers=26, n_heads=8, n_key_value_heads=4, d_head=256, d_mlp=9216,
                       d_vocab=256000, normalization="RMSNorm (1 + weight)", positions="rotary (rotate-half)",
                       mlp="GeGLU", tied_embeddings=True, embedding_scale="sqrt(d_model) = 48",
                       soft_capping="attention 50, logits 30"),
    "Llama-3.1-8B": dict(d_model=4096, n_layers=32, n_heads=32, n_key_value_heads=8, d_head=128, d_mlp=14336,
                         d_vocab=128256, normalization="RMSNorm",
                         positions="rotary (rotate-half), llama3 scaling x8",
                         mlp="SwiGLU", tied_embeddings=False, embedding_scale="1", soft_capping="none"),
}
_MLP_NAMES = {"silu": "SwiGLU", "gelu_pytorch_tanh": "GeGLU", "gelu": "GeGLU"}


def describe(model) -> dict:
    """The architecture facts of `model` that weight-based reading depends on, as its checkpoint states them.

    `model` is a `WeightsModel` (its config says whether the embeddings are tied and whether the norm
    multiplies by 1 + weight) or a `HookedTransformer` (tying then judged from the tensors).
    """
    cfg = model.cfg
    if cfg.positional_embedding_type == "rotary":
        pairs = "adjacent pairs" if getattr(cfg, "rotary_adjacent_pairs", False) else "rotate-half"
        positions = "rotary (" + pairs
        if getattr(cfg, "use_NTK_by_parts_rope", False):
            positions += f"), llama3 scaling x{cfg.NTK_by_parts_factor:g}"
        else:
            positions += ")"
    else:
        kind = cfg.positional_embedding_type
        positions = "learned absolute" if kind == "standard" else kind
    kind = cfg.normalization_type.removesuffix("Pre")
    norm = {"RMS": "RMSNorm", "LN": "LayerNorm"}.get(kind, kind)
    if getattr(cfg, "norm_plus_one", False):
        norm += " (1 + weight)"
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None or not hasattr(model, "processing_notes"):
        tied = bool(torch.equal(model.W_U, model.W_E.T))
    caps = [f"{what} {value:g}" for what, value in (("attention", getattr(cfg, "attn_scores_soft_cap", -1.0)),
                                                     ("logits", getattr(cfg, "output_logits_soft_cap", -1.0)))
            if value and value > 0]
    scale = getattr(cfg, "embed_scale", 1.0)
    return dict(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        n_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab, normalization=norm, positions=positions,
        mlp=_MLP_NAMES.get(cfg.act_fn, cfg.act_fn) if cfg.gated_mlp else cfg.act_fn,
        tied_embeddings=bool(tied),
        embedding_scale="1" if scale == 1.0 else f"sqrt(d_model) = {scale:.4g}",
        soft_capping=", ".join(caps) or "none",
    )


def architecture_table(model, name: str | None = None):
    """DataFrame: one row per architecture fact, one column for `model` and one per paper model."""
    import pandas as pd

    columns = {name or model.cfg.model_name: describe(model), **PAPER_MODELS}
    table = pd.DataFrame(columns).astype(str)
    return table.rename_axis("property").reset_index()


# ----------------------------------------------------------------------------------------------------
# The full model of any target (the chapters that run forward passes)


def load_full_model(name: str, *, device="cpu", dtype=torch.float32, base: Path | None = None, **flags):
    """The forward-pass `HookedTransformer` of `model.name`: built by TransformerLens for the demo and the
    models it knows, else from the (local or downloaded) Hugging Face folder's own tensors and config.json
    (`weightscope.load.hooked`), so that every hook exists for every target.

    `flags`: TransformerLens processing flags (`PROCESSING_FLAGS`), applied either way. GPT-2's gelu_new is
    computed in one pass (`fuse_activation`).
    """
    source = sources.resolve_model(name, base=base)
    if source.kind == "demo" or source.tl_name:
        return fuse_activation(load_model(source.tl_name or name, device=device, dtype=dtype, **flags))
    folder = sources.model_folder(source, progress=progress_enabled())
    return fuse_activation(hooked_from_folder(folder, name=Path(str(name)).name, device=device, dtype=dtype,
                                              progress=progress_enabled(), **flags))


# GPT-2's activation. TransformerLens computes gelu_new (and gelu_fast) as six elementwise passes over
# [tokens, d_mlp], each writing a new tensor; torch's tanh GELU is the same formula,
# 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in one pass: 5.5x faster at [8,192 x 3,072] on a
# CPU, with the same largest error against a float64 evaluation (bench/bench_activation.py).
TANH_GELU_NAMES = ("gelu_new", "gelu_fast")


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), elementwise, in one pass."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activation(model):
    """model, its MLPs computing gelu_new / gelu_fast with `tanh_gelu` (same function, one pass); any other
    activation is left as TransformerLens set it."""
    if model.cfg.act_fn in TANH_GELU_NAMES:
        for block in model.blocks:
            if hasattr(block.mlp, "act_fn"):
                block.mlp.act_fn = tanh_gelu
    return model
