"""Streaming weight loading: only the tensors the book needs, straight from a safetensors checkpoint.

`load_weights(path)` reads the token embedding, the unembedding, the final norm and, per block, the
pre-attention norm and the Q/K/V/O weights (the MLP and the other block norms only with `mlp=True`) of a
Gemma-2, Llama(-2, -3.x), Mistral, Qwen2 or GPT-2 checkpoint, without building the model and without ever
loading a whole file:
each tensor is opened lazily with `safetensors.safe_open` and converted to the requested dtype and device on
its own; a tensor larger than `_BLOCK_BYTES` (64 MiB, e.g. an embedding) is read in row blocks straight into
its preallocated output, reopening the file per block so that the memory map of one block is released before
the next one is read. Peak resident memory is therefore the returned tensors plus one block.

Tensors come back in TransformerLens conventions, shapes and values, as `HookedTransformer` stores them
*unprocessed* (`from_pretrained_no_processing`: no norm folding, no centring), so that they can replace
`model.W_U`, `model.blocks[l].attn.W_Q`, ... in the chapters' kernels:

* `W_E` [d_vocab, d_model]; `W_U` [d_model, d_vocab]: for tied embeddings (Gemma, GPT-2, tied Llama) the
  embedding's transpose, as TransformerLens copies it (a view of `W_E` when they are the same numbers).
* `ln_final_w` [d_model], `layers[l].ln1_w` [d_model]: the multiplier actually applied. Gemma's RMSNorm
  multiplies by `1 + weight`, and TransformerLens's Gemma conversion stores `weight + 1` (computed in fp32);
  so does this module. Llama's RMSNorm and GPT-2's LayerNorm weights are taken as they are (GPT-2 also
  gets the biases `ln_final_b`, `ln1_b`).
* `W_Q` [n_heads, d_model, d_head]; `W_K`, `W_V` [n_kv_heads, d_model, d_head] *raw, not repeated* over the
  query heads sharing them: TransformerLens's `attn._W_K` / `attn._W_V` under grouped-query attention (its
  `attn.W_K` repeats them with `repeat_interleave(n_heads // n_kv_heads)`, see
  `attention.kv_head_index`); `W_O` [n_heads, d_head, d_model]. GPT-2 adds `b_Q`, `b_K`, `b_V` [n_heads,
  d_head] and `b_O` [d_model]; Qwen2 has `b_Q` [n_heads, d_head] and `b_K`, `b_V` [n_kv_heads, d_head];
  Gemma, Llama and Mistral have no biases (TransformerLens's are zeros).
* Gemma's embedding scale: Gemma multiplies the embeddings by sqrt(d_model) in its forward pass;
  TransformerLens folds that factor into `W_E` when converting (`embed_tokens.weight * sqrt(d_model)`, the
  factor rounded to the model's dtype as Hugging Face does) and applies no scale in its forward pass, while
  `W_U` stays the unscaled embedding. `load_weights` does the same by default (`fold_embed_scale=True`); then
  `W_E` and `W_U` are two tensors, each of the embedding's size. `fold_embed_scale=False` keeps the raw
  embedding in `W_E` (and `W_U` a view of it), and `WeightSet.embed_scale` says how the model scales it.

Tensors may be non-contiguous views (`W_U` of a tied embedding or of an untied lm_head, `W_Q` of the
checkpoint's [n_heads * d_head, d_model] matrix, the MLP's projections, ...); their values and shapes are
TransformerLens's, their layout the checkpoint's. Call `.contiguous()` where a layout matters (a model built
from them keeps the views: `weightscope.load.hooked`).
A non-finite value (NaN/Inf) in any tensor read raises `NonFiniteWeightsError` unless `check_finite=False`.

`config_dims(arch, config)` reads the dimensions from config.json alone (no weights); `config_from_hf(ws,
name)` states a checkpoint's facts under TransformerLens's names (`ModelConfig`), for the weights-only model
and the `HookedTransformer` built from the same tensors.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_ARCHS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "LayerWeights",
    "NonFiniteWeightsError",
    "UnsupportedArchitectureError",
    "WeightSet",
    "detect_arch",
    "load_weights",
]

SUPPORTED_ARCHS = ("gemma2", "llama", "mistral", "qwen2", "gpt2")

# config.json `model_type` / `architectures[0]` -> the layout read here
_MODEL_TYPES = {arch: arch for arch in SUPPORTED_ARCHS}
_ARCHITECTURES = {
    "Gemma2ForCausalLM": "gemma2",
    "Gemma2Model": "gemma2",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "MistralForCausalLM": "mistral",
    "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
}
_BLOCK_BYTES = 64 << 20  # tensors above this are read in row blocks of about this size
_INDEX_NAME, _SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"


class CheckpointError(ValueError):
    """The checkpoint is unreadable, inconsistent with its config.json, or lacks a tensor."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path, its config.json or one of its shards does not exist."""


class UnsupportedArchitectureError(CheckpointError):
    """The checkpoint's architecture is none of `SUPPORTED_ARCHS`."""


class NonFiniteWeightsError(CheckpointError):
    """A tensor holds NaN or Inf values."""


# ----------------------------------------------------------------------------------------------------------
# Result containers
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LayerWeights:
    """One block's tensors, TransformerLens names and shapes (see the module docstring).

    Always: ln1_w, W_Q, W_K, W_V, W_O (W_K/W_V with n_kv_heads heads, not repeated). GPT-2 (and Qwen2's
    q/k/v): ln1_b, b_Q, b_K, b_V, b_O. With `mlp=True`: ln2_w, W_in [d_model, d_mlp], W_out [d_mlp, d_model];
    gated MLPs (Gemma, Llama) W_gate [d_model, d_mlp]; GPT-2 ln2_b, b_in, b_out; Gemma-2 its post-norms ln1_post_w
    (after attention) and ln2_post_w (after the MLP), stored as `1 + weight` like every Gemma norm.
    Absent tensors are None.
    """

    ln1_w: Tensor
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    ln1_b: Tensor | None = None
    b_Q: Tensor | None = None
    b_K: Tensor | None = None
    b_V: Tensor | None = None
    b_O: Tensor | None = None
    ln1_post_w: Tensor | None = None
    ln2_w: Tensor | None = None
    ln2_b: Tensor | None = None
    ln2_post_w: Tensor | None = None
    W_in: Tensor | None = None
    W_gate: Tensor | None = None
    W_out: Tensor | None = None
    b_in: Tensor | None = None
    b_out: Tensor | None = None

    def attention(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(W_Q, W_K, W_V, W_O), the operands of `attention.head_reads` (kv heads unexpanded)."""
        return self.W_Q, self.W_K, self.W_V, self.W_O


# TransformerLens state-dict name of each LayerWeights field ("{kv}" is "_" under grouped-query attention)
_TL_LAYER_NAMES = {
    "ln1_w": "ln1.w", "ln1_b": "ln1.b", "ln1_post_w": "ln1_post.w",
    "W_Q": "attn.W_Q", "W_K": "attn.{kv}W_K", "W_V": "attn.{kv}W_V", "W_O": "attn.W_O",
    "b_Q": "attn.b_Q", "b_K": "attn.{kv}b_K", "b_V": "attn.{kv}b_V", "b_O": "attn.b_O",
    "ln2_w": "ln2.w", "ln2_b": "ln2.b", "ln2_post_w": "ln2_post.w",
    "W_in": "mlp.W_in", "W_gate": "mlp.W_gate", "W_out": "mlp.W_out",
    "b_in": "mlp.b_in", "b_out": "mlp.b_out",
}


@dataclass
class Dims:
    """The model's shape and norm settings from config.json: the first fields of `WeightSet`."""

    arch: str
    d_model: int
    d_vocab: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    normalization_type: str
    eps: float


@dataclass
class WeightSet(Dims):
    """The tensors `load_weights` read, in TransformerLens conventions, and the model's dimensions.

    Dimensions (from config.json): arch, d_model, d_vocab, n_layers, n_heads, n_kv_heads (key/value heads,
    fewer than n_heads under grouped-query attention), d_head, d_mlp, eps (the norms' epsilon).
    W_E [d_vocab, d_model] (times `embed_scale` when `embed_scale_folded`), W_U [d_model, d_vocab],
    ln_final_w [d_model] (ln_final_b for GPT-2), layers {layer index: LayerWeights} for the layers requested.
    normalization_type: "RMS" (Gemma, Llama) or "LN" (GPT-2, whose norms also centre their input).
    embed_scale: the factor the model multiplies its embeddings by (sqrt(d_model) for Gemma, else 1.0);
    embed_scale_folded: whether W_E already holds it (TransformerLens's convention, the default).
    config: the checkpoint's config.json; files: the safetensors files read.
    """

    W_E: Tensor
    W_U: Tensor
    ln_final_w: Tensor
    ln_final_b: Tensor | None
    layers: dict[int, LayerWeights]
    embed_scale: float
    embed_scale_folded: bool
    tied_embeddings: bool
    dtype: torch.dtype
    device: torch.device
    config: dict = field(repr=False)
    files: list[Path] = field(repr=False)
    W_pos: Tensor | None = None  # [n_ctx, d_model] GPT-2's learned positions (read with mlp=True only)

    def __getitem__(self, layer: int) -> LayerWeights:
        try:
            return self.layers[layer]
        except KeyError:
            raise KeyError(f"layer {layer} was not loaded; loaded layers: {sorted(self.layers)}") from None

    @property
    def gqa(self) -> bool:
        """Whether TransformerLens treats the model as grouped-query (its `_W_K`/`_W_V` names)."""
        return self.arch == "gemma2" or (self.arch != "gpt2" and self.n_kv_heads != self.n_heads)

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor read, by its TransformerLens state-dict name ("embed.W_E", "blocks.0.attn._W_K", ...).

        For a grouped-query model the kv weights carry TransformerLens's underscore (`attn._W_K`): they are
        the raw [n_kv_heads, ...] tensors, not the repeated `attn.W_K`.
        """
        out = {"embed.W_E": self.W_E, "unembed.W_U": self.W_U, "ln_final.w": self.ln_final_w}
        if self.ln_final_b is not None:
            out["ln_final.b"] = self.ln_final_b
        if self.W_pos is not None:
            out["pos_embed.W_pos"] = self.W_pos
        kv = "_" if self.gqa else ""
        for layer, weights in sorted(self.layers.items()):
            for name, tl_name in _TL_LAYER_NAMES.items():
                value = getattr(weights, name)
                if value is not None:
                    out[f"blocks.{layer}.{tl_name.format(kv=kv)}"] = value
        return out

    def nbytes(self) -> int:
        """Bytes held by the returned tensors, a shared storage (a view such as a tied W_U) counted once."""
        seen: dict[int, int] = {}
        for tensor in self.tensors().values():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


# ----------------------------------------------------------------------------------------------------------
# Locating the checkpoint
# ----------------------------------------------------------------------------------------------------------


def _resolve(path_or_dir: str | Path) -> tuple[Path, dict[str, Path]]:
    """(folder holding config.json, {tensor name: safetensors file}) from a folder, a file or an index."""
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(
            f"No checkpoint at {path}: pass a folder holding config.json and model.safetensors (or a sharded "
            f"{_INDEX_NAME}), or one of those files."
        )
    if path.is_dir():
        folder = path
        if (path / _INDEX_NAME).is_file():
            path = path / _INDEX_NAME
        elif (path / _SINGLE_NAME).is_file():
            path = path / _SINGLE_NAME
        else:
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                found = ", ".join(p.name for p in candidates) or "no .safetensors file"
                raise CheckpointNotFoundError(
                    f"{folder} has neither {_SINGLE_NAME} nor {_INDEX_NAME} ({found}); pass the file itself."
                )
            path = candidates[0]
    folder = path.parent
    if path.name.endswith(".json"):
        return folder, _read_index(path)
    with _open(path) as handle:
        return folder, dict.fromkeys(handle.keys(), path)


def _read_index(path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"Cannot read the shard index {path}: {err!r} (expected a 'weight_map')."
        ) from err
    files = {name: path.parent / shard for name, shard in weight_map.items()}
    missing = sorted({str(p) for p in files.values() if not p.is_file()})
    if missing:
        raise CheckpointNotFoundError(
            f"The index {path} names shards that do not exist: {', '.join(missing)}."
        )
    return files


def _open(path: Path):
    """safe_open(path) on CPU with a clear error for a missing, truncated or corrupted file."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointNotFoundError(f"Checkpoint file {path} does not exist.")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
        hint = ""
        with open(path, "rb") as raw:
            head = raw.read(64)
        if head.startswith(b"version https://git-lfs"):
            hint = " It is a Git LFS pointer, not the weights: fetch the file (git lfs pull / hf download)."
        elif "incomplete" in str(err) or "not fully covered" in str(err):
            hint = " The file is shorter than its header says: it is truncated (an interrupted download?)."
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({path.stat().st_size:,} bytes): {err}.{hint}"
        ) from err


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"No config.json next to the weights in {folder}: it is needed for the head counts and sizes."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def detect_arch(config: dict) -> str:
    """The layout of a config.json dict: one of `SUPPORTED_ARCHS`, from `model_type`, else `architectures`."""
    model_type = config.get("model_type")
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    for name in config.get("architectures") or ():
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    raise UnsupportedArchitectureError(
        f"Unsupported architecture: model_type={model_type!r}, "
        f"architectures={config.get('architectures')!r}. "
        f"weightscope reads the weights of these architectures (config.json `model_type`): "
        f"{', '.join(SUPPORTED_ARCHS)}. Use a checkpoint of one of them, or add its layout to "
        "weightscope.load.checkpoints."
    )


# ----------------------------------------------------------------------------------------------------------
# Reading tensors
# ----------------------------------------------------------------------------------------------------------


class _Reader:
    """Reads named tensors one at a time (large ones in row blocks) into `dtype` on `device`."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype, device: torch.device, check_finite: bool):
        self.files, self.dtype, self.device, self.check_finite = files, dtype, device, check_finite
        self.read_files: set[Path] = set()
        self.progress = False

    def layer_done(self, layer: int, layers: list[int]) -> None:
        """A progress line per block read (stderr, so that it reaches the terminal during `make book`)."""
        if self.progress:
            done = layers.index(layer) + 1
            # "n/m [" is the shape the book runner drops from pages (as tqdm's bars): live only
            print(f"[weights] {done}/{len(layers)} [block {layer}] read", file=sys.stderr, flush=True)

    def has(self, name: str) -> bool:
        return name in self.files

    def file(self, name: str) -> Path:
        try:
            return self.files[name]
        except KeyError:
            sample = ", ".join(sorted(self.files)[:6])
            raise CheckpointError(
                f"Tensor {name!r} is not in the checkpoint (it has {len(self.files)} tensors, e.g. "
                f"{sample}). Is config.json describing these weights?"
            ) from None

    def read(self, name: str, shape: tuple[int, ...] | None = None, *,
             dtype: torch.dtype | None = None) -> Tensor:
        """Tensor `name` as `dtype` (default the reader's) on the device, always a copy; checks `shape`.

        The output is allocated once and filled from the file's memory map in row blocks of about
        `_BLOCK_BYTES` (one block for most tensors), the file reopened per block so that the pages of one
        block are unmapped before the next is read.
        """
        dtype = dtype or self.dtype
        path = self.file(name)
        self.read_files.add(path)
        with _open(path) as handle:
            source = handle.get_slice(name)
            actual = tuple(source.get_shape())
            if shape is not None and actual != tuple(shape):
                raise CheckpointError(
                    f"Tensor {name!r} in {path.name} has shape {list(actual)}, but config.json implies "
                    f"{list(shape)}: the config does not describe these weights."
                )
            out = torch.empty(actual, dtype=dtype, device=self.device)
            if not actual:  # a scalar
                out.copy_(handle.get_tensor(name))
                self._check(name, out)
                return out
            row_bytes = _source_itemsize(source.get_dtype()) * math.prod(actual[1:])
            rows = max(1, _BLOCK_BYTES // max(1, row_bytes))
            first = min(rows, actual[0])
            out[:first].copy_(source[0:first])  # safetensors' slices are views of the map: copy_ reads once
            del source
        self._check(name, out[:first])
        for start in range(first, actual[0], rows):
            stop = min(start + rows, actual[0])
            with _open(path) as handle:
                out[start:stop].copy_(handle.get_slice(name)[start:stop])
            self._check(name, out[start:stop], offset=start)
        return out

    def _check(self, name: str, tensor: Tensor, offset: int = 0) -> None:
        if self.check_finite:
            check_finite(name, tensor, where=self.files[name].name, offset=offset)


def check_finite(name: str, tensor: Tensor, *, where: str, offset: int = 0) -> None:
    """Raise `NonFiniteWeightsError` if floating `tensor` (rows from `offset` of tensor `name`, read from
    `where`) holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # One pass and no tensor-sized temporaries (torch.isfinite allocates several): aminmax propagates
    # NaN, and an Inf is an extreme. Only a failing tensor pays for locating its first bad value.
    low, high = torch.aminmax(tensor)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return
    bad = (~torch.isfinite(tensor)).nonzero()
    index = bad[0].tolist()
    value = tensor[tuple(index)].item()
    if index:
        index[0] += offset  # rows of a block are offset within the whole tensor
    raise NonFiniteWeightsError(
        f"Tensor {name!r} ({where}) holds non-finite values (NaN/Inf): {bad.shape[0]:,}"
        f"{' in the block from row ' + str(offset) if offset else ''}, "
        f"the first {value} at index {index} "
        f"(after conversion to {tensor.dtype}). The checkpoint is corrupted, or its values overflow the "
        "requested dtype (e.g. float16); pass check_finite=False to load it anyway."
    )


def scale_embedding(W_E: Tensor, scale: float, *, in_place: bool = False) -> Tensor:
    """W_E [d_vocab, d_model] times `scale` in its own dtype, as TransformerLens folds Gemma's sqrt(d_model)
    (`embed_tokens.weight * torch.tensor(sqrt(d_model), dtype=cfg.dtype)`).

    in_place: overwrite W_E (no second embedding-sized tensor; only where nothing else views it)."""
    factor = torch.tensor(scale, dtype=W_E.dtype, device=W_E.device)
    return W_E.mul_(factor) if in_place else W_E * factor


def _source_itemsize(safetensors_dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2}
    return sizes.get(safetensors_dtype, 1)


# ----------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------


def config_dims(arch: str, config: dict) -> Dims:
    """The dimensions of an `arch` model from its config.json (GPT-2's keys, or Gemma-2's and Llama's)."""
    def need(key: str):
        if key not in config:
            raise CheckpointError(f"config.json of this {arch} checkpoint lacks {key!r}.")
        return config[key]

    if arch == "gpt2":
        d_model, n_heads = int(need("n_embd")), int(need("n_head"))
        return Dims(arch, d_model, int(need("vocab_size")), int(need("n_layer")), n_heads, n_heads,
                     d_model // n_heads, int(config.get("n_inner") or 4 * d_model), "LN",
                     float(config.get("layer_norm_epsilon", 1e-5)))
    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    default_head = 256 if arch == "gemma2" else d_model // n_heads  # Gemma2Config's default head_dim is 256
    return Dims(
        arch, d_model, int(need("vocab_size")), int(need("num_hidden_layers")), n_heads,
        int(config.get("num_key_value_heads") or n_heads), int(config.get("head_dim") or default_head),
        int(need("intermediate_size")), "RMS", float(config.get("rms_norm_eps", 1e-6)),
    )


def _config_ties(arch: str, config: dict) -> bool:
    """config.json's `tie_word_embeddings`; absent, GPT-2 and Gemma-2 tie (W_U = W_E.T), the others do not."""
    return bool(config.get("tie_word_embeddings", arch in ("gemma2", "gpt2")))


def _prefix(reader: _Reader, candidates: tuple[str, ...], probe: str) -> str:
    for prefix in candidates:
        if reader.has(prefix + probe):
            return prefix
    raise CheckpointError(
        f"Cannot find the token embedding ({' or '.join(p + probe for p in candidates)}) in the checkpoint; "
        f"its tensors are e.g. {', '.join(sorted(reader.files)[:6])}."
    )


def _split_heads(W: Tensor, n: int) -> Tensor:
    """Hugging Face [n * d_head, d_model] -> TransformerLens [n, d_model, d_head] ("(n h) m -> n m h")."""
    return W.view(n, -1, W.shape[1]).transpose(1, 2)


def _load_rms_model(reader: _Reader, dims: Dims, config_ties: bool, layers: list[int], mlp: bool,
                    fold_embed_scale: bool) -> dict:
    """Gemma-2, Llama, Mistral, Qwen2: the same tensor names; Gemma adds 1 to its norm weights and scales its
    embedding; q/k/v/o biases (Qwen2, Llama with `attention_bias`) are read where the checkpoint has them."""
    gemma = dims.arch == "gemma2"
    p = _prefix(reader, ("model.", ""), "embed_tokens.weight")
    d, V, nh, nkv, dh = dims.d_model, dims.d_vocab, dims.n_heads, dims.n_kv_heads, dims.d_head

    def norm(name: str) -> Tensor:
        if not gemma:
            return reader.read(name, (d,))
        return (reader.read(name, (d,), dtype=torch.float32) + 1.0).to(reader.dtype)  # TL: weight.float() + 1

    out: dict = {}
    embed_scale = math.sqrt(d) if gemma else 1.0
    W_E = reader.read(p + "embed_tokens.weight", (V, d))
    if config_ties or not reader.has("lm_head.weight"):
        W_U = W_E.T
        tied = True
    else:
        W_U = reader.read("lm_head.weight", (V, d)).T
        tied = False
    if gemma and fold_embed_scale:  # W_U keeps the raw embedding
        W_E = scale_embedding(W_E, embed_scale)
        reader._check(p + "embed_tokens.weight", W_E)
    out.update(W_E=W_E, W_U=W_U, tied=tied, embed_scale=embed_scale, ln_final_w=norm(p + "norm.weight"),
               ln_final_b=None)
    blocks = {}
    for layer in layers:
        q = f"{p}layers.{layer}."
        weights = LayerWeights(
            ln1_w=norm(q + "input_layernorm.weight"),
            W_Q=_split_heads(reader.read(q + "self_attn.q_proj.weight", (nh * dh, d)), nh),
            W_K=_split_heads(reader.read(q + "self_attn.k_proj.weight", (nkv * dh, d)), nkv),
            W_V=_split_heads(reader.read(q + "self_attn.v_proj.weight", (nkv * dh, d)), nkv),
            W_O=reader.read(q + "self_attn.o_proj.weight", (d, nh * dh)).view(d, nh, dh).permute(1, 2, 0),
        )
        for field_name, proj, n in (("b_Q", "q", nh), ("b_K", "k", nkv), ("b_V", "v", nkv)):
            if reader.has(f"{q}self_attn.{proj}_proj.bias"):
                bias = reader.read(f"{q}self_attn.{proj}_proj.bias", (n * dh,))
                setattr(weights, field_name, bias.view(n, dh))
        if reader.has(q + "self_attn.o_proj.bias"):
            weights.b_O = reader.read(q + "self_attn.o_proj.bias", (d,))
        if mlp:
            if gemma:  # Gemma-2: post_attention_layernorm follows attention; the MLP has pre/post norms
                weights.ln1_post_w = norm(q + "post_attention_layernorm.weight")
                weights.ln2_w = norm(q + "pre_feedforward_layernorm.weight")
                weights.ln2_post_w = norm(q + "post_feedforward_layernorm.weight")
            else:
                weights.ln2_w = norm(q + "post_attention_layernorm.weight")
            weights.W_in = reader.read(q + "mlp.up_proj.weight", (dims.d_mlp, d)).T
            weights.W_gate = reader.read(q + "mlp.gate_proj.weight", (dims.d_mlp, d)).T
            weights.W_out = reader.read(q + "mlp.down_proj.weight", (d, dims.d_mlp)).T
        blocks[layer] = weights
        reader.layer_done(layer, layers)
    out["layers"] = blocks
    return out


def _load_gpt2(reader: _Reader, dims: Dims, config_ties: bool, layers: list[int], mlp: bool) -> dict:
    """GPT-2: Conv1D weights stored [in, out]; fused c_attn [d_model, 3 * d_model] = Q | K | V."""
    p = _prefix(reader, ("transformer.", ""), "wte.weight")  # the hub's gpt2 checkpoints have no prefix
    d, V, nh, dh = dims.d_model, dims.d_vocab, dims.n_heads, dims.d_head
    W_E = reader.read(p + "wte.weight", (V, d))
    if config_ties or not reader.has("lm_head.weight"):
        W_U, tied = W_E.T, True
    else:
        W_U, tied = reader.read("lm_head.weight", (V, d)).T, False
    out: dict = dict(W_E=W_E, W_U=W_U, tied=tied, embed_scale=1.0,
                     ln_final_w=reader.read(p + "ln_f.weight", (d,)),
                     ln_final_b=reader.read(p + "ln_f.bias", (d,)),
                     W_pos=reader.read(p + "wpe.weight") if mlp else None)  # the full model's positions
    blocks = {}
    for layer in layers:
        q = f"{p}h.{layer}."
        W = reader.read(q + "attn.c_attn.weight", (d, 3 * d))
        b = reader.read(q + "attn.c_attn.bias", (3 * d,)).view(3, nh, dh)
        # "m (i h) -> i m h" for each of Q, K, V
        W_Q, W_K, W_V = (part.view(d, nh, dh).transpose(0, 1) for part in W.split(d, dim=1))
        weights = LayerWeights(
            ln1_w=reader.read(q + "ln_1.weight", (d,)), ln1_b=reader.read(q + "ln_1.bias", (d,)),
            W_Q=W_Q, W_K=W_K, W_V=W_V, b_Q=b[0], b_K=b[1], b_V=b[2],
            W_O=reader.read(q + "attn.c_proj.weight", (d, d)).view(nh, dh, d),  # "(i h) m -> i h m"
            b_O=reader.read(q + "attn.c_proj.bias", (d,)),
        )
        if mlp:
            weights.ln2_w = reader.read(q + "ln_2.weight", (d,))
            weights.ln2_b = reader.read(q + "ln_2.bias", (d,))
            weights.W_in = reader.read(q + "mlp.c_fc.weight", (d, dims.d_mlp))
            weights.b_in = reader.read(q + "mlp.c_fc.bias", (dims.d_mlp,))
            weights.W_out = reader.read(q + "mlp.c_proj.weight", (dims.d_mlp, d))
            weights.b_out = reader.read(q + "mlp.c_proj.bias", (d,))
        blocks[layer] = weights
        reader.layer_done(layer, layers)
    out["layers"] = blocks
    return out


def _load(reader: _Reader, dims: Dims, config_ties: bool, layers: list[int], mlp: bool, fold: bool) -> dict:
    """The tensors of `dims.arch`'s layout; `config_ties`: whether config.json ties the embeddings."""
    if dims.arch == "gpt2":
        return _load_gpt2(reader, dims, config_ties, layers, mlp)
    return _load_rms_model(reader, dims, config_ties, layers, mlp, fold)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def load_weights(
    path_or_dir: str | Path,
    *,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    mlp: bool = False,
    layers: Iterable[int] | None = None,
    fold_embed_scale: bool = True,
    check_finite: bool = True,
    progress: bool = False,
) -> WeightSet:
    """Read the book's tensors from a Hugging Face safetensors checkpoint, one tensor at a time.

    path_or_dir: a folder with config.json and model.safetensors or model.safetensors.index.json (sharded),
        or one of those files (config.json must sit next to it).
    arch: one of `SUPPORTED_ARCHS`; default detected from config.json (`model_type`, then `architectures`).
        Llama covers Llama 1/2/3.x (grouped-query attention, tied or untied embeddings); Mistral and Qwen2
        share its layout (Qwen2 adds q/k/v biases).
    device, dtype: where and in which floating dtype every returned tensor lives; each tensor is converted on
        its own (large ones block by block), so the checkpoint's dtype (e.g. bf16) is never held twice.
    mlp: also read the MLP weights and the norms around the MLP (Gemma-2: all its post-norms), and GPT-2's
        position embedding: with them the tensors are a whole model (`weightscope.load.hooked`).
    layers: block indices to read (default all); other blocks are not touched.
    fold_embed_scale: Gemma only: multiply W_E by sqrt(d_model) as TransformerLens does (default). With
        False, W_E is the raw embedding, W_U a view of it (half the memory), `embed_scale` the model's factor.
    check_finite: raise `NonFiniteWeightsError` if a tensor holds NaN/Inf.
    progress: print a line per block read to stderr.

    Never builds the model and never loads a whole file (no `safetensors.torch.load_file`): only the tensors
    named above are read. Returns a `WeightSet` (see the module docstring for every tensor's convention).
    Raises CheckpointNotFoundError (missing path, config.json or shard), CheckpointError (truncated or
    corrupted file, missing tensor, shapes inconsistent with config.json), UnsupportedArchitectureError,
    NonFiniteWeightsError.
    """
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    if not dtype.is_floating_point:
        raise ValueError(f"load_weights returns floating-point tensors; got dtype={dtype}.")
    device = torch.device(device)
    folder, files = _resolve(path_or_dir)
    config = _read_config(folder)
    if arch is None:
        arch = detect_arch(config)
    elif arch not in SUPPORTED_ARCHS:
        raise UnsupportedArchitectureError(f"arch must be one of {SUPPORTED_ARCHS}; got {arch!r}.")
    dims = config_dims(arch, config)
    if dims.n_kv_heads < 1 or dims.n_heads % dims.n_kv_heads:
        raise CheckpointError(f"num_attention_heads={dims.n_heads} is not a multiple of "
                              f"num_key_value_heads={dims.n_kv_heads} in config.json.")
    if layers is None:
        chosen = list(range(dims.n_layers))
    else:
        chosen = sorted({int(layer) for layer in layers})
        bad = [layer for layer in chosen if not 0 <= layer < dims.n_layers]
        if bad:
            raise ValueError(
                f"layers {bad} out of range: the model has {dims.n_layers} blocks (0..{dims.n_layers - 1})."
            )

    reader = _Reader(files, dtype, device, check_finite)
    reader.progress = progress
    parts = _load(reader, dims, _config_ties(arch, config), chosen, mlp, fold_embed_scale)
    gemma = arch == "gemma2"
    return WeightSet(
        **asdict(dims),
        W_E=parts["W_E"], W_U=parts["W_U"], ln_final_w=parts["ln_final_w"], ln_final_b=parts["ln_final_b"],
        layers=parts["layers"], embed_scale=parts["embed_scale"],
        embed_scale_folded=bool(fold_embed_scale or not gemma), tied_embeddings=parts["tied"],
        dtype=dtype, device=device, config=config, files=sorted(reader.read_files), W_pos=parts.get("W_pos"),
    )


# ----------------------------------------------------------------------------------------------------------
# The model's facts under TransformerLens's names

_ARCH_NAMES = {"gemma2": "Gemma2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@dataclass
class ModelConfig:
    """The model's facts, under `HookedTransformerConfig`'s names (those the book reads)."""

    model_name: str
    original_architecture: str
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    n_key_value_heads: int | None  # None without grouped-query attention, as TransformerLens
    d_head: int
    d_mlp: int
    act_fn: str
    gated_mlp: bool
    normalization_type: str  # "RMS" | "LN" (or "RMSPre" | "LNPre" once fold_ln moved the weights)
    eps: float
    positional_embedding_type: str  # "rotary" | "standard"
    rotary_base: float = 10000.0
    rotary_dim: int | None = None
    rotary_adjacent_pairs: bool = False
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_factor: float = 8.0
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_original_ctx_len: int = 8192
    n_ctx: int = 2048
    attn_scale: float = 1.0
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    tie_word_embeddings: bool = False
    norm_plus_one: bool = False  # Gemma: the checkpoint stores w, the norm multiplies by 1 + w
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(d_model) (folded into W_E)
    device: str = "cpu"
    dtype: str = "float32"




def config_from_hf(ws: WeightSet, name: str) -> ModelConfig:
    """`ModelConfig` from a `WeightSet`'s dimensions and its config.json (rope, soft-capping, context)."""
    c = ws.config
    gpt2, gemma = ws.arch == "gpt2", ws.arch == "gemma2"
    rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}  # transformers 4 | 5 keys
    llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
    scalar = c.get("query_pre_attn_scalar") if gemma else None
    act = c.get("hidden_activation") or c.get("hidden_act") or c.get("activation_function") or "gelu_new"
    return ModelConfig(
        model_name=name, original_architecture=_ARCH_NAMES[ws.arch], n_layers=ws.n_layers, d_model=ws.d_model,
        d_vocab=ws.d_vocab, n_heads=ws.n_heads, n_key_value_heads=ws.n_kv_heads if ws.gqa else None,
        d_head=ws.d_head, d_mlp=ws.d_mlp, act_fn=act, gated_mlp=not gpt2,
        normalization_type=ws.normalization_type, eps=ws.eps,
        positional_embedding_type="standard" if gpt2 else "rotary",
        rotary_base=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        rotary_dim=None if gpt2 else int(ws.d_head * c.get("partial_rotary_factor", 1.0)),
        use_NTK_by_parts_rope=llama3,
        NTK_by_parts_factor=float(rope.get("factor", 8.0)),
        NTK_by_parts_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        NTK_by_parts_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        NTK_original_ctx_len=int(rope.get("original_max_position_embeddings", 8192)),
        n_ctx=int(c.get("n_positions") or c.get("max_position_embeddings") or 2048),
        attn_scale=math.sqrt(scalar) if scalar else math.sqrt(ws.d_head),
        attn_scores_soft_cap=float(c.get("attn_logit_softcapping") or -1.0) if gemma else -1.0,
        output_logits_soft_cap=float(c.get("final_logit_softcapping") or -1.0) if gemma else -1.0,
        tie_word_embeddings=ws.tied_embeddings, norm_plus_one=gemma, embed_scale=ws.embed_scale,
        device=str(ws.device), dtype=str(ws.dtype).removeprefix("torch."),
    )
