"""SRP, SCH and cache curves against values worked out by hand on small routing masks."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.analysis.consistency import (
    cache_curve,
    model_trace,
    per_sample_hit_rates,
    routing_mask,
    srp,
    window_count_histogram,
)


def ids(*tokens) -> np.ndarray:
    """One sample ``(1, T, k)`` from per-token expert lists."""
    return np.array([list(t) if isinstance(t, tuple | list) else [t] for t in tokens])[None]


# --- SRP ----------------------------------------------------------------------------------


def test_window_histogram_counts_every_window_and_expert():
    # Prepare: E=3, k=1, experts 0 0 1 0; windows of m=2 start at tokens 0, 1, 2.
    mask = routing_mask(ids(0, 0, 1, 0), 3)
    # Execute
    hist = window_count_histogram(mask, 2)
    # Assert: windows (2,0,0), (1,1,0), (1,1,0) -> four zeros, four ones, one two.
    np.testing.assert_array_equal(hist, [[4, 4, 1]])


def test_srp_per_layer_and_model_by_hand():
    # Prepare: layer 0 routes 0 0 1 0, layer 1 routes 0 1 2 0 (E=3, k=1), m=2.
    masks = {0: routing_mask(ids(0, 0, 1, 0), 3), 1: routing_mask(ids(0, 1, 2, 0), 3)}
    # Execute
    res = srp(masks, 2, num_bootstrap=20)
    # Assert: layer 0: F1(tau) = 12/24, 12/16, 4/8 -> 0.75 at tau 1.
    assert res["0"].f1 == pytest.approx([0.5, 0.75, 0.5])
    assert (res["0"].srp, res["0"].tau) == (pytest.approx(0.75), 1)
    # layer 1: windows (1,1,0) (0,1,1) (1,0,1): F1 = 12/24, 12/18, 0/6 -> 2/3.
    assert res["1"].f1 == pytest.approx([0.5, 2 / 3, 0.0])
    # model, one threshold for both layers: M = 12, 12, 2; P = 36, 22, 2; A = 12.
    assert res["model"].f1 == pytest.approx([24 / 48, 24 / 34, 4 / 14])
    assert res["model"].srp == pytest.approx(12 / 17)
    assert res["0"].windows == 3


def test_srp_of_a_constant_router_is_one_and_skips_short_samples():
    # Prepare: k=2 of E=4, every token picks {0, 1}; a second sample shorter than m.
    long = np.tile([[0, 1]], (4, 1))[None]  # (1, 4, 2)
    mask = routing_mask(long, 4)
    # Execute
    res = srp({0: mask}, 4, num_bootstrap=10)
    short = window_count_histogram(routing_mask(long[:, :3], 4), 4)
    # Assert: tau in 1..4 predicts exactly the two experts; tau 0 predicts all four.
    assert res["0"].f1[0] == pytest.approx(16 / 24)
    assert res["0"].srp == pytest.approx(1.0)
    assert short.sum() == 0


# --- caches ---------------------------------------------------------------------------------

SEQ = ids(0, 1, 2, 0, 1, 3)  # k = 1, E = 4, 6 accesses


def test_lru_hit_rates_both_conventions_and_cold_misses():
    # Execute
    hit, strict, cold = per_sample_hit_rates(SEQ, 4, "lru")
    # Assert: C=1: only the first use finds a free slot; C=2: 0,1 cold hits, then
    # 2 evicts 0, 0 evicts 1, 1 evicts 2, 3 misses; C=3: 0 and 1 hit again; C=4: all.
    np.testing.assert_allclose(hit[0], [1 / 6, 2 / 6, 5 / 6, 6 / 6])
    np.testing.assert_allclose(strict[0], [0, 0, 2 / 6, 2 / 6])
    np.testing.assert_allclose(cold[0], [3 / 6, 2 / 6, 1 / 6, 0])


def test_belady_beats_lru_by_hand():
    # Execute
    hit, _, _ = per_sample_hit_rates(SEQ, 4, "belady")
    # Assert C=2: 2 evicts 1 (0 is used sooner); 0 hits; 1 evicts 2 (tie: never used
    # again, 2 is less recent than 0); 3 misses -> 2 cold hits + 1.
    assert hit[0][1] == pytest.approx(3 / 6)
    assert hit[0][2] == pytest.approx(5 / 6)


def test_sch_lookahead_two_keeps_the_expert_used_next():
    # Execute
    sch2, _, _ = per_sample_hit_rates(SEQ, 4, "sch", lookahead=2)
    sch1, _, _ = per_sample_hit_rates(SEQ, 4, "sch", lookahead=1)
    lru, _, _ = per_sample_hit_rates(SEQ, 4, "lru")
    # Assert C=2: at token 2, expert 0 is used in the next 2 tokens and 1 is not, so 1
    # goes (LRU would evict 0); then 0 hits.
    assert sch2[0][1] == pytest.approx(3 / 6)
    np.testing.assert_allclose(sch1, lru)  # SCH with L=1 is LRU


def test_lfu_and_static_by_hand():
    # Prepare: 0 0 1 2 0 1 (frequencies 3, 2, 1).
    seq = ids(0, 0, 1, 2, 0, 1)
    # Execute
    lfu, _, _ = per_sample_hit_rates(seq, 3, "lfu")
    lru, _, _ = per_sample_hit_rates(seq, 3, "lru")
    static, static_strict, static_cold = per_sample_hit_rates(seq, 3, "static")
    # Assert C=2: LFU evicts 1 (freq 1) for 2, keeps 0 which hits, then 1 evicts 2.
    assert lfu[0][1] == pytest.approx(4 / 6)
    assert lru[0][1] == pytest.approx(3 / 6)
    np.testing.assert_allclose(static[0], [3 / 6, 5 / 6, 1.0])
    np.testing.assert_allclose(static_strict, static)  # preloaded: no free-slot hits
    # The first use of an expert it does not pin is a cold miss: 1 and 2 at C=1, 2 at C=2.
    np.testing.assert_allclose(static_cold[0], [2 / 6, 1 / 6, 0])


def test_all_k_experts_look_up_the_cache_state_at_the_token_start():
    # Prepare: k=2, C=1; token 0 leaves {1} cached, token 1 asks for 0 then 1.
    seq = ids((0, 1), (0, 1))
    # Execute
    hit, strict, _ = per_sample_hit_rates(seq, 2, "lru")
    # Assert: token 1 finds 1 in the start-of-token cache although 0 is inserted first
    # (sequential lookups would miss both); plus one cold hit at token 0.
    assert hit[0][0] == pytest.approx(2 / 4)
    assert strict[0][0] == pytest.approx(1 / 4)


def test_cache_curve_mean_over_samples_and_zero_width_ci_for_equal_samples():
    # Prepare: two identical samples.
    two = np.concatenate([SEQ, SEQ])
    # Execute
    curve = cache_curve(two, 4, "lru", num_bootstrap=30)
    # Assert
    assert curve.capacity == [1, 2, 3, 4]
    assert curve.at(3) == pytest.approx(5 / 6)
    np.testing.assert_allclose(curve.ci_low, curve.hit_rate)
    np.testing.assert_allclose(curve.ci_high, curve.hit_rate)


def test_model_trace_offsets_layers():
    # Prepare: two layers of 4 experts, one token each.
    trace, total = model_trace({0: ids((1, 2)), 3: ids((0, 3))}, {0: 4, 3: 4})
    # Assert
    assert total == 8
    np.testing.assert_array_equal(trace[0, 0], [1, 2, 4, 7])
