"""The stack algorithm against the simulator, and LFU counted in turn as moe-lrc does."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.expert_cache import (
    STACK_POLICIES,
    capacity_hits,
    simulate_cache_stats,
    stack_depths,
)


@st.composite
def traces(draw) -> tuple[np.ndarray, int]:
    """A ``(T, k)`` trace of distinct ids per token, and the number of experts E."""
    num_experts = draw(st.integers(2, 7))
    k = draw(st.integers(1, min(3, num_experts)))
    tokens = draw(st.integers(1, 24))
    rows = draw(st.lists(st.permutations(range(num_experts)), min_size=tokens,
                         max_size=tokens))
    return np.array([row[:k] for row in rows]), num_experts


@settings(max_examples=60, deadline=None)
@given(case=traces(), policy=st.sampled_from([*STACK_POLICIES, "static"]),
       lookahead=st.integers(1, 4), window=st.integers(1, 4))
def test_stack_equals_the_simulator_at_every_capacity(case, policy, lookahead, window):
    # Prepare
    seq, num_experts = case
    frequency = np.bincount(seq.ravel(), minlength=num_experts)

    # Execute
    hits, resident, cold = capacity_hits(seq, num_experts, policy, lookahead, window=window,
                                         frequency=frequency)

    # Assert: one simulation per capacity gives the same counts
    for c in range(1, num_experts + 1):
        stats = simulate_cache_stats(seq, c, policy, lookahead=lookahead, window=window,
                                     counts=frequency, bypass=False)
        got = (stats.hits, stats.resident_hits, stats.cold_misses)
        assert got == (hits[c - 1], resident[c - 1], cold[c - 1]), (policy, c)


def test_lfu_counts_each_use_in_turn_so_the_first_expert_can_evict_the_second():
    # Prepare: E=3, k=2, a cache of C=2.
    seq = np.array([[2, 0], [2, 0], [1, 2], [0, 2]])

    # Execute
    stats = simulate_cache_stats(seq, 2, "lfu")
    hits, _, _ = capacity_hits(seq, 3, "lfu")

    # Assert, by hand. Tokens 0-1: 2 and 0 take the free slots (2 hits), then both hit (2);
    # counts 2:2, 0:2, 0 the more recent. Token 2 looks up {0, 2}: 2 hits, 1 is a cold miss.
    # Counted in turn, 1 enters first while 2 still counts 2, tied with 0 and older: 2 leaves,
    # then re-enters (count 3) and evicts 1 (count 1): the cache is {0, 2} and token 3 hits
    # twice -> 7 of 8. Counting the token's uses at its start (fedmoe before) makes 2 count 3
    # as 1 enters, so 0 leaves and token 3 misses 0 -> 6 of 8.
    assert stats.hits == 7
    assert stats.hit_rate == pytest.approx(7 / 8)
    np.testing.assert_array_equal(hits, [3, 7, 8])  # moe-lrc's calc_lfu * 8 on this trace


def test_stack_rejects_policies_it_cannot_run():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        stack_depths(np.array([[0], [1]]), 2, "fifo")
