"""The pure parts of scripts/bench_edge.py: routing replay mapping and the goal ratios."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_edge")


def test_stack_routing_keeps_each_source_layers_ids_in_its_own_block(bench):
    # Prepare: 3 source layers of 16 experts, top-2; targets of 60 experts, top-4 (2 groups)
    gen = torch.Generator().manual_seed(0)
    source = [torch.stack([torch.randperm(16, generator=gen)[:2] for _ in range(50)])
              for _ in range(3)]
    # Execute
    out = bench.stack_routing(source, 16, layers=[0, 1], num_experts=60, top_k=4)
    # Assert: layer i takes source layers 2i, 2i+1 (cycling), the j-th shifted by 16 j
    assert set(out) == {0, 1} and out[0].shape == (50, 4)
    torch.testing.assert_close(out[0][:, :2], source[0])
    torch.testing.assert_close(out[0][:, 2:], source[1] + 16)
    torch.testing.assert_close(out[1][:, :2], source[2])
    torch.testing.assert_close(out[1][:, 2:], source[0] + 16)


def test_stack_routing_moves_a_collision_to_the_next_free_id(bench):
    # 16 source experts onto 20: group 1's experts 6 and 9 map to (16 + 6) % 20 = 2 and
    # 5, which group 0 already holds -> the next free ids 3 and 6
    source = [torch.tensor([[2, 5]]), torch.tensor([[6, 9]])]
    out = bench.stack_routing(source, 16, layers=[0], num_experts=20, top_k=4)
    assert out[0].tolist() == [[2, 5, 3, 6]]


def test_goals_are_the_issues_ratios(bench):
    def row(contender, budget, policy, decode, hit=1.0, belady=1.0, prefetch=False, frac=1.0):
        return {"contender": contender, "budget": budget, "policy": policy, "prefetch": prefetch,
                "decode_tokens_per_s": decode, "hit_rate": hit, "belady_hit_rate": belady,
                "resident_expert_fraction": frac}

    rows = [row("in-memory eager", "all", "eager", 10.0),
            row("in-memory grouped_mm", "all", "grouped_mm", 20.0),
            row("fedmoe in-memory", "all", "static", 12.0),
            row("naive offload", "1", "none", 30.0, hit=0.0, frac=0.0),
            row("lru 2x +prefetch", "2x", "lru", 8.0, 0.6, 0.8, True, 0.25),
            row("lfu 2x +prefetch", "2x", "lfu", 11.0, 0.76, 0.8, True, 0.25),
            row("lru 4x", "4x", "lru", 15.0, 0.9, 0.95, False, 0.5)]
    goals = bench.goals(rows)
    assert goals["best_2x_prefetch"] == "lfu 2x +prefetch"
    assert goals["hit_rate_vs_belady"] == pytest.approx(0.95) and goals["hit_goal_met"]
    # 4x holds 50% > 40%, and naive offload keeps no cache: lfu 2x is the fastest small one
    assert goals["fastest_small_budget"] == "lfu 2x +prefetch"
    assert goals["decode_vs_fastest_in_memory"] == pytest.approx(11 / 20)
    assert goals["speed_goal_met"]
    assert goals["fedmoe_in_memory_decode_vs_eager"] == pytest.approx(1.2)
    assert goals["in_memory_goal_met"]
