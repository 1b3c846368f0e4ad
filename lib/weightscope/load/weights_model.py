"""The weights-only model of chapters 1–3: the tensors they read, under TransformerLens's attribute names.

`load_weights_model(name)` builds a `WeightsModel` without building the network: for a Hugging Face folder or
hub id it reads only the embedding, the unembedding, the final norm and every block's pre-attention norm and
attention weights with the streaming loader (`checkpoints.load_weights`); for the demo model it reads the
llama2.c checkpoint. No TransformerLens and no `transformers` model is involved. The object answers to the
names the compute code uses on a `HookedTransformer`:

    model.cfg.{n_layers, d_model, d_vocab, n_heads, n_key_value_heads, d_head, normalization_type, ...}
    model.W_E [d_vocab, d_model]      model.W_U [d_model, d_vocab]      model.ln_final.w (.b) [d_model]
    model.blocks[l].ln1.w (.b) [d_model]
    model.blocks[l].attn.W_Q [n_heads, d_model, d_head]   .W_O [n_heads, d_head, d_model]
    model.blocks[l].attn._W_K, ._W_V [n_kv_heads, d_model, d_head] (grouped-query: the raw kv heads)
    model.blocks[l].attn.W_K, .W_V [n_heads, d_model, d_head] (kv heads repeated, as TransformerLens)
    model.tokenizer (a Hugging Face tokenizer), model.hook_dict (the TransformerLens hook names)

Norm weights are the multiplier applied (Gemma's 1 + weight already summed, as TransformerLens stores it).
The processing flags an SAE was trained with (`center_writing_weights`, ...) are applied by
`apply_processing`, explicitly, each with a note of what it changed (`model.processing_notes`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from weightscope.config.paths import progress_enabled
from weightscope.load import sources
from weightscope.load.checkpoints import (CheckpointError, ModelConfig, WeightSet, config_dims, config_from_hf,
                                          detect_arch, load_weights)
from weightscope.load.llama2c import (CHECKPOINT_FILE, DEMO_MODEL, KNOWN_SHA256, llama2c_state_dict,
                                      read_checkpoint, stories260k_dir)
from weightscope.load.tokenizer import hf_tokenizer, stories260k_tokenizer

HONOURED_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


class ProcessingError(CheckpointError):
    """A processing flag the weights-only route cannot apply."""


@dataclass
class Norm:
    """A norm's multiplier `w` [d_model] and bias `b` (LayerNorm); None once folded away (`fold_ln`)."""

    w: Tensor | None
    b: Tensor | None = None


@dataclass
class Attention:
    """One block's attention weights: `_W_K`/`_W_V` the checkpoint's kv heads, `W_K`/`W_V` them repeated."""

    W_Q: Tensor
    _W_K: Tensor
    _W_V: Tensor
    W_O: Tensor
    b_Q: Tensor | None = None
    _b_K: Tensor | None = None
    _b_V: Tensor | None = None
    b_O: Tensor | None = None

    @property
    def repeat_kv_heads(self) -> int:
        return self.W_Q.shape[0] // self._W_K.shape[0]

    @property
    def W_K(self) -> Tensor:
        """[n_heads, d_model, d_head]: head h uses kv head h // (n_heads / n_kv_heads), as TransformerLens."""
        return self._W_K.repeat_interleave(self.repeat_kv_heads, dim=0)

    @property
    def W_V(self) -> Tensor:
        return self._W_V.repeat_interleave(self.repeat_kv_heads, dim=0)


@dataclass
class MLP:
    """One block's feed-forward weights (read only with `mlp=True`): W_in, W_gate [d_model, d_mlp] (gated MLPs
    compute act(x W_gate) * (x W_in)), W_out [d_mlp, d_model], GPT-2's biases b_in, b_out."""

    W_in: Tensor
    W_out: Tensor
    W_gate: Tensor | None = None
    b_in: Tensor | None = None
    b_out: Tensor | None = None


@dataclass
class Block:
    ln1: Norm
    attn: Attention
    ln2: Norm | None = None  # the pre-MLP norm (with `mlp=True`)
    ln2_post: Norm | None = None  # Gemma-2's post-feed-forward norm (with `mlp=True`)
    mlp: MLP | None = None


@dataclass(eq=False)
class WeightsModel:
    """The weights chapters 1–3 read (see the module docstring), on one device and dtype."""

    cfg: ModelConfig
    W_E: Tensor
    W_U: Tensor
    ln_final: Norm
    blocks: list[Block]
    tokenizer: Any
    source: dict = field(default_factory=dict)
    processing: dict[str, bool] = field(default_factory=dict)
    processing_notes: list[str] = field(default_factory=list)

    @property
    def hook_dict(self) -> dict[str, None]:
        """The TransformerLens hook names of this architecture (for `saes.check_fits`); values are None."""
        return hook_names(self.cfg.n_layers, self.cfg.positional_embedding_type)

    def nbytes(self) -> int:
        """Bytes held by the tensors (a shared storage, such as a tied W_U, counted once)."""
        tensors = [self.W_E, self.W_U, self.ln_final.w, self.ln_final.b]
        for block in self.blocks:
            a = block.attn
            tensors += [block.ln1.w, block.ln1.b, a.W_Q, a._W_K, a._W_V, a.W_O, a.b_Q, a._b_K, a._b_V, a.b_O]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in tensors if t is not None}
        return sum(storages.values())

    def __repr__(self) -> str:
        c = self.cfg
        return (f"WeightsModel({c.model_name}, {c.original_architecture}, {c.n_layers} layers, "
                f"d_model={c.d_model}, d_vocab={c.d_vocab}, {c.dtype} on {c.device})")


def hook_names(n_layers: int, positional_embedding_type: str) -> dict[str, None]:
    """{TransformerLens hook name: None} of a model of this depth: what an SAE's `hook_name` may be."""
    names = ["hook_embed", "ln_final.hook_normalized"]
    if positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{hook}" for hook in (
            "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
            "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "mlp.hook_pre", "mlp.hook_post")]
    return dict.fromkeys(names)


def shape_only(folder: Path):
    """An object with `cfg` (widths and depth from config.json) and `hook_dict`, for checking SAEs against a
    Hugging Face folder before any weights are read."""
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = detect_arch(config)
    dims = config_dims(arch, config)
    cfg = SimpleNamespace(n_layers=dims.n_layers, d_model=dims.d_model, n_heads=dims.n_heads,
                          d_head=dims.d_head, d_mlp=dims.d_mlp, model_name=Path(folder).name)
    positions = "standard" if arch == "gpt2" else "rotary"
    return SimpleNamespace(cfg=cfg, hook_dict=hook_names(dims.n_layers, positions))


# ----------------------------------------------------------------------------------------------------------
# Building


def load_weights_model(name: str, *, device="cpu", dtype=torch.float32, base: Path | None = None,
                       progress: bool = True, mlp: bool = False) -> WeightsModel:
    """The weights-only model of `model.name` (demo, local folder, TransformerLens name or hub id).

    mlp: also read every block's feed-forward weights and the norms around them (the FF-KV baseline).
    """
    progress = progress and progress_enabled()
    source = sources.resolve_model(name, base=base)
    if source.kind == "demo":
        return from_llama2c(device=device, dtype=dtype, mlp=mlp)
    folder = sources.model_folder(source, progress=progress)
    weights = load_weights(folder, device=device, dtype=dtype, progress=progress, mlp=mlp)
    model = from_weight_set(weights, hf_tokenizer(folder), name=source.tl_name or Path(str(name)).name)
    model.source = {**source.as_dict(), "folder": str(folder)}
    return model


def from_weight_set(ws: WeightSet, tokenizer, *, name: str) -> WeightsModel:
    """A `WeightsModel` around the tensors `load_weights` read (all layers must have been read)."""
    if sorted(ws.layers) != list(range(ws.n_layers)):
        raise ValueError(f"from_weight_set needs every layer; got {sorted(ws.layers)} of {ws.n_layers}.")
    cfg = config_from_hf(ws, name)
    blocks = []
    for layer in range(ws.n_layers):
        w = ws[layer]
        attn = Attention(W_Q=w.W_Q, _W_K=w.W_K, _W_V=w.W_V, W_O=w.W_O, b_Q=w.b_Q, _b_K=w.b_K, _b_V=w.b_V,
                         b_O=w.b_O)
        block = Block(ln1=Norm(w.ln1_w, w.ln1_b), attn=attn)
        if w.W_out is not None:
            block.ln2, block.mlp = Norm(w.ln2_w, w.ln2_b), MLP(W_in=w.W_in, W_out=w.W_out, W_gate=w.W_gate,
                                                               b_in=w.b_in, b_out=w.b_out)
            block.ln2_post = Norm(w.ln2_post_w) if w.ln2_post_w is not None else None
        blocks.append(block)
    return WeightsModel(cfg=cfg, W_E=ws.W_E, W_U=ws.W_U, ln_final=Norm(ws.ln_final_w, ws.ln_final_b),
                        blocks=blocks, tokenizer=tokenizer)


def from_llama2c(*, device="cpu", dtype=torch.float32, mlp: bool = False) -> WeightsModel:
    """The demo model (stories260K) from its llama2.c checkpoint, with its tokenizer."""
    folder = stories260k_dir()
    ckpt = read_checkpoint(folder / CHECKPOINT_FILE, expected_sha256=KNOWN_SHA256[CHECKPOINT_FILE])
    c = ckpt.config
    gqa = c.n_kv_heads != c.n_heads
    shape = SimpleNamespace(n_heads=c.n_heads, d_head=c.head_size, d_model=c.dim, n_layers=c.n_layers,
                            n_key_value_heads=c.n_kv_heads if gqa else None, d_vocab_out=c.vocab_size,
                            d_mlp=c.hidden_dim)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in llama2c_state_dict(ckpt, shape).items()}
    kv = "_" if gqa else ""
    blocks = [Block(ln1=Norm(sd[f"blocks.{i}.ln1.w"]), attn=Attention(
        W_Q=sd[f"blocks.{i}.attn.W_Q"], _W_K=sd[f"blocks.{i}.attn.{kv}W_K"],
        _W_V=sd[f"blocks.{i}.attn.{kv}W_V"], W_O=sd[f"blocks.{i}.attn.W_O"])) for i in range(c.n_layers)]
    if mlp:  # SwiGLU: silu(x W_gate) * (x W_in), no biases
        for i, block in enumerate(blocks):
            block.ln2 = Norm(sd[f"blocks.{i}.ln2.w"])
            block.mlp = MLP(W_in=sd[f"blocks.{i}.mlp.W_in"], W_out=sd[f"blocks.{i}.mlp.W_out"],
                            W_gate=sd[f"blocks.{i}.mlp.W_gate"])
    cfg = ModelConfig(
        model_name=DEMO_MODEL if c.dim == 64 and c.n_layers == 5 else "llama2c",
        original_architecture="LlamaForCausalLM", n_layers=c.n_layers, d_model=c.dim, d_vocab=c.vocab_size,
        n_heads=c.n_heads, n_key_value_heads=c.n_kv_heads if gqa else None, d_head=c.head_size,
        d_mlp=c.hidden_dim, act_fn="silu", gated_mlp=True, normalization_type="RMS", eps=1e-5,
        positional_embedding_type="rotary", rotary_dim=c.head_size, rotary_adjacent_pairs=True,
        n_ctx=c.seq_len, attn_scale=math.sqrt(c.head_size), tie_word_embeddings=c.shared_classifier,
        device=str(torch.device(device)), dtype=str(dtype).removeprefix("torch."),
    )
    W_E = sd["embed.W_E"]
    W_U = W_E.T if c.shared_classifier else sd["unembed.W_U"]
    return WeightsModel(cfg=cfg, W_E=W_E, W_U=W_U, ln_final=Norm(sd["ln_final.w"]), blocks=blocks,
                        tokenizer=stories260k_tokenizer(folder, model_max_length=c.seq_len),
                        source={"kind": "demo", "name": DEMO_MODEL, "folder": str(folder)})


# ----------------------------------------------------------------------------------------------------------
# Processing (the flags an SAE records in `model_from_pretrained_kwargs`)


def apply_processing(model: WeightsModel, flags: dict[str, bool]) -> WeightsModel:
    """Apply TransformerLens's processing `flags` to the loaded tensors, in its order; records notes.

    fold_ln: the pre-attention norm's weight (and bias) move into W_Q/W_K/W_V (their biases), the final
    norm's into W_U; the norms become weightless ("LNPre"/"RMSPre"), LayerNorm-folded weights are centred
    over d_model as TransformerLens does. center_writing_weights: W_E, W_O and b_O lose their mean over
    d_model (GPT-2's position embedding is not read by the chapters). center_unembed: W_U loses its mean
    over the vocabulary. fold_value_biases: b_V moves into b_O. Any other true flag is refused.
    Returns `model` with new tensors (inputs are never modified in place: W_U may be a view of W_E).
    """
    on = {flag for flag, value in flags.items() if value}
    unknown = sorted(on - set(HONOURED_FLAGS))
    if unknown:
        raise ProcessingError(
            f"The SAEs were trained on a model processed with {unknown}, which the weights-only route cannot "
            f"apply (it applies {list(HONOURED_FLAGS)}). Set `model.processing` in the parameters file to "
            "the flags to use, or use SAEs trained without them."
        )
    notes = []
    if "fold_ln" in on:
        notes.append(_fold_ln(model))
    if "center_writing_weights" in on:
        model.W_E = model.W_E - model.W_E.mean(-1, keepdim=True)
        for block in model.blocks:
            a = block.attn
            a.W_O = a.W_O - a.W_O.mean(-1, keepdim=True)
            if a.b_O is not None:
                a.b_O = a.b_O - a.b_O.mean()
            if block.mlp is not None:  # the MLP writes to the residual stream too
                block.mlp.W_out = block.mlp.W_out - block.mlp.W_out.mean(-1, keepdim=True)
                if block.mlp.b_out is not None:
                    block.mlp.b_out = block.mlp.b_out - block.mlp.b_out.mean()
        notes.append("center_writing_weights: W_E and every W_O, b_O (and W_out, b_out) centred over d_model")
    if "center_unembed" in on:
        model.W_U = model.W_U - model.W_U.mean(-1, keepdim=True)
        notes.append("center_unembed: W_U centred over the vocabulary")
    if "fold_value_biases" in on:
        for block in model.blocks:
            a = block.attn
            if a._b_V is not None:
                b_V = a._b_V.repeat_interleave(a.repeat_kv_heads, dim=0)
                b_O = torch.einsum("hk,hkm->m", b_V.float(), a.W_O.float()).to(a.W_O.dtype)
                a.b_O = b_O if a.b_O is None else a.b_O + b_O
                a._b_V = torch.zeros_like(a._b_V)
        notes.append("fold_value_biases: b_V folded into b_O")
    model.processing = {flag: flag in on for flag in flags}
    model.processing_notes = notes
    return model


def _fold_ln(model: WeightsModel) -> str:
    centre = model.cfg.normalization_type == "LN"
    for block in model.blocks:
        a, g, b = block.attn, block.ln1.w, block.ln1.b
        for name in ("W_Q", "_W_K", "_W_V"):
            W = getattr(a, name)
            bias_name = {"W_Q": "b_Q", "_W_K": "_b_K", "_W_V": "_b_V"}[name]
            if b is not None:
                extra = torch.einsum("m,hmk->hk", b.float(), W.float()).to(W.dtype)
                old = getattr(a, bias_name)
                setattr(a, bias_name, extra if old is None else old + extra)
            if g is not None:
                W = W * g[None, :, None]
            if centre:
                W = W - W.mean(1, keepdim=True)
            setattr(a, name, W)
        block.ln1 = Norm(None)
    g = model.ln_final.w
    W_U = model.W_U if g is None else model.W_U * g[:, None]
    model.W_U = W_U - W_U.mean(0, keepdim=True) if centre else W_U
    model.ln_final = Norm(None)
    model.cfg.normalization_type += "Pre"
    return "fold_ln: norm weights folded into W_Q/W_K/W_V and W_U; norms now weightless"
