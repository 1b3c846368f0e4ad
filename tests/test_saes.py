"""SAE loading, fit checks and the demo-SAE pipeline, offline, on tiny random models and SAEs built here."""

import dataclasses
import json
import signal
from pathlib import Path

import pytest
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from weightscope.prepare import demo_saes
from weightscope.load import corpora, saes
from weightscope.load.saes import SAEError

D_MODEL, N_LAYERS = 16, 2
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*non-empty model_from_pretrained_kwargs")


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama-style HookedTransformer (2 blocks, d_model 16, vocabulary 512)."""
    cfg = HookedTransformerConfig(
        n_layers=N_LAYERS, d_model=D_MODEL, n_ctx=64, d_head=4, n_heads=4, d_mlp=32, d_vocab=512,
        act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, seed=0,
    )
    return HookedTransformer(cfg).eval()


def make_sae(arch: str, hook: str, d_in: int = D_MODEL, d_sae: int = 32, **meta) -> SAE:
    """A sae-lens SAE with random weights, built from its config class."""
    torch.manual_seed(0)
    metadata = SAEMetadata(hook_name=hook, model_name="tiny", **meta)
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4, metadata=metadata))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
        sae.threshold.data = torch.rand(d_sae)
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return sae


def save(sae: SAE, path: Path) -> Path:
    sae.save_model(path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Loading local folders


def test_folder_of_saes_loads_with_documented_fields(tmp_path, model):
    top = save(make_sae("topk", "blocks.0.hook_resid_post", model_from_pretrained_kwargs={"fold_ln": True}),
               tmp_path / "layer_0")
    jump = save(make_sae("jumprelu", "blocks.1.hook_resid_pre"), tmp_path / "layer_1")
    loaded = saes.load_saes(tmp_path, model=model)
    assert [s.sae_id for s in loaded] == ["layer_0", "layer_1"]
    a, b = loaded
    assert a.architecture == "topk" and b.architecture == "jumprelu"
    assert (a.hook_name, a.layer) == ("blocks.0.hook_resid_post", 0)
    assert (b.hook_name, b.layer) == ("blocks.1.hook_resid_pre", 1)
    assert (a.d_in, a.d_sae, a.k) == (D_MODEL, 32, 4)
    assert a.W_enc.shape == (D_MODEL, 32) and a.W_dec.shape == (32, D_MODEL)
    assert a.b_enc.shape == (32,) and a.b_dec.shape == (D_MODEL,)
    assert a.threshold is None and b.threshold.shape == (32,)
    reference = TopKSAE.load_from_disk(top)
    assert torch.equal(a.W_enc, reference.W_enc) and torch.equal(a.W_dec, reference.W_dec)
    assert torch.equal(b.threshold, JumpReLUSAE.load_from_disk(jump).threshold)
    assert a.model_from_pretrained_kwargs == {"fold_ln": True}
    assert a.normalize_activations == "none" and a.norm_scaling_factor is None
    assert a.model_name == "tiny" and a.is_residual
    # encoding through the sae-lens object still works
    assert a.sae.encode(torch.randn(3, D_MODEL)).shape == (3, 32)


def test_ids_select_subfolders_and_single_folder_loads(tmp_path):
    for layer in range(2):
        save(make_sae("standard", f"blocks.{layer}.hook_resid_post"), tmp_path / "saes" / f"layer_{layer}")
    assert [s.layer for s in saes.load_saes(tmp_path / "saes", [1])] == [1]  # int L means layer_L
    named = saes.load_saes(tmp_path / "saes", ["layer_1", "layer_0"])
    assert [s.sae_id for s in named] == ["layer_1", "layer_0"]
    single = saes.load_saes(tmp_path / "saes" / "layer_0", dtype=torch.float64)
    assert len(single) == 1 and single[0].W_enc.dtype == torch.float64
    with pytest.raises(SAEError, match=r"no SAE folder\(s\) \['layer_7'\]"):
        saes.load_saes(tmp_path / "saes", [7])
    with pytest.raises(SAEError, match="does not exist"):
        saes.load_saes(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="holds no sae-lens SAE"):
        saes.load_saes(tmp_path / "empty")


def test_sae_without_hook_name_is_refused(tmp_path):
    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=8, k=2))
    with pytest.raises(SAEError, match="records no hook name"):
        saes.load_saes(save(sae, tmp_path / "x"))


# ------------------------------------------------------------------------------------------------------------
# Fit checks


def test_wrong_width_is_refused(tmp_path, model):
    path = save(make_sae("topk", "blocks.0.hook_resid_post", d_in=D_MODEL * 2), tmp_path / "wide")
    with pytest.raises(SAEError, match=r"d_in=32, but blocks.0.hook_resid_post .* width d_model=16"):
        saes.load_saes(path, model=model)


def test_hook_not_in_model_is_refused(model):
    with pytest.raises(SAEError, match=r"reads hook 'blocks.0.hook_resid_mod', which this model does not"):
        saes.check_fits(make_sae("topk", "blocks.0.hook_resid_mod"), model)


def test_layer_out_of_range_is_refused(model):
    with pytest.raises(SAEError, match=r"reads layer 5 .* the model has 2 layers \(0..1\)"):
        saes.check_fits(make_sae("topk", "blocks.5.hook_resid_post"), model)


def test_non_residual_refused_where_required(model):
    mlp = make_sae("topk", "blocks.1.hook_mlp_out")
    saes.check_fits(mlp, model)  # fits the model...
    with pytest.raises(SAEError, match="needs residual-stream SAEs .* reads blocks.1.hook_mlp_out"):
        saes.require_residual(mlp)  # ...but not a residual-stream chapter
    with pytest.raises(SAEError, match="needs residual-stream"):
        saes.require_residual(make_sae("topk", "hook_embed"))


def test_hook_layer():
    assert saes.hook_layer("blocks.12.attn.hook_z") == 12 and saes.hook_layer("hook_embed") is None


# ------------------------------------------------------------------------------------------------------------
# Releases: validated offline, before any download


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(SAE, "from_pretrained", refuse)


def test_unknown_release_lists_close_matches(no_download):
    with pytest.raises(SAEError, match=r"unknown sae-lens release 'gemma-scope-2b-pt-res-canonicl'.*"
                                       r"Close matches: \['gemma-scope-2b-pt-res-canonical'"):
        saes.load_saes("gemma-scope-2b-pt-res-canonicl", ["layer_3/width_16k/canonical"])


def test_unknown_id_is_refused_before_any_download(no_download):
    ids = ["layer_3/width_16k/canonical", "layer_3/width_16k/canonicl"]  # the good one is not fetched first
    with pytest.raises(SAEError, match=r"no SAE with id 'layer_3/width_16k/canonicl' \(close: \['layer_3/"):
        saes.load_saes("gemma-scope-2b-pt-res-canonical", ids)
    with pytest.raises(SAEError, match="no sae_ids given for release 'gpt2-small-res-jb', which has 13 SAEs"):
        saes.load_saes("gpt2-small-res-jb")
    assert saes.validate_release("llama_scope_lxr_8x", ["l3r_8x"]) == ["l3r_8x"]


def test_offline_download_failure_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(SAE, "from_pretrained", offline)
    with pytest.raises(SAEError, match="could not download SAE 'blocks.3.hook_resid_pre' .* Connect to"):
        saes.load_saes("gpt2-small-res-jb", ["blocks.3.hook_resid_pre"])


# ------------------------------------------------------------------------------------------------------------
# Demo SAEs: the sae-lens training pipeline on a tiny model and a tiny corpus


def _story(i: int) -> str:
    names = ["Lily", "Tom", "Ben", "Mia", "Sam"]
    name = names[i % 5]
    return (f"Once upon a time, {name} had a red ball number {i}. {name} played in the park.\n\n"
            f"The sun was warm and the dog ran fast. They were happy and went home {i % 7} times.")


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """A corpus folder in the demo layout and an empty data folder, via the environment variables."""
    folder = tmp_path / "corpora" / "tinystories"
    folder.mkdir(parents=True)
    stories = [_story(i) for i in range(60)]
    (folder / "tinystories_lowercase.txt").write_text("\n".join(s.lower() for s in stories) + "\n")
    (folder / "tinystories_cased.txt").write_text("\n\n".join(stories[:20]) + "\n")
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path / "corpora"))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    return tmp_path


def byte_encode(text: str) -> list[int]:
    """A stand-in tokenizer: BOS, then one token per UTF-8 byte (ids 3..258, as llama2.c's byte fallback)."""
    return [demo_saes.BOS_ID] + [3 + b for b in text.encode()]


TEST_CFG = dataclasses.replace(demo_saes.TINY, name="test", d_sae=32, k=4, context_size=32, train_rows=48,
                               training_tokens=3072, max_eval_tokens=512)


def test_split_stories_carries_boundaries_to_the_cased_text():
    stories = [_story(i) for i in range(6)]
    lower, cased = corpora.split_stories("\n".join(s.lower() for s in stories), "\n\n".join(stories[:4]))
    assert lower == [s.lower() for s in stories] and cased == stories[:4]


def test_tiny_training_writes_manifest_and_reuses_cache(tiny_env, model, monkeypatch, capsys):
    handler = signal.getsignal(signal.SIGINT)
    root = demo_saes.ensure_demo_saes(TEST_CFG, model=model, encode=byte_encode)
    assert signal.getsignal(signal.SIGINT) is handler  # sae-lens's handler was taken back out
    assert root.parent == tiny_env / "data" / "cache" / "demo_saes" and root.name.startswith("test-")
    manifest = demo_saes.read_manifest(root)
    assert manifest["complete"] and manifest["layers"] == [0, 1]
    shape = (manifest["architecture"], manifest["width"], manifest["k"], manifest["context_size"])
    assert shape == ("topk", 32, 4, 32)
    assert [c["name"] for c in manifest["corpus"]] == list(demo_saes.DEFAULT.corpus_files)
    assert all(len(c["sha256"]) == 64 for c in manifest["corpus"])
    assert {"sae-lens", "torch"} <= set(manifest["versions"])
    for layer in ("0", "1"):
        m = manifest["per_layer"][layer]
        assert m["tokens_seen"] >= TEST_CFG.training_tokens and m["training_time_s"] > 0
        assert m["mean_l0"] <= TEST_CFG.k and 0 <= m["dead_fraction"] <= 1 and m["mse"] > 0
        assert m["explained_variance"] < 1
    assert not (root / demo_saes.ACTS_DIR).exists()  # the activation cache is gone once all layers are done
    loaded = saes.load_saes(root, model=model)
    assert [(s.hook_name, s.architecture, s.d_sae) for s in loaded] == [
        ("blocks.0.hook_resid_post", "topk", 32), ("blocks.1.hook_resid_post", "topk", 32)]
    assert loaded[0].model_from_pretrained_kwargs == {} and loaded[0].context_size == 32

    def must_not_train(*args, **kwargs):
        raise AssertionError("retrained a cached layer")

    monkeypatch.setattr(demo_saes, "train_layer", must_not_train)
    capsys.readouterr()
    assert demo_saes.ensure_demo_saes(TEST_CFG, model=model, encode=byte_encode) == root
    assert "cached" in capsys.readouterr().out
    assert demo_saes.demo_sae_dir(TEST_CFG, model=model, encode=byte_encode) == root


def test_interrupted_run_resumes_at_the_missing_layer(tiny_env, model, monkeypatch):
    cfg = dataclasses.replace(TEST_CFG, seed=1)
    real_train, calls = demo_saes.train_layer, []

    def interrupted_after_layer_0(cfg_, model_, dataset, acts_dir, layer, out_dir, progress=True):
        calls.append(layer)
        if layer == 1:
            raise KeyboardInterrupt
        return real_train(cfg_, model_, dataset, acts_dir, layer, out_dir, progress)

    monkeypatch.setattr(demo_saes, "train_layer", interrupted_after_layer_0)
    with pytest.raises(KeyboardInterrupt):
        demo_saes.ensure_demo_saes(cfg, model=model, encode=byte_encode, progress=False)
    root = demo_saes.demo_sae_dir(cfg, model=model, encode=byte_encode)
    assert demo_saes._layer_complete(root, 0) and not (root / "layer_1").exists()
    assert not list(root.glob("layer_1.tmp-*"))  # the half-trained layer left nothing behind
    assert not demo_saes.read_manifest(root)["complete"]
    (root / "layer_1.tmp-999999999-1").mkdir()  # as a killed process would leave it

    calls.clear()
    monkeypatch.setattr(demo_saes, "train_layer", lambda *a, **k: calls.append(a[4]) or real_train(*a, **k))
    assert demo_saes.ensure_demo_saes(cfg, model=model, encode=byte_encode, progress=False) == root
    assert calls == [1]
    assert demo_saes.read_manifest(root)["complete"] and not list(root.glob("*.tmp-*"))


def test_bad_demo_configs_are_refused(tiny_env, model):
    with pytest.raises(demo_saes.DemoSAEError, match="unknown demo-SAE config 'huge'"):
        demo_saes.ensure_demo_saes("huge", model=model, encode=byte_encode)
    too_deep = dataclasses.replace(TEST_CFG, layers=(0, 4))
    with pytest.raises(demo_saes.DemoSAEError, match=r"layers \[4\] are out of range: the model has 2 lay"):
        demo_saes.ensure_demo_saes(too_deep, model=model, encode=byte_encode)


def test_missing_corpus_is_explained(tmp_path, monkeypatch, model):
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path))
    with pytest.raises(demo_saes.DemoSAEError, match="corpus file\\(s\\) missing"):
        demo_saes.ensure_demo_saes(TEST_CFG, model=model, encode=byte_encode)


def test_real_demo_model_tiny_run(tmp_path, monkeypatch):
    """The tiny config on the real stories260K model and corpus, when they are on this machine."""
    shared = Path(__file__).resolve().parents[2] / "shared"
    models = Path(demo_saes.models_dir() or shared / "models")
    corpora = Path(demo_saes.corpora_dir() or shared / "corpora")
    have_model = (models / "stories260K" / "stories260K.bin").is_file()
    if not (have_model and (corpora / demo_saes.LOWER_FILE).is_file()):
        pytest.skip("stories260K or the TinyStories corpus is not on this machine")
    monkeypatch.setenv("WEIGHTSCOPE_MODELS", str(models))
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(corpora))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))
    root = demo_saes.ensure_demo_saes("tiny", progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["layers"] == [0, 1, 2, 3, 4]
    assert manifest["model"]["sha256"] == "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"
    from weightscope.load.models import load_model

    loaded = saes.load_saes(root, model=load_model("stories260K"))
    assert [s.layer for s in loaded] == [0, 1, 2, 3, 4] and all(s.d_in == 64 for s in loaded)


def test_adopting_a_training_pins_its_exact_bytes(tiny_env, model, monkeypatch):
    """`--adopt`: the training's files become the pinned folder (weights byte for byte, SHA256SUMS, no local
    paths); the comparison with the pinned SAEs then finds the same weights, and a damaged copy is refused."""
    monkeypatch.setattr(saes, "PINNED_DIR", tiny_env / "pinned")
    root = demo_saes.ensure_demo_saes(TEST_CFG, model=model, encode=byte_encode, progress=False)
    assert demo_saes.compare_with_pinned(root) == []  # nothing of this config is pinned yet
    folder = demo_saes.adopt(TEST_CFG, root)
    assert folder == tiny_env / "pinned" / "test" and saes.pinned_problems(folder) == []
    for layer in (0, 1):
        for name in ("cfg.json", "sae_weights.safetensors", "metrics.json"):
            shipped, trained = folder / f"layer_{layer}" / name, root / f"layer_{layer}" / name
            assert shipped.read_bytes() == trained.read_bytes()
    manifest = saes.read_manifest(folder)
    assert manifest["cache_key"] == root.name and str(tiny_env) not in (folder / "manifest.json").read_text()
    assert manifest["corpus"][0]["file"].startswith("$WEIGHTSCOPE_CORPORA/")
    assert saes.pinned_cache_key(folder) == root.name
    lines = demo_saes.compare_with_pinned(root)
    assert len(lines) == 3 and all("weights identical" in line for line in lines[1:])
    saes.demo_sae_pointer("test").unlink()  # written by the training above, before anything was pinned
    demo_saes._point_to(TEST_CFG, root)  # a training with the pinned parameters never redirects the book
    assert not saes.demo_sae_pointer("test").exists() and saes.demo_sae_folder("test") == folder
    (folder / "layer_1" / "metrics.json").write_text("{}")
    with pytest.raises(SAEError, match="layer_1/metrics.json is damaged"):
        saes.demo_sae_folder("test")


@pytest.mark.parametrize("architecture,hook,k", [("standard", "hook_resid_pre", None),
                                                 ("standard", "attn.hook_z", None),
                                                 ("jumprelu", "hook_resid_post", None),
                                                 ("topk", "hook_resid_post", 8)])
def test_sae_decode_of_a_sparse_code_equals_the_dense_decode(tmp_path, architecture, hook, k):
    """`saes.sae_decode` hands a code with few nonzero entries to sae-lens as a sparse tensor (on a CPU):
    the same reconstruction as the dense code, for each architecture the book reads (hook_z reshaping
    included); a dense code, and a code of zeros (the decoder's bias), too."""
    import realwidth

    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    folder = realwidth.write_saes(tmp_path, hf, [0], architecture, 512, hook, k, {})
    sae = saes.load_saes(str(folder))[0]
    if hook.endswith("hook_z"):  # sae-lens learns d_head from the [.., heads, d_head] input it encodes
        sae.sae.encode(torch.zeros(1, 4, 16))
    gen = torch.Generator().manual_seed(0)
    f = torch.zeros(6, 512)
    rows, cols = torch.arange(6).repeat_interleave(2), torch.randint(0, 512, (12,), generator=gen)
    f[rows, cols] = torch.rand(12, generator=gen)
    dense = torch.randn(6, 512, generator=gen).relu()
    with torch.no_grad():
        for code in (f, dense, torch.zeros(1, 512)):
            assert torch.allclose(saes.sae_decode(sae, code), sae.sae.decode(code), atol=1e-5)
    sparse_calls = []
    original = sae.sae.decode
    sae.sae.decode = lambda code: sparse_calls.append(code.is_sparse) or original(code)
    with torch.no_grad():
        saes.sae_decode(sae, f), saes.sae_decode(sae, dense)
    assert sparse_calls == [True, False]  # 12 of 3,072 entries: sparse; half of them nonzero: dense


@pytest.mark.parametrize("architecture,hook,k", [("standard", "hook_resid_pre", None),
                                                 ("standard", "attn.hook_z", None),
                                                 ("jumprelu", "hook_resid_post", None),
                                                 ("topk", "hook_resid_post", 8)])
def test_feature_activation_equals_the_whole_encode_at_that_feature(tmp_path, architecture, hook, k):
    """`saes.feature_activation` reads one encoder column where the architecture allows (ReLU, JumpReLU):
    the same activations as sae-lens's whole encode, zeros and threshold cuts included (hook_z input
    [.., heads, d_head] and b_dec taken off the input as sae-lens does); TopK encodes whole."""
    import realwidth

    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    folder = realwidth.write_saes(tmp_path, hf, [0], architecture, 512, hook, k, {})
    sae = saes.load_saes(str(folder))[0]
    if architecture == "jumprelu":  # thresholds that cut some positive pre-activations
        with torch.no_grad():
            sae.sae.threshold.fill_(0.5)
    x = torch.randn(3, 7, 4, 16) if hook.endswith("hook_z") else torch.randn(3, 7, 64)
    whole_calls = []
    original = sae.sae.encode
    sae.sae.encode = lambda v: whole_calls.append(v.shape) or original(v)
    with torch.no_grad():
        whole = original(x)  # [3, 7, 512]
        for f in range(0, 512, 37):
            got = saes.feature_activation(sae, x, f)
            assert got.shape == (3, 7) and torch.allclose(got, whole[..., f], atol=1e-5), f
    one_column = architecture in saes.ONE_FEATURE_ARCHITECTURES
    assert one_column == (architecture != "topk") and (len(whole_calls) == 0) == one_column
    assert 0 < (whole > 0).float().mean() < 0.95  # some features fire and some do not: it can fail
    if architecture == "jumprelu":  # the threshold cut positive pre-activations: that step is tested too
        with torch.no_grad():
            pre = sae.sae.process_sae_in(x) @ sae.sae.W_enc + sae.sae.b_enc
        assert bool(((pre > 0) & (whole == 0)).any())


def test_topk_sae_rescaled_by_decoder_norms_is_folded_so_a_row_is_the_write_per_unit(tmp_path):
    """A TopK SAE with `rescale_acts_by_decoder_norm` and rows of varying norm loads as the same function
    (encode then decode) with unit-norm rows, so that act x W_dec[i] is feature i's write; one whose rows are
    already unit-norm loads bit for bit as saved."""
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    gen = torch.Generator().manual_seed(0)
    varied = torch.rand(64, 1, generator=gen) * 1.5 + 0.5
    for name, scale in (("varied", varied), ("unit", torch.ones(64, 1))):
        sae = TopKSAE(TopKSAEConfig(d_in=16, d_sae=64, k=4, rescale_acts_by_decoder_norm=True,
                                    metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post")))
        with torch.no_grad():
            W = torch.randn(64, 16, generator=gen)
            sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True) * scale)
            sae.W_enc.copy_(torch.randn(16, 64, generator=gen))
            sae.b_enc.copy_(torch.randn(64, generator=gen) * 0.1)
        sae.save_model(tmp_path / name)
        raw = SAE.load_from_disk(str(tmp_path / name))
        loaded = saes.load_saes(str(tmp_path / name))[0]
        x = torch.randn(5, 16, generator=gen)
        with torch.no_grad():
            same = loaded.sae.decode(loaded.sae.encode(x))
            assert torch.allclose(same, raw.decode(raw.encode(x)), atol=1e-5)
            a = loaded.sae.encode(x)
            i = int(a[0].argmax())
            one = torch.zeros_like(a[:1])
            one[0, i] = a[0, i]
            write = saes.sae_decode(loaded, one)[0] - loaded.b_dec
            assert torch.allclose(write, a[0, i] * loaded.W_dec[i], atol=1e-5)
        assert torch.allclose(loaded.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
        if name == "unit":
            assert torch.equal(loaded.W_enc, raw.W_enc) and torch.equal(loaded.W_dec, raw.W_dec)
        else:
            assert not torch.allclose(raw.W_dec.norm(dim=1), torch.ones(64), atol=1e-2)  # it was not unit
