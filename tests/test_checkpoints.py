"""Streaming weight loading against TransformerLens's own conversion of the same Hugging Face model.

Tiny randomly initialised Gemma-2, Llama (grouped-query, untied) and GPT-2 models are built offline from
transformers' config classes, saved with `save_pretrained` (single file and sharded), and read back by
`checkpoints.load_weights`. The reference is TransformerLens's weight conversion (`convert_gemma_weights`,
`convert_llama_weights`, `convert_gpt2_weights`) applied to the in-memory HF model with a
`HookedTransformerConfig` built here to match: `from_pretrained_no_processing` itself needs an official model
name and fetches its config from the hub, so offline the conversion functions are called directly (they are
what `from_pretrained_no_processing` calls, and it applies no processing after them).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from weightscope.compute.folding import fold_final_norm
from weightscope.load import checkpoints as C

transformers = pytest.importorskip("transformers")
tl = pytest.importorskip("transformer_lens")
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.pretrained.weight_conversions import (  # noqa: E402
    convert_gemma_weights,
    convert_gpt2_weights,
    convert_llama_weights,
)

V, LAYERS = 100, 3


def _hf_configs():
    return {
        # hidden 72: sqrt(72) is not a power of two, so rounding the embedding scale to the dtype matters
        "gemma2": transformers.Gemma2Config(
            vocab_size=V, hidden_size=72, intermediate_size=96, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
            max_position_embeddings=64,
        ),
        "gpt2": transformers.GPT2Config(
            vocab_size=V, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        ),
    }


_MODEL_CLASSES = {"gemma2": "Gemma2ForCausalLM", "llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _tl_config(arch: str, hf_cfg, dtype) -> HookedTransformerConfig:
    """The HookedTransformerConfig TransformerLens would build for hf_cfg (fields its converters read)."""
    if arch == "gpt2":
        return HookedTransformerConfig(
            n_layers=hf_cfg.n_layer, d_model=hf_cfg.n_embd, n_ctx=hf_cfg.n_positions, n_heads=hf_cfg.n_head,
            d_head=hf_cfg.n_embd // hf_cfg.n_head, d_mlp=4 * hf_cfg.n_embd, d_vocab=V, act_fn="gelu_new",
            normalization_type="LN", dtype=dtype, original_architecture="GPT2LMHeadModel",
        )
    gemma = arch == "gemma2"
    n_kv = hf_cfg.num_key_value_heads
    return HookedTransformerConfig(
        n_layers=hf_cfg.num_hidden_layers, d_model=hf_cfg.hidden_size, n_ctx=64,
        n_heads=hf_cfg.num_attention_heads, d_head=hf_cfg.head_dim, d_mlp=hf_cfg.intermediate_size, d_vocab=V,
        act_fn="gelu_pytorch_tanh" if gemma else "silu", normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, dtype=dtype,
        # TL's Llama config sets n_key_value_heads only when it differs from n_heads (Gemma always sets it)
        n_key_value_heads=n_kv if gemma or n_kv != hf_cfg.num_attention_heads else None,
        use_normalization_before_and_after=gemma, original_architecture=_MODEL_CLASSES[arch],
    )


_CONVERTERS = {"gemma2": convert_gemma_weights, "llama": convert_llama_weights, "gpt2": convert_gpt2_weights}


def _randomise(model, seed: int) -> None:
    """Non-trivial values everywhere (HF initialises norms to 0/1 and biases to 0: that hides +1 bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{arch: (hf_model fp32, folder single-file fp32, folder sharded fp32)} plus a bf16 Gemma checkpoint."""
    out = {}
    root = tmp_path_factory.mktemp("ckpt")
    for i, (arch, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = getattr(transformers, _MODEL_CLASSES[arch])(cfg).eval()
        _randomise(model, seed=100 + i)
        single, sharded = root / f"{arch}-single", root / f"{arch}-sharded"
        model.save_pretrained(single, safe_serialization=True)
        model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
        out[arch] = (model, single, sharded)
    bf16 = root / "gemma2-bf16"
    copy.deepcopy(out["gemma2"][0]).to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
    out["gemma2-bf16"] = (None, bf16, None)
    return out


def _reference(arch: str, hf_model, dtype) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        state = _CONVERTERS[arch](hf_model, _tl_config(arch, hf_model.config, dtype))
    return {name: value.detach().to(dtype) for name, value in state.items()}  # TL casts into its params


def _expected_names(arch: str, n_layers: int, mlp: bool) -> set[str]:
    kv = "_" if arch == "gemma2" or arch == "llama" else ""  # both test models use grouped-query attention
    names = {"embed.W_E", "unembed.W_U", "ln_final.w"}
    layer = {"ln1.w", "attn.W_Q", f"attn.{kv}W_K", f"attn.{kv}W_V", "attn.W_O"}
    if arch == "gpt2":
        names |= {"ln_final.b"}
        layer |= {"ln1.b", "attn.b_Q", "attn.b_K", "attn.b_V", "attn.b_O"}
    if mlp:
        layer |= {"ln2.w", "mlp.W_in", "mlp.W_out"}
        layer |= {"ln2.b", "mlp.b_in", "mlp.b_out"} if arch == "gpt2" else {"mlp.W_gate"}
        layer |= {"ln1_post.w", "ln2_post.w"} if arch == "gemma2" else set()
        names |= {"pos_embed.W_pos"} if arch == "gpt2" else set()  # the whole model: its learned positions
    return names | {f"blocks.{i}.{name}" for i in range(n_layers) for name in layer}


def _assert_same(ws: C.WeightSet, ref: dict[str, torch.Tensor], expected: set[str]) -> None:
    got = ws.tensors()
    assert set(got) == expected
    for name, value in got.items():
        assert value.shape == ref[name].shape, name
        assert value.dtype == ref[name].dtype, name
        assert torch.equal(value, ref[name]), f"{name}: max |diff| {(value - ref[name]).abs().max()}"


# ----------------------------------------------------------------------------------------------------------
# Equality with TransformerLens
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("arch", ["gemma2", "llama", "gpt2"])
def test_matches_transformer_lens(checkpoints, arch, layout, mlp):
    hf_model, single, sharded = checkpoints[arch]
    folder = single if layout == "single" else sharded
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    ws = C.load_weights(folder, mlp=mlp)
    assert ws.arch == arch
    assert (ws.n_heads, ws.n_kv_heads) == ((4, 2) if arch != "gpt2" else (4, 4))
    _assert_same(ws, _reference(arch, hf_model, torch.float32), _expected_names(arch, LAYERS, mlp))


def test_gemma_conventions(checkpoints):
    """Norms are stored as 1 + weight; W_E holds the sqrt(d_model) scale, W_U the raw embedding."""
    hf_model, single, _ = checkpoints["gemma2"]
    ws = C.load_weights(single)
    raw = hf_model.model.embed_tokens.weight.detach()
    scale = torch.tensor(72**0.5, dtype=torch.float32)
    assert ws.embed_scale == pytest.approx(72**0.5) and ws.embed_scale_folded
    assert torch.equal(ws.W_E, raw * scale)
    assert torch.equal(ws.W_U, raw.T)
    assert torch.equal(ws.ln_final_w, hf_model.model.norm.weight.detach() + 1)
    assert torch.equal(ws[1].ln1_w, hf_model.model.layers[1].input_layernorm.weight.detach() + 1)
    unfolded = C.load_weights(single, fold_embed_scale=False)
    assert torch.equal(unfolded.W_E, raw) and not unfolded.embed_scale_folded
    assert unfolded.W_U.data_ptr() == unfolded.W_E.data_ptr()  # a view: no second copy of the embedding
    assert unfolded.nbytes() < ws.nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_checkpoint(checkpoints, dtype):
    """A bf16 checkpoint read as fp32 or bf16 equals TL's conversion of the HF model loaded in that dtype."""
    _, folder, _ = checkpoints["gemma2-bf16"]
    hf_model = transformers.Gemma2ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ws = C.load_weights(folder, dtype=dtype, mlp=True)
    assert ws.W_E.dtype == dtype
    _assert_same(ws, _reference("gemma2", hf_model, dtype), _expected_names("gemma2", LAYERS, True))


@pytest.mark.parametrize("arch", ["gemma2", "llama", "gpt2"])
def test_loads_onto_each_device(checkpoints, arch, device):
    _, single, _ = checkpoints[arch]
    on_cpu = C.load_weights(single, mlp=True)
    on_device = C.load_weights(single, device=device, mlp=True)
    for name, tensor in on_cpu.tensors().items():
        assert on_device.tensors()[name].device.type == device, name
        assert torch.equal(on_device.tensors()[name].cpu(), tensor), name


@pytest.mark.parametrize("arch", ["gemma2", "llama", "gpt2"])
def test_block_reads_match(checkpoints, arch, monkeypatch):
    """Tensors above the block size are read in row blocks into one output: same values; the tensors stored
    [out, in] come as views of the file's layout (what the full model's forward pass wants: `load.hooked`)."""
    hf_model, single, _ = checkpoints[arch]
    monkeypatch.setattr(C, "_BLOCK_BYTES", 1000)  # a few rows per block for every matrix
    ws = C.load_weights(single, mlp=True)
    _assert_same(ws, _reference(arch, hf_model, torch.float32), _expected_names(arch, LAYERS, True))
    if arch == "llama":  # untied: lm_head, and the MLP's three projections, are stored [out, in]
        stored = [ws.W_U, ws[0].W_in, ws[0].W_gate, ws[0].W_out]
        assert [t.T.is_contiguous() for t in stored] == [True] * 4


def test_loads_into_hooked_transformer(checkpoints):
    """The names of `WeightSet.tensors()` are TransformerLens parameter names (GQA's `_W_K` included)."""
    hf_model, single, _ = checkpoints["llama"]
    ws = C.load_weights(single, mlp=True)
    model = HookedTransformer(_tl_config("llama", hf_model.config, torch.float32))
    result = model.load_state_dict(ws.tensors(), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(model.blocks[2].attn._W_K, ws[2].W_K)
    assert torch.equal(model.blocks[2].attn.W_K[1], ws[2].W_K[0])  # TL repeats kv heads: h // (4 // 2)


def test_layers_subset_reads_only_those_tensors(checkpoints, monkeypatch):
    _, single, _ = checkpoints["llama"]
    names = []
    original = C._Reader.read
    def read(self, name, *args, **kwargs):
        names.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(C._Reader, "read", read)
    ws = C.load_weights(single, layers=[1])
    assert sorted(ws.layers) == [1]
    unwanted = ("layers.0.", "layers.2.", ".mlp.", "post_attention")
    assert not any(part in name for name in names for part in unwanted)
    assert len(names) == 3 + 5  # embed, lm_head, final norm; ln1 and Q/K/V/O of layer 1
    with pytest.raises(KeyError, match="not loaded"):
        ws[0]
    with pytest.raises(ValueError, match="out of range"):
        C.load_weights(single, layers=[LAYERS])


def test_never_loads_a_whole_file(checkpoints, monkeypatch):
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("load_weights must not load a whole state dict")

    for module, name in ((safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    for arch in ("gemma2", "llama", "gpt2"):
        for folder in checkpoints[arch][1:]:
            C.load_weights(folder, mlp=True)


def test_helpers(checkpoints):
    _, single, _ = checkpoints["gpt2"]
    ws = C.load_weights(single)
    assert ws.W_U.data_ptr() == ws.W_E.data_ptr() and ws.tied_embeddings  # GPT-2 ties: W_U is a view
    M = fold_final_norm(ws.W_U, ws.ln_final_w, ws.normalization_type)
    assert M.shape == (64, V)
    assert torch.allclose(M.mean(0), torch.zeros(V), atol=1e-5)  # LayerNorm centring folded
    W_Q, W_K, W_V, W_O = ws[0].attention()
    assert W_Q.shape == (4, 64, 16) and W_O.shape == (4, 16, 64)
    path = single / "model.safetensors"
    assert torch.equal(C.load_weights(path).W_E, ws.W_E)  # a file path works as well as its folder


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def _copy(folder, tmp_path):
    dest = tmp_path / folder.name
    shutil.copytree(folder, dest)
    return dest


def test_missing_paths(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        C.load_weights(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(C.CheckpointNotFoundError, match="neither"):
        C.load_weights(empty)
    folder = _copy(checkpoints["llama"][1], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(C.CheckpointNotFoundError, match="config.json"):
        C.load_weights(folder)
    sharded = _copy(checkpoints["llama"][2], tmp_path)
    next(iter(sorted(sharded.glob("*.safetensors")))).unlink()
    with pytest.raises(C.CheckpointNotFoundError, match="shards that do not exist"):
        C.load_weights(sharded)


def test_truncated_and_corrupted_files(checkpoints, tmp_path):
    folder = _copy(checkpoints["gemma2"][1], tmp_path)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.load_weights(folder)
    file.write_bytes(b"\x07" * 64)
    with pytest.raises(C.CheckpointError, match="not a readable safetensors file"):
        C.load_weights(folder)
    file.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(C.CheckpointError, match="Git LFS pointer"):
        C.load_weights(folder)


def _save_state(state, folder, config_from):
    import safetensors.torch

    folder.mkdir()
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(config_from / "config.json", folder / "config.json")
    return folder


@pytest.mark.parametrize("block_bytes", [C._BLOCK_BYTES, 1000])
def test_non_finite_values(checkpoints, tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(C, "_BLOCK_BYTES", block_bytes)
    hf_model, single, _ = checkpoints["llama"]
    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    state["model.embed_tokens.weight"][57, 3] = float("inf")
    folder = _save_state(state, tmp_path / "inf", single)
    with pytest.raises(C.NonFiniteWeightsError, match=r"embed_tokens.*index \[57, 3\]"):
        C.load_weights(folder)
    ws = C.load_weights(folder, check_finite=False)
    assert torch.isinf(ws.W_E[57, 3])

    state["model.embed_tokens.weight"][57, 3] = 0.0
    state["lm_head.weight"][41, 2] = float("-inf")  # given as a transposed view: the file's index
    folder = _save_state(state, tmp_path / "inf-head", single)
    with pytest.raises(C.NonFiniteWeightsError, match=r"lm_head.*index \[41, 2\]"):
        C.load_weights(folder, layers=[])
    state["lm_head.weight"][41, 2] = 0.0

    state["model.layers.1.self_attn.k_proj.weight"][5, 7] = float("nan")
    folder = _save_state(state, tmp_path / "nan", single)
    C.load_weights(folder, layers=[0, 2])  # the bad tensor is not read
    with pytest.raises(C.NonFiniteWeightsError, match=r"layers.1.self_attn.k_proj.*nan at index \[5, 7\]"):
        C.load_weights(folder)


def test_unsupported_architecture(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    # the message names the model_type and every supported one
    supported = "gemma2, llama, mistral, qwen2, gpt2"
    with pytest.raises(C.UnsupportedArchitectureError, match=f"model_type='falcon'.*{supported}"):
        C.load_weights(folder)
    assert C.load_weights(folder, arch="llama").arch == "llama"  # the layout is Llama's: arch overrides
    with pytest.raises(C.UnsupportedArchitectureError, match="arch must be one of"):
        C.load_weights(folder, arch="t5")


def test_config_inconsistent_with_weights(checkpoints, tmp_path):
    folder = _copy(checkpoints["llama"][1], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_key_value_heads=4, head_dim=None)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(C.CheckpointError, match="k_proj.*shape"):
        C.load_weights(folder)
