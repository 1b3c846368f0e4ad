"""Real-width stand-ins: the SAE folders load as the releases they stand for; the book runs at GPT-2 width.

The format checks write small SAEs with the release writers (cheap); the real-width book run is `slow` (CI).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import realwidth
import standins

pytestmark = pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/gpt2")


@pytest.mark.parametrize("arch", sorted(realwidth.RELEASES))
def test_release_formats_load_with_their_flags(tmp_path, arch):
    """Each release's architecture, hook, width of input, processing flags and hook_z reshape, read back."""
    from sae_lens import SAE

    hf = {"model_type": arch, "n_embd": 64, "n_head": 4, "hidden_size": 64, "num_attention_heads": 4,
          "head_dim": 32}
    for kind, spec in realwidth.RELEASES[arch].items():
        if spec is None:
            continue
        architecture, _, hook, k, flags = spec
        folder = realwidth.write_saes(tmp_path / kind, hf, [1], architecture, 96, hook, k, flags)
        sae = SAE.load_from_disk(str(folder / "layer_1"))
        d_in = 128 if hook.endswith("hook_z") and arch != "gpt2" else 64
        assert sae.cfg.architecture() == architecture and sae.cfg.d_sae == 96 and sae.cfg.d_in == d_in
        assert sae.cfg.metadata.hook_name == f"blocks.1.{hook}"
        assert sae.cfg.metadata.model_from_pretrained_kwargs == flags
        assert sae.cfg.reshape_activations == ("hook_z" if hook.endswith("hook_z") else "none")
        norms = sae.W_dec.norm(dim=1)
        assert torch.allclose(norms, torch.ones(96)) != (architecture == "topk")  # Llama Scope: folded scale


def test_real_widths_are_the_targets():
    assert realwidth.WIDTHS["gpt2"]["n_embd"] == 768 and realwidth.WIDTHS["gpt2"]["vocab_size"] == 50257
    assert realwidth.WIDTHS["gemma2"]["hidden_size"] == 2304 and realwidth.WIDTHS["gemma2"]["vocab_size"] == 256000
    assert realwidth.WIDTHS["llama"]["hidden_size"] == 4096 and realwidth.WIDTHS["llama"]["vocab_size"] == 128256
    assert realwidth.RELEASES["gpt2"]["res"][1] == realwidth.RELEASES["gpt2"]["att"][1] == 24576
    assert realwidth.RELEASES["gemma2"]["res"][1] == 16384 and realwidth.RELEASES["llama"]["res"][1] == 32768


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("WEIGHTSCOPE_REALWIDTH") or os.environ.get("CI")), reason=(
    "the real-width book takes about 10 minutes on a 2-core CPU: it runs in CI (CI=true) or with "
    "WEIGHTSCOPE_REALWIDTH=1 pytest tests/test_realwidth.py"))
def test_gpt2_width_book_runs_every_chapter(tmp_path):
    """The whole book on a 1-block GPT-2-small-width stand-in with `processing: auto` and `attn_saes`
    (bench/bench_book.py's run): every chapter exits 0, every page stays under 3 MB, and the SAEs fire as
    released ones do (calibrated L0 of tens, not half of 24,576)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_book

    out = tmp_path / "book.json"
    bench_book.main(["--arch", "gpt2", "--layers", "1", "--out", str(out), "--tmp", str(tmp_path)])
    result = json.loads(out.read_text())
    chapters = result["chapters"]
    l0 = [v for kind in result["saes"]["mean_l0_random_tokens"].values() for v in kind.values()]
    assert l0 and all(8 < v < 128 for v in l0), l0
    failed = {stem: c["last_lines"] for stem, c in chapters.items() if c["rc"] != 0}
    assert not failed, failed
    heavy = {stem: c["page_mb"] for stem, c in chapters.items() if (c["page_mb"] or 0) > 3.0}
    assert not heavy, heavy


@pytest.mark.parametrize("arch,kind", [("gpt2", "res"), ("gpt2", "att"), ("gemma2", "res"), ("gemma2", "att")])
def test_calibration_sets_a_realistic_l0(tmp_path, arch, kind):
    """Random encoders fire on about half their features; calibrated ones on about `l0` of them (checked on
    tokens the calibration did not see), and the book's loader still reads the folder."""
    from weightscope.load.saes import load_saes

    folder = standins.build_model(arch, tmp_path / "model", n_layers=2)
    hf = json.loads((folder / "config.json").read_text())
    architecture, _, hook, k, flags = realwidth.RELEASES[arch][kind]
    saes = realwidth.write_saes(tmp_path / kind, hf, [0, 1], architecture, 2048, hook, k, flags)
    before = realwidth.calibrate_l0(folder, saes, l0=1024, flags=flags)  # z = 0: the uncalibrated regime
    after = realwidth.calibrate_l0(folder, saes, l0=32, flags=flags)
    assert all(600 < v < 1400 for v in before.values()), before
    assert all(12 < v < 80 for v in after.values()), after
    assert json.loads((saes / "calibration.json").read_text())["mean_l0"] == {str(k): v for k, v in after.items()}
    assert [s.layer for s in load_saes(str(saes))] == [0, 1]


def test_the_tokenizer_has_the_real_vocabulary_and_tokenizes_text_as_before(tmp_path):
    """Ids past a tokenizer's vocabulary are special to the chapters (not scored): a real-width stand-in with
    GPT-2's 50,257 tokens would score a fifth of Gemma's vocabulary. Its added entries are content tokens that
    no text produces; the last id (the config's BOS/EOS) stays outside."""
    from transformers import AutoTokenizer

    from weightscope.compute.token_scores import token_categories

    standins.tokenizer().save_pretrained(tmp_path)
    text = "Once upon a time, Lily zzq liked 12 cats \u2014 \u00fcn\u00efcode!"
    before = AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"]
    realwidth.full_vocabulary(tmp_path, 60_000)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 59_999 and tok(text)["input_ids"] == before
    kinds = token_categories(tok, 60_000)
    assert set(kinds[50_257:59_999]) == {"content"} and kinds[59_999] == "special"
    assert tok.decode([50_257]) == " zzqcwiz"  # a word, as a lens table shows it
