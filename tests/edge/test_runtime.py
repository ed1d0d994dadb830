"""Routing statistics for the ``static`` policy: every layout an export or a user file has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmoe.artifacts import EXPERTS_FILE
from fedmoe.edge.runtime import check_counts, load_routing_counts
from fedmoe.moe.routing import capture_routing
from fedmoe.prune import RoutingStats
from tests.helpers.models import tiny_model


@pytest.fixture(scope="module")
def stats() -> RoutingStats:
    """Statistics of a real forward pass of a tiny OLMoE model (3 MoE layers, 8 experts)."""
    model = tiny_model("olmoe")
    stats = RoutingStats()
    with capture_routing(model, router_probs=False) as trace, torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)))
    stats.update(trace)
    return stats


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("nested", [False, True])
def test_routing_stats_to_dict_layout_is_read(stats, tmp_path, nested):
    # Prepare: RoutingStats.to_dict(), alone or as an export's "routing_stats"
    data = stats.to_dict()
    path = write(tmp_path / EXPERTS_FILE, {"kept": {}, "routing_stats": data} if nested else data)
    # Execute
    counts = load_routing_counts(path)
    # Assert: the counts, layer by layer; 2 x 16 tokens pick 2 experts each
    assert counts == {i: c.tolist() for i, c in stats.counts.items()}
    assert sorted(counts) == [0, 1, 2] and all(sum(c) == 2 * 32 for c in counts.values())


def test_per_layer_lists_and_count_entries_are_read(tmp_path):
    plain = write(tmp_path / "plain.json", {"1": [3, 0, 1], "2": [0, 5, 5]})
    entries = write(tmp_path / "entries.json", {"routing_stats": {
        "1": {"counts": [3, 0, 1], "counts_by_original_id": [3, 9, 0, 1], "tcess": [1, 0, 1]}}})
    assert load_routing_counts(plain) == {1: [3.0, 0.0, 1.0], 2: [0.0, 5.0, 5.0]}
    assert load_routing_counts(entries) == {1: [3.0, 0.0, 1.0]}


@pytest.mark.parametrize("recorded", [None, {}])
def test_an_export_without_statistics_has_none(tmp_path, recorded):
    # What `fedmoe prune` writes: it scores by a calibration pass and keeps no counts
    path = write(tmp_path / EXPERTS_FILE, {"family": "olmoe", "kept": {"1": [0, 2]},
                                           "scores": None, "routing_stats": recorded})
    assert load_routing_counts(path) is None


@pytest.mark.parametrize("data", [[1, 2, 3], {"layer one": [1, 2]}, {"1": {"tcess": [1.0]}}])
def test_anything_else_is_an_error_naming_the_file(tmp_path, data):
    path = write(tmp_path / "stats.json", data)
    with pytest.raises(ValueError, match=r"stats\.json"):
        load_routing_counts(path)


def test_counts_must_match_the_experts_each_layer_holds():
    model = tiny_model("olmoe")  # 3 MoE layers of 8 experts
    check_counts({i: [1.0] * 8 for i in range(3)}, model, "f.json")
    with pytest.raises(ValueError, match=r"f\.json: MoE layer 1 holds 8 experts .* 4 counts"):
        check_counts({0: [1.0] * 8, 1: [1.0] * 4, 2: [1.0] * 8}, model, "f.json")
    with pytest.raises(ValueError, match=r"MoE layer 2 holds 8 experts .* none"):
        check_counts({0: [1.0] * 8, 1: [1.0] * 8}, model, "f.json")


@pytest.mark.slow
def test_a_fedmoe_prune_export_records_no_statistics(smoke_prune):
    export = Path(smoke_prune[0]["export"])
    assert json.loads((export / EXPERTS_FILE).read_text())["routing_stats"] is None
    assert load_routing_counts(export / EXPERTS_FILE) is None


@pytest.mark.slow
def test_a_federated_export_gives_the_clients_training_counts(smoke_run):
    # Prepare: client 0's counts over its training steps (it kept every expert)
    state = smoke_run.dir / "clients" / "client_0000"
    meta = json.loads((state / "meta.json").read_text())
    # Execute
    counts = load_routing_counts(state / "model" / EXPERTS_FILE)
    # Assert
    assert counts == {int(layer): [float(c) for c in v] for layer, v in
                      meta["expert_counts"].items()}
    assert len(counts) == 4 and all(len(c) == 16 for c in counts.values())
