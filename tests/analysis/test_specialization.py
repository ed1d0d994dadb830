"""Expert-usage divergence and its change over rounds, on hand-made distributions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmoe.analysis.specialization import (
    entropy_bits,
    js_divergence,
    load_client_usage,
    pairwise_js,
    specialization_over_rounds,
    usage_from_routing,
)


def test_js_divergence_by_hand():
    # disjoint support: 1 bit; identical: 0; counts are normalised first.
    assert js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_divergence([2, 6], [1, 3]) == pytest.approx(0.0)
    # p = (1, 0), q = (.5, .5), m = (.75, .25):
    # KL(p||m) = log2(4/3) = 0.4150375, KL(q||m) = .5 log2(2/3) + .5 log2(2) = 0.2075187
    assert js_divergence([2, 0], [3, 3]) == pytest.approx((0.4150375 + 0.2075187) / 2, abs=1e-6)


def test_entropy_bits():
    assert entropy_bits([5, 5, 5, 5]) == pytest.approx(2.0)
    assert entropy_bits([0, 9, 0]) == pytest.approx(0.0)


def test_pairwise_js_matrix_and_mean_over_layers():
    # Prepare: a and b disjoint in layer 0 and equal in layer 1; c equals a.
    usages = {"a": {"0": [4, 0], "1": [1, 1]}, "b": {"0": [0, 4], "1": [2, 2]},
              "c": {"0": [1, 0], "1": [3, 3]}}
    # Execute
    js = pairwise_js(usages)
    # Assert
    assert js["names"] == ["a", "b", "c"]
    np.testing.assert_allclose(js["matrix"]["0"], [[0, 1, 0], [1, 0, 1], [0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(js["mean"], [[0, .5, 0], [.5, 0, .5], [0, .5, 0]], atol=1e-12)
    assert js["mean_pairwise"] == pytest.approx(1 / 3)


def test_specialization_over_rounds_differences_cumulative_snapshots():
    # Prepare: running totals as meta.json keeps them. Round 1: a uses expert 0, b expert 1;
    # round 2: both use expert 0 only (a: 4 - 2 = 2 more, b: 2 - 0 = 2 more).
    snapshots = [{"a": {"0": [2, 0]}, "b": {"0": [0, 2]}},
                 {"a": {"0": [4, 0]}, "b": {"0": [2, 2]}}]
    # Execute
    rounds = specialization_over_rounds(snapshots)
    per_round = specialization_over_rounds(snapshots, cumulative=False)
    # Assert
    assert [r["mean_pairwise_js"] for r in rounds] == pytest.approx([1.0, 0.0])
    assert rounds[1]["tokens"] == {"a": 2.0, "b": 2.0}
    assert rounds[0]["entropy"] == {"a": 0.0, "b": 0.0}
    # read as per-round usages, round 2 compares (1, 0) with (.5, .5)
    assert per_round[1]["mean_pairwise_js"] == pytest.approx(js_divergence([1, 0], [1, 1]))


def test_usage_from_routing_and_client_meta(tmp_path):
    # Prepare: routing ids of one layer; a run dir with two clients' personal state.
    usage = usage_from_routing({2: np.array([[[0, 1], [1, 3]]])}, {2: 4})
    for cid, counts in (("client_0000", {"1": [3, 1]}), ("client_0001", None)):
        (tmp_path / "clients" / cid).mkdir(parents=True)
        meta = {"rounds": 1} | ({"expert_counts": counts} if counts else {})
        (tmp_path / "clients" / cid / "meta.json").write_text(json.dumps(meta))
    # Execute
    clients = load_client_usage(tmp_path)
    # Assert
    assert usage == {"2": [1, 2, 0, 1]}
    assert clients == {"client_0000": {"1": [3, 1]}}  # never-trained clients left out
    with pytest.raises(FileNotFoundError, match="fedmoe simulate. run dir"):
        load_client_usage(tmp_path / "nothing")
    assert not math.isnan(pairwise_js(clients)["mean_pairwise"])
