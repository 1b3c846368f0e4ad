"""Chapter 0's generation: the key-value cache changes the cost, not the tokens."""

import pytest
import torch

import standins
from weightscope.chapters import model_intro
from weightscope.load import models


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_generation_equals_rerunning_the_sequence(tmp_path, arch):
    """The same greedy tokens as the uncached loop (which reruns the whole sequence for each token)."""
    from weightscope.chapters.context import open_chapter

    folder = standins.build_model(arch, tmp_path / arch, seed=3)
    params = standins.write_params(f"standin-{arch}", folder, standins.build_saes(folder, tmp_path / "saes"),
                                   tmp_path / f"standin-{arch}.yaml")
    full = open_chapter(str(params)).load_full_model()
    torch.manual_seed(0)
    cached = model_intro.greedy_generate(full, "Once upon a time", 12)
    plain = models.greedy_generate(full, "Once upon a time", 12)
    assert torch.equal(cached, plain)
    assert len(cached) > len(full.to_tokens("Once upon a time")[0])  # something was generated
