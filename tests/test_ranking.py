"""`compute.ranking`: near-equal activations rank as equal, the earlier position wins, on every processor."""

from __future__ import annotations

import pytest
import torch

from weightscope.compute import ranking


def _naive_top(values: torch.Tensor, n: int) -> torch.Tensor:
    """indices [n, k]: per column, sorted by (key descending, index ascending) in Python."""
    cols = []
    for j in range(values.shape[1]):
        keys = ranking.rank_key(values[:, j]).tolist()
        cols.append(sorted(range(len(keys)), key=lambda i: (-keys[i], i))[:n])
    return torch.tensor(cols).T


def test_top_earliest_equals_a_sort_by_key_then_index_with_ties_and_last_bit_neighbours():
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(300, 40, generator=gen)
    base[base < 0.3] = 0  # a sparse code: many exact zeros
    base[::7] = base[3]  # exact ties: identical contexts
    up = torch.nextafter(base, torch.tensor(2.0))
    values = torch.where(torch.rand(base.shape, generator=gen) < 0.5, base, up)  # a last bit apart
    got_vals, got_idx = ranking.top_earliest(values, 12)
    want = _naive_top(values, 12)
    assert torch.equal(got_idx, want)
    assert torch.equal(got_vals, values.gather(0, want))  # the exact values, not the keys


def test_top_earliest_keeps_the_earlier_of_two_near_equal_values_in_either_order():
    a = torch.tensor(0.55819964)
    b = torch.nextafter(a, torch.tensor(1.0))
    for first, second in ((a, b), (b, a)):
        values = torch.stack([torch.tensor(0.1), first, torch.tensor(0.9), second])[:, None]
        assert ranking.top_earliest(values, 2)[1][:, 0].tolist() == [2, 1]  # torch.topk alone: 3 for b
    step = ranking.rank_key(torch.tensor(1.0)) * 2.0 ** (1 - ranking.RANK_BITS)
    apart = torch.tensor([[1.0], [1.0 + float(step)]])  # one key step apart: the larger wins, though later
    assert ranking.top_earliest(apart, 1)[1].item() == 1


def test_top_earliest_refuses_more_positions_than_its_tie_break_can_order(monkeypatch):
    monkeypatch.setattr(ranking, "MAX_INDEX", 8)
    with pytest.raises(ValueError, match="at most 8 positions"):
        ranking.top_earliest(torch.ones(9, 1), 1)
