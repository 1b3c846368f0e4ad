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
from huggingface_hub import hf_hub_download

from weightscope.config import paths
from weightscope.config.params import PROCESSING_FLAGS  # TransformerLens processing options; all off unless asked for
from weightscope.load.llama2c import KNOWN_SHA256, Llama2cCheckpoint, read_checkpoint
from weightscope.load.tokenizer import Llama2cTokenizer

if TYPE_CHECKING:  # TransformerLens is imported only where a full model is built
    from transformer_lens import HookedTransformer, HookedTransformerConfig

DEMO_MODEL = "stories260K"
HUB_REPO = "karpathy/tinyllamas"
CHECKPOINT_FILE, TOKENIZER_FILE = "stories260K.bin", "tok512.bin"



class ModelUnavailableError(FileNotFoundError):
    """The demo model's files are neither on disk nor downloadable."""


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
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# stories260K


def stories260k_dir() -> Path:
    """Folder holding `stories260K.bin` and `tok512.bin`: `WEIGHTSCOPE_MODELS/stories260K`, else the download
    cache (downloading there from the hub if needed). Raises `ModelUnavailableError` when neither works."""
    candidates = []
    if paths.models_dir() is not None:
        candidates.append(paths.models_dir() / DEMO_MODEL)
    cache = paths.cache_dir() / "models" / DEMO_MODEL
    candidates.append(cache)
    for folder in candidates:
        if (folder / CHECKPOINT_FILE).is_file() and (folder / TOKENIZER_FILE).is_file():
            return folder
    try:
        for filename in (CHECKPOINT_FILE, TOKENIZER_FILE):
            hf_hub_download(HUB_REPO, f"{DEMO_MODEL}/{filename}", local_dir=cache.parent)
    except Exception as err:  # offline, hub unreachable, HF_HUB_OFFLINE=1, ...: all mean "not available"
        looked = ", ".join(str(folder) for folder in candidates)
        raise ModelUnavailableError(
            f"The {DEMO_MODEL} model files ({CHECKPOINT_FILE}, {TOKENIZER_FILE}) are not on disk (looked in "
            f"{looked}) and downloading them from the Hugging Face hub ({HUB_REPO}) failed: "
            f"{type(err).__name__}: {err}. Set WEIGHTSCOPE_MODELS to a folder containing {DEMO_MODEL}/, or "
            "connect to the internet."
        ) from err
    return cache


def stories260k_tokenizer(folder: Path | None = None, model_max_length: int = 512) -> Llama2cTokenizer:
    """The demo model's tokenizer (sha256-checked)."""
    folder = folder or stories260k_dir()
    return Llama2cTokenizer(
        folder / TOKENIZER_FILE,
        vocab_size=512,
        expected_sha256=KNOWN_SHA256[TOKENIZER_FILE],
        model_max_length=model_max_length,
    )


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


def llama2c_state_dict(ckpt: Llama2cCheckpoint, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """HookedTransformer state dict (unprocessed) of a llama2.c checkpoint.

    Shapes: embed.W_E [d_vocab, d_model]; W_Q [n_heads, d_model, d_head]; _W_K, _W_V [n_kv_heads, d_model,
    d_head] (W_K, W_V without the underscore when there is no GQA); W_O [n_heads, d_head, d_model]; ln1.w,
    ln2.w, ln_final.w [d_model]; mlp.W_gate = w1^T and mlp.W_in = w3^T [d_model, d_mlp] (TransformerLens
    computes silu(x W_gate) * (x W_in)); mlp.W_out = w2^T [d_mlp, d_model]; unembed.W_U = W_E^T
    [d_model, d_vocab] when tied; all biases zero.
    """
    w = ckpt.weights
    n_heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model
    n_kv = cfg.n_key_value_heads or n_heads
    kv = "_" if cfg.n_key_value_heads else ""

    def heads_in(weight: torch.Tensor, n: int) -> torch.Tensor:
        """[n * d_head, d_model] (y = W x, head-major rows) -> [n, d_model, d_head]."""
        return weight.reshape(n, d_head, d_model).transpose(1, 2)

    sd = {"embed.W_E": w["tok_embeddings"], "ln_final.w": w["norm"]}
    sd["unembed.W_U"] = w["output"].T
    sd["unembed.b_U"] = torch.zeros(cfg.d_vocab_out)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        sd[p + "ln1.w"] = w["attention_norm"][layer]
        sd[p + "ln2.w"] = w["ffn_norm"][layer]
        sd[p + "attn.W_Q"] = heads_in(w["wq"][layer], n_heads)
        sd[p + f"attn.{kv}W_K"] = heads_in(w["wk"][layer], n_kv)
        sd[p + f"attn.{kv}W_V"] = heads_in(w["wv"][layer], n_kv)
        # wo: [d_model, n_heads * d_head] -> W_O [n_heads, d_head, d_model]
        sd[p + "attn.W_O"] = w["wo"][layer].T.reshape(n_heads, d_head, d_model)
        sd[p + "attn.b_Q"] = torch.zeros(n_heads, d_head)
        sd[p + f"attn.{kv}b_K"] = torch.zeros(n_kv, d_head)
        sd[p + f"attn.{kv}b_V"] = torch.zeros(n_kv, d_head)
        sd[p + "attn.b_O"] = torch.zeros(d_model)
        sd[p + "mlp.W_gate"] = w["w1"][layer].T
        sd[p + "mlp.W_in"] = w["w3"][layer].T
        sd[p + "mlp.W_out"] = w["w2"][layer].T
        sd[p + "mlp.b_in"] = torch.zeros(cfg.d_mlp)
        sd[p + "mlp.b_out"] = torch.zeros(d_model)
    return {name: tensor.contiguous().clone() for name, tensor in sd.items()}


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
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"Unknown model {name!r}: it is neither {DEMO_MODEL!r} (the offline demo model) nor a model "
            "TransformerLens knows. Valid names are in "
            "`transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES` (aliases in "
            "`transformer_lens.supported_models.MODEL_ALIASES`), e.g. 'gpt2-small', 'gemma-2-2b', "
            "'meta-llama/Llama-3.1-8B'."
        ) from None


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


def greedy_generate(model, prompt: str, n_tokens: int) -> torch.Tensor:
    """Greedy continuation: [1 + len(prompt tokens) + n_tokens] ids, BOS first (stops early at BOS/EOS)."""
    ids = model.to_tokens(prompt)
    stop = {model.tokenizer.bos_token_id, model.tokenizer.eos_token_id}
    for _ in range(n_tokens):
        next_id = model(ids)[0, -1].argmax()
        if int(next_id) in stop:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0]


# ----------------------------------------------------------------------------------------------------
# The full model of any target (the chapters that run forward passes)


def load_full_model(name: str, *, device="cpu", dtype=torch.float32, base: Path | None = None, **flags):
    """The forward-pass `HookedTransformer` of `model.name`: built by TransformerLens for the demo and the
    models it knows, else from the (local or downloaded) Hugging Face folder's own tensors and config.json
    (`weightscope.load.hooked`), so that every hook exists for every target.

    `flags`: TransformerLens processing flags (`PROCESSING_FLAGS`), applied either way.
    """
    from weightscope.config.paths import progress_enabled
    from weightscope.load import sources
    from weightscope.load.hooked import hooked_from_folder

    source = sources.resolve_model(name, base=base)
    if source.kind == "demo" or source.tl_name:
        return load_model(source.tl_name or name, device=device, dtype=dtype, **flags)
    folder = sources.model_folder(source, progress=progress_enabled())
    return hooked_from_folder(folder, name=Path(str(name)).name, device=device, dtype=dtype,
                              progress=progress_enabled(), **flags)
