"""The run metrics every table reads (fedmoe/reporting/metrics.py): each definition on a
results.json whose numbers are worked out by hand, and the consumers agree with it."""

import math

import pytest

from fedmoe.analysis.cost import federated_traffic
from fedmoe.reporting.metrics import MB, cumulative_mb, run_metrics, spread
from fedmoe.reporting.summary import headline
from fedmoe.reporting.sweep import METRICS
from fedmoe.reporting.tracking import summary_metrics

# Three clients: 0 improves (10 -> 8), 1 gets worse (20 -> 22), 2 has no base perplexity,
# 3 never reported a final one. Two rounds; round 2 accepted only one client.
RESULTS = {
    "clients": {"0": {"base_ppl": 10.0, "final_ppl": 8.0},
                "1": {"base_ppl": 20.0, "final_ppl": 22.0},
                "2": {"base_ppl": None, "final_ppl": 30.0},
                "3": {"base_ppl": 5.0, "final_ppl": None}},
    "rounds": [{"round": 1, "train_loss": 3.0, "bytes_down": 4 * MB, "bytes_up": 2 * MB,
                "wall_seconds": 2.0, "accepted": [0, 1]},
               {"round": 2, "train_loss": 2.5, "bytes_down": 2 * MB, "bytes_up": 1 * MB,
                "wall_seconds": 4.0, "accepted": [0]}],
    "wall_seconds": 7.0, "payload_bytes": MB, "trainable_bytes": 4 * MB,
}


def test_each_metric_matches_its_definition():
    # Execute
    m = run_metrics(RESULTS)
    # Assert: perplexity over the clients that reported a final one (0, 1, 2)
    assert m.ppl_by_client == {"0": 8.0, "1": 22.0, "2": 30.0}
    assert m.ppl_mean == pytest.approx(20.0) and m.ppl_worst == 30.0
    # ... the comparisons with the start over the clients that have both (0, 1)
    assert m.clients_compared == 2 and m.clients_improved == 1 and m.improved_share == 0.5
    assert m.base_ppl_mean == pytest.approx(15.0)
    assert m.ppl_ratio == pytest.approx((0.8 + 1.1) / 2)  # mean of ratios, not ratio of means
    # ... bytes: totals, and per accepted client averaged over rounds: (6/2 + 3/1) / 2 MB
    assert (m.bytes_down, m.bytes_up, m.rounds) == (6 * MB, 3 * MB, 2)
    assert m.bytes_per_client_round == pytest.approx(3.0 * MB)
    assert m.bytes_up_per_client_round == pytest.approx(1.0 * MB)
    assert (m.train_loss, m.seconds_per_round, m.wall_seconds) == (2.5, 3.0, 7.0)
    assert cumulative_mb(RESULTS) == [6.0, 9.0]
    assert spread([8.0, 22.0]) == {"mean": 15.0, "worst": 22.0, "best": 8.0, "std": 7.0}


def test_tables_w_and_b_and_analysis_read_the_same_numbers():
    # Prepare
    m = run_metrics(RESULTS)
    # Execute
    summary = summary_metrics(RESULTS)
    column = {name: metric.value(m) for name, metric in METRICS.items()}
    traffic = federated_traffic(RESULTS)
    lines = headline(RESULTS)
    # Assert
    assert summary["final/ppl_mean"] == column["ppl"] == traffic["mean_final_ppl"] == m.ppl_mean
    assert summary["final/ppl_ratio"] == column["ppl_ratio"] == m.ppl_ratio
    assert summary["final/clients_improved"] == 1 and column["improved"] == 0.5
    assert traffic["bytes_per_client_round"] == m.bytes_per_client_round
    assert "1/2 clients improved" in lines[0] and "25.0% of all trainable" in lines[1]


def test_a_run_without_clients_or_rounds_has_no_numbers():
    m = run_metrics({"clients": {}, "rounds": []})
    assert m.ppl_mean is None and m.improved_share is None and m.bytes_per_client_round is None
    assert summary_metrics({"clients": {}, "rounds": []}) == {"comm/total_bytes_down": 0,
                                                               "comm/total_bytes_up": 0,
                                                               "num_rounds": 0}
    assert headline({"clients": {}, "rounds": []}) == []
    assert math.isnan(spread([]).get("mean", math.nan))
