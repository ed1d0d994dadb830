"""Bootstrap intervals, paired differences and win rates of `fedmoe.reporting.stats`: properties,
hand-computed answers, and what resampling seeds and clients changes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.reporting.stats import (
    Estimate,
    UnmatchedUnits,
    bootstrap_ci,
    crossed,
    paired_differences,
    win_rate,
)

samples = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30)
FAST = {"n_resamples": 2000}  # property tests: fewer resamples, the properties hold for any


def _tol(values) -> float:
    return 1e-9 * (1 + max(abs(v) for v in values))


@settings(max_examples=60, deadline=None)
@given(samples)
def test_the_interval_contains_the_sample_mean(values):
    e = bootstrap_ci(values, **FAST)
    assert e.mean == pytest.approx(np.mean(values), abs=_tol(values))
    assert e.low - _tol(values) <= e.mean <= e.high + _tol(values)


@settings(max_examples=60, deadline=None)
@given(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 30))
def test_a_constant_sample_has_a_zero_width_interval(value, n):
    e = bootstrap_ci([value] * n, **FAST)
    assert e.low == e.mean == e.high == value


@settings(max_examples=60, deadline=None)
@given(samples, st.floats(-1e3, 1e3, allow_nan=False))
def test_shifting_the_values_shifts_the_interval(values, shift):
    e = bootstrap_ci(values, **FAST)
    moved = bootstrap_ci([v + shift for v in values], **FAST)
    tol = _tol(values) + 1e-9 * abs(shift)
    assert moved.low == pytest.approx(e.low + shift, abs=tol)
    assert moved.high == pytest.approx(e.high + shift, abs=tol)


def test_known_answer_of_two_values():
    # Resampled means of [0, 1]: 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4. The 2.5 % and
    # 97.5 % quantiles are then 0 and 1; the 30 % and 70 % quantiles are both 0.5.
    assert bootstrap_ci([0.0, 1.0]) == Estimate(0.5, 0.0, 1.0, 2)
    narrow = bootstrap_ci([0.0, 1.0], confidence=0.4)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_agrees_with_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(1).lognormal(size=40)
    e = bootstrap_ci(x, n_resamples=20_000)
    ref = scipy_stats.bootstrap((x,), np.mean, method="percentile", n_resamples=20_000,
                                random_state=0).confidence_interval
    width = ref.high - ref.low
    assert abs(e.low - ref.low) < 0.05 * width and abs(e.high - ref.high) < 0.05 * width


def test_the_same_seed_gives_the_same_interval():
    x = np.random.default_rng(2).normal(size=20)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)


def test_resampling_seeds_widens_the_interval_of_a_seed_effect():
    # Prepare: 2 seeds x 5 clients; a run's clients all move together (value = seed)
    units = [(str(s), str(c)) for s in range(2) for c in range(5)]
    values = [float(s) for s, _ in units]
    # Execute
    iid = bootstrap_ci(values)
    clustered = bootstrap_ci(values, clusters=crossed(units))
    # Assert: the crossed interval is the bootstrap of two seed means, 0 and 1 (see
    # test_known_answer_of_two_values); the i.i.d. one takes 10 units as 10 pieces of evidence
    assert (clustered.low, clustered.high) == (0.0, 1.0)
    assert 0.1 <= iid.low < iid.high <= 0.9


def test_resampling_clients_widens_the_interval_of_a_client_effect():
    # A client is the same data under every seed: its value repeats across the 4 seeds
    units = [(str(s), str(c)) for s in range(4) for c in range(2)]
    values = [float(c) for _, c in units]
    narrow = bootstrap_ci(values, clusters=crossed(units), confidence=0.4)
    clustered = bootstrap_ci(values, clusters=crossed(units))
    assert (narrow.low, narrow.high) == (0.5, 0.5)
    assert (clustered.low, clustered.high) == (0.0, 1.0)
    iid = bootstrap_ci(values)
    assert 0.1 <= iid.low < iid.high <= 0.9


def test_bad_samples_are_errors():
    with pytest.raises(ValueError, match="non-empty 1-D finite"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="non-empty 1-D finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="2 labels for 3 values"):
        bootstrap_ci([1.0, 2.0, 3.0], clusters=[["a", "b"]])


def test_paired_differences():
    a = {("0", "0"): 90.0, ("0", "1"): 120.0}
    b = {("0", "0"): 100.0, ("0", "1"): 100.0}
    assert paired_differences(a, b) == {("0", "0"): -10.0, ("0", "1"): 20.0}
    assert paired_differences(a, b, relative=True) == pytest.approx(
        {("0", "0"): -10.0, ("0", "1"): 20.0})  # percent of b, which is 100 here
    assert paired_differences(b, a, relative=True)[("0", "0")] == pytest.approx(100 / 9)


def test_unmatched_units_are_named():
    a = {("0", "0"): 1.0, ("0", "1"): 1.0, ("1", "0"): 1.0}
    b = {("0", "0"): 1.0, ("1", "0"): 1.0, ("1", "2"): 1.0}
    with pytest.raises(UnmatchedUnits, match=r"first \[\('0', '1'\)\].*second \[\('1', '2'\)\]"):
        paired_differences(a, b)


def test_win_rate_counts_ties_as_half():
    # Prepare: a beats b on 2 units, ties 1, loses 1 -> (1 + 1 + 0.5 + 0) / 4
    a = {("0", "0"): 1.0, ("0", "1"): 1.0, ("1", "0"): 5.0, ("1", "1"): 9.0}
    b = {("0", "0"): 2.0, ("0", "1"): 2.0, ("1", "0"): 5.0, ("1", "1"): 3.0}
    e = win_rate(a, b)
    assert e.mean == 0.625 and e.n == 4
    assert 0.0 <= e.low < 0.625 < e.high <= 1.0
    assert win_rate(a, a) == Estimate(0.5, 0.5, 0.5, 4)
