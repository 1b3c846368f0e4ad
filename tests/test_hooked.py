"""`load.hooked`: a HookedTransformer built from a Hugging Face folder's own tensors and config.json.

The reference is `transformers`' own model of the same folder (eager attention, fp32): logits and every
block's residual stream must agree, on sequences longer than the stand-ins' sliding window (64) and past
the llama3 rope scaling's original context, for the five supported architectures. Dropping a detail of the
configuration (Gemma-2's soft caps or sliding window, Llama-3.1's rope scaling) must break the agreement.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import standins
from weightscope.load.checkpoints import CheckpointError, load_weights
from weightscope.config.paths import models_dir
from weightscope.load.hooked import hooked_from_folder, hooked_from_weights, tl_config
from weightscope.load.models import load_model
from weightscope.load.weights_model import hf_tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/gpt2")
N_POS = 100  # > the stand-ins' sliding window (64) and the llama3 scaling's original context (64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooked")
    return {arch: standins.build_model(arch, root / arch, seed=11) for arch in standins.ARCHS}


def _ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 50_000, (batch, N_POS), generator=torch.Generator().manual_seed(0))


def _hf_outputs(folder):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(input_ids=_ids(), output_hidden_states=True)
    return out.logits, out.hidden_states


@pytest.mark.parametrize("arch", standins.ARCHS)
def test_equals_transformers_forward_pass(folders, arch):
    model = hooked_from_folder(folders[arch])
    logits_ref, hidden = _hf_outputs(folders[arch])
    with torch.no_grad():
        logits, cache = model.run_with_cache(_ids())
    scale = logits_ref.abs().max()
    assert (logits - logits_ref).abs().max() <= 1e-5 * scale + 1e-4, arch
    for layer in range(model.cfg.n_layers):  # hidden_states[L] is the stream block L reads
        got, ref = cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer]
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (arch, layer, (got - ref).abs().max())


@pytest.mark.parametrize("arch, field, value", [
    ("gemma2", "attn_scores_soft_cap", -1.0),
    ("gemma2", "use_local_attn", False),
    ("llama", "use_NTK_by_parts_rope", False),
    ("gpt2", "use_attn_scale", False),
])
def test_a_dropped_config_detail_breaks_the_agreement(folders, arch, field, value, monkeypatch):
    import weightscope.load.hooked as hooked

    real = hooked.tl_config

    def wrong(*args, **kw):
        cfg = real(*args, **kw)
        setattr(cfg, field, value)
        return cfg

    monkeypatch.setattr(hooked, "tl_config", wrong)
    model = hooked.hooked_from_folder(folders[arch])
    logits_ref, _ = _hf_outputs(folders[arch])
    with torch.no_grad():
        logits = model(_ids())
    assert (logits - logits_ref).abs().max() > 1e-3 * logits_ref.abs().max(), field


def test_processing_flags_keep_the_next_token_distribution(folders):
    folder = folders["gpt2"]
    plain = hooked_from_folder(folder)
    processed = hooked_from_folder(folder, fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert processed.weightscope_processing["center_writing_weights"]
    assert not torch.allclose(plain.W_E, processed.W_E)  # the weights did change
    with torch.no_grad():
        a, b = plain(_ids()).log_softmax(-1), processed(_ids()).log_softmax(-1)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("arch", [*standins.ARCHS, "demo"])
def test_forward_pass_copies_no_weight(folders, arch, monkeypatch):
    """TransformerLens's forward pass takes each matrix back to the checkpoint's layout (`F.linear(x,
    W_in.T.contiguous())`, W_U likewise, a rearrange of W_Q): the model keeps the checkpoint's layout, so
    that no call copies a weight. Copies of contiguous TransformerLens-layout matrices took 4.5 of a
    Gemma-2-2B-width generation's 6.9 s on a CPU (2 blocks, 20 tokens), and all of W_U at each logits call.
    The demo is built by TransformerLens itself, in its own layout: `forward_layout` lays it out once."""
    if arch == "demo":
        if models_dir() is None:
            pytest.skip("needs WEIGHTSCOPE_MODELS (the demo model)")
        model = load_model("stories260K")
    else:
        model = hooked_from_folder(folders[arch])
    weights = {p.data_ptr() for p in model.parameters() if p.ndim >= 2}
    copies = []
    for method in ("contiguous", "reshape"):
        def counted(self, *args, _original=getattr(torch.Tensor, method), _method=method, **kwargs):
            out = _original(self, *args, **kwargs)
            if self.data_ptr() in weights and out.data_ptr() != self.data_ptr():
                copies.append((_method, tuple(self.shape)))
            return out

        monkeypatch.setattr(torch.Tensor, method, counted)
    with torch.no_grad():
        model(_ids(1)[:, :8] % model.cfg.d_vocab)
    assert copies == [], copies


def test_unprocessed_model_shares_the_tensors_read_and_processing_leaves_them_alone(folders):
    # unprocessed: no second copy of the model while it is built; processed: the tensors read are not changed
    ws = load_weights(folders["llama"], mlp=True)
    model = hooked_from_weights(ws, hf_tokenizer(folders["llama"]), "llama")
    assert model.W_E.data_ptr() == ws.W_E.data_ptr()
    assert model.blocks[0].ln1.w.data_ptr() == ws.layers[0].ln1_w.data_ptr()
    assert all(not p.requires_grad or p.is_leaf for p in model.parameters())
    ws = load_weights(folders["gpt2"], mlp=True)
    before = ws.W_E.clone()
    hooked_from_weights(ws, hf_tokenizer(folders["gpt2"]), "gpt2", center_writing_weights=True)
    assert torch.equal(ws.W_E, before)


def test_config_fields(folders):
    ws = load_weights(folders["gemma2"], mlp=True)
    cfg = tl_config(ws, "g", max_ctx=128)
    assert cfg.n_ctx == 128 and cfg.attn_types == ["local", "global", "local"] and cfg.window_size == 64
    assert cfg.attn_scale == pytest.approx(4.0)  # sqrt(query_pre_attn_scalar = 16)
    assert cfg.n_key_value_heads == 2 and cfg.use_normalization_before_and_after


def test_needs_the_whole_model(folders):
    ws = load_weights(folders["llama"])  # attention only, as chapters 1-3 read it
    with pytest.raises(CheckpointError, match="mlp=True"):
        hooked_from_weights(ws, hf_tokenizer(folders["llama"]), "llama")
    with pytest.raises(ValueError, match="unknown processing flags"):
        hooked_from_folder(folders["llama"], fold_everything=True)


def test_unknown_flags_are_refused_before_the_weights_are_read(folders, monkeypatch):
    import weightscope.load.hooked as hooked

    monkeypatch.setattr(hooked, "load_weights", lambda *a, **k: pytest.fail("the weights were read first"))
    with pytest.raises(ValueError, match="unknown processing flags"):
        hooked.hooked_from_folder(folders["llama"], fold_everything=True)


@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_unprocessed_model_on_each_device_holds_the_cpu_parameters(folders, arch, device):
    """Built on `device` (Gemma's embedding scale folded in place there, Llama's transposed tensors read into
    their layout there), every parameter equals the CPU build's."""
    on_cpu, on_device = hooked_from_folder(folders[arch]), hooked_from_folder(folders[arch], device=device)
    reference = dict(on_cpu.named_parameters())
    for name, param in on_device.named_parameters():
        assert param.device.type == torch.device(device).type, name
        assert torch.equal(param.cpu(), reference[name]), name


def test_processed_model_without_biases_on_each_device(folders, device):
    """Llama has no attention or MLP biases: the zeros made for them meet the tensors read in
    TransformerLens's folds (fold_value_biases: b_V x W_O), so they are made on the model's device too."""
    flags = dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True)
    plain = hooked_from_folder(folders["llama"])
    processed = hooked_from_folder(folders["llama"], device=device, **flags)
    assert {p.device.type for p in processed.parameters()} == {torch.device(device).type}
    with torch.no_grad():
        a, b = plain(_ids()).log_softmax(-1), processed(_ids()).log_softmax(-1).cpu()
    assert torch.allclose(a, b, atol=1e-4)


def test_gemma_embedding_is_scaled_as_the_loader_scales_it(folders):
    """The folder route folds sqrt(d_model) into W_E in place after W_U's copy; the result is the loader's
    own fold, bit for bit, and a `WeightSet` read unfolded gives the same model without being changed."""
    folded = load_weights(folders["gemma2"], mlp=True)
    model = hooked_from_folder(folders["gemma2"])
    assert torch.equal(model.W_E, folded.W_E) and torch.equal(model.W_U, folded.W_U)
    raw = load_weights(folders["gemma2"], mlp=True, fold_embed_scale=False)
    before = raw.W_E.clone()
    again = hooked_from_weights(raw, hf_tokenizer(folders["gemma2"]), "gemma2")
    assert torch.equal(again.W_E, folded.W_E) and torch.equal(raw.W_E, before)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux's /proc")
@pytest.mark.parametrize("arch", ["gemma2", "llama"])
def test_building_the_model_holds_its_parameters_and_no_second_unembedding(tmp_path, arch):
    """Gemma ties W_U to the raw embedding and TransformerLens's W_E is it times sqrt(d_model): building the
    model once held the raw embedding, the scaled one and W_U's copy at once (1.5x the model at Gemma-2-2B's
    width). Llama's untied lm_head is stored [d_vocab, d_model]: its [d_model, d_vocab] copy was made beside
    it. The peak resident set the build adds, in a fresh process with the imports done, is now the
    model's parameters and one read block (made small here), not one more embedding-sized tensor."""
    folder = standins.build_model(arch, tmp_path / "m", seed=3, n_layers=1, vocab_size=131_072,
                                  hidden_size=128)
    code = textwrap.dedent(f"""
        import re, transformer_lens
        from pathlib import Path
        from weightscope.load import checkpoints
        from weightscope.load.hooked import hooked_from_folder
        from weightscope.load.tokenizer import hf_tokenizer
        checkpoints._BLOCK_BYTES = 4 << 20  # the reader's transient, bounded by a block
        def size(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) << 10
        first = hf_tokenizer(Path({str(folder)!r}))
        start = size("VmRSS")
        second = hf_tokenizer(Path({str(folder)!r}))  # what the build's own tokenizer adds
        tokenizer = size("VmRSS") - start
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
        before = size("VmRSS")
        model = hooked_from_folder({str(folder)!r})
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        print(size("VmHWM") - before - tokenizer, params, model.W_E.numel() * model.W_E.element_size())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    grown, params, embedding = map(int, out.split())
    assert grown < params + embedding / 2, (grown / params, embedding / params)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_full_model_computes_gelu_new_in_one_pass_and_still_equals_transformers(folders, arch):
    """`load_full_model` swaps TransformerLens's six-pass gelu_new for `tanh_gelu` (same formula) and leaves
    every other activation alone; the forward pass still equals transformers' own."""
    from transformer_lens.utilities.activation_functions import gelu_new

    from weightscope.load.models import load_full_model, tanh_gelu

    model = load_full_model(str(folders[arch]))
    swapped = [block.mlp.act_fn is tanh_gelu for block in model.blocks]
    assert all(swapped) if arch == "gpt2" else not any(swapped)
    logits_ref, _ = _hf_outputs(folders[arch])
    with torch.no_grad():
        logits = model(_ids())
    assert (logits - logits_ref).abs().max() <= 1e-5 * logits_ref.abs().max() + 1e-4
    if arch == "gpt2":  # TransformerLens's own function gives the same pass to fp32 rounding
        for block in model.blocks:
            block.mlp.act_fn = gelu_new
        with torch.no_grad():
            assert torch.allclose(model(_ids()), logits, rtol=1e-5, atol=1e-5)


def test_tanh_gelu_is_transformer_lens_gelu_new_and_gelu_fast():
    from transformer_lens.utilities.activation_functions import gelu_fast, gelu_new

    from weightscope.load.models import tanh_gelu

    x = torch.linspace(-12, 12, 200_001)
    for reference in (gelu_new, gelu_fast):
        assert (tanh_gelu(x) - reference(x)).abs().max() <= 2e-6
    assert not torch.allclose(tanh_gelu(x), torch.nn.functional.gelu(x), atol=1e-4)  # not the erf GELU
