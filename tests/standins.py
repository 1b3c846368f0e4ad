"""Tiny random Hugging Face checkpoints ("stand-ins") of the supported architectures, with local SAE folders.

Each stand-in is a real `transformers` model at toy width, saved with `save_pretrained` next to the GPT-2
tokenizer (from `../shared/tokenizers/gpt2`, so no download), with every parameter randomised, norm weights
and biases included, so that a wrong fold (Gemma's raw weight instead of 1 + weight, GPT-2 without its
centring, a wrong grouped-query head map) changes the numbers. The SAE folders are sae-lens's saved format
(`cfg.json` + `sae_weights.safetensors`), one `layer_L/` per residual layer.

    folder = build_model("gemma2", tmp / "gemma2")
    saes = build_saes(folder, tmp / "gemma2-saes")
    params = write_params("standin-gemma2", folder, saes, tmp / "standin-gemma2.yaml")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
if not SHARED.exists() and os.environ.get("WEIGHTSCOPE_MODELS"):  # a checkout elsewhere: the models' neighbour
    SHARED = Path(os.environ["WEIGHTSCOPE_MODELS"]).parent
GPT2_TOKENIZER = SHARED / "tokenizers" / "gpt2"
ARCHS = ("gemma2", "llama", "gpt2", "mistral", "qwen2")
REAL_ARCHS = ("gemma2", "llama", "gpt2")  # the architectures of the book's real targets
N_LAYERS = 3


def tokenizer():
    """The GPT-2 tokenizer (50,257 tokens) from the shared folder."""
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab=str(GPT2_TOKENIZER / "vocab.json"),
                             merges=str(GPT2_TOKENIZER / "merges.txt"))


def config(arch: str, vocab_size: int, n_layers: int = N_LAYERS, **overrides):
    """A transformers config of `arch` at toy width (64 residual dims, 4 heads, 2 kv heads where GQA)."""
    import transformers as T

    eos = dict(bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    llama_like = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **eos)
    if arch == "gemma2":  # soft-capping and post-norms are Gemma2Config's defaults
        cfg = T.Gemma2Config(**{**llama_like, "head_dim": 16, "query_pre_attn_scalar": 16,
                                "sliding_window": 64, "pad_token_id": 0})
    elif arch == "llama":  # Llama-3.1: llama3 rope scaling, GQA, untied unembedding
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = T.LlamaConfig(**llama_like, tie_word_embeddings=False, rope_parameters=rope)
    elif arch == "mistral":
        cfg = T.MistralConfig(**llama_like, sliding_window=64, tie_word_embeddings=False)
    elif arch == "qwen2":  # q/k/v biases
        cfg = T.Qwen2Config(**llama_like, tie_word_embeddings=False)
    elif arch == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
                           **eos)
    else:
        raise ValueError(f"no stand-in for {arch!r}; choose one of {ARCHS}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def randomise(model, seed: int = 0) -> None:
    """Every parameter random: weights ~ N(0, 0.2²), biases N(0, 0.1²), norm weights N(0, 0.5²) + offset.

    Norm weights get an offset (0 for Gemma, whose norms multiply by 1 + weight; 1 elsewhere) so the model
    stays well conditioned while `weight` and `1 + weight` differ everywhere.
    """
    gen = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type == "gemma2"
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name or name.split(".")[-2].startswith("ln"):
                param.copy_(noise * 0.5 + (0.0 if gemma or name.endswith("bias") else 1.0))
            elif name.endswith("bias"):
                param.copy_(noise * 0.1)
            else:
                param.copy_(noise * 0.2)


def build_model(arch: str, folder: Path, *, seed: int = 0, n_layers: int = N_LAYERS, shard: bool = False,
                dtype: torch.dtype = torch.float32, vocab_size: int | None = None, **overrides) -> Path:
    """Save a random `arch` stand-in (weights, config.json, tokenizer) in `folder`; returns the folder.

    vocab_size: the model's vocabulary (default: the tokenizer's 50,257; a larger one has ids no text makes)."""
    import transformers

    tok = tokenizer()
    cfg = config(arch, vocab_size or len(tok), n_layers, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomise(model, seed)
    if cfg.tie_word_embeddings and hasattr(model, "lm_head"):
        model.tie_weights()
    model = model.to(dtype)
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size="2MB" if shard else "50GB")
    tok.save_pretrained(folder)
    return folder


def build_saes(model_folder: Path, folder: Path, *, d_sae: int = 48, layers=None,
               hook: str = "hook_resid_post", seed: int = 1, flags: dict | None = None) -> Path:
    """One random TopK SAE per layer, in sae-lens's saved format under `folder/layer_L/`; returns `folder`.

    flags: the TransformerLens processing the SAEs record (`model_from_pretrained_kwargs`); default
    {"center_writing_weights": True} for GPT-2 (as the gpt2-small-res-jb release), else {}.
    """
    import json
    import warnings

    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    hf = json.loads((Path(model_folder) / "config.json").read_text())
    gpt2 = hf["model_type"] == "gpt2"
    d_model = hf["n_embd"] if gpt2 else hf["hidden_size"]
    n_layers = hf["n_layer"] if gpt2 else hf["num_hidden_layers"]
    if flags is None:
        flags = {"center_writing_weights": True} if gpt2 else {}
    gen = torch.Generator().manual_seed(seed)
    for layer in range(n_layers) if layers is None else layers:
        meta = SAEMetadata(hook_name=f"blocks.{layer}.{hook}", model_name=Path(model_folder).name,
                           model_from_pretrained_kwargs=dict(flags), prepend_bos=True, context_size=128)
        with warnings.catch_warnings():  # sae-lens warns about recorded processing flags: they are the point
            warnings.simplefilter("ignore")
            sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=8, metadata=meta))
        with torch.no_grad():
            W_dec = torch.randn(d_sae, d_model, generator=gen)
            sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(torch.randn(d_model, d_sae, generator=gen) / d_model**0.5)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
            sae.b_dec.copy_(torch.randn(d_model, generator=gen) * 0.1)
        sae.save_model(Path(folder) / f"layer_{layer}")
    return Path(folder)


def write_params(target: str, model_folder: Path, sae_folder: Path, path: Path, *,
                 chapters: dict | None = None, layers="all") -> Path:
    """A parameters file naming the stand-in and its SAE folder (small chapter settings by default)."""
    import yaml

    chapters = chapters if chapters is not None else {
        "01_output_tokens": {"n_null": 128, "max_features": 0},
        "02_attention": {"n_null": 128, "top_pairs": 5, "n_pair_heads": 1},
    }
    raw = {"target": target, "title": f"stand-in {target}", "model": {"name": str(model_folder)},
           "saes": {"source": str(sae_folder)}, "layers": layers, "device": "cpu", "dtype": "float32",
           "chapters": chapters}
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------------------
# An independent plain-torch reading of the Hugging Face weights (what the book's numbers must equal)

WRONG_FOLDS = ("gemma_raw_weight", "gpt2_no_centring", "gqa_modulo")


def hf_weights(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, every tensor of the checkpoint in fp32), read whole with safetensors, names unchanged."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    sd = {}
    for path in sorted(folder.glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(str(path)).items()})
    return json.loads((folder / "config.json").read_text()), sd


def _get(sd: dict, *names: str) -> torch.Tensor:
    for name in names:
        if name in sd:
            return sd[name]
    raise KeyError(names)


def reference_output_matrix(cfg: dict, sd: dict, wrong: str | None = None) -> torch.Tensor:
    """[d_model, d_vocab]: the final norm's multiplier times the unembedding (HF `lm_head`, or the embedding
    when tied), centred over d_model for GPT-2's LayerNorm."""
    arch = cfg["model_type"]
    if arch == "gpt2":
        g = _get(sd, "transformer.ln_f.weight", "ln_f.weight")
        E = _get(sd, "transformer.wte.weight", "wte.weight")
        M = g[:, None] * _get(sd, "lm_head.weight", "transformer.wte.weight", "wte.weight").T
        return M if wrong == "gpt2_no_centring" else M - M.mean(0, keepdim=True)
    g = sd["model.norm.weight"]
    if arch == "gemma2" and wrong != "gemma_raw_weight":
        g = 1.0 + g
    W_U = sd["lm_head.weight"] if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings") else \
        sd["model.embed_tokens.weight"]
    return g[:, None] * W_U.T


def reference_input_matrix(cfg: dict, sd: dict, centre: bool, wrong: str | None = None) -> torch.Tensor:
    """[d_model, d_vocab]: the embeddings as they enter the residual stream (Gemma: times sqrt(d_model),
    rounded to the dtype as HF does; GPT-2 with the SAEs' centre_writing_weights: centred over d_model)."""
    arch = cfg["model_type"]
    if arch == "gpt2":
        E = _get(sd, "transformer.wte.weight", "wte.weight")
        return (E - E.mean(1, keepdim=True) if centre and wrong != "gpt2_no_centring" else E).T
    E = sd["model.embed_tokens.weight"]
    if arch == "gemma2":
        E = E * torch.tensor(cfg["hidden_size"] ** 0.5, dtype=E.dtype)
    return E.T


def reference_reads(cfg: dict, sd: dict, D: torch.Tensor, layer: int, centre: bool,
                    wrong: str | None = None) -> dict[str, torch.Tensor]:
    """Query, key and value reads [n, n_heads] of directions D [n, d_model] by block `layer`'s heads, from
    the HF tensors: d~ = norm-folded d; q_h = ||d~ Wq_h^T||, k_h = ||d~ Wk_kv(h)^T||,
    v_h = ||(d~ Wv_kv(h)^T) Wo[:, h]^T|| (GPT-2 with centre: that output centred over d_model),
    kv(h) = h // rep.
    """
    arch = cfg["model_type"]
    D = D.float()
    if arch == "gpt2":
        p = f"transformer.h.{layer}." if f"transformer.h.{layer}.ln_1.weight" in sd else f"h.{layer}."
        d, nh = cfg["n_embd"], cfg["n_head"]
        nkv, dh = nh, d // nh
        Dt = D if wrong == "gpt2_no_centring" else D - D.mean(1, keepdim=True)
        Dt = Dt * sd[p + "ln_1.weight"]
        W = sd[p + "attn.c_attn.weight"]  # Conv1D [d, 3d]: y = x W
        q, k, v = (Dt @ W[:, i * d:(i + 1) * d] for i in range(3))
        Wo = sd[p + "attn.c_proj.weight"].T  # as nn.Linear [out d, in nh*dh]
    else:
        p = f"model.layers.{layer}."
        nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        dh = cfg.get("head_dim") or cfg["hidden_size"] // nh
        g = sd[p + "input_layernorm.weight"]
        if arch == "gemma2" and wrong != "gemma_raw_weight":
            g = 1.0 + g
        Dt = D * g
        q, k, v = (Dt @ sd[p + f"self_attn.{x}_proj.weight"].T for x in "qkv")
        Wo = sd[p + "self_attn.o_proj.weight"]
    rep = nh // nkv
    q, k, v = q.view(len(D), nh, dh), k.view(len(D), nkv, dh), v.view(len(D), nkv, dh)
    kv = [(h % nkv) if wrong == "gqa_modulo" else h // rep for h in range(nh)]
    out = {"q": q.norm(dim=2), "k": torch.stack([k[:, kv[h]].norm(dim=1) for h in range(nh)], 1)}
    vs = []
    for h in range(nh):
        o = v[:, kv[h]] @ Wo[:, h * dh:(h + 1) * dh].T
        if arch == "gpt2" and centre and wrong != "gpt2_no_centring":
            o = o - o.mean(1, keepdim=True)
        vs.append(o.norm(dim=1))
    out["v"] = torch.stack(vs, 1)
    return out


def applicable_wrong_folds(arch: str) -> list[str]:
    """The deliberate mistakes that change this architecture's numbers."""
    by_arch = {"gemma2": ["gemma_raw_weight", "gqa_modulo"], "gpt2": ["gpt2_no_centring"]}
    return by_arch.get(arch, ["gqa_modulo"])
