"""Masked aggregation math, without Flower."""

import numpy as np
import pytest

from fedmoe.fl.aggregate import (
    check_held,
    check_update,
    masked_aggregate,
    norm_outliers,
    reduce_rows,
    update_norm,
    weighted_mean_metrics,
)
from tests.helpers.records import ROUTER, f32

SHARED = "model.layers.1.mlp.shared_expert.down_proj.weight"
EXPERT_ROWS = {ROUTER: 1}


@pytest.fixture
def current() -> dict[str, np.ndarray]:
    return {ROUTER: f32([[0, 0], [1, 1], [2, 2], [3, 3]]), SHARED: f32([0, 0, 0])}


def test_weighted_mean_matches_hand_computation(current):
    # Prepare: two clients holding every expert, weights 1 and 3
    a = {ROUTER: f32([[1, 2], [3, 4], [5, 6], [7, 8]]), SHARED: f32([1, 1, 1])}
    b = {ROUTER: f32([[5, 6], [7, 8], [9, 10], [11, 12]]), SHARED: f32([5, 5, 5])}

    # Execute
    out = masked_aggregate([a, b], [None, None], [1, 3], current, EXPERT_ROWS)

    # Assert: (1 * a + 3 * b) / 4
    np.testing.assert_allclose(out[ROUTER], [[4, 5], [6, 7], [8, 9], [10, 11]])
    np.testing.assert_allclose(out[SHARED], [4, 4, 4])
    assert out[ROUTER].dtype == np.float32


def test_router_rows_average_only_over_holders(current):
    # Prepare: A holds experts {0, 1}, B holds {1, 2}; nobody holds expert 3
    a = {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32([1, 1, 1])}
    b = {ROUTER: f32([[7, 8], [9, 10]]), SHARED: f32([5, 5, 5])}

    # Execute
    out = masked_aggregate([a, b], [{1: [0, 1]}, {1: [1, 2]}], [1, 3], current, EXPERT_ROWS)

    # Assert: row 0 only A, row 1 = (1*[3,4] + 3*[7,8]) / 4, row 2 only B, row 3 global
    np.testing.assert_allclose(out[ROUTER], [[1, 2], [6, 7], [9, 10], [3, 3]])
    np.testing.assert_allclose(out[SHARED], [4, 4, 4])


def test_disjoint_subsets_take_each_row_from_its_only_holder(current):
    # Prepare
    a = {ROUTER: f32([[1, 2], [3, 4]]), SHARED: f32([2, 2, 2])}
    b = {ROUTER: f32([[9, 10], [11, 12]]), SHARED: f32([6, 6, 6])}

    # Execute
    out = masked_aggregate([a, b], [{1: [0, 1]}, {1: [2, 3]}], [1, 1], current, EXPERT_ROWS)

    # Assert
    np.testing.assert_allclose(out[ROUTER], [[1, 2], [3, 4], [9, 10], [11, 12]])
    np.testing.assert_allclose(out[SHARED], [4, 4, 4])


def test_held_record_for_another_layer_means_all_experts_here(current):
    # Prepare: the client pruned layer 0 only, so it holds all 4 experts of layer 1
    a = {ROUTER: f32([[1, 1], [1, 1], [1, 1], [1, 1]]), SHARED: f32([1, 1, 1])}

    # Execute
    out = masked_aggregate([a], [{0: [2]}], [1], current, EXPERT_ROWS)

    # Assert
    np.testing.assert_allclose(out[ROUTER], np.ones((4, 2)))


def _robust_case():
    """Five clients; expert 0 held by all, expert 1 only by the first three."""
    current = {ROUTER: f32([[0], [-1]]), SHARED: f32([0])}
    row0, row1, shared = [1, 2, 3, 7, 100], [10, 20, 60], [5, 1, 4, 2, 3]
    updates, held = [], []
    for k in range(5):
        rows = [[row0[k]], [row1[k]]] if k < 3 else [[row0[k]]]
        updates.append({ROUTER: f32(rows), SHARED: f32([shared[k]])})
        held.append(None if k < 3 else {1: [0]})
    return current, updates, held


def test_median_per_row_over_holders_ignores_weights():
    # Prepare
    current, updates, held = _robust_case()

    # Execute
    out = masked_aggregate(updates, held, [1, 1, 1, 1, 100], current, EXPERT_ROWS, "median")

    # Assert: row 0 median of 5 values, row 1 median of its 3 holders
    np.testing.assert_allclose(out[ROUTER], [[3], [20]])
    assert out[ROUTER][0, 0] == np.median([1, 2, 3, 7, 100])
    np.testing.assert_allclose(out[SHARED], [3])


def test_trimmed_mean_per_row_over_holders():
    # Prepare
    current, updates, held = _robust_case()

    # Execute
    out = masked_aggregate(updates, held, [1] * 5, current, EXPERT_ROWS, "trimmed_mean", 0.2)

    # Assert: 5 holders -> drop 1 at each end: (2+3+7)/3; 3 holders -> int(0.6) = 0 dropped
    np.testing.assert_allclose(out[ROUTER], [[4], [30]])
    np.testing.assert_allclose(out[SHARED], [3])  # (2+3+4)/3


def test_trimmed_mean_matches_numpy_sort_and_slice():
    # Prepare
    stack = np.random.default_rng(0).normal(size=(10, 3, 2))

    # Execute
    out = reduce_rows(stack, np.ones(10), "trimmed_mean", 0.25)

    # Assert: int(0.25 * 10) = 2 cut at each end, per coordinate
    np.testing.assert_allclose(out, np.sort(stack, axis=0)[2:8].mean(axis=0))


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="'mode'"):
        reduce_rows(np.ones((2, 1)), np.ones(2), "mode", 0.2)


@pytest.mark.parametrize(
    ("update", "held", "expected"),
    [
        ({ROUTER: f32(np.ones((4, 2)))}, None, f"missing ['{SHARED}']"),
        (
            {ROUTER: f32(np.ones((4, 2))), SHARED: f32([0, 0, 0]), "x": f32([1])},
            None,
            "unknown ['x']",
        ),
        (
            {ROUTER: f32(np.ones((4, 2))), SHARED: f32([0, 0, 0])},
            {1: [0, 2]},
            "shape (4, 2), expected (2, 2)",
        ),
        (
            {ROUTER: f32(np.ones((2, 2))), SHARED: f32([0, 0])},
            {1: [0, 2]},
            "shape (2,), expected (3,)",
        ),
        ({ROUTER: np.ones((4, 2)), SHARED: f32([0, 0, 0])}, None, "dtype float64"),
        ({ROUTER: f32([[0, np.nan]] * 4), SHARED: f32([0, 0, 0])}, None, "non-finite"),
        ({ROUTER: f32(np.ones((4, 2))), SHARED: f32([0, np.inf, 0])}, None, "non-finite"),
    ],
)
def test_check_update_names_the_problem(current, update, held, expected):
    # Execute
    reason = check_update(update, held, current, EXPERT_ROWS)

    # Assert
    assert reason is not None and expected in reason


def test_check_update_accepts_pruned_rows(current):
    update = {ROUTER: f32([[1, 1], [2, 2]]), SHARED: f32([0, 0, 0])}
    assert check_update(update, {1: [0, 3]}, current, EXPERT_ROWS) is None


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        ({1: [2, 1]}, "sorted and unique"),
        ({1: [1, 1]}, "sorted and unique"),
        ({1: [0, 4]}, "[0 < 4)"),
        ({1: [-1, 0]}, "[0 < 4)"),
        ({1: [0.5]}, "integers"),
    ],
)
def test_check_held_rejects_malformed_lists(held, expected):
    reason = check_held(held, {1: 4})
    assert reason is not None and expected in reason


def test_update_norm_counts_only_held_rows(current):
    # Prepare: expert 3's global row is [3, 3]; the client holds only it
    update = {ROUTER: f32([[6, 7]]), SHARED: f32([0, 0, 0])}

    # Execute
    norm = update_norm(update, {1: [3]}, current, EXPERT_ROWS)

    # Assert: sqrt(3^2 + 4^2)
    assert norm == pytest.approx(5.0)


def test_norm_outliers_hold_from_two_replies_against_the_lower_median():
    # With 2 replies the plain median (50.5) would let the huge one through; the lower
    # median (1.0) does not. A single reply has nothing to be compared with.
    assert norm_outliers([1.0, 100.0], 2.0) == [False, True]
    assert norm_outliers([100.0], 2.0) == [False]
    assert norm_outliers([1.0, 2.0, 100.0], 10.0) == [False, False, True]
    assert norm_outliers([1.0, 2.0, float("nan")], 10.0) == [False, False, True]


def test_weighted_mean_metrics_per_key_over_reporters():
    # Prepare: only the first client reports "aux"
    metrics = [{"loss": 1.0, "aux": 5.0, "n": 1}, {"loss": 3.0, "n": 3}]

    # Execute
    out = weighted_mean_metrics(metrics, [1, 3], exclude=("n",))

    # Assert
    assert out == {"loss": pytest.approx(2.5), "aux": pytest.approx(5.0)}
