"""Every chapter of the book on the simulated device (tests/simdevice.py), on a tiny stand-in target.

Each chapter runs as the book runs it (`open_chapter`, the chapter's `run` and `findings`; chapter 0, the
calls of its page) with the context's device set to the simulated one. Every tensor a chapter puts on "its"
device is then not a CPU tensor, and a CPU/device mix, `.numpy()` of a device tensor or a CPU generator
drawing on the device fails here as it would on a CUDA GPU. The numbers are not checked: the CPU tests check
them (test_standin_book), and the simulation has no numerics of its own.

The Llama stand-in runs by default, in bfloat16 as params/llama-3.1-8b.yaml: every chapter applies to it,
and it has the paths GPT-2 lacks (rotary positions, grouped-query heads, a model without biases). GPT-2
(`processing: auto` folds and centres its weights) and Gemma-2 (post-attention norms; chapter 5 does not
apply) run in CI or with `pytest -m standins` (about a minute each).

The last tests check the check: what it refuses and allows, and the backend's ops it replaces.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import simdevice
import standins
from weightscope.chapters import CHAPTERS

pytestmark = pytest.mark.skipif(not standins.GPT2_TOKENIZER.is_dir(),
                                reason="needs ../shared/tokenizers/gpt2")

STEMS = ["00_demo_model", *CHAPTERS]
# Small settings (the least each chapter's Config accepts), so that a chapter takes seconds, that still reach
# every step: chapter 5 ranks neurons only for chosen heads and compares two genres or more; chapter 7 leaves
# out features with fewer firings than min_firings.
SETTINGS = {
    "01_output_tokens": dict(n_null=100, max_features=16),
    "02_attention": dict(n_null=100, max_features=16, top_pairs=3, n_pair_heads=1, qk_max_offset=4),
    "03_semantic_populations": dict(n_boot=100),
    "04_attention_saes": dict(top_k=4, n_null=2, text_rows=2, text_ctx=32, dfa_features=2, n_examples=2,
                              min_fires=1, induction_len=6, induction_rows=2),
    "05_context_neurons": dict(window=32, n_calibration=4, n_heldout=2, n_top=4, n_permutations=100, batch=2,
                               heads="all", heldout={"stories": "tinystories/tinystories_cased.txt",
                                                     "encyclopedia": "wikipedia/wiki_00.txt"}),
    "06_ffkv_baseline": dict(n_null=100, max_features=16, max_neurons=32, n_eval_tokens=256),
    "07_in_context": dict(n_tokens=512, row_len=64, n_boot=100, n_ablate=2, ablate_positions=2,
                          n_random_pairs=4, min_firings=1),
}
# the shipped parameters' dtypes (params/llama-3.1-8b.yaml, gpt2-small.yaml, gemma-2-2b.yaml)
DTYPES = {"llama": "bfloat16", "gpt2": "float32", "gemma2": "bfloat16"}
EVERY_ARCH = [pytest.mark.slow, pytest.mark.standins]


@pytest.fixture(scope="module", params=["llama", pytest.param("gpt2", marks=EVERY_ARCH),
                                        pytest.param("gemma2", marks=EVERY_ARCH)])
def target(request, tmp_path_factory):
    """A stand-in target of one architecture, its results in a data folder of its own; `ran` holds each
    chapter's outcome (done, failed or why it does not apply), so that a chapter runs once. Two blocks: the
    fewest for chapter 2's reads by a later block and chapter 4's recursive DFA (a residual SAE before an
    attention SAE)."""
    arch = request.param
    if arch != "llama" and not standins.all_selected(request.config):
        pytest.skip("runs in CI (CI=true) or with `pytest -m standins`: every real architecture")
    root = tmp_path_factory.mktemp(f"simulated-{arch}")
    params, _, _ = standins.build_target(arch, root, n_layers=2, chapters=SETTINGS, dtype=DTYPES[arch])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSCOPE_DATA", str(root / "data"))
        yield SimpleNamespace(params=params, ran={})


@pytest.mark.parametrize("stem", STEMS)
def test_chapter_runs_on_the_simulated_device(target, stem):
    with simdevice.simulated_device() as device:
        for earlier in STEMS[1 : STEMS.index(stem)]:  # the results this chapter may read (none of 00's)
            if earlier not in target.ran:  # this test was selected alone
                _run(target, earlier, device)
            if target.ran[earlier] == "failed":
                pytest.skip(f"{earlier}, whose results this chapter may read, failed")
        if stem not in target.ran:
            _run(target, stem, device)
    assert target.ran[stem] != "failed", f"{stem} failed as an input of an earlier test"
    if target.ran[stem] != "done":
        pytest.skip(target.ran[stem])


def _run(target, stem: str, device: str) -> None:
    target.ran[stem] = "failed"  # unless it finishes
    why = _run_chapter(target.params, stem, device)
    target.ran[stem] = f"{stem} does not apply: {why}" if why else "done"


def _run_chapter(params: Path, stem: str, device: str) -> str | None:
    """Run chapter `stem` on `device`; None, or why it does not apply to the target (as the book runner
    decides: Gemma-2's chapter 5)."""
    from weightscope.chapters.context import open_chapter, resolve_dtype
    from weightscope.publish.preflight import resolve_target, skipped_chapters

    with warnings.catch_warnings():  # bfloat16 "on the CPU" the params name: the dtype is resolved again
        warnings.filterwarnings("ignore", message="dtype .* requested on the CPU")
        ctx = open_chapter(str(params))
    ctx.device = torch.device(device)  # a params file names only real devices
    ctx.dtype = resolve_dtype(ctx.params.dtype, ctx.device)
    if stem == "00_demo_model":
        _chapter_0(ctx)
        return None
    why = skipped_chapters(resolve_target(ctx.params), [Path(f"{stem}.md")]).get(stem)
    if why:
        return why
    module = importlib.import_module(CHAPTERS[stem])
    tables = module.run(ctx, module.Config(**ctx.params.chapter_params(stem)))
    assert module.findings(tables)
    return None


def _chapter_0(ctx) -> None:
    """The calls of the page 00_demo_model (its prose aside)."""
    from weightscope.chapters import model_intro
    from weightscope.chapters.context import sae_summary
    from weightscope.load.models import architecture_table

    model, saes = ctx.load_model_and_saes()
    # the chapters really compute on the simulated device, in the params' dtype
    assert (model.W_E.device.type, model.W_E.dtype) == (simdevice.DEVICE, ctx.dtype)
    architecture_table(model)
    model_intro.architecture_note(model)  # (not `model.nbytes()`: the backend's tensors have no storage)
    del model  # one model at a time, as the page: the SAEs are then checked against the full model
    saes.model = None
    full = saes.model = ctx.load_full_model()
    assert {p.device.type for p in full.parameters()} == {simdevice.DEVICE}
    assert full.to_string(model_intro.greedy_generate(full, "Once upon a time", 4))
    assert [sae_summary(sae)["layer"] for sae in saes] == [0, 1]
    model_intro.sae_source_note(ctx.params)
    model_intro.scale_caveats(full, demo=False)


# ------------------------------------------------------------------------------------------------------------
# The check itself: what it refuses (as CUDA does; the lazy backend alone lets all but `numpy` through) and
# what it allows (as CUDA does)

REFUSED = {
    "CPU generator": lambda d: torch.randn(3, generator=torch.Generator().manual_seed(0), device=d),
    "where, a CPU operand": lambda d: torch.where(torch.ones(3, device=d) > 0, torch.ones(3, device=d),
                                                  torch.zeros(3)),
    "searchsorted, CPU values": lambda d: torch.searchsorted(torch.arange(3.0).to(d), torch.ones(2)),
    "scatter_, CPU source": lambda d: torch.zeros(3, device=d).scatter_(0, torch.tensor([0, 1]).to(d),
                                                                        torch.ones(2)),
    "advanced index, CPU values": lambda d: torch.zeros(3, device=d).__setitem__(torch.tensor([0, 1]),
                                                                               torch.ones(2)),
    "CPU tensor, device index": lambda d: torch.zeros(3)[torch.tensor([0, 1]).to(d)],
    "numpy": lambda d: torch.zeros(3, device=d).numpy(),
}
ALLOWED = {
    "0-dim CPU operand": lambda d: torch.ones(3, device=d) * torch.tensor(2.0),
    "CPU index": lambda d: torch.arange(3.0).to(d)[torch.tensor([0, 2])],
    "slice assignment": lambda d: torch.zeros(3, device=d).__setitem__(slice(0, 2), torch.ones(2)),
    "reads back": lambda d: (torch.ones(3, device=d).cpu(), torch.ones(3, device=d).to("cpu"),
                             torch.ones(3, device=d).sum().item(), torch.ones(3, device=d).tolist()),
    "copy into a CPU tensor": lambda d: torch.zeros(3).copy_(torch.ones(3, device=d)),
}


@pytest.fixture
def calls_count_as_the_library(monkeypatch):
    """The check looks only at the library's calls: let this file's count."""
    monkeypatch.setattr(simdevice, "LIBRARY", str(Path(__file__).parent))


@pytest.mark.parametrize("name", REFUSED)
def test_the_check_refuses_what_cuda_refuses(name, calls_count_as_the_library):
    with simdevice.simulated_device() as device:
        with pytest.raises(simdevice.DeviceBugError, match=r"at tests/test_simulated_device\.py:\d+"):
            REFUSED[name](device)


@pytest.mark.parametrize("name", ALLOWED)
def test_the_check_allows_what_cuda_allows(name, calls_count_as_the_library):
    with simdevice.simulated_device() as device:
        ALLOWED[name](device)


def test_the_backend_splits_as_cuda_does():
    x = torch.arange(70.0).view(10, 7)
    with simdevice.simulated_device() as device:
        for cut in (lambda t: t.split(3, 1), lambda t: t.split([2, 5], 1), lambda t: torch.split(t, 4),
                    lambda t: t.chunk(3), lambda t: t.chunk(4, 1), lambda t: t.unbind(1)):
            want, got = cut(x), cut(x.to(device))
            assert [g.device.type for g in got] == [simdevice.DEVICE] * len(want)
            assert all(torch.equal((g * 2).cpu(), w * 2) for g, w in zip(got, want))  # usable pieces
