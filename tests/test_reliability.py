"""Faults a user can cause end in one clear message and a documented exit code; caches are verified on reuse.

The runner tests use a tiny target built here (a random two-layer Llama saved with `save_pretrained`, an SAE
folder holding only its `cfg.json`) and a folder of fake chapter notebooks (`WEIGHTSCOPE_NOTEBOOKS`), with the
book and data folders in a temporary directory: they never touch the repository's book or data. Those that start
kernels are marked slow (`make test-fast` skips them).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from weightscope import io
from weightscope.config.params import ParamsError, load_target
from weightscope.publish import book, preflight as pf

REPO = Path(__file__).resolve().parents[1]
N_LAYERS, D_MODEL, D_VOCAB = 2, 16, 64


# --- a tiny target ---


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random two-layer Llama (d_model 16, vocab 64) saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(hidden_size=D_MODEL, intermediate_size=32, num_hidden_layers=N_LAYERS,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=D_VOCAB,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _sae_folder(root: Path, *, d_in: int = D_MODEL, layers=range(N_LAYERS)) -> Path:
    """A folder of `layer_L/` SAE folders; only `cfg.json` matters to the pre-flight."""
    for layer in layers:
        (root / f"layer_{layer}").mkdir(parents=True, exist_ok=True)
        cfg = {"d_in": d_in, "d_sae": 32, "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}
        (root / f"layer_{layer}" / "cfg.json").write_text(json.dumps(cfg))
    return root


def _params(folder: Path, name: str, model: str, saes: str, **extra) -> Path:
    text = {"target": name, "model": {"name": model}, "saes": {"source": saes}, "layers": "all",
            "device": "cpu", "dtype": "float32", "chapters": {}}
    text.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path


FAKE_CHAPTER = '''---
jupytext:
  text_representation: {{extension: .md, format_name: myst}}
kernelspec: {{name: python3, display_name: Python 3, language: python}}
---
# Fake chapter

```{{code-cell}} python
:tags: [parameters]
target = "demo"
k = 10
```

```{{code-cell}} python
{body}
```
'''


def _notebooks(folder: Path, bodies: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, body in bodies.items():
        (folder / f"{stem}.md").write_text(FAKE_CHAPTER.format(body=textwrap.dedent(body).strip()))
    return folder


@pytest.fixture
def world(tmp_path, tiny_model):
    """Environment for runner subprocesses: tiny target, temporary book/data folders, fake notebooks."""
    saes = _sae_folder(tmp_path / "saes")
    params = _params(tmp_path, "tiny", str(tiny_model), str(saes))
    bookdir = tmp_path / "book"
    bookdir.mkdir()
    env = {**os.environ, "WEIGHTSCOPE_DATA": str(tmp_path / "data"), "WEIGHTSCOPE_BOOK": str(bookdir),
           "WEIGHTSCOPE_NOTEBOOKS": str(tmp_path / "notebooks"), "PYTHONPATH": str(REPO / "lib")}
    return {"tmp": tmp_path, "params": params, "book": bookdir, "env": env, "saes": saes}


def _run(world, *args, env=None):
    cmd = [sys.executable, "-m", "weightscope.publish.book", "--target", str(world["params"]), "--no-html",
           *args]
    env = {**world["env"], **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _last_line(proc) -> str:
    return (proc.stdout + proc.stderr).strip().splitlines()[-1]


# --- pre-flight: every problem at once, before any work ---


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A chapter registered in weightscope.chapters.CHAPTERS with a `Config` that checks its own values."""
    (tmp_path / "fake_chapter_mod.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from weightscope.config.params import ParamsError

        @dataclass
        class Config:
            k: int = 10

            def __post_init__(self):
                if self.k < 1:
                    raise ParamsError(f"k = {self.k}: need k >= 1")

            def problems(self, dims):
                too_big = self.k > dims.d_vocab
                return [f"k = {self.k} exceeds the vocabulary ({dims.d_vocab})"] if too_big else []
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import weightscope.chapters as chapters

    monkeypatch.setattr(chapters, "CHAPTERS", {"01_fake": "fake_chapter_mod"}, raising=False)


def test_preflight_lists_every_problem_at_once(tmp_path, tiny_model, fake_registry, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    saes = _sae_folder(tmp_path / "saes", d_in=D_MODEL + 1)
    params = _params(tmp_path, "tiny", str(tiny_model), str(saes), layers=[0, 5], device="cuda",
                     chapters={"01_fake": {"k": 1000}, "01_fkae": {"k": 2}})
    target = load_target(params)
    stems = ["00_fake", "01_fake"]
    defaults = {s: {"params_file": "x", "k": 10} for s in stems}
    problems = pf.preflight(pf.resolve_target(target), [Path(f"{s}.md") for s in stems], defaults)
    text = "\n".join(problems)
    assert "layer(s) [5] out of range; the model has 2 layers" in text
    assert "d_in=17, but the model's residual stream has d_model=16" in text
    assert "`chapters.01_fkae`: no chapter of that name (did you mean '01_fake'?)" in text
    assert "k = 1000 exceeds the vocabulary (64)" in text  # the registered Config's model-dependent check
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in text
    assert len(problems) == 5 + (not torch.cuda.is_available()), text  # one d_in line per SAE folder


def test_registered_config_errors_and_unregistered_chapters(tmp_path, fake_registry):
    target = load_target(_params(tmp_path, "t", "stories260K", "demo", chapters={"01_fake": {"k": 0}}))
    dims = pf.ModelDims(n_layers=2, d_model=16, d_vocab=64)
    assert pf.chapter_problems(target, "01_fake", {"k": 10}, dims) == [f"{target.path}: chapters.01_fake: "
                                                                       "k = 0: need k >= 1"]
    # a chapter without a registered Config: names and types only, as before
    assert pf.chapter_problems(target, "02_other", {"k": 10}, dims, extra={"k": 0}) == []
    bad = pf.chapter_problems(target, "02_other", {"k": 10}, dims, extra={"k": "ten"})
    assert len(bad) == 1 and "should be int" in bad[0]


def test_chapters_that_do_not_apply_are_skipped_with_their_reason(tmp_path, tiny_model):
    stems = [Path(f"{s}.md") for s in ("01_output_tokens", "04_attention_saes", "05_context_neurons")]
    plain = pf.resolve_target(load_target(_params(tmp_path, "plain", str(tiny_model), "saes")))
    assert list(pf.skipped_chapters(plain, stems)) == ["04_attention_saes"]
    assert "names no attention-output SAEs" in pf.skipped_chapters(plain, stems)["04_attention_saes"]
    gemma = tmp_path / "gemma"  # what the pre-flight reads: config.json and that weights exist
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma2", "num_hidden_layers": 2}))
    (gemma / "model.safetensors").write_bytes(b"")
    attn = {"source": "some/attn-saes", "id_template": "layer_{layer}"}
    target = pf.resolve_target(load_target(_params(tmp_path, "gemma", str(gemma), "saes", attn_saes=attn)))
    skipped = pf.skipped_chapters(target, stems)
    assert list(skipped) == ["05_context_neurons"] and "post-attention" in skipped["05_context_neurons"]
    assert pf.skipped_chapters(pf.resolve_target(load_target("demo")), stems) == {}


def test_the_ffkv_baseline_is_skipped_when_no_sae_sees_an_mlp_write(tmp_path, tiny_model):
    """Chapter 6 pairs each SAE with the MLP block whose write it sees last; SAEs on resid_pre of block 0 (the
    first SAE of gpt2-small-res-jb) see none. Only such SAEs: skipped with the reason; one later SAE: runs."""
    stems = [Path("06_ffkv_baseline.md")]
    for layer in range(N_LAYERS):
        (tmp_path / "pre" / f"layer_{layer}").mkdir(parents=True)
        cfg = {"d_in": D_MODEL, "d_sae": 32, "metadata": {"hook_name": f"blocks.{layer}.hook_resid_pre"}}
        (tmp_path / "pre" / f"layer_{layer}" / "cfg.json").write_text(json.dumps(cfg))
    first = pf.resolve_target(load_target(_params(tmp_path, "first", str(tiny_model), str(tmp_path / "pre"),
                                                  layers=[0])))
    assert "no MLP block has written yet" in pf.skipped_chapters(first, stems)["06_ffkv_baseline"]
    every = pf.resolve_target(load_target(_params(tmp_path, "every", str(tiny_model), str(tmp_path / "pre"))))
    assert pf.skipped_chapters(every, stems) == {}
    post = pf.resolve_target(load_target(_params(tmp_path, "post", str(tiny_model),
                                                 str(_sae_folder(tmp_path / "post")), layers=[0])))
    assert pf.skipped_chapters(post, stems) == {}  # resid_post of block 0 sees block 0's MLP


def test_chapter_2_and_its_readers_are_skipped_when_no_head_reads_any_sae(tmp_path, tiny_model, monkeypatch):
    """Chapter 2 measures how later attention layers read each SAE; resid_post of the last block is read by
    none (a one-block model's only SAE site, say). Only such SAEs: chapter 2 is skipped with the reason, and
    chapters 3 and 7, which read its tables, with it (the run does not stop on their missing inputs); one SAE
    an attention layer reads: all run."""
    stems = [Path(f"{s}.md") for s in ("01_output_tokens", "02_attention", "03_semantic_populations",
                                       "07_in_context")]
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))  # no stored tables
    post = str(_sae_folder(tmp_path / "post"))  # resid_post SAEs
    last = pf.resolve_target(load_target(_params(tmp_path, "last", str(tiny_model), post, layers=[N_LAYERS - 1])))
    skipped = pf.skipped_chapters(last, stems)
    assert list(skipped) == ["02_attention", "03_semantic_populations", "07_in_context"]
    assert "no attention layer of the model reads" in skipped["02_attention"]
    assert all("reads the tables of 02_attention" in skipped[s] for s in ("03_semantic_populations",
                                                                         "07_in_context"))
    defaults = {s.stem: book.notebook_defaults(REPO / "notebooks" / s.name) for s in stems}
    assert pf.preflight(last, stems[2:], defaults) == []  # chapter 2's tables missing: no problem when skipped
    assert pf.skipped_chapters(last, stems[2:3]) == {  # chapter 2 not in the run: still consulted
        "03_semantic_populations": skipped["03_semantic_populations"]}
    every = pf.resolve_target(load_target(_params(tmp_path, "every", str(tiny_model), post)))
    assert pf.skipped_chapters(every, stems) == {}  # layer 0's resid_post is read by layer 1


@pytest.fixture
def input_registry(tmp_path, monkeypatch):
    """Two registered chapters: 01_fake reads a corpus and 02_fake reads 01_fake's table; 03_skip never
    applies, and its model-dependent check must then not run."""
    (tmp_path / "input_chapters.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from weightscope.chapters.context import CorpusInput, TableInput

        @dataclass(frozen=True)
        class Reads:
            corpus: str = "tinystories/stories.txt"
            def problems(self, dims):
                return []
            def inputs(self):
                return [CorpusInput(self.corpus)]

        @dataclass(frozen=True)
        class Follows:
            def problems(self, dims):
                return []
            def inputs(self):
                return [TableInput("01_features", produced_by="01_fake")]

        @dataclass(frozen=True)
        class Config:
            def problems(self, dims):
                return ["the model-dependent check of a skipped chapter ran"]

        def skip_reason(target, dims):
            return "it never applies"
    '''))
    for stem, cls in (("01_fake", "Reads"), ("02_fake", "Follows")):
        (tmp_path / f"mod_{stem}.py").write_text(f"from input_chapters import {cls} as Config\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import weightscope.chapters as chapters

    monkeypatch.setattr(chapters, "CHAPTERS", {"01_fake": "mod_01_fake", "02_fake": "mod_02_fake",
                                               "03_skip": "input_chapters"})
    corpora = tmp_path / "corpora"
    (corpora / "tinystories").mkdir(parents=True)
    (corpora / "tinystories" / "stories.txt").write_text("Once upon a time.")
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(corpora))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))


def test_inputs_a_chapter_reads_are_checked_before_any_work(tmp_path, input_registry, monkeypatch):
    target = load_target(_params(tmp_path, "t", "stories260K", "demo"))
    resolved = pf.resolve_target(target)
    defaults = {s: {"params_file": "x"} for s in ("01_fake", "02_fake", "03_skip")}
    defaults["01_fake"]["corpus"] = "tinystories/stories.txt"

    def problems(*stems, **overrides):
        sources = [Path(f"{s}.md") for s in stems]
        return pf.preflight(resolved, sources, defaults, extra=overrides or None)

    assert problems("01_fake", "02_fake", "03_skip") == []  # 02 runs after 01, 03 is skipped
    alone = problems("02_fake")
    assert len(alone) == 1 and "01_features" in alone[0] and "run the chapter 01_fake first" in alone[0]
    missing = problems("01_fake", corpus="tinystories/nope.txt")
    assert len(missing) == 1 and "no corpus file 'tinystories/nope.txt'" in missing[0]
    monkeypatch.delenv("WEIGHTSCOPE_CORPORA")
    unset = problems("01_fake")
    assert len(unset) == 1 and "WEIGHTSCOPE_CORPORA is not set" in unset[0]


@pytest.mark.parametrize("name, fragment", [
    ("gpt2-smal", "Unknown model 'gpt2-smal'"),
    ("/no/such/folder", "looks like a folder, but no folder exists there"),
])
def test_model_name_problems(name, fragment):
    dims, problems = pf.model_dims(name)
    assert dims is None and len(problems) == 1 and fragment in problems[0]


def test_model_dims_without_loading(tiny_model, tmp_path):
    dims, problems = pf.model_dims(str(tiny_model))
    assert (dims.n_layers, dims.d_model, dims.d_vocab, dims.n_heads, problems) == (N_LAYERS, D_MODEL, D_VOCAB, 2, [])
    assert pf.model_dims("some-org/some-model") == (None, [])  # a hub id: accepted, checked when loading
    assert pf.model_dims("stories260K")[0].n_layers == 5  # from the llama2.c header
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(tiny_model / "config.json", weightless)
    assert "has no .safetensors weights" in pf.model_dims(str(weightless))[1][0]


@pytest.mark.parametrize("file, damage, fragment", [
    ("stories260K.bin", lambda b: b[: len(b) // 2], "the file is truncated"),
    ("stories260K.bin", lambda b: b[:-8] + b"\x00" * 8, "has sha256"),
    ("tok512.bin", lambda b: b[:100], "tok512.bin"),
])
def test_damaged_demo_model_is_a_preflight_problem(tmp_path, monkeypatch, file, damage, fragment):
    source = Path(os.environ["WEIGHTSCOPE_MODELS"]) / "stories260K"
    copy = tmp_path / "stories260K"
    shutil.copytree(source, copy)
    (copy / file).write_bytes(damage((copy / file).read_bytes()))
    monkeypatch.setenv("WEIGHTSCOPE_MODELS", str(tmp_path))
    dims, problems = pf.model_dims("stories260K")
    assert dims is None and len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_bad_target_exits_2_with_every_problem_and_no_traceback(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": "print('ran')"})
    _params(world["tmp"], "tiny", "gpt2-smal", str(world["saes"]), device="cuda", layers=[0, 9],
            chapters={"00_fkae": {}, "00_fake": {"kk": 1}})
    proc = _run(world)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and "[book" not in proc.stdout  # nothing was run
    assert err.startswith("error: ") and "nothing was run" in err.splitlines()[0]
    assert "Unknown model 'gpt2-smal'" in err and "`chapters.00_fkae`" in err
    assert "unknown parameter(s) ['kk']" in err
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in err


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_kernels_get_fixed_malloc_thresholds_unless_the_user_set_one(world):
    from weightscope.publish.book import MALLOC_SETTINGS

    names = list(MALLOC_SETTINGS)
    assert names == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
    body = f"import os; print('thresholds', *[os.environ.get(n) for n in {names!r}])"
    _notebooks(world["tmp"] / "notebooks", {"00_fake": body})
    page = world["book"] / "tiny" / "00_fake.ipynb"
    mmap, trim = MALLOC_SETTINGS.values()
    for env, expected in (({}, f"{mmap} {trim}"), ({names[0]: "1048576"}, f"1048576 {trim}"),
                          ({names[1]: "0"}, f"{mmap} 0")):
        base = {k: v for k, v in world["env"].items() if k not in MALLOC_SETTINGS}
        proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", str(world["params"]),
                               "--no-html", "--force"], env={**base, **env}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"thresholds {expected}" in page.read_text()


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_a_long_step_in_a_kernel_reaches_the_terminal_as_lines_and_leaves_the_page(world):
    """A notebook's bar is a widget, which never reaches the runner's terminal: in the runner's kernels a bar
    prints lines instead (`LineBar`), which are relayed while the chapter runs and dropped from the page."""
    body = """
        import time
        from weightscope.compute import streaming
        bar = streaming.progress_bar(4, True, "token scores")
        print(type(bar).__name__)
        bar.every = 0.2
        for _ in range(4):
            time.sleep(0.25)
            bar.update(1)
        bar.close()
        from weightscope.publish.book import PAGE_BEAT_S
        time.sleep(PAGE_BEAT_S + 0.5)  # a cell that prints nothing: the runner says the page is running
    """
    _notebooks(world["tmp"] / "notebooks", {"00_fake": body})
    page = world["book"] / "tiny" / "00_fake.ipynb"
    proc = _run(world, "--force", env={"WEIGHTSCOPE_PROGRESS": "1"})  # as in a user's shell
    assert proc.returncode == 0, proc.stderr
    relayed = [line for line in proc.stdout.splitlines() if "[progress] token scores: " in line]
    assert len(relayed) == 4, proc.stdout
    assert relayed[0].startswith("  00_fake | [progress] token scores: 1/4 features (25%)")
    assert "LineBar" in page.read_text() and "[progress]" not in page.read_text()
    assert re.search(r"^  00_fake \| \[page\] \d/\d code cells run$", proc.stdout, re.M), proc.stdout
    off = _run(world, "--force", env={"WEIGHTSCOPE_PROGRESS": "0"})
    assert off.returncode == 0 and "[progress]" not in off.stdout and "[page]" not in off.stdout
    assert "NoBar" in page.read_text()  # WEIGHTSCOPE_PROGRESS=0 holds in the kernels


def test_unwritable_data_folder_is_a_preflight_problem(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": "print('ran')"})
    blocker = world["tmp"] / "blocker"
    blocker.write_text("a file where the data folder should be")
    proc = _run(world, env={"WEIGHTSCOPE_DATA": str(blocker / "data")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output: cannot write in {blocker / 'data'}" in proc.stderr


# --- params: the target name is the file's name ---


def test_a_copied_params_file_must_rename_its_target(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text((REPO / "params" / "demo.yaml").read_text())
    with pytest.raises(ParamsError, match=r"`target` is 'demo' but the file is named mine.yaml.*`target: mi"):
        load_target(copy)


# --- caches: verified on reuse, rebuilt or reported ---


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path))
    return tmp_path


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def test_damaged_table_is_not_reused_and_required_one_names_the_rebuild(data, capsys):
    df = pd.DataFrame({"feature": range(100), "x": [0.5] * 100})
    path = io.save_table(df, "t", "tab", key="k", params={})
    assert io.table_meta("t", "tab")["sha256"] == io.file_sha256(path)
    _truncate(path)
    assert io.load_table("t", "tab", key="k") is None
    assert "is damaged (its sha256 differs" in capsys.readouterr().out
    with pytest.raises(io.CacheError, match=r"tab.parquet is damaged.*Rebuild it: make book TARGET=t"):
        io.require_table("t", "tab", produced_by="01_output_tokens")
    path.with_suffix(".json").write_text("{trunc")  # a damaged sidecar: the table counts as missing
    with pytest.raises(FileNotFoundError, match="Run the chapter 01_output_tokens first"):
        io.require_table("t", "tab", produced_by="01_output_tokens")


def test_table_from_before_checksums_is_read_whole(data):
    path = io.save_table(pd.DataFrame({"x": range(1000)}), "t", "old", key="k", params={})
    meta = io.table_meta("t", "old")
    del meta["sha256"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert io.table_problem("t", "old") is None
    _truncate(path)
    assert "cannot be read (ArrowInvalid)" in io.table_problem("t", "old")


class _SAE:
    def __init__(self, layer):
        self.layer, self.sae_id, self.d_sae = layer, f"layer_{layer}", 4


def test_layer_tables_recompute_a_damaged_layer(data):
    calls = []

    def compute(sae):
        calls.append(sae.layer)
        return {"a": pd.DataFrame({"x": [float(sae.layer)] * 50})}

    saes = [_SAE(0), _SAE(1)]
    first = io.layer_tables("t", "ch", saes, {"p": 1}, compute)
    _truncate(io.table_path("t", "ch/layer_01_a"))
    again = io.layer_tables("t", "ch", saes, {"p": 1}, compute)
    assert calls == [0, 1, 1]
    pd.testing.assert_frame_equal(again["a"], first["a"])


def _demo_layer(root: Path, layer: int) -> Path:
    from safetensors.numpy import save_file
    import numpy as np

    folder = root / f"layer_{layer}"
    folder.mkdir(parents=True)
    weights = {"W_dec": np.arange(64, dtype=np.float32).reshape(8, 8)}
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": 8}))
    (folder / "metrics.json").write_text(json.dumps({"layer": layer}))
    return folder


@pytest.mark.parametrize("victim", ["sae_weights.safetensors", "cfg.json", "metrics.json"])
def test_damaged_demo_sae_layer_is_found_and_dropped(tmp_path, victim):
    from weightscope.prepare.demo_saes import _drop_damaged_layers, layer_problem

    folder = _demo_layer(tmp_path, 0)
    assert layer_problem(tmp_path, 0) is None  # read whole once; its checksums are recorded
    recorded = json.loads((folder / "metrics.json").read_text())["sha256"]
    assert set(recorded) == {"cfg.json", "sae_weights.safetensors"}
    _truncate(folder / victim)
    assert "damaged" in layer_problem(tmp_path, 0)
    said = []
    _drop_damaged_layers(tmp_path, [0], said.append)
    assert not folder.exists() and "layer 0 is trained again" in said[0]


def test_demo_sae_from_before_checksums_that_cannot_be_read(tmp_path):
    from weightscope.prepare.demo_saes import layer_problem

    folder = _demo_layer(tmp_path, 0)
    _truncate(folder / "sae_weights.safetensors")
    assert "cannot be read (SafetensorError)" in layer_problem(tmp_path, 0)


def test_truncated_demo_sae_is_retrained_and_only_that_layer(tmp_path, monkeypatch, capsys):
    """The tiny demo-SAE config on a random two-block model: a truncated layer is trained again, and only it."""
    import dataclasses

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from weightscope.prepare import demo_saes

    corpus = tmp_path / "corpora" / "tinystories"
    corpus.mkdir(parents=True)
    stories = [f"Story {i}. Tom saw a dog number {i} and they played in the park all day." for i in range(60)]
    (corpus / "tinystories_lowercase.txt").write_text("\n".join(t.lower() for t in stories) + "\n")
    (corpus / "tinystories_cased.txt").write_text("\n\n".join(stories[:20]) + "\n")
    monkeypatch.setenv("WEIGHTSCOPE_CORPORA", str(tmp_path / "corpora"))
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=64, d_head=4, n_heads=4, d_mlp=32, d_vocab=512, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True, seed=0)).eval()

    def encode(text):
        return [demo_saes.BOS_ID] + [3 + b for b in text.encode()]

    cfg = dataclasses.replace(demo_saes.TINY, name="test", d_sae=32, k=4, context_size=32, train_rows=48,
                              training_tokens=3072, max_eval_tokens=512)
    root = demo_saes.ensure_demo_saes(cfg, model=model, encode=encode, progress=False)
    weights = root / "layer_1" / "sae_weights.safetensors"
    _truncate(weights)
    real, calls = demo_saes.train_layer, []
    monkeypatch.setattr(demo_saes, "train_layer", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    capsys.readouterr()
    assert demo_saes.ensure_demo_saes(cfg, model=model, encode=encode) == root
    assert calls == [1]
    assert "are damaged (sha256 differs); layer 1 is trained again" in capsys.readouterr().out
    manifest = demo_saes.read_manifest(root)
    assert manifest["complete"] and manifest["per_layer"]["1"]["sha256"]["sae_weights.safetensors"] == \
        io.file_sha256(weights)
    assert demo_saes.layer_problem(root, 0) is None and demo_saes.layer_problem(root, 1) is None


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_reused_chapter_is_re_executed_when_its_table_is_damaged(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": """
        import pandas as pd
        from weightscope import io
        df = io.load_table("tiny", "00_tab", key="k")
        if df is None:
            io.save_table(pd.DataFrame({"x": range(500)}), "tiny", "00_tab", key="k", params={})
        print("rows", len(io.require_table("tiny", "00_tab", produced_by="00_fake")))
    """})
    assert _run(world).returncode == 0
    second = _run(world)
    assert "0 chapter(s) executed, 1 reused" in second.stdout
    _truncate(world["tmp"] / "data" / "results" / "tiny" / "00_tab.parquet")
    third = _run(world)
    assert third.returncode == 0, third.stderr
    assert "cached artefact(s) missing or damaged" in third.stdout and "00_tab.parquet" in third.stdout
    assert "1 chapter(s) executed, 0 reused" in third.stdout
    assert io.file_sha256(world["tmp"] / "data" / "results" / "tiny" / "00_tab.parquet") == json.loads(
        (world["tmp"] / "data" / "results" / "tiny" / "00_tab.json").read_text())["sha256"]


# --- writes: file modes, a full disk ---


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        io.atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644


def test_full_disk_names_the_path_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(io.StorageError) as err:
        io.atomic_write_bytes(target, b"new" * 1000)
    assert str(err.value).startswith(f"no space left on the device while writing {target} (3,000 bytes)")
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["table.parquet"]


# --- local paths never reach a page ---


def test_local_paths_are_scrubbed_from_outputs(monkeypatch, tmp_path):
    import nbformat

    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "d"))
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"cached in {tmp_path}/d/cache/x\n"),
                    nbformat.v4.new_output("execute_result",
                                           data={"text/html": f"<td>{book.REPO_ROOT}/a</td>"})]
    nb.cells = [cell]
    book.scrub_local_paths(nb)
    assert cell.outputs[0]["text"] == "cached in $WEIGHTSCOPE_DATA/cache/x\n"
    assert cell.outputs[1]["data"]["text/html"] == "<td><repo>/a</td>"


# --- one run at a time; failed runs stay out of the book ---


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_two_runs_at_once_the_second_is_refused(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": """
        import time
        from pathlib import Path
        from weightscope.config.paths import data_dir
        with open(data_dir() / "runs.txt", "a") as f:
            f.write("run\\n")
        deadline = time.time() + 200
        while not (data_dir() / "release").exists() and time.time() < deadline:  # until the test says so
            time.sleep(0.2)
    """})
    cmd = [sys.executable, "-m", "weightscope.publish.book", "--target", str(world["params"]), "--no-html"]
    first = subprocess.Popen(cmd, env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = world["tmp"] / "data" / "cache" / "locks" / "target-tiny.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")) and time.time() < deadline:
        time.sleep(0.2)
    second = _run(world)
    (world["tmp"] / "data" / "release").touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 5
    assert re.search(r"error: target tiny is in use by pid \d+ \(lock .*target-tiny.lock\)", second.stderr)
    assert _last_line(second).startswith("error: target tiny is in use")
    assert (world["tmp"] / "data" / "runs.txt").read_text() == "run\n"  # the chapter ran once


def test_failed_target_is_left_out_of_the_toc(tmp_path, monkeypatch):
    monkeypatch.setattr(book, "BOOK", tmp_path)
    for name, status in (("good", "ok"), ("broken", "failed"), ("unknown", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "00_x.ipynb").write_text('{"cells": []}')
        if status:
            book._set_run_status(name, status)
    import yaml

    (tmp_path / "good" / "00_x.ipynb").write_text('{"cells": [], "metadata": {}}')
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "00_x.ipynb").write_text('{"cells": [')  # a truncated notebook of a good run
    book._set_run_status("damaged", "ok")
    toc = yaml.safe_load(book.write_toc().read_text())
    assert [c["file"] for part in toc["parts"] for c in part["chapters"]] == ["good/00_x"]


def test_unknown_chapter_on_the_command_line(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": "print('ran')"})
    proc = _run(world, "--chapters", "07")
    assert proc.returncode == 2 and "--chapters: no chapter ['07']" in proc.stderr


def test_shared_locks_wait_and_target_locks_refuse(tmp_path, capsys):
    lock = tmp_path / "locks" / "html.lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from weightscope.io import file_lock
        with file_lock({str(lock)!r}, what="x", wait=False):
            print("held", flush=True)
            time.sleep(3)
            open({str(tmp_path / "released")!r}, "w").close()
    """)], env={**os.environ, "PYTHONPATH": str(REPO / "lib")}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(io.Busy, match=rf"the HTML build is in use by pid {holder.pid} \(lock {lock}\)"):
        with io.file_lock(lock, what="the HTML build", wait=False):
            pass
    with io.file_lock(lock, what="the HTML build", wait=True, poll_s=0.1):
        assert (tmp_path / "released").is_file()  # acquired only once the holder let go
    assert f"waiting: the HTML build is in use by pid {holder.pid}" in capsys.readouterr().out
    holder.wait()


# --- every fault class ends in one message and its exit code ---


def _faults():
    from weightscope.load.llama2c import Llama2cFileError
    from weightscope.load.saes import SAEError

    return [
        (ParamsError("p.yaml: `dtype` is 'float64'"), 2, "p.yaml: `dtype`"),
        (pf.PreflightError("2 problem(s) with target t; nothing was run:"), 2, "2 problem(s)"),
        (io.CacheError("the result table x is damaged"), 2, "the result table x"),
        (Llama2cFileError("stories260K.bin is truncated"), 2, "stories260K.bin"),
        (SAEError("SAE folder x does not exist"), 2, "SAE folder"),
        (book.ChapterFailed("chapter 01 failed: ValueError: boom", ename="ValueError"), 3, "chapter 01"),
        (book.ChapterFailed("chapter 01 failed: StorageError: full", ename="StorageError"), 6, "chapter 01"),
        (subprocess.CalledProcessError(1, "jupyter-book"), 4, "jupyter-book reported warnings or errors"),
        (io.Busy("target t is in use by pid 1"), 5, "target t is in use"),
        (io.StorageError("no space left on the device while writing x"), 6, "no space left"),
        (PermissionError("cannot create the output folder x"), 6, "cannot create the output folder"),
        (KeyboardInterrupt(), 130, "interrupted. Kept: every finished chapter"),
    ]


@pytest.mark.parametrize("fault, code, fragment", _faults(), ids=lambda v: type(v).__name__)
def test_exit_code_of_each_fault_class(monkeypatch, capsys, fault, code, fragment):
    def run(*args, **kwargs):
        print("[book] some progress")
        raise fault

    monkeypatch.setattr(book, "run", run)
    assert book.main(["--target", "demo"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {fragment}") and "Traceback" not in "\n".join(err)
    assert code in book.EXIT_CODES


# --- a dead kernel, Ctrl-C ---


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_dead_kernel_is_reported_with_exit_3(world):
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    _notebooks(world["tmp"] / "notebooks", {"00_fake": suicide})
    proc = _run(world)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _last_line(proc).startswith("error: chapter 00_fake failed for target tiny: its kernel died")


@pytest.mark.slow  # runs the book runner in subprocesses (kernels)
def test_ctrl_c_says_what_was_kept_and_exits_130(world):
    _notebooks(world["tmp"] / "notebooks", {"00_fake": "print('done')", "01_fake": "import time; time.sleep(60)"})
    cmd = [sys.executable, "-m", "weightscope.publish.book", "--target", str(world["params"]), "--no-html"]
    # SIGINT back to its default in the child: a suite started as a background job (no job control) inherits
    # an ignored SIGINT, and Python then never turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen(cmd, env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    nb = world["book"] / "tiny" / "00_fake.ipynb"
    deadline = time.time() + 120
    while not nb.is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # chapter 01's kernel is running
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: interrupted. Kept: every finished chapter")
    assert nb.is_file() and not (world["book"] / "tiny" / "01_fake.ipynb").exists()


def test_ctrl_c_during_sae_training_is_a_keyboard_interrupt():
    """sae-lens's runner turns SIGINT into its own InterruptedException; the book runner expects Ctrl-C."""
    from sae_lens.training._interruption import InterruptedException

    from weightscope.prepare.demo_saes import _training_guard

    with pytest.raises(KeyboardInterrupt):
        with _training_guard(progress=False):
            raise InterruptedException()


# --- the exit-code table in the appendix is backed by tests ---


def test_every_row_of_the_fault_table_names_an_existing_test():
    page = (REPO / "book" / "appendix" / "reliability.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("|") and "`test_" in line]
    assert len(rows) >= 10
    sources = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for row in rows:
        for name in re.findall(r"`(test_\w+)`", row):
            assert f"def {name}(" in sources, f"{name} (named in the fault table) is not a test"
        code = row.split("|")[2].strip()
        assert code.strip("`") in {str(c) for c in book.EXIT_CODES}, row


# --- a killed HTML build is repaired by the next one ---


def _tiny_book(tmp_path, pages):
    """(book folder, build): a book of an intro and appendix `pages`; build() starts one HTML build."""
    bookdir = tmp_path / "book"
    bookdir.mkdir()
    for name in ("_config.yml", "intro.md", "_ext", "_css"):
        src = REPO / "book" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bookdir / name)
    (bookdir / "appendix").mkdir()
    for page in pages:
        (bookdir / "appendix" / f"{page}.md").write_text(f"# Page {page}\n\nThe word {page}word is here.\n")
    env = {**os.environ, "WEIGHTSCOPE_BOOK": str(bookdir), "WEIGHTSCOPE_DATA": str(tmp_path / "data"),
           "PYTHONPATH": str(REPO / "lib")}
    code = "from weightscope.publish.book import build_html, write_toc; write_toc(); build_html()"

    def build(**kw):
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)

    return bookdir, build


@pytest.mark.slow
def test_a_page_left_out_of_the_toc_is_linked_from_no_page(tmp_path):
    """Sphinx rebuilds only changed pages, but every page's navigation lists the table of contents."""
    bookdir, build = _tiny_book(tmp_path, ["alpha", "beta"])
    for _ in range(2):  # the second build: gone from the toc, so every page is rebuilt without it
        proc = build()
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out
        (bookdir / "appendix" / "beta.md").unlink(missing_ok=True)
    assert "the table of contents changed: rebuilding every page" in out
    for page in ("intro.html", "appendix/alpha.html"):
        assert "beta.html" not in (bookdir / "_build" / "html" / page).read_text(), page


@pytest.mark.slow
def test_killed_html_build_is_rebuilt_with_a_complete_search_index(tmp_path):
    """A tiny book (intro and three appendix pages) is built, a second build is killed (SIGKILL to its whole
    process group) while it runs, and the next build must list every page in its search index."""
    pages = ["alpha", "beta", "gamma"]
    bookdir, build = _tiny_book(tmp_path, pages)

    def docnames() -> set[str]:
        text = (bookdir / "_build" / "html" / "searchindex.js").read_text()
        return set(json.loads(re.search(r'"docnames":\s*(\[[^\]]*\])', text).group(1)))

    first = build()
    assert first.wait(timeout=600) == 0, first.stdout.read()
    assert docnames() == {"intro", *(f"appendix/{p}" for p in pages)}
    (bookdir / "appendix" / "delta.md").write_text("# Page delta\n")  # the killed build had work to do
    killed = build()
    deadline = time.time() + 300
    while (bookdir / "_build" / book.BUILD_STAMP).is_file() and time.time() < deadline:
        time.sleep(0.05)  # the build removes the stamp first and writes it last: kill it in between
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (bookdir / "_build" / book.BUILD_STAMP).is_file(), "the build finished before it was killed"
    (bookdir / "_build" / "html" / "searchindex.js").write_text("Search.setIndex({")  # as a kill can leave it
    again = build()
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out
    assert "book/_build was left by an interrupted or failed build" in out
    assert docnames() == {"intro", *(f"appendix/{p}" for p in pages + ["delta"])}
    assert "index will be incomplete" not in out and "couldn't be loaded" not in out


def test_progress_lines_reach_the_terminal_while_a_chapter_runs(capsys):
    from weightscope.publish.book import _ProgressRelay

    relay = _ProgressRelay("01_output_tokens")
    relay.write("[weights] 1/5 [block 0] re")  # a line may arrive in pieces
    relay.write("ad\n01_token_lens: layer 3 (512 features) ...\noutput side: 2.4% of features\n")
    relay.write(" 40%|####      | 2/5 [00:01<00:01]\r100%|##########| 5/5 [00:02<00:00]\n")
    out = capsys.readouterr().out.splitlines()
    assert out == ["  01_output_tokens | [weights] 1/5 [block 0] read",
                   "  01_output_tokens | 01_token_lens: layer 3 (512 features) ..."]


def test_a_quiet_page_gets_a_line_after_its_next_cell_and_a_relayed_line_resets_the_wait(capsys):
    from weightscope.publish import book

    now = [0.0]
    heard = book._Heard(clock=lambda: now[0])
    relay, beat = book._ProgressRelay("02_attention", heard), book._PageHeartbeat("02_attention", 5, heard)
    now[0] = book.PAGE_BEAT_S - 1
    beat(cell=None, cell_index=1)  # quiet for less than PAGE_BEAT_S: no line
    relay.write("[progress] qk pairs: 3/4 features (75%), 1 s\n")
    now[0] += book.PAGE_BEAT_S - 0.5
    beat(cell=None, cell_index=2)  # the relayed line restarted the wait
    now[0] += 1
    beat(cell=None, cell_index=3)
    beat(cell=None, cell_index=4)  # its own line restarted it too
    out = capsys.readouterr().out.splitlines()
    assert out == ["  02_attention | [progress] qk pairs: 3/4 features (75%), 1 s",
                   "  02_attention | [page] 3/5 code cells run"]


def test_preflight_refuses_an_unsupported_architecture_before_any_work(tmp_path):
    import json

    from weightscope.config.params import load_target

    folder = tmp_path / "falcon"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "falcon", "num_hidden_layers": 2,
                                                    "hidden_size": 8, "vocab_size": 16,
                                                    "num_attention_heads": 2}))
    (folder / "model.safetensors").write_bytes(b"")
    params = tmp_path / "falcon-test.yaml"
    params.write_text(f"target: falcon-test\nmodel: {{name: {folder}}}\nsaes: {{source: {tmp_path}}}\n"
                      "layers: [0]\n")
    problems = pf.preflight(pf.resolve_target(load_target(params)), [], {})
    assert any("falcon" in p and "gemma2" in p for p in problems), problems


def test_progress_lines_are_dropped_from_pages():
    import nbformat

    from weightscope.publish.book import _drop_progress_bars

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run()")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="[saes] 1/5 [layer_0] loading from demo\n"),
                    nbformat.v4.new_output("stream", name="stdout",
                                           text="01_token_lens: layer 0 (512 features) ...\n2.4% of features\n")]
    nb.cells.append(cell)
    _drop_progress_bars(nb)
    assert [(o["name"], o["text"]) for o in nb.cells[0].outputs] == [("stdout", "2.4% of features\n")]


def test_a_progress_line_sent_apart_from_its_newline_leaves_nothing_on_the_page():
    """A kernel may send a line and its newline as two stream messages (seen in chapter 6 of the demo): both
    go, and the page keeps what a run without progress lines prints (the nbval references compare it)."""
    import nbformat

    from weightscope.publish.book import _drop_progress_bars

    out = nbformat.v4.new_output
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("run()")
    cell.outputs = [out("stream", name="stdout", text="06_attention_reads: layer 4 (SAE layer_4) ..."),
                    out("stream", name="stdout", text="\n"),
                    out("stream", name="stderr", text="[saes] 5/5 [layer_4] loading from demo\n"),
                    out("stream", name="stdout", text="kept "), out("stream", name="stdout", text="line\n"),
                    out("display_data", data={"text/plain": "table"}),
                    out("stream", name="stdout", text="after\n")]
    nb.cells.append(cell)
    _drop_progress_bars(nb)
    assert [(o["output_type"], o.get("text")) for o in nb.cells[0].outputs] == [
        ("stream", "kept line\n"), ("display_data", None), ("stream", "after\n")]


def test_held_out_text_inputs_name_the_files_the_reader_opens(monkeypatch, tmp_path):
    from weightscope.chapters.context import HELD_OUT_TEXT
    from weightscope.load import corpora

    opened = []

    def record(name):
        opened.append(name)
        path = tmp_path / name.replace("/", "_")
        path.write_text("Once upon a time there was a cat.\n\nThe end.\n")
        return path

    monkeypatch.setattr(corpora, "corpus_path", record)
    corpora.story_split()
    assert sorted(opened) == sorted(item.name for item in HELD_OUT_TEXT)
