"""Random checkpoints at the book's real targets' widths, with SAE folders in the real releases' formats.

The tiny stand-ins of `standins.py` check that every fold and head map is right; these check what a user meets
at real width: time, memory and page weight. Same builders (`standins.build_model`, the same randomisation),
at the real widths and vocabularies, depth a parameter:

    gpt2    GPT-2 small: 768 dims, 12 heads of 64, MLP 3,072, 1,024 positions, vocabulary 50,257
    llama   Llama-3.1-8B: 4,096 dims, 32 query / 8 key-value heads of 128, MLP 14,336, vocabulary 128,256
    gemma2  Gemma-2-2B: 2,304 dims, 8 query / 4 key-value heads of 256, MLP 9,216, vocabulary 256,000

(the tokenizer is GPT-2's, given entries up to the real vocabulary's size that no text produces, so that the
lenses score as many tokens as on the real target: `full_vocabulary`), and SAE folders as sae-lens saves them
(`cfg.json` + `sae_weights.safetensors`), as the releases record them:

    gpt2-small-res-jb      standard ReLU, 24,576 features, blocks.L.hook_resid_pre, center_writing_weights
    gpt2-small-hook-z-kk   standard ReLU, 24,576 features, blocks.L.attn.hook_z (reshape hook_z), same flags
    gemma-scope res 16k    JumpReLU, 16,384 features, blocks.L.hook_resid_post, no processing flags
    gemma-scope att 16k    JumpReLU, 16,384 features on hook_z (8 x 256 = 2,048 inputs)
    llama_scope_lxr_8x     TopK (k = 50), 32,768 features, blocks.L.hook_resid_post, the dataset-norm scaling
                           folded into the weights as sae-lens does on load (decoder rows of varying norm)

Random encoders fire on about half their features; released SAEs fire on tens. So that every step whose cost
grows with firings (chapter 7's top firings, chapter 4's families) costs what it will at real width,
`build_release_saes` calibrates each ReLU and JumpReLU SAE's encoder bias on the stand-in's own activations
(`calibrate_l0`): a feature fires where its pre-activation is `z` standard deviations above its mean over
random tokens, one `z` chosen for a mean L0 of `l0` (32 by default; TopK fixes its own: k = 50).

Real-width files are large (a GPT-2-width SAE is 150 MB, one Llama-width layer 0.9 GB): write them only in
temporary folders, from slow tests and `bench/bench_book.py`.

    folder = build_model("gpt2", tmp / "gpt2", n_layers=2)
    saes, attn = build_release_saes("gpt2", folder, tmp / "saes")
    params = write_params("realwidth-gpt2", folder, saes, tmp / "realwidth-gpt2.yaml", attn_saes=attn)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

import standins

WIDTHS = {  # transformers config fields of each real target (vocabulary included)
    "gpt2": dict(n_embd=768, n_head=12, n_inner=3072, n_positions=1024, vocab_size=50257),
    "llama": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, max_position_embeddings=8192, vocab_size=128256),
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
                   vocab_size=256000),
}
# (architecture, d_sae, hook, k or None, processing flags) of each release's residual and hook_z SAEs
RELEASES = {
    "gpt2": {"res": ("standard", 24576, "hook_resid_pre", None, {"center_writing_weights": True}),
             "att": ("standard", 24576, "attn.hook_z", None, {"center_writing_weights": True})},
    "gemma2": {"res": ("jumprelu", 16384, "hook_resid_post", None, {}),
               "att": ("jumprelu", 16384, "attn.hook_z", None, {})},
    "llama": {"res": ("topk", 32768, "hook_resid_post", 50, {}), "att": None},
}


def build_model(arch: str, folder: Path, *, n_layers: int = 2, seed: int = 0) -> Path:
    """A random `arch` checkpoint at its real width and vocabulary, `n_layers` deep (`standins.build_model`)."""
    if arch not in WIDTHS:
        raise ValueError(f"no real-width stand-in for {arch!r}; choose one of {sorted(WIDTHS)}")
    overrides = dict(WIDTHS[arch])
    if arch == "gpt2":
        overrides.update(n_layer=n_layers)
    else:
        overrides.update(num_hidden_layers=n_layers)
    vocab = overrides.pop("vocab_size")
    model_folder = standins.build_model(arch, folder, seed=seed, n_layers=n_layers, vocab_size=vocab, **overrides)
    _rescale(model_folder)
    full_vocabulary(model_folder, vocab)
    return model_folder


def full_vocabulary(folder: Path, d_vocab: int) -> None:
    """Give the stand-in's tokenizer (GPT-2's, 50,257 tokens) entries up to `d_vocab` - 1, the real target's
    vocabulary less the config's BOS/EOS id: ordinary words (" zzq" + letters) with no merge that makes them,
    so text tokenizes as before while every id is a content token. Without them the chapters' clean vocabulary
    (`token_categories`: ids past the tokenizer count as special) would be GPT-2's, and every [features x
    vocabulary] product a fifth of Gemma's (256,000) and two fifths of Llama's (128,256)."""
    path = Path(folder) / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    expected = max(len(vocab), d_vocab - 1)
    for i in range(len(vocab), d_vocab - 1):
        word, n = "", i
        while True:  # the id in base 26, as letters (GPT-2's byte-level alphabet maps a-z to themselves)
            word, n = chr(97 + n % 26) + word, n // 26
            if n == 0:
                break
        vocab["\u0120zzq" + word] = i  # U+0120: the byte-level form of a leading space
    if len(vocab) != expected:  # an added word equal to one of GPT-2's would have replaced its id
        raise RuntimeError(f"{path}: the added entries collide with the tokenizer's own")
    path.write_text(json.dumps(tok, ensure_ascii=False))


def _rescale(folder: Path) -> None:
    """Scale the randomised matrices to 1/sqrt(fan-in) (the stand-ins' N(0, 0.2^2) is for 64 dims: at real
    width it would saturate every softmax), keeping norms and biases as `standins.randomise` set them."""
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(folder).glob("*.safetensors")):
        sd = load_file(str(path))
        for name, W in sd.items():
            if W.ndim == 2 and not any(k in name for k in ("embed", "wte", "wpe", "lm_head")):
                fan_in = W.shape[0] if ".c_" in name else W.shape[1]  # GPT-2's Conv1D stores [in, out]
                sd[name] = (W / 0.2 / fan_in**0.5).to(W.dtype)
        save_file(sd, str(path), metadata={"format": "pt"})


def build_release_saes(arch: str, model_folder: Path, folder: Path, *, layers=None, seed: int = 1,
                       l0: float | None = 32) -> tuple[Path, Path | None]:
    """The residual SAE folder and (where the release exists) the hook_z SAE folder of `arch`'s real release,
    one random SAE per layer, encoders calibrated to a mean L0 of about `l0` (None: left random, half of the
    features firing): (res folder, att folder or None)."""
    hf = json.loads((Path(model_folder) / "config.json").read_text())
    n_layers = hf.get("n_layer") or hf["num_hidden_layers"]
    layers = list(range(n_layers)) if layers is None else list(layers)
    folders = []
    for kind, offset in (("res", 0), ("att", 1)):
        spec = RELEASES[arch][kind]
        if spec is None:
            folders.append(None)
            continue
        out = write_saes(Path(folder) / kind, hf, layers, *spec, seed=seed + offset)
        if l0 is not None and spec[0] != "topk":
            calibrate_l0(model_folder, out, l0=l0, flags=spec[4], seed=seed + offset)
        folders.append(out)
    return folders[0], folders[1]


def _site_inputs(model, sae, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 [n_tokens, ...]: the SAE's hook activations on `tokens` (hook_z keeps its [heads, d_head]: sae-lens
    flattens it in `process_sae_in`)."""
    hook = sae.cfg.metadata.hook_name
    layer = int(hook.split(".")[1])
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=layer + 1)
    return cache[hook].flatten(0, 1).float()


@torch.no_grad()
def calibrate_l0(model_folder: Path, sae_folder: Path, *, l0: float = 32, flags: dict | None = None,
                 n_rows: int = 8, row_len: int = 256, seed: int = 1, device: str | None = None
                 ) -> dict[int, float]:
    """Set each ReLU / JumpReLU SAE's `b_enc` (and JumpReLU threshold) in `sae_folder/layer_L/` so that a
    feature fires where its encoder pre-activation is `z` standard deviations above its mean over random
    tokens, z chosen so that l0 of d_sae features per token pass on those tokens (pooled over features);
    resave. Returns {layer: mean L0 on other random tokens}, also written to `sae_folder/calibration.json`.

    device: where the forward passes run (default: the GPU where there is one: on a GPU machine the build
    is part of each benchmark call's time)."""
    from sae_lens import SAE

    from weightscope.load.models import load_full_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_full_model(str(model_folder), device=device, **(flags or {}))
    gen = torch.Generator().manual_seed(seed)
    fit, check = (torch.randint(0, model.cfg.d_vocab, (n_rows, row_len), generator=gen).to(device)
                  for _ in range(2))
    measured = {}
    for path in sorted(Path(sae_folder).glob("layer_*"), key=lambda p: int(p.name.split("_")[1])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = SAE.load_from_disk(str(path), device=device)
        pre = sae.process_sae_in(_site_inputs(model, sae, fit)) @ sae.W_enc  # [n_tokens, d_sae], no b_enc
        mean, std = pre.mean(0), pre.std(0).clamp_min(1e-12)
        z = ((pre - mean) / std).flatten()  # pooled over features: the tail's own shape, not a normal's
        z_cut = z.topk(max(1, int(l0 * len(pre)))).values[-1]  # about l0 of d_sae above it per token
        cut = mean + z_cut * std  # [d_sae]
        floor = 0.01 if hasattr(sae, "threshold") else 0.0  # JumpReLU: a positive threshold, crossed at `cut`
        sae.b_enc.copy_(floor - cut)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(floor)
        layer = int(path.name.split("_")[1])
        measured[layer] = float((sae.encode(_site_inputs(model, sae, check)) > 0).sum(1).float().mean())
        sae.to("cpu").save_model(path)
    model = sae = None
    if device == "cuda":  # the benchmark's process builds the stand-in: give the chapters the GPU's memory back
        torch.cuda.empty_cache()
    (Path(sae_folder) / "calibration.json").write_text(json.dumps({"target_l0": l0, "mean_l0": measured}))
    return measured


def _dims(hf: dict) -> tuple[int, int]:
    """(d_model, n_heads * d_head) of a config.json."""
    if hf["model_type"] == "gpt2":
        return hf["n_embd"], hf["n_embd"]
    return hf["hidden_size"], hf["num_attention_heads"] * (hf.get("head_dim") or
                                                           hf["hidden_size"] // hf["num_attention_heads"])


def write_saes(folder: Path, hf: dict, layers, architecture: str, d_sae: int, hook: str, k: int | None,
               flags: dict, *, seed: int = 1) -> Path:
    """Random sae-lens SAEs `folder/layer_L/` of one architecture ("standard", "jumprelu", "topk") on `hook`."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    d_model, d_z = _dims(hf)
    hook_z = hook.endswith("hook_z")
    d_in = d_z if hook_z else d_model
    gen = torch.Generator().manual_seed(seed)
    for layer in layers:
        meta = SAEMetadata(hook_name=f"blocks.{layer}.{hook}", model_name=Path(hf.get("_name_or_path") or
                           "stand-in").name, model_from_pretrained_kwargs=dict(flags), prepend_bos=True,
                           context_size=1024)
        extra = {"reshape_activations": "hook_z"} if hook_z else {}
        with warnings.catch_warnings():  # sae-lens warns about recorded processing flags: they are the point
            warnings.simplefilter("ignore")
            if architecture == "standard":
                sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
            elif architecture == "jumprelu":
                sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta, **extra))
            else:
                sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta, **extra))
        with torch.no_grad():
            W_dec = torch.randn(d_sae, d_in, generator=gen)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            if architecture == "topk":  # the norm scaling folded in: rows of varying norm
                W_dec *= torch.empty(d_sae, 1).uniform_(0.5, 2.0, generator=gen)
            sae.W_dec.copy_(W_dec)
            sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
            sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
            sae.b_dec.copy_(torch.randn(d_in, generator=gen) * 0.1)
            if architecture == "jumprelu":
                sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.1)
        sae.save_model(Path(folder) / f"layer_{layer}")
    return Path(folder)


def write_params(target: str, model_folder: Path, sae_folder: Path, path: Path, *,
                 attn_saes: Path | None = None, chapters: dict | None = None, device: str = "cpu",
                 dtype: str = "float32") -> Path:
    """A parameters file as a user would write it: `processing: auto`, the chapters' defaults (unless
    `chapters`), `attn_saes` when given, `device` and `dtype` (the benchmark passes `auto` and the shipped
    params file's dtype: the GPU where there is one, in the precision a user's run would use)
    (`standins.write_params` plus these)."""
    import yaml

    path = standins.write_params(target, model_folder, sae_folder, path, chapters=chapters or {})
    raw = yaml.safe_load(Path(path).read_text())
    raw["model"]["processing"] = "auto"
    raw["device"], raw["dtype"] = device, dtype
    raw["chapters"] = chapters or {"05_context_neurons": {"layer": 0}}
    if attn_saes is not None:
        raw["attn_saes"] = {"source": str(attn_saes)}
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Path(path)
