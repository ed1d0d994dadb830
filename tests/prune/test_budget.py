"""Budgets: fraction, count per layer, total MB; never below top-k; errors name the key."""

from __future__ import annotations

import numpy as np
import pytest

from fedmoe.prune import check_budget, expert_mb, plan_keep, routed_mb
from tests.helpers.models import tiny_model

SCORES = {1: np.array([0.1, 0.9, 0.3, 0.8, 0.0, 0.5]),  # ranking 1, 3, 5, 2, 0, 4
          2: np.array([5.0, -1.0, 2.0, 4.0, 3.0, 1.0])}  # ranking 0, 3, 4, 2, 5, 1
TOP_K = {1: 2, 2: 2}


def test_fraction_keeps_the_highest_scores_sorted():
    assert plan_keep(SCORES, {"keep": 0.5}, TOP_K) == {1: [1, 3, 5], 2: [0, 3, 4]}
    # 0.4 * 6 = 2.4 -> 2 (rounded half up: 0.25 * 6 = 1.5 -> 2)
    assert plan_keep(SCORES, {"keep": 0.4}, TOP_K) == {1: [1, 3], 2: [0, 3]}
    assert plan_keep(SCORES, {"keep": 0.25}, TOP_K) == {1: [1, 3], 2: [0, 3]}


def test_count_per_layer_and_precedence_over_fraction():
    kept = plan_keep(SCORES, {"keep": 0.5, "keep_per_layer": 4}, TOP_K)
    assert kept == {1: [1, 2, 3, 5], 2: [0, 2, 3, 4]}


def test_max_mb_allocates_by_normalised_score_never_below_top_k():
    # Layer 1 experts weigh 1 MB, layer 2 experts 2 MB. Floor: 2*1 + 2*2 = 6 MB.
    sizes = {1: 1.0, 2: 2.0}
    # Normalised shares (shifted to start at 0, divided by the sum): layer 1 (s - 0) / 2.6
    # -> expert 5: 0.192, expert 2: 0.115; layer 2 (s + 1) / 20 -> expert 4: 0.20, 2: 0.15.
    # 8 MB leaves 2: layer-2 expert 4 (0.20, 2 MB) comes first and takes it all.
    assert plan_keep(SCORES, {"max_mb": 8.0}, TOP_K, sizes) == {1: [1, 3], 2: [0, 3, 4]}
    # 9 MB leaves 3: then layer-1 expert 5 (0.192, 1 MB) fits too.
    assert plan_keep(SCORES, {"max_mb": 9.0}, TOP_K, sizes) == {1: [1, 3, 5], 2: [0, 3, 4]}
    # 7.5 MB leaves 1.5: layer-2 expert 4 does not fit, layer-1 expert 5 does.
    assert plan_keep(SCORES, {"max_mb": 7.5}, TOP_K, sizes) == {1: [1, 3, 5], 2: [0, 3]}
    assert plan_keep(SCORES, {"max_mb": 6.0}, TOP_K, sizes) == {1: [1, 3], 2: [0, 3]}
    everything = plan_keep(SCORES, {"max_mb": 1000.0}, TOP_K, sizes)
    assert everything == {1: list(range(6)), 2: list(range(6))}


@pytest.mark.parametrize(("budget", "key"), [
    ({"keep": 0.2}, r"prune\.keep="),
    ({"keep": 1.5}, r"prune\.keep="),
    ({"keep_per_layer": 1}, r"prune\.keep_per_layer=1"),
    ({"keep_per_layer": 7}, r"prune\.keep_per_layer=7"),
    ({"max_mb": 5.9}, r"prune\.max_mb=5\.9"),
    ({}, r"prune\.keep, prune\.keep_per_layer, prune\.max_mb"),
])
def test_impossible_budgets_name_the_key(budget, key):
    with pytest.raises(ValueError, match=key):
        plan_keep(SCORES, budget, TOP_K, {1: 1.0, 2: 2.0})


def test_check_budget_against_a_model_before_training():
    # Prepare: tiny olmoe, 3 MoE layers of 8 experts (32 x 16 x 3 fp32 = 6 KiB each), top-2
    model = tiny_model("olmoe")
    sizes = expert_mb(model)
    floor = 3 * 2 * sizes[0]
    base = {"enabled": True, "score": "tcess", "keep": 0.5, "keep_per_layer": None,
            "max_mb": None, "at_round": 1, "schedule": None, "tcess_k": None}
    # Execute / Assert
    assert sizes[0] == pytest.approx(3 * 32 * 16 * 4 / 2**20)
    assert routed_mb(model) == pytest.approx(3 * 8 * sizes[0])
    check_budget(base, model)
    check_budget(base | {"keep": None, "max_mb": floor}, model)
    check_budget({"enabled": False, "score": "bogus"}, model)  # disabled: nothing to check
    with pytest.raises(ValueError, match=r"prune\.max_mb"):
        check_budget(base | {"max_mb": floor * 0.9}, model)
    with pytest.raises(ValueError, match=r"prune\.keep="):
        check_budget(base | {"keep": 0.1}, model)
    with pytest.raises(ValueError, match=r"prune\.score='bogus'"):
        check_budget(base | {"score": "bogus"}, model)
    with pytest.raises(ValueError, match=r"prune\.keep="):
        check_budget(base | {"schedule": [[1, 0.75], [3, 0.125]]}, model)
    with pytest.raises(ValueError, match=r"prune\.tcess_k"):
        check_budget(base | {"tcess_k": 9}, model)
