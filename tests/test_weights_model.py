"""The weights-only route of chapters 1–3 against an independent plain-torch reading of the HF weights.

For each stand-in architecture (tests/standins.py: random Gemma-2, Llama-3.1, GPT-2, Mistral, Qwen2 with
randomised norms and biases, and local sae-lens SAE folders), the model and SAEs come through the chapters'
own opening (`open_chapter(params file).load_model_and_saes()`), and chapter 1's output matrix and top tokens
and chapter 2's query/key/value reads are compared with `standins.reference_*`, computed from the raw
safetensors tensors. The same comparison run against a deliberately wrong fold (Gemma's raw weight instead
of 1 + weight, GPT-2 without its centring, `h % n_kv` as the grouped-query map) must fail, so the test can.
"""

from __future__ import annotations

import pytest
import torch

import standins
from weightscope.chapters.context import open_chapter
from weightscope.compute import attention, lens
from weightscope.compute.token_scores import token_score_stats

pytestmark = pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(),
                                reason="needs ../shared/tokenizers/gpt2")
K = 10


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """arch -> (params path, model folder, SAE folder), built once per module."""
    built = {}

    def get(arch):
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            folder = standins.build_model(arch, root / arch, seed=3)
            saes = standins.build_saes(folder, root / "saes")
            built[arch] = (standins.write_params(f"standin-{arch}", folder, saes, root / f"standin-{arch}.yaml"),
                           folder, saes)
        return built[arch]

    return get


def _close(a, b):
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", standins.ARCHS)
def test_chapter_tensors_equal_the_hf_weights(standin, arch):
    params, folder, _ = standin(arch)
    ctx = open_chapter(str(params))
    model, saes = ctx.load_model_and_saes()
    cfg, sd = standins.hf_weights(folder)
    centre = bool(ctx.processing.get("center_writing_weights"))
    assert centre == (arch == "gpt2")  # recorded by the GPT-2 SAEs, as in gpt2-small-res-jb
    provenance = ctx.provenance()
    assert provenance["processing"] == ctx.processing and provenance["model_source"]["kind"] == "local"

    M_out, _ = lens.output_matrix(model)
    assert _close(M_out, standins.reference_output_matrix(cfg, sd))
    assert _close(lens.input_matrix(model), standins.reference_input_matrix(cfg, sd, centre))
    for wrong in standins.applicable_wrong_folds(arch):
        if wrong != "gqa_modulo":
            assert not _close(M_out, standins.reference_output_matrix(cfg, sd, wrong)), wrong

    sae = saes[1]
    D = sae.W_dec
    top = token_score_stats(D, M_out, k=K, progress=False).top_ids
    ref_top = (D @ standins.reference_output_matrix(cfg, sd)).topk(K, dim=1).indices
    assert torch.equal(top, ref_top)

    reads = attention.sae_attention_reads(model, D, sae.layer, sae.hook_name, n_null=128, seed=0)
    n_heads = model.cfg.n_heads
    for read_layer in sorted(reads["read_layer"].unique()):
        got = reads[reads["read_layer"] == read_layer]
        ref = standins.reference_reads(cfg, sd, D, int(read_layer), centre)
        for name in ("q", "k", "v"):
            mine = torch.tensor(got[name].to_numpy()).view(-1, n_heads)
            assert _close(mine, ref[name]), (arch, read_layer, name)
        for wrong in standins.applicable_wrong_folds(arch):
            bad = standins.reference_reads(cfg, sd, D, int(read_layer), centre, wrong)
            mine = {n: torch.tensor(got[n].to_numpy()).view(-1, n_heads) for n in "qkv"}
            assert not all(_close(mine[n], bad[n]) for n in "qkv"), wrong


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_model_config_says_what_the_checkpoint_says(standin, arch):
    from weightscope.load.models import describe

    params, folder, _ = standin(arch)
    model, _ = open_chapter(str(params)).load_model_and_saes()
    facts = describe(model)
    if arch == "gemma2":
        assert facts["tied_embeddings"] and facts["normalization"] == "RMSNorm (1 + weight)"
        assert facts["soft_capping"] == "attention 50, logits 30" and model.cfg.n_key_value_heads == 2
        assert model.cfg.attn_scale == 4.0  # sqrt(query_pre_attn_scalar = 16)
    else:
        assert not facts["tied_embeddings"] and model.cfg.use_NTK_by_parts_rope
        assert (model.cfg.NTK_by_parts_factor, model.cfg.NTK_original_ctx_len, model.cfg.rotary_base) == (
            8.0, 64, 500000.0)
    assert set(model.hook_dict) >= {f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)}
    W_K = model.blocks[0].attn.W_K
    assert W_K.shape[0] == model.cfg.n_heads and torch.equal(W_K[1], model.blocks[0].attn._W_K[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_model_of_a_local_folder(standin, arch):
    """A folder TransformerLens cannot build by name becomes a HookedTransformer of the same tensors, processed
    as the weights-only model (the GPT-2 stand-in's SAEs record center_writing_weights)."""
    from transformer_lens import HookedTransformer

    from weightscope.chapters.model_intro import greedy_generate

    params, _, _ = standin(arch)
    ctx = open_chapter(str(params))
    model, _ = ctx.load_model_and_saes()
    full = ctx.load_full_model()
    assert isinstance(full, HookedTransformer)
    assert full.weightscope_processing["center_writing_weights"] == (arch == "gpt2")
    assert _close(full.W_E, model.W_E) and _close(full.W_U, model.W_U)
    assert _close(full.blocks[1].attn.W_Q, model.blocks[1].attn.W_Q)
    ids = full.to_tokens("Once upon a time")
    assert ids[0, 0] == full.tokenizer.bos_token_id
    assert len(greedy_generate(full, "Once upon a time", 5)) <= ids.shape[1] + 5


def test_saes_load_one_at_a_time(standin, monkeypatch):
    from weightscope.load import sae_sequence

    params, _, _ = standin("llama")
    model, saes = open_chapter(str(params)).load_model_and_saes()
    assert len(saes) == 3 and saes.layers == [0, 1, 2]
    calls = []
    real = sae_sequence.load_saes
    monkeypatch.setattr(sae_sequence, "load_saes", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    it = iter(saes)
    first = next(it)
    assert calls == [["layer_0"]] and first.layer == 0
    assert [s.layer for s in it] == [1, 2] and len(calls) == 3


def test_sae_subsets_and_sites_are_described_and_checked_without_weights(standin, monkeypatch):
    """A subset keeps the chosen SAEs lazy, in the given order; its descriptions, and the check that every
    SAE reads the sequence's site (here residual SAEs refused as hook_z ones), read only the configs."""
    from weightscope.load import sae_sequence
    from weightscope.load.saes import SAEError

    params, _, folder = standin("llama")
    model, saes = open_chapter(str(params)).load_model_and_saes()
    monkeypatch.setattr(sae_sequence, "load_saes", lambda *a, **k: pytest.fail("SAE weights read"))
    part = saes.subset([2, 0])
    assert part.layers == [2, 0] and part.ids == ["layer_2", "layer_0"]
    assert [m.hook_name for m in part.describe()] == ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"]
    wrong = sae_sequence.SAESequence(str(folder), saes.ids, saes.layers, device="cpu", dtype=None, model=model,
                                     site="attention_z")
    with pytest.raises(SAEError, match="needs attention-output SAEs on blocks.L.attn.hook_z"):
        wrong.check()
    with pytest.raises(ValueError, match="site 'mlp'"):
        sae_sequence.SAESequence(str(folder), [], [], device="cpu", dtype=None, site="mlp")


def test_processing_flags_as_transformer_lens_applies_them(standin):
    """apply_processing on the GPT-2 stand-in equals TransformerLens's own processing of the same weights."""
    import transformers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    from weightscope.load.weights_model import apply_processing, load_weights_model

    _, folder, _ = standin("gpt2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    c = hf.config
    tl_cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, n_heads=c.n_head,
        d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
        original_architecture="GPT2LMHeadModel", init_weights=False)
    flags = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    tl = HookedTransformer(tl_cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, tl_cfg), **flags,
                                   refactor_factored_attn_matrices=False)
    mine = apply_processing(load_weights_model(str(folder), progress=False), flags)
    assert mine.cfg.normalization_type == tl.cfg.normalization_type == "LNPre"
    assert mine.ln_final.w is None and mine.blocks[0].ln1.w is None
    for name in ("W_E", "W_U"):
        assert _close(getattr(mine, name), getattr(tl, name)), name
    for layer in range(tl_cfg.n_layers):
        a, b = mine.blocks[layer].attn, tl.blocks[layer].attn
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_O"):
            assert _close(getattr(a, name), getattr(b, name)), (layer, name)
        assert _close(a._b_K, b.b_K) and _close(a._b_V, b.b_V)  # b_V folded: zeros
    assert len(mine.processing_notes) == 4 and mine.processing == flags


def test_mlp_weights_on_request_equal_transformer_lens(tmp_path):
    """The FF-KV chapter reads the feed-forward weights through the weights-only model (`mlp=True`)."""
    import torch

    from weightscope.load.models import load_model
    from weightscope.load.weights_model import load_weights_model

    plain = load_weights_model("stories260K")
    assert plain.blocks[0].mlp is None  # chapters 1-3 read no MLP
    model = load_weights_model("stories260K", mlp=True)
    tl = load_model("stories260K")
    for layer in range(model.cfg.n_layers):
        block, ref = model.blocks[layer], tl.blocks[layer]
        for name in ("W_in", "W_gate", "W_out"):
            assert torch.equal(getattr(block.mlp, name), getattr(ref.mlp, name).detach()), (layer, name)
        assert torch.equal(block.ln2.w, ref.ln2.w.detach())
