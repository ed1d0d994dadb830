"""The pruning summary `fedmoe simulate` prints after a run whose clients pruned."""

from __future__ import annotations

import json
import re

import pytest

from fedmoe.prune.summary import pruned_clients, pruning_table


def test_only_clients_whose_experts_shrank_are_listed(tmp_path):
    results = {"clients": {
        "0": {"experts_kept": {"0": 8}, "routed_expert_mb": {"before": 2.0, "after": 1.0}},
        "1": {"experts_kept": {"0": 16}, "routed_expert_mb": {"before": 2.0, "after": 2.0}},
        "2": {"final_ppl": 3.0}}}
    assert list(pruned_clients(results)) == ["0"]
    assert pruning_table({"clients": {"1": results["clients"]["1"]}}, tmp_path) is None


@pytest.mark.slow
def test_simulate_prints_kept_experts_mb_and_export_paths(pruned_run):
    # Prepare
    run_dir, printed = pruned_run
    results = json.loads((run_dir / "results.json").read_text())

    # Assert: one row per client: 8 of 16 experts in each of the 4 MoE layers, half the MB,
    # and the client's export, which exists
    assert "pruning: score=tcess, keep=0.5" in printed
    for cid, client in results["clients"].items():
        mb = client["routed_expert_mb"]
        export = run_dir / "clients" / f"client_{int(cid):04d}" / "model"
        row = re.search(rf"│\s+{cid} │\s+0:8 1:8 2:8 3:8 │\s+{mb['before']:.3f} -> "
                        rf"{mb['after']:.3f} │ (\S+)", printed)
        assert row, printed[-3000:]
        assert row.group(1) == str(export) and (export / "config.json").is_file()
        assert mb["after"] == pytest.approx(mb["before"] / 2)
    assert re.search(r"routed experts over 2 pruned clients: [\d.]+ -> [\d.]+ MB \(50% kept\)",
                     printed)
