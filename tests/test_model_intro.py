"""Chapter 0's generation: the key-value cache changes the cost, not the tokens."""

import pytest
import torch

import standins
from weightscope.chapters import model_intro


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
    plain = plain_greedy(full, "Once upon a time", 12)
    assert torch.equal(cached, plain)
    assert len(cached) > len(full.to_tokens("Once upon a time")[0])  # something was generated


def plain_greedy(model, prompt: str, n_tokens: int) -> torch.Tensor:
    """The naive reference: the whole forward pass again for every token, no key-value cache."""
    ids = model.to_tokens(prompt)
    stop = {model.tokenizer.bos_token_id, model.tokenizer.eos_token_id}
    for _ in range(n_tokens):
        next_id = model(ids)[0, -1].argmax()
        if int(next_id) in stop:
            break
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0]
