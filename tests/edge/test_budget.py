"""``edge.budget``: experts per layer from counts, multiples and memory."""

from __future__ import annotations

import pytest

from fedmoe.edge.budget import parse_budget


@pytest.mark.parametrize(("budget", "expected"), [
    ("2x", 4), ("1x", 2), ("all", 8), (3, 3), ("5", 5), ("100x", 8),
    ("1MB", 1_000_000 // (1000 * 4)), ("0.5MiB", 2**19 // (1000 * 4)),
])
def test_parse_budget(budget, expected):
    got = parse_budget(budget, top_k=2, num_experts=8, expert_nbytes=1000, num_layers=4)
    assert got == min(expected, 8)


@pytest.mark.parametrize("budget", ["1KB", "abc", "0"])
def test_parse_budget_rejects_less_than_one_expert(budget):
    with pytest.raises(ValueError, match="edge.budget"):
        parse_budget(budget, top_k=2, num_experts=8, expert_nbytes=1000, num_layers=4)
