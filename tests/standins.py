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


def all_selected(config) -> bool:
    """Whether this run covers every real architecture's stand-in (tests marked `standins`, each a few
    minutes): in CI (CI set), or when asked for with `pytest -m standins`."""
    return "standins" in (config.getoption("markexpr") or "") or bool(os.environ.get("CI"))


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
                 chapters: dict | None = None, layers="all", attn_sae_folder: Path | None = None,
                 processing: str | None = None, dtype: str = "float32") -> Path:
    """A parameters file naming the stand-in and its SAE folder (small chapter settings by default);
    `attn_sae_folder` names hook_z SAEs for chapter 4, `processing` sets `model.processing` (e.g. "auto")."""
    import yaml

    chapters = chapters if chapters is not None else {
        "01_output_tokens": {"n_null": 128, "max_features": 0},
        "02_attention": {"n_null": 128, "top_pairs": 5, "n_pair_heads": 1},
        "07_in_context": {"n_tokens": 2048, "n_boot": 200, "n_ablate": 2, "ablate_positions": 4,
                          "n_random_pairs": 8},
    }
    model = {"name": str(model_folder), **({"processing": processing} if processing else {})}
    raw = {"target": target, "title": f"stand-in {target}", "model": model,
           "saes": {"source": str(sae_folder)}, "layers": layers, "device": "cpu", "dtype": dtype,
           "chapters": chapters}
    if attn_sae_folder is not None:
        raw["attn_saes"] = {"source": str(attn_sae_folder)}
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def build_target(arch: str, root: Path, *, seed: int = 5, n_layers: int = N_LAYERS,
                 chapters: dict | None = None, dtype: str = "float32") -> tuple[Path, Path, Path]:
    """A stand-in target set up as the book's real ones: the model, residual SAEs, hook_z SAEs recording the
    residual SAEs' processing (as the gpt2-small-hook-z-kk release does) and a params file
    `standin-{arch}.yaml` with `processing: auto` and `attn_saes` (as params/gpt2-small.yaml).
    Returns (params file, model folder, residual SAE folder)."""
    root = Path(root)
    folder = build_model(arch, root / f"model-{arch}", seed=seed, n_layers=n_layers)
    saes = build_saes(folder, root / f"saes-{arch}")
    flags = {"center_writing_weights": True} if arch == "gpt2" else {}
    attn = build_attn_saes(folder, root / f"attn-saes-{arch}", flags=flags)
    params = write_params(f"standin-{arch}", folder, saes, root / f"standin-{arch}.yaml", chapters=chapters,
                          attn_sae_folder=attn, processing="auto", dtype=dtype)
    return params, folder, saes


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


# ------------------------------------------------------------------------------------------------------------
# Attention-output (hook_z) SAEs for chapter 4, and the plain-torch reading of what their features write


def build_attn_saes(model_folder: Path, folder: Path, *, d_sae: int = 48, layers=None, seed: int = 2,
                    flags: dict | None = None) -> Path:
    """One random TopK SAE per layer on `blocks.L.attn.hook_z` (d_in = n_heads * head_dim, head-major), in
    sae-lens's saved format under `folder/layer_L/`; returns `folder`."""
    import json
    import warnings

    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    hf = json.loads((Path(model_folder) / "config.json").read_text())
    gpt2 = hf["model_type"] == "gpt2"
    n_heads = hf["n_head"] if gpt2 else hf["num_attention_heads"]
    d_model = hf["n_embd"] if gpt2 else hf["hidden_size"]
    d_in = n_heads * (hf.get("head_dim") or d_model // n_heads)
    n_layers = hf["n_layer"] if gpt2 else hf["num_hidden_layers"]
    gen = torch.Generator().manual_seed(seed)
    for layer in range(n_layers) if layers is None else layers:
        meta = SAEMetadata(hook_name=f"blocks.{layer}.attn.hook_z", model_name=Path(model_folder).name,
                           model_from_pretrained_kwargs=dict(flags or {}), prepend_bos=True, context_size=128)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=meta))
        with torch.no_grad():
            W_dec = torch.randn(d_sae, d_in, generator=gen)
            sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.save_model(Path(folder) / f"layer_{layer}")
    return Path(folder)


def reference_attn_writes(cfg: dict, sd: dict, W_dec: torch.Tensor, layer: int, *,
                          post_norm: bool = True) -> torch.Tensor:
    """[d_sae, d_model]: what hook_z decoder rows W_dec [d_sae, n_heads * head_dim] write into the residual
    stream of a Llama-like stand-in, read from the Hugging Face tensors: through `o_proj` and, for Gemma-2,
    the post-attention RMSNorm's multiplier 1 + weight (its per-position scale left out)."""
    writes = W_dec @ sd[f"model.layers.{layer}.self_attn.o_proj.weight"].T
    if cfg["model_type"] == "gemma2" and post_norm:
        writes = writes * (1.0 + sd[f"model.layers.{layer}.post_attention_layernorm.weight"])
    return writes
# A GPT-2 with planted layer-0 context heads (the known answer of chapter 5)

PLANTED_HEADS = (0, 2)
PLANTED_NEURON = 7
BAG_WORDS = (" dragon", " castle", " knight", " sword", " wizard")


def build_context_heads_gpt2(folder: Path, *, seed: int = 0, n_positions: int = 64) -> dict:
    """A 1-layer GPT-2 (64 dims, 4 heads, 256 neurons, the GPT-2 vocabulary) whose heads 0 and 2 are context
    heads by construction; returns {"folder", "heads", "neuron", "bag"} (the bag's token ids).

    The residual stream is split into orthogonal subspaces, all orthogonal to the all-ones vector (so
    LayerNorm's centring leaves them alone): tokens (40 dims; every embedding has norm 4), positions (12 dims;
    norm 2) and the planted heads' output (11 dims). Every input thus has the same LayerNorm scale, so the
    norm is exactly linear. The planted heads' queries and keys read only the positions (their patterns are
    the same in every window: the kernel is exact), their values read the tokens and they write only into the
    output subspace. Heads 1 and 3 read tokens with large query and key weights (sharp, content-dependent
    patterns). Neuron 7 reads only the output subspace, along the direction the planted heads give the bag
    tokens, whose embeddings share one direction g; every other neuron reads a random direction.
    """
    import transformers

    tok = tokenizer()
    gen = torch.Generator().manual_seed(seed)
    d, n_heads, d_head, d_mlp = 64, 4, 16, 256
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_embd=d, n_layer=1, n_head=n_heads,
                                  n_positions=n_positions, n_inner=d_mlp, bos_token_id=len(tok) - 1,
                                  eos_token_id=len(tok) - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    basis = torch.linalg.qr(torch.cat([torch.ones(d, 1), torch.randn(d, d - 1, generator=gen)], 1))[0]
    Q_tok, Q_pos, Q_out = basis[:, 1:41], basis[:, 41:53], basis[:, 53:64]

    def unit(x):
        return x / x.norm(dim=-1, keepdim=True)

    bag = [tok.encode(w)[0] for w in BAG_WORDS if len(tok.encode(w)) == 1]
    V = {h: torch.randn(40, d_head, generator=gen) / 40 ** 0.5 for h in PLANTED_HEADS}
    V2 = {h: torch.randn(d_head, 11, generator=gen) / d_head ** 0.5 for h in PLANTED_HEADS}
    M = sum(V[h] @ V2[h] for h in PLANTED_HEADS)  # [40, 11]: token coordinates -> output coordinates
    g = unit(M @ torch.randn(11, generator=gen))  # the bag's shared direction, one the heads carry
    z = unit(torch.randn(len(tok), 40, generator=gen))
    z[bag] = unit(g + 0.3 * unit(torch.randn(len(bag), 40, generator=gen)) / 40 ** 0.5)
    W_q, W_k, W_v, W_o = (torch.zeros(d, d) for _ in range(4))
    for h in range(n_heads):
        cols = slice(h * d_head, (h + 1) * d_head)
        if h in PLANTED_HEADS:  # positions only, moderate scores: a spread-out positional kernel
            W_q[:, cols] = Q_pos @ torch.randn(12, d_head, generator=gen) * 0.15
            W_k[:, cols] = Q_pos @ torch.randn(12, d_head, generator=gen) * 0.15
            W_v[:, cols] = Q_tok @ V[h]
            W_o[cols] = V2[h] @ Q_out.T
        else:  # content heads: large token-reading queries and keys; they write back into the tokens
            W_q[:, cols] = Q_tok @ torch.randn(40, d_head, generator=gen) * 3
            W_k[:, cols] = Q_tok @ torch.randn(40, d_head, generator=gen) * 3
            W_v[:, cols] = Q_tok @ torch.randn(40, d_head, generator=gen) / 40 ** 0.5
            W_o[cols] = torch.randn(d_head, 40, generator=gen) / d_head ** 0.5 @ Q_tok.T
    W_in = torch.randn(d, d_mlp, generator=gen) / d ** 0.5
    W_in[:, PLANTED_NEURON] = Q_out @ torch.linalg.pinv(M) @ g
    state = {"transformer.wte.weight": 4 * z @ Q_tok.T,
             "transformer.wpe.weight": 2 * unit(torch.randn(n_positions, 12, generator=gen)) @ Q_pos.T,
             "transformer.h.0.attn.c_attn.weight": torch.cat([W_q, W_k, W_v], 1),
             "transformer.h.0.attn.c_proj.weight": W_o, "transformer.h.0.mlp.c_fc.weight": W_in,
             "transformer.h.0.mlp.c_proj.weight": torch.randn(d_mlp, d, generator=gen) / d_mlp ** 0.5}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])
            elif name.endswith("bias"):
                param.zero_()
            elif "ln" in name:
                param.fill_(1.0)
    model.tie_weights()
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"folder": folder, "heads": list(PLANTED_HEADS), "neuron": PLANTED_NEURON, "bag": bag}
