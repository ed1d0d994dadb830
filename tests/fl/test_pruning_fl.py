"""Pruning inside federated training: heterogeneous expert subsets, results and export."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from fedmoe.artifacts import ClientMeta
from fedmoe.client.state import PersonalStore
from tests.helpers.runs import FAST, simulate

pytestmark = pytest.mark.slow


def test_disjoint_expert_subsets_train_together(tmp_path, fedmoe_cache):
    # Prepare: 4 clients whose kept experts are disjoint in every layer (4 of 16 each)
    state = tmp_path / "state"
    for c in range(4):
        kept = {str(layer): list(range(4 * c, 4 * c + 4)) for layer in range(4)}
        PersonalStore(state / f"client_{c:04d}").save({}, ClientMeta(kept=kept))
    # Execute
    run = simulate(tmp_path, fedmoe_cache, *FAST, f"fl.state_dir={state}", "fl.num_rounds=1")
    # Assert: every reply accepted; each carries only its own 4 router rows and its ids
    res = run.results
    assert res["rounds"][0]["accepted"] == [0, 1, 2, 3] and not res["rounds"][0]["rejected"]
    replies = [m for m in run.audit if m["direction"] == "out" and "experts" in m["records"]]
    assert len(replies) == 4
    for m in replies:
        routers = {k: v for k, v in m["records"]["arrays"]["arrays"].items() if ".mlp.gate." in k}
        assert routers and all(v["shape"][0] == 4 for v in routers.values())
    # ... as the server received them: each client's own block of 4 ids in every layer
    up = [m for m in run.wire if m["direction"] == "up" and m["type"] == "train"]
    held = sorted(tuple(ids) for m in up for ids in m["configs"]["experts"].values())
    assert held == [tuple(range(4 * c, 4 * c + 4)) for c in range(4) for _ in range(4)]
    m = res["config"]["model"]["config"]  # 3 matrices (gate, up, down) per expert, fp32
    per_expert_mb = 3 * m["hidden_size"] * m["moe_intermediate_size"] * 4 / 2**20
    for c in range(4):
        assert res["clients"][str(c)]["experts_kept"] == {str(i): 4 for i in range(4)}
        mb = res["clients"][str(c)]["routed_expert_mb"]["after"]
        assert mb == pytest.approx(4 * 4 * per_expert_mb)  # 4 layers x 4 experts


def test_prune_keep_half_reports_and_exports(tmp_path, fedmoe_cache):
    run = simulate(tmp_path, fedmoe_cache, *FAST, "fl.export=true", "prune.keep=0.5")
    run_dir, res = run.dir, run.results
    client = res["clients"]["0"]
    assert client["experts_kept"] == {str(i): 8 for i in range(4)}
    assert client["routed_expert_mb"]["after"] == pytest.approx(
        client["routed_expert_mb"]["before"] / 2)
    meta = json.loads((run_dir / "clients" / "client_0000" / "meta.json").read_text())
    assert meta["pruned_at"] == 1 and meta["score"] == "tcess"
    export = run_dir / "clients" / "client_0000" / "model"
    info = json.loads((export / "fedmoe_experts.json").read_text())
    assert {k: len(v) for k, v in info["kept"].items()} == {str(i): 8 for i in range(4)}
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_experts == 8
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8
