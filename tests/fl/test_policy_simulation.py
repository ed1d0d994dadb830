"""The device's privacy policy on Flower's real Simulation Engine.

``fedmoe simulate`` is one trust domain: it passes its virtual SuperNodes the policy the
chosen strategy needs, so the fedavg baseline runs. A device whose policy is stricter than
the strategy refuses: the run goes on, no tensor leaves, and the audit mod records the
refusal as what left the client.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmoe.fl.bridge import to_run_config
from fedmoe.fl.policy import SEND_ROLES_KEY, TRUST_KEY
from fedmoe.fl.simulation import run_simulation_engine

pytestmark = pytest.mark.slow

QUICK = ["experiment=smoke", "fl.num_rounds=1", "train.local_steps=1", "fl.export=false",
         "data.max_train_blocks_per_client=8", "data.max_eval_blocks_per_client=2"]
ROUTED = ".mlp.experts."


def audit(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("client_*.jsonl"))
            for line in f.read_text().splitlines()]


def sent_tensors(messages: list[dict]) -> set[str]:
    return {name for m in messages if m["direction"] == "out"
            for record in m["records"].values() for name in record.get("arrays", {})}


def test_simulate_passes_the_policy_fedavg_needs(tmp_path, fedmoe_cache):
    from fedmoe.cli import main as fedmoe_main

    # Execute: the fedavg baseline through the CLI
    fedmoe_main(["simulate", *QUICK, "strategy=fedavg", f"cache_dir={fedmoe_cache}",
                 f"hydra.run.dir={tmp_path / 'run'}", f"fl.audit_dir={tmp_path / 'audit'}"])
    # Assert: every client's reply accepted, and the routed experts left, as fedavg needs
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["rounds"][0]["accepted"] == [0, 1, 2, 3]
    assert any(ROUTED in name for name in sent_tensors(audit(tmp_path / "audit")))


def test_a_stricter_device_refuses_and_nothing_leaves(tmp_path, fedmoe_cache, base_model):
    # Prepare: the server runs fedavg; every device only lets router and shared expert go
    run = tmp_path / "run"
    overrides = [*QUICK, "strategy=fedavg", f"cache_dir={fedmoe_cache}", f"run_dir={run}",
                 f"fl.base_model={base_model}", f"fl.state_dir={run / 'clients'}",
                 f"fl.audit_dir={tmp_path / 'audit'}"]
    node_config = {TRUST_KEY: True, SEND_ROLES_KEY: "router,shared_expert"}
    # Execute
    run_simulation_engine(to_run_config(overrides), num_supernodes=4, app_dir=run / "app",
                          client_resources={"num_cpus": 1, "num_gpus": 0.0},
                          node_config=node_config)
    # Assert: each reply is a refusal that says why; no tensor left any client; no client
    # kept a state the server's config shaped
    results = json.loads((run / "results.json").read_text())
    rejected = results["rounds"][0]["rejected"]
    assert results["rounds"][0]["accepted"] == [] and len(rejected) == 4, results["rounds"]
    for reason in rejected.values():
        assert reason.startswith("error reply: refused: privacy policy"), reason
        assert "routed_experts" in reason
    messages = audit(tmp_path / "audit")
    out = [m for m in messages if m["direction"] == "out"]
    assert len(out) == 8  # 4 clients x (train, evaluate)
    assert all(m["error"].startswith("refused: privacy policy") for m in out)
    assert sent_tensors(messages) == set()
    assert not list((run / "clients").glob("client_*/personal.safetensors"))
