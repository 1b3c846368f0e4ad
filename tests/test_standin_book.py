"""`python -m weightscope.publish.book` end to end on stand-in targets: a params file naming a local model
folder and a local SAE folder, built here (tests/standins.py), with its results checked against plain torch.

Chapter 1's top output tokens and chapter 2's query/key/value reads, read back from the result tables, must
equal `standins.reference_*` (computed from the raw Hugging Face tensors), and must differ from the same
reference with a deliberately wrong fold. The default run builds the Gemma-2 stand-in's book (HTML
included); the test marked `standins` runs the three real architectures (in CI, where CI is set, or with
`pytest -m standins`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import standins
from weightscope.publish.book import BOOK

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(),
                                 reason="needs ../shared/tokenizers/gpt2")]
DEMO_ONLY = ("stories260K", "512 tokens", "public release", "children's stories", "trained by this project with",
             "Demo SAEs on held-out text", "the demo's", "The demo.")


def _book(arch: str, tmp_path: Path, html: bool):
    """Build the stand-in, run the book for it; returns (proc, target, model folder, SAE folder, data dir)."""
    # `processing: auto` and `attn_saes`, as the shipped params/gpt2-small.yaml and gemma-2-2b.yaml
    params, folder, saes = standins.build_target(arch, tmp_path)
    target = f"standin-{arch}"
    book = tmp_path / "book"  # a book of its own: the checkout's HTML never links to the stand-in's pages
    book.mkdir()
    for name in ("_config.yml", "intro.md", "_ext", "_css", "appendix"):
        (shutil.copytree if (BOOK / name).is_dir() else shutil.copy)(BOOK / name, book / name)
    env = {**os.environ, "WEIGHTSCOPE_DATA": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1",
           "WEIGHTSCOPE_BOOK": str(book)}
    # every chapter: those with forward passes build the stand-in as a HookedTransformer (load.hooked);
    # every chapter runs but 05 on Gemma-2 (its post-attention norm)
    cmd = [sys.executable, "-m", "weightscope.publish.book", "--target", str(params)]
    cmd += [] if html else ["--no-html"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    pages = {p.stem: p.read_text() for p in (book / target).glob("*.ipynb")}
    return proc, target, folder, saes, tmp_path / "data", pages


def _table(data: Path, target: str, name: str):
    import pandas as pd

    path = data / "results" / target / f"{name}.parquet"
    assert path.is_file(), f"missing result table {path}"
    return pd.read_parquet(path)


def _vocab(folder: Path, d_vocab: int) -> tuple[list[str], torch.Tensor]:
    """The token strings and the ids chapter 1 ranks by default (byte-fallback and special tokens left out)."""
    from transformers import AutoTokenizer

    from weightscope.compute.lens import token_strings
    from weightscope.compute.token_scores import content_token_ids, token_categories

    tok = AutoTokenizer.from_pretrained(str(folder))
    strings = token_strings(SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(d_vocab=d_vocab)))
    return strings, content_token_ids(token_categories(tok, d_vocab), ("byte", "special"))


def _check_results(arch, target, folder, saes, data):
    from safetensors.torch import load_file

    cfg, sd = standins.hf_weights(folder)
    centre = arch == "gpt2"  # the GPT-2 SAEs record center_writing_weights
    M = standins.reference_output_matrix(cfg, sd)
    vocab, keep = _vocab(folder, M.shape[1])
    assert 0 < len(keep) < M.shape[1], "the stand-in's vocabulary should have tokens the filter leaves out"
    features = _table(data, target, "01_features")
    for layer in sorted(features["layer"].unique()):
        W_dec = load_file(str(saes / f"layer_{layer}" / "sae_weights.safetensors"))["W_dec"].float()
        rows = features[features["layer"] == layer].sort_values("feature")
        got = [list(t) for t in rows["dec_top_tokens"]]
        k = len(got[0])

        def top(wrong=None):
            scores = W_dec @ standins.reference_output_matrix(cfg, sd, wrong)[:, keep]
            ids = keep[scores.topk(k, dim=1).indices]
            return [[vocab[i] for i in row] for row in ids[rows["feature"].tolist()].tolist()]

        assert got == top(), f"layer {layer}: chapter 1's top tokens differ from plain torch"
        for wrong in standins.applicable_wrong_folds(arch):
            if wrong != "gqa_modulo":  # the output side has no heads
                assert got != top(wrong), wrong

        # chapter 2 keeps each head's summary, not the long reads table; the reads themselves are compared with
        # plain torch (and with each wrong fold) by test_weights_model, through the function chapter 2 calls
        heads = _table(data, target, "02_heads")
        mine = heads[heads["layer"] == layer]
        n_layers = int(cfg.get("num_hidden_layers", cfg.get("n_layer")))
        assert sorted(mine["read_layer"].unique()) == list(range(layer + 1, n_layers))  # later blocks only
        assert (mine["n_features"] == W_dec.shape[0]).all() and mine["any_frac"].between(0, 1).all()


def _check_pages(arch: str, proc, pages: dict[str, str]):
    skipped = {"05_context_neurons"} if arch == "gemma2" else set()
    expected = {"00_demo_model", "01_output_tokens", "02_attention", "03_semantic_populations",
                "04_attention_saes", "05_context_neurons", "06_ffkv_baseline", "07_in_context",
                "90_cross_model"} - skipped
    assert set(pages) == expected, sorted(pages)
    for stem in skipped:
        assert f"{stem} skipped: " in proc.stdout, stem
    for stem, text in pages.items():
        nb = json.loads(text)
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                assert out.get("output_type") != "error", (stem, out.get("ename"), out.get("evalue"))
                if out.get("name") == "stderr":
                    assert "Warning" not in "".join(out.get("text", "")), (stem, out["text"])
    for stem, text in pages.items():  # what a page shows: prose and outputs (not code, which names the demo)
        shown = []
        for cell in json.loads(text)["cells"]:
            if cell["cell_type"] == "markdown":
                shown.append("".join(cell["source"]))
            for out in cell.get("outputs", []):
                shown.append("".join(out.get("text", "")) + json.dumps(out.get("data", {})))
        for phrase in DEMO_ONLY:
            assert phrase not in "\n".join(shown), (stem, phrase)


def test_gemma2_standin_book_end_to_end(tmp_path):
    proc, target, folder, saes, data, pages = _book("gemma2", tmp_path, html=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"book: target {target}:" in proc.stdout
    assert "[weights]" not in json.dumps(pages) and "[saes]" not in json.dumps(pages)  # live progress only
    _check_pages("gemma2", proc, pages)
    _check_results("gemma2", target, folder, saes, data)


@pytest.fixture
def standins_selected(request):
    if not standins.all_selected(request.config):
        pytest.skip("runs in CI (CI=true) or with `pytest -m standins`: the book for every real architecture")


@pytest.mark.standins  # Gemma-2's book is run (with HTML) by test_gemma2_standin_book_end_to_end
@pytest.mark.parametrize("arch", [a for a in standins.REAL_ARCHS if a != "gemma2"])
def test_every_real_architecture_standin_book(arch, tmp_path, standins_selected):
    proc, target, folder, saes, data, pages = _book(arch, tmp_path, html=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_pages(arch, proc, pages)
    _check_results(arch, target, folder, saes, data)
