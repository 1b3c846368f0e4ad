"""A `HookedTransformer` from any supported Hugging Face folder, built from the streaming loader's tensors.

TransformerLens's own `from_pretrained` knows only official checkpoints (it hard-codes their shapes and
reads the architecture from the name), so a local folder or an unofficial hub id of a known architecture
cannot be built with it. Here the configuration comes from the folder's config.json and the weights from
`checkpoints.load_weights(mlp=True)`, which already returns TransformerLens's names, shapes and values
(tested equal to TransformerLens's own conversion). Every hook (`hook_z`, `hook_pattern`, `ln2.hook_scale`,
...) then exists, so the chapters that need forward passes (0, 4, 5, 6) run on every target.

    model = hooked_from_folder(folder, device="cpu", dtype=torch.float32, fold_ln=False)

What config.json says and where it goes (TransformerLens's `HookedTransformerConfig` names):
* Gemma-2: `attn_logit_softcapping` / `final_logit_softcapping` -> soft caps; `query_pre_attn_scalar` ->
  `attn_scale` = its square root; `layer_types` (sliding / full) -> `attn_types` (local / global) with
  `window_size` = `sliding_window`; pre- and post-norms around both sublayers.
* Llama: `rope_parameters` (or transformers 4's `rope_scaling`) with `rope_type: llama3` -> NTK-by-parts
  rotary scaling; grouped-query attention when there are fewer kv heads.
* Mistral: a sliding window on every layer when `sliding_window` is set; Qwen2: q/k/v biases.
* GPT-2: learned positions, LayerNorm, `scale_attn_by_inverse_layer_idx`.
The context length is capped at `max_ctx` (TransformerLens allocates an [n_ctx, n_ctx] mask per layer; the
chapters read a few hundred tokens).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from weightscope.config.params import PROCESSING_FLAGS
from weightscope.load.checkpoints import (CheckpointError, WeightSet, check_finite, config_from_hf,
                                          load_weights, scale_embedding)
from weightscope.load.tokenizer import hf_tokenizer

MAX_CTX = 2048


def tl_config(ws: WeightSet, name: str, *, max_ctx: int = MAX_CTX):
    """The `HookedTransformerConfig` of the checkpoint `ws` was read from (see the module docstring)."""
    from transformer_lens import HookedTransformerConfig

    c, base = ws.config, asdict(config_from_hf(ws, name))
    for key in ("tie_word_embeddings", "norm_plus_one", "embed_scale"):  # weightscope's own facts
        base.pop(key)
    base["n_ctx"] = min(base["n_ctx"], max_ctx)
    base["n_key_value_heads"] = ws.n_kv_heads if ws.gqa else None
    base["use_attn_scale"] = bool(c.get("scale_attn_weights", True))
    if ws.arch == "gpt2":
        base["scale_attn_by_inverse_layer_idx"] = bool(c.get("scale_attn_by_inverse_layer_idx", False))
    else:
        base["final_rms"] = True
    if ws.arch == "gemma2":
        base["use_normalization_before_and_after"] = True
    window, types = _local_attention(ws.arch, c, ws.n_layers)
    if window is not None:
        base.update(use_local_attn=True, window_size=int(window), attn_types=types)
    base["dtype"] = ws.dtype
    return HookedTransformerConfig(**base, default_prepend_bos=True)


def _local_attention(arch: str, c: dict, n_layers: int) -> tuple[int | None, list[str] | None]:
    """(window, per-layer "local" | "global") of sliding-window attention, or (None, None) without it."""
    window = c.get("sliding_window")
    if arch == "gemma2" and window:
        kinds = c.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                         for i in range(n_layers)]  # transformers 4: even layers slide
        return window, ["local" if k == "sliding_attention" else "global" for k in kinds]
    if arch == "mistral" and window:
        return window, ["local"] * n_layers
    if arch == "qwen2" and window and c.get("use_sliding_window"):
        cut = int(c.get("max_window_layers", n_layers))  # Qwen2 slides from layer max_window_layers on
        return window, ["global" if i < cut else "local" for i in range(n_layers)]
    return None, None


def hooked_from_weights(ws: WeightSet, tokenizer, name: str, *, max_ctx: int = MAX_CTX, **processing):
    """A `HookedTransformer` holding exactly `ws`'s tensors (read with `mlp=True`), processed as asked.

    Biases the architecture lacks are zeros (as TransformerLens's conversions make them); any other
    parameter the tensors do not supply is an error, not a random initialisation. Unprocessed, the model's
    parameters are `ws`'s tensors, views included (GPT-2's attention W_O alone is laid out anew: `_build`).
    """
    _check_flags(processing)
    cfg = tl_config(ws, name, max_ctx=max_ctx)
    cfg.device = str(ws.device)
    tensors = ws.tensors()
    if not ws.embed_scale_folded:  # a new W_E: `ws`'s own tensors are left as they are
        tensors["embed.W_E"] = _scaled_embedding(tensors["embed.W_E"], ws.embed_scale)
    return _build(cfg, tensors, ws.dtype, tokenizer, name, processing)


def hooked_from_folder(folder: str | Path, *, name: str | None = None, device="cpu", dtype=torch.float32,
                       progress: bool = False, max_ctx: int = MAX_CTX, **processing):
    """`hooked_from_weights` of a Hugging Face folder (config.json, safetensors, tokenizer files), built
    without a second copy of the weights when unprocessed: the tensors read are handed over one at a time."""
    _check_flags(processing)  # before gigabytes are read
    name = name or Path(folder).name
    # Gemma's embedding scale is folded below, in place, once W_U has its own copy of the raw embedding
    ws = load_weights(folder, device=device, dtype=dtype, mlp=True, progress=progress, fold_embed_scale=False)
    cfg, tensors, dtype = tl_config(ws, name, max_ctx=max_ctx), ws.tensors(), ws.dtype
    cfg.device, scale, tied = str(ws.device), ws.embed_scale, ws.tied_embeddings
    del ws  # `tensors` is now the only holder of the tensors read: `_build` empties it as it goes
    if scale != 1.0:
        if tied:  # W_U is a view of the raw embedding: its own copy first, in the embedding's layout (see
            # `_build`; `clone`: some devices' tensors say they are contiguous whatever their strides)
            tensors["unembed.W_U"] = tensors["unembed.W_U"].T.clone(memory_format=torch.contiguous_format).T
        tensors["embed.W_E"] = _scaled_embedding(tensors["embed.W_E"], scale, in_place=True)
    return _build(cfg, tensors, dtype, hf_tokenizer(Path(folder)), name, processing)


def _scaled_embedding(W_E: torch.Tensor, scale: float, *, in_place: bool = False) -> torch.Tensor:
    """`checkpoints.scale_embedding`, checked for an overflow of the model's dtype (as the loader checks)."""
    out = scale_embedding(W_E, scale, in_place=in_place)
    check_finite("embed.W_E", out, where=f"the embedding times {scale:g}")
    return out


def _check_flags(processing: dict) -> None:
    unknown = sorted(set(processing) - set(PROCESSING_FLAGS))
    if unknown:
        raise ValueError(f"unknown processing flags {unknown}; use any of {list(PROCESSING_FLAGS)}.")


def _build(cfg, tensors: dict, dtype: torch.dtype, tokenizer, name: str, processing: dict):
    """The model of `tensors` ({TransformerLens name: tensor}, emptied: each is released once taken) on
    `cfg.device`."""
    from transformer_lens import HookedTransformer

    cfg.init_weights = False  # every parameter is overwritten below: a random initialisation is wasted time
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    lacking = [k for k in missing if not k.rsplit(".", 1)[-1].lstrip("_").startswith("b_")]
    unexpected = sorted(set(tensors) - set(params))
    if lacking or unexpected:
        raise CheckpointError(f"{name}: the tensors read do not make a whole TransformerLens model (missing "
                              f"{lacking[:6]}, unexpected {unexpected[:6]}); was it read with mlp=True?")
    # the tensors stay in the checkpoint's layout, views where TransformerLens's differs (W_U, W_in, W_Q,
    # ...): the layout its forward pass wants (`forward_layout`)
    state = {key: tensors.pop(key) for key in list(tensors)}
    for key in missing:
        state[key] = torch.zeros_like(params[key], dtype=dtype, device=cfg.device)  # beside the tensors read
    # every flag explicit: TransformerLens's own defaults fold and centre (unprocessed is the book's default)
    flags = {f: bool(processing.get(f, False)) for f in PROCESSING_FLAGS}
    if any(flags.values()):  # TransformerLens's folds write new tensors (about twice the model while building)
        model.load_and_process_state_dict(state, **flags)
    else:  # unprocessed: the parameters are the tensors themselves, not a second copy
        model.load_state_dict(state, strict=False, assign=True)
    model.weightscope_processing = flags
    return forward_layout(model.to(cfg.device, print_details=False).eval())


# How TransformerLens's forward pass reads each matrix, as a permutation of the parameter's axes whose result
# it makes contiguous at every call: `F.linear(x, W.T.contiguous())` for the unembedding and a gated MLP's
# three matrices, a rearrange to [(head d_head), d_model] for W_Q, W_K, W_V and to [d_model, (head d_head)]
# for W_O. A parameter laid out that way costs nothing there; a contiguous one in TransformerLens's own
# layout is copied whole each time (a 1-token generation step at Gemma-2-2B's width copied 0.3 GB per
# block, and 2.4 GB for W_U at each logits call).
_FORWARD_ORDER = {"unembed.W_U": (1, 0), "mlp.W_in": (1, 0), "mlp.W_gate": (1, 0), "mlp.W_out": (1, 0),
                  "attn.W_Q": (0, 2, 1), "attn.W_K": (0, 2, 1), "attn.W_V": (0, 2, 1),
                  "attn._W_K": (0, 2, 1), "attn._W_V": (0, 2, 1), "attn.W_O": (2, 0, 1)}


def forward_layout(model):
    """`model` (changed in place) with every matrix of `_FORWARD_ORDER` laid out as its forward pass reads
    it: a matrix stored otherwise is copied once, here, instead of at every call. Values are unchanged, and
    so are the outputs, bit for bit (the same copy, made once). A non-gated MLP (GPT-2's) multiplies W_in
    and W_out as they are: left alone."""
    for name, param in model.named_parameters():
        order = next((o for key, o in _FORWARD_ORDER.items() if name.endswith(key)), None)
        if order is None or (name.endswith(("mlp.W_in", "mlp.W_out")) and not _gated(model, name)):
            continue
        if not param.permute(order).is_contiguous():
            back = sorted(range(len(order)), key=order.__getitem__)  # the inverse permutation
            param.data = param.data.permute(order).contiguous().permute(back)
    return model


def _gated(model, name: str) -> bool:
    return hasattr(model.get_submodule(name.rsplit(".", 1)[0]), "W_gate")
