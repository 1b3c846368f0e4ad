"""Test-session defaults: find the shared inputs next to the repository, and never touch the network."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# Explicit environment variables win; otherwise use `<repo>/../shared/{models,corpora}` when present.
for variable, name in (("WEIGHTSCOPE_MODELS", "models"), ("WEIGHTSCOPE_CORPORA", "corpora")):
    folder = SHARED / name
    if not os.environ.get(variable) and folder.is_dir():
        os.environ[variable] = str(folder)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here; runs where one is present")),
    pytest.param("simulated", id="simulated")])
def device(request):
    """The compute devices a kernel test runs on: the CPU always, a CUDA GPU when one is present, and the
    simulated device (tests/simdevice.py: "lazy", refusing what CUDA refuses) everywhere, so that device
    bugs show without a GPU."""
    if request.param != "simulated":
        yield request.param
        return
    import simdevice

    with simdevice.simulated_device() as simulated:
        yield simulated


@pytest.fixture(autouse=True)
def _restore_grad_mode():
    """`open_chapter` turns autograd off for the whole process (as a notebook wants), and a module-scoped
    fixture may do so before a test starts: every test starts with autograd on (torch's default; sae-lens's
    training runner needs it) and leaves it on for the next."""
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)


@pytest.fixture
def sae_loads(monkeypatch):
    """Watches every SAE a lazy `SAESequence` loads: `.alive` holds a weak reference to each, `.most` the
    most of them alive at once, counted at each load (the new one included). Call `.reset()` between steps."""
    import weakref
    from types import SimpleNamespace

    import sae_lens  # noqa: F401  (imported first: its first import keeps the importing frame, and an SAE, alive)

    from weightscope.load.sae_sequence import SAESequence

    seen = SimpleNamespace(alive=[], most=0)
    seen.reset = lambda: (seen.alive.clear(), setattr(seen, "most", 0))
    load = SAESequence.__getitem__

    def counted(self, index):
        sae = load(self, index)
        seen.alive.append(weakref.ref(sae.sae))
        seen.most = max(seen.most, sum(ref() is not None for ref in seen.alive))
        return sae

    monkeypatch.setattr(SAESequence, "__getitem__", counted)
    return seen


@pytest.fixture
def lazy_standin(tmp_path, monkeypatch):
    """A chapter context (`open_chapter`) for a 4-block Llama stand-in with a TopK SAE on every block, which
    the chapters load as the book does (`SAESequence`: each when reached); its data under tmp_path."""
    import standins

    from weightscope.chapters.context import open_chapter

    if not standins.GPT2_TOKENIZER.is_dir():
        pytest.skip("needs ../shared/tokenizers/gpt2")
    folder = standins.build_model("llama", tmp_path / "model", n_layers=4)
    params = standins.write_params("lazy-saes", folder, standins.build_saes(folder, tmp_path / "saes"),
                                   tmp_path / "lazy-saes.yaml")
    monkeypatch.setenv("WEIGHTSCOPE_DATA", str(tmp_path / "data"))
    return open_chapter(str(params))
