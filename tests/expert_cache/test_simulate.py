"""Cache policies and the simulator: textbook hit counts, Belady's optimality, LFU as moe-lrc."""

from __future__ import annotations

import itertools
import random
from functools import cache

import pytest
import torch

from fedmoe.expert_cache import CacheState, make_policy, simulate_cache_stats

# Silberschatz's reference string: 3 frames give 12 faults under LRU, 9 under OPT.
TEXTBOOK = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]


def _steps(ids):
    return [[e] for e in ids]


def optimal_hits(trace: list[list[int]], capacity: int) -> int:
    """Most hits any cache of ``capacity`` can score (exhaustive search, bypass allowed)."""
    steps = [frozenset(s) for s in trace]

    @cache
    def best(t: int, resident: frozenset) -> int:
        if t == len(steps):
            return 0
        hits = len(steps[t] & resident)
        pool = sorted(resident | steps[t])
        choices = [frozenset(c) for r in range(min(capacity, len(pool)) + 1)
                   for c in itertools.combinations(pool, r)]
        return hits + max(best(t + 1, c) for c in choices)

    return best(0, frozenset())


def hit_rate(trace, capacity: int, policy: str, **kwargs) -> float:
    return simulate_cache_stats(trace, capacity, policy, **kwargs).hit_rate


def random_trace(seed: int, steps: int, experts: int, k: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Mild locality: a drifting favourite set, so policies differ.
    favourites = rng.sample(range(experts), k + 1)
    trace = []
    for _ in range(steps):
        if rng.random() < 0.3:
            favourites[rng.randrange(len(favourites))] = rng.randrange(experts)
        pool = list(dict.fromkeys(favourites + rng.sample(range(experts), k)))
        trace.append(sorted(rng.sample(pool, k)))
    return trace


def test_lru_textbook_reference_string():
    # Execute
    stats = simulate_cache_stats(_steps(TEXTBOOK), 3, "lru")

    # Assert: the textbook's 12 faults of 20, 6 of them first uses (7, 0, 1, 2, 3, 4); the
    # first three found a free slot, hits by the moe-lrc convention, so 9 misses, 3 cold.
    assert (stats.lookups - stats.resident_hits, stats.resident_hits) == (12, 8)
    assert (stats.first_uses, stats.free_slot_hits, stats.cold_misses) == (6, 3, 3)
    assert (stats.hits, stats.misses) == (11, 9)
    assert stats.hit_rate == pytest.approx(11 / 20)
    assert stats.hit_rate_strict == pytest.approx(8 / 20)
    assert stats.hit_rate_warm == pytest.approx(8 / 14)


def test_belady_textbook_reference_string_beats_opt_without_bypass():
    # Execute
    stats = simulate_cache_stats(_steps(TEXTBOOK), 3, "belady")

    # Assert: OPT's 9 faults at most (bypass can only help), and exactly the optimum
    assert stats.lookups - stats.resident_hits <= 9
    assert stats.resident_hits == optimal_hits(_steps(TEXTBOOK), 3)


def test_lfu_keeps_the_frequent_expert_lru_drops():
    # Prepare: 1 is used thrice, then 2 and 3 arrive; 1 returns.
    trace = _steps([1, 1, 2, 3, 1, 2])

    # Execute
    lfu = simulate_cache_stats(trace, 2, "lfu")
    lru = simulate_cache_stats(trace, 2, "lru")

    # Assert
    # LFU: 1 miss, 1 hit, 2 miss, 3 miss (evicts 2: used once), 1 hit, 2 miss -> 2 hits
    assert lfu.resident_hits == 2
    # LRU: 1 miss, 1 hit, 2 miss, 3 miss (evicts 1), 1 miss, 2 miss -> 1 hit
    assert lru.resident_hits == 1


def test_consistency_counts_uses_within_the_window():
    # Prepare: window 4; at step 4 the window holds 1 twice, 2 once -> 2 leaves (LRU drops 1).
    trace = _steps([1, 1, 1, 2, 3, 1])

    # Execute
    consistency = simulate_cache_stats(trace, 2, "consistency", window=4)
    lru = simulate_cache_stats(trace, 2, "lru")
    short = simulate_cache_stats(trace, 2, "consistency", window=1)

    # Assert
    assert consistency.resident_hits == 3  # steps 1, 2 and 5
    assert lru.resident_hits == 2
    assert short.resident_hits == lru.resident_hits  # a 1-step window degenerates to recency


def test_static_pins_the_most_used_and_admits_nothing():
    # Prepare
    trace = _steps([0, 1, 0, 2, 0, 3, 1, 1])
    counts = [5, 4, 1, 0]

    # Execute
    stats = simulate_cache_stats(trace, 2, "static", counts=counts)

    # Assert: 0 and 1 pinned: hits on every 0 and 1 (6), misses on 2 and 3
    assert (stats.hits, stats.misses) == (6, 2)
    assert stats.cold_misses == 2  # pinned experts were loaded up front, never cold
    assert stats.free_slot_hits == 0  # it admits nothing: no slot is ever free for 2 or 3


def test_none_policy_misses_every_lookup():
    stats = simulate_cache_stats(_steps(TEXTBOOK), 3, "none")
    assert stats.hits == 0 and stats.lookups == 20


def test_multi_expert_steps_look_up_against_the_start_of_step_state():
    # Prepare: capacity 2, steps of two experts; 0 and 1 both resident before step 2
    trace = [[0, 1], [2, 3], [0, 1]]

    # Execute
    lru = simulate_cache_stats(trace, 2, "lru")
    full = simulate_cache_stats(trace, 4, "lru")

    # Assert: 0, 1 take the free slots; 2 and 3 evict them; 0, 1 miss again
    assert (lru.resident_hits, lru.free_slot_hits, lru.lookups, lru.steps) == (0, 2, 6, 3)
    # four slots: four first uses into free slots, then 0 and 1 resident
    assert (full.resident_hits, full.first_uses, full.cold_misses, full.hits) == (2, 4, 0, 6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_belady_is_optimal_on_small_random_traces(k):
    for seed in range(4):
        # Prepare
        trace = random_trace(seed, steps=10, experts=6, k=k)
        for capacity in (k, k + 1):
            # Execute
            hits = simulate_cache_stats(trace, capacity, "belady").resident_hits

            # Assert
            assert hits == optimal_hits(trace, capacity), (seed, capacity)


def test_belady_upper_bounds_every_online_policy_on_random_traces():
    for seed, k, capacity in itertools.product(range(6), (1, 2, 4), (1, 2, 4, 8)):
        # Prepare
        trace = random_trace(100 + seed, steps=200, experts=16, k=k)
        bound = hit_rate(trace, capacity, "belady")

        # Execute
        online = {p: hit_rate(trace, capacity, p, window=8)
                  for p in ("lru", "lfu", "consistency", "none")}
        static = hit_rate(trace, capacity, "static")  # oracle counts, preloaded
        warm_bound = hit_rate(trace, capacity, "belady", warm=True)

        # Assert
        assert all(rate <= bound + 1e-12 for rate in online.values()), (seed, k, capacity, online)
        assert static <= warm_bound + 1e-12 and bound <= warm_bound + 1e-12


def test_simulator_accepts_a_top_k_tensor():
    # Prepare: (T, k) top-k ids, as routing capture records them
    ids = torch.tensor([[0, 1], [1, 2], [0, 1]])

    # Execute
    stats = simulate_cache_stats(ids, 4, "lru")

    # Assert: 0,1 first uses; 1 hit, 2 first use; 0 and 1 hit; every first use found a slot
    assert stats.hit_rate_strict == pytest.approx(3 / 6)
    assert stats.hit_rate == pytest.approx(1.0)


def test_cache_state_never_exceeds_capacity():
    # Prepare
    state = CacheState(3, make_policy("consistency", window=4))

    # Execute / Assert
    for step in random_trace(7, steps=50, experts=10, k=2):
        _, misses = state.lookup(step)
        for e in misses:
            state.admit(e)
        assert len(state.resident) <= 3


def test_admit_never_evicts_a_protected_expert():
    # Prepare: LRU holding 1 (oldest) and 2
    state = CacheState(2, make_policy("lru"))
    for e in (1, 2):
        state.lookup([e])
        state.admit(e)
    # Execute / Assert: 1 is LRU's victim unless the step needs it
    assert state.admit(3, protect=[1]) == (True, 2)
    assert state.admit(4, protect=[1, 3]) == (False, None)
    assert list(state.resident) == [1, 3]
    assert state.admit(4) == (True, 1)


def test_unknown_policy_and_missing_inputs_name_the_key():
    with pytest.raises(ValueError, match="edge.policy='fifo'"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="static needs"):
        make_policy("static")
    with pytest.raises(ValueError, match="belady"):
        make_policy("belady")
