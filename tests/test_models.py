"""The offline demo model (stories260K) against the outputs of llama2.c's own `run.c`, plus loader errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from weightscope.load import llama2c, models
from weightscope.load.llama2c import Llama2cEncoder, Llama2cFileError, read_checkpoint, read_tokenizer

MODELS = Path(os.environ.get("WEIGHTSCOPE_MODELS", "/nonexistent"))
CORPORA = Path(os.environ.get("WEIGHTSCOPE_CORPORA", "/nonexistent"))
MODEL_DIR = MODELS / "stories260K"
if not (MODEL_DIR / "reference_outputs.json").is_file():
    pytest.skip(
        f"stories260K not found under WEIGHTSCOPE_MODELS={MODELS}; set it to the shared models folder",
        allow_module_level=True,
    )

REFERENCE = json.loads((MODEL_DIR / "reference_outputs.json").read_text())
CASES = REFERENCE["cases"]
CASE_IDS = [repr(case["prompt"]) for case in CASES]

TRICKY_TEXTS = [
    "",
    " ",
    "a",
    "  two  spaces  ",
    "Tabs\tand\nnewlines\n\n",
    "caf\u00e9 \u00f1 \u201cquoted\u201d \u2014 dash\u2026",
    "emoji \U0001f600 and \u4e2d\u6587 need byte fallback",
    "literal <s> and </s> and <0x41> and <unk>",
    "\u00a0non-breaking\u00a0space",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread avoids OpenMP synchronisation costs, large on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return models.load_model("stories260K")


@pytest.fixture(scope="module")
def encoder() -> Llama2cEncoder:
    return llama2c.load_encoder(MODEL_DIR / "tok512.bin", 512, llama2c.KNOWN_SHA256["tok512.bin"])


@pytest.fixture(scope="module")
def corpus_text() -> str:
    path = CORPORA / "tinystories" / "tinystories_cased.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; set WEIGHTSCOPE_CORPORA to the shared corpora folder")
    return path.read_text(encoding="utf-8")


def greedy(model, prompt_ids: list[int], n_new: int) -> list[int]:
    """run.c's temperature-0 loop: full forward, argmax, stop at BOS."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n_new):
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
            if next_id == llama2c.BOS_ID:
                break
            ids.append(next_id)
    return ids[len(prompt_ids) :]


def n_generated(case) -> int:
    # run.c loops while pos < steps, pos counting positions from BOS on: steps - len(prompt) + 1 new tokens.
    return case["steps"] - len(case["prompt_ids"]) + 1


# ----------------------------------------------------------------------------------------------------
# Against run.c


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_to_tokens_matches_runc(model, encoder, case):
    assert model.to_tokens(case["prompt"])[0].tolist() == case["prompt_ids"]
    assert encoder.encode(case["prompt"]) == case["prompt_ids"]
    assert encoder.encode_slow(case["prompt"]) == case["prompt_ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_prompt_logits_match_runc(model, case):
    with torch.no_grad():
        logits = model(torch.tensor([case["prompt_ids"]]))[0]
    expected = torch.tensor(case["prompt_logits"])
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_greedy_decoding_matches_runc(model, case):
    assert len(case["greedy_ids"]) == n_generated(case)
    assert greedy(model, case["prompt_ids"], n_generated(case)) == case["greedy_ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_generate_matches_runc(model, case):
    tokens = model.to_tokens(case["prompt"])
    out = model.generate(
        tokens, max_new_tokens=n_generated(case), do_sample=False, stop_at_eos=False, verbose=False
    )
    assert out[0, tokens.shape[1] :].tolist() == case["greedy_ids"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_decode_matches_runc_text(model, encoder, case):
    ids = case["prompt_ids"] + case["greedy_ids"]
    assert encoder.decode(ids) == case["greedy_text_runc"]
    assert model.to_string(ids) == "<s>" + case["greedy_text_runc"]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == case["greedy_text_runc"]


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def test_fast_path_equals_slow_path(encoder, corpus_text):
    assert encoder.fast_path_ok  # no piece of tok512 holds a space after its first byte
    for start in (0, 50_000):
        text = corpus_text[start : start + 4000]
        assert encoder.encode(text) == encoder.encode_slow(text)
    for text in TRICKY_TEXTS:
        assert encoder.encode(text) == encoder.encode_slow(text), text


def test_slow_path_used_when_a_piece_has_an_inner_space():
    data = read_tokenizer(MODEL_DIR / "tok512.bin", 512)
    pieces = list(data.pieces)
    pieces[-1] = b" a b"  # " a" + " b" now merges across a space: chunking before spaces would be wrong
    encoder = Llama2cEncoder(pieces, data.scores)
    assert not encoder.fast_path_ok
    assert encoder.encode("a b") == encoder.encode_slow("a b") == [1, 511]


def test_encode_decode_round_trip(encoder, corpus_text):
    text = corpus_text[:20_000]
    assert encoder.decode(encoder.encode(text)) == text
    for text in TRICKY_TEXTS:
        assert encoder.decode(encoder.encode(text)) == text, text


def test_byte_fallback(encoder):
    ids = encoder.encode("\U0001f600", bos=False)
    assert ids == [410] + [b + llama2c.BYTE_OFFSET for b in "\U0001f600".encode()]  # " " then 4 bytes


def test_hf_tokenizer_conventions(model):
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    assert model.cfg.tokenizer_prepends_bos
    assert tok.encode("") == [1]
    assert tok("<s>Once upon a time", add_special_tokens=False)["input_ids"] == [1, 403, 407, 261, 378]
    assert model.to_str_tokens("Once upon") == ["<s>", " Once", " upon"]
    assert model.to_tokens("Once upon", prepend_bos=False)[0].tolist() == [403, 407]


def test_batch_padding(model):
    prompts = ["The cat", "", "Once upon a time"]
    right = model.to_tokens(prompts)
    assert right.tolist() == [[1, 291, 280, 294, 2], [1, 2, 2, 2, 2], [1, 403, 407, 261, 378]]
    left = model.to_tokens(prompts, padding_side="left", prepend_bos=False)
    assert left.tolist() == [[2, 291, 280, 294], [2, 2, 2, 2], [403, 407, 261, 378]]
    assert model.to_string(right[:1, :4]) == ["<s>The cat"]


def test_tokenizer_save_and_reload(model, tmp_path):
    model.tokenizer.save_pretrained(tmp_path)
    reloaded = type(model.tokenizer).from_pretrained(tmp_path)
    assert reloaded.encode("Once upon a time") == [1, 403, 407, 261, 378]


# ----------------------------------------------------------------------------------------------------
# Loader


def test_model_config_and_processing(model):
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp) == (
        64, 5, 8, 4, 8, 172,
    )
    assert cfg.rotary_adjacent_pairs and cfg.normalization_type == "RMS" and cfg.gated_mlp
    assert not model.training
    assert model.weightscope_processing == {flag: False for flag in models.PROCESSING_FLAGS}
    torch.testing.assert_close(model.W_U, model.W_E.T)  # tied classifier, not centred
    assert model.blocks[0].attn._W_K.shape == (4, 64, 8)
    assert model.blocks[0].mlp.W_gate.shape == (64, 172)


def test_processing_flags_keep_log_probs(model):
    folded = models.load_model("stories260K", fold_ln=True, center_unembed=True)
    assert folded.weightscope_processing["fold_ln"] and folded.weightscope_processing["center_unembed"]
    tokens = torch.tensor([CASES[2]["prompt_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            folded(tokens).log_softmax(-1), model(tokens).log_softmax(-1), atol=1e-4, rtol=1e-4
        )


def test_unknown_flag_for_demo_model():
    with pytest.raises(ValueError, match="processing flags"):
        models.load_model("stories260K", n_devices=2)


def test_unknown_model_name_errors_before_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("must not try to download an unknown model")

    from transformer_lens import HookedTransformer

    monkeypatch.setattr(HookedTransformer, "from_pretrained", no_download)
    with pytest.raises(ValueError, match="OFFICIAL_MODEL_NAMES"):
        models.load_model("not-a-real-model-xyz")


def test_missing_model_without_network(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setenv("WEIGHTSCOPE_MODELS", str(tmp_path / "empty"))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(llama2c, "hf_hub_download", offline)
    with pytest.raises(llama2c.ModelUnavailableError, match="WEIGHTSCOPE_MODELS.*internet"):
        models.load_model("stories260K")


def _copy_model(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "stories260K"
    folder.mkdir(parents=True)
    for name in ("stories260K.bin", "tok512.bin"):
        shutil.copyfile(MODEL_DIR / name, folder / name)
    return folder


def test_truncated_checkpoint(monkeypatch, tmp_path):
    folder = _copy_model(tmp_path)
    checkpoint = folder / "stories260K.bin"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-1000])
    with pytest.raises(Llama2cFileError, match="truncated.*download it again"):
        read_checkpoint(checkpoint)
    monkeypatch.setenv("WEIGHTSCOPE_MODELS", str(folder.parent))
    with pytest.raises(Llama2cFileError, match="truncated"):
        models.load_model("stories260K")


def test_truncated_tokenizer(tmp_path):
    folder = _copy_model(tmp_path)
    tokenizer = folder / "tok512.bin"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-3])
    with pytest.raises(Llama2cFileError, match="truncated"):
        read_tokenizer(tokenizer, 512)


def test_corrupted_checkpoint_fails_sha256(monkeypatch, tmp_path):
    folder = _copy_model(tmp_path)
    checkpoint = folder / "stories260K.bin"
    data = bytearray(checkpoint.read_bytes())
    data[5000] ^= 0x01  # same size, different bytes
    checkpoint.write_bytes(bytes(data))
    monkeypatch.setenv("WEIGHTSCOPE_MODELS", str(folder.parent))
    with pytest.raises(Llama2cFileError, match="sha256"):
        models.load_model("stories260K")


def test_nan_weights(tmp_path):
    folder = _copy_model(tmp_path)
    checkpoint = folder / "stories260K.bin"
    data = bytearray(checkpoint.read_bytes())
    data[28:32] = b"\x00\x00\xc0\x7f"  # float32 NaN as the first embedding entry
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(Llama2cFileError, match="NaN or Inf.*tok_embeddings"):
        read_checkpoint(checkpoint)


def test_demo_sae_metrics_table_and_figure():
    from weightscope.chapters import model_intro

    row = {"layer": 0, "explained_variance": 0.9, "mean_l0": 20.0, "dead_fraction": 0.05, "mse": 0.1,
           "tokens_seen": 1000, "training_time_s": 3.0, "extra": "dropped"}
    manifest = {"per_layer": {"0": row, "1": {**row, "layer": 1, "explained_variance": 0.7}},
                "distinct_training_tokens": 12345, "epochs_over_distinct_tokens": 4,
                "n_eval_tokens": 678, "n_eval_stories": 9}
    line, metrics = model_intro.sae_metrics(manifest)
    assert line == ("trained on 12,345 distinct tokens (4 passes); evaluated on 678 held-out tokens of "
                    "9 stories")
    assert list(metrics["explained_variance"]) == [0.9, 0.7] and "extra" not in metrics
    fig = model_intro.sae_metrics_figure(metrics)
    assert [list(t.y) for t in fig.data] == [[0.9, 0.7], [20.0, 20.0], [0.05, 0.05]]
    bars = sorted(s.y0 for s in fig.layout.shapes)
    assert bars == sorted(model_intro.QUALITY_BAR.values())
    assert [fig.layout[f"yaxis{i}"].title.text for i in ("", 2, 3)] == [
        "fraction of variance", "active features per token", "fraction of features"]
