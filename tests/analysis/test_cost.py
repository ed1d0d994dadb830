"""The edge-vs-cloud cost model, checked by arithmetic on round numbers."""

from __future__ import annotations

import json

import pytest

from fedmoe.analysis.cost import (
    cloud_cost,
    cloud_latency,
    compare,
    edge_cost,
    edge_latency,
    edge_vs_cloud,
    federated_traffic,
    load_bench,
    pick_row,
)

EDGE = dict(policy="lru", budget=4, hit_rate=0.9, prefill_tokens_per_s=100.0,
            decode_tokens_per_s=10.0, bytes_loaded=1e6, peak_rss_mb=500.0)
FULL = dict(policy="none", budget="all", hit_rate=1.0, prefill_tokens_per_s=200.0,
            decode_tokens_per_s=20.0, bytes_loaded=0, peak_rss_mb=2000.0)
RESULTS = {"rounds": [{"bytes_up": 1e6, "bytes_down": 3e6, "accepted": [0, 1]}],
           "clients": {"0": {"final_ppl": 10.0}, "1": {"final_ppl": 20.0}}}
CFG = {"prompt_tokens": 100, "output_tokens": 50, "bytes_per_token": 4,
       "responses_per_round": 10, "transfer_price_per_gb": 1.0,
       "edge": {"memory_mb": 1000, "price_per_hour": 3.6, "remote_expert_store": False,
                "policy": None, "budget": None},
       "cloud": {"price_per_1k_input_tokens": 1.0, "price_per_1k_output_tokens": 2.0,
                 "rtt_ms": 100, "speedup": 2.0, "bench_policy": None, "bench_budget": None},
       "quality": {"edge_ppl": None, "cloud_ppl": None}, "alpha_steps": 3,
       "bandwidths_mbps": [1, 100], "reference": {"alpha": 0.5, "bandwidth_mbps": 1}}


def test_latencies_and_costs_by_hand():
    traffic = federated_traffic(RESULTS)
    assert traffic["bytes_per_client_round"] == 2e6 and traffic["mean_final_ppl"] == 15.0
    # edge: 100/100 + 50/10 = 6 s
    assert edge_latency(EDGE, CFG, 1) == pytest.approx(6.0)
    # cloud: 0.1 s rtt + 8*150*4 bits / 1 Mbit/s + 100/(2*200) + 50/(2*20)
    assert cloud_latency(FULL, CFG, 1) == pytest.approx(0.1 + 0.0048 + 0.25 + 1.25)
    # edge: 3.6 $/h for 6 s + 1 $/GB * (2 MB / 10 responses)
    assert edge_cost(6.0, traffic, CFG) == pytest.approx(0.006 + 0.0002)
    # cloud: (100 * 1 + 50 * 2) / 1000 + 1 $/GB * 600 B
    assert cloud_cost(CFG) == pytest.approx(0.2 + 6e-7)


def test_remote_expert_store_adds_transfer_time():
    cfg = CFG | {"edge": CFG["edge"] | {"remote_expert_store": True}}
    assert edge_latency(EDGE, cfg, 8) == pytest.approx(6.0 + 1.0)  # 8 Mbit over 8 Mbit/s


def test_utility_per_cost_decides_the_winner():
    res = compare(EDGE, FULL, federated_traffic(RESULTS), CFG, alpha=0.5, bandwidth_mbps=1)
    r_edge = 1.6048 / 6.0
    assert res["R_edge"] == pytest.approx(r_edge) and res["R_cloud"] == 1.0
    assert res["Q_edge"] == res["Q_cloud"] == 1.0  # quality ties by default
    assert res["U_edge"] == pytest.approx(0.5 + 0.5 * r_edge)
    assert res["U_per_cost_edge"] == pytest.approx((0.5 + 0.5 * r_edge) / 0.0062)
    assert res["edge_wins"]
    # a worse edge model and alpha = 1: Q_edge = 15 / 30, still cheaper per utility
    worse = CFG | {"quality": {"edge_ppl": 30.0, "cloud_ppl": 15.0}}
    res = compare(EDGE, FULL, federated_traffic(RESULTS), worse, alpha=1.0, bandwidth_mbps=1)
    assert res["U_edge"] == pytest.approx(0.5)
    # a row that does not fit in memory never wins
    assert not compare(FULL, FULL, federated_traffic(RESULTS), CFG, 0.5, 1)["edge_wins"]


def test_rows_are_picked_and_the_grid_is_filled(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"model_dir": "m", "contenders": [EDGE, FULL]}))  # edge bench
    rows = load_bench(path)
    assert pick_row(rows, None, None, largest=True)["policy"] == "none"  # "all" = no limit
    assert pick_row(rows, None, None, memory_mb=1000)["policy"] == "lru"
    report = edge_vs_cloud(rows, RESULTS, CFG)
    assert len(report["table"]) == 2
    assert len(report["grid"]["log_ratio"]) == 3 and len(report["grid"]["log_ratio"][0]) == 2
    path.write_text(json.dumps([{"policy": "lru"}]))
    with pytest.raises(ValueError, match="lacks"):
        load_bench(path)
