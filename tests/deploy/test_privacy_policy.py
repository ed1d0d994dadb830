"""The device's privacy policy on Flower's real Deployment Engine: `flwr run` against a
SuperLink and two SuperNodes (TLS and node authentication on), whose run config asks for
every role (strategy=fedavg) while the devices keep their default policy."""

from __future__ import annotations

import importlib
import json

import pytest

from fedmoe.fl.policy import send_roles
from fedmoe.moe.families import Role
from tests.helpers.runs import FAST as TINY

from .conftest import REPO, dump_logs


def test_start_supernode_defaults_to_the_strict_policy(monkeypatch):
    # Prepare: the launcher's own argument parser and node config
    monkeypatch.syspath_prepend(str(REPO / "scripts" / "deploy"))
    script = importlib.import_module("start_supernode")
    # Execute
    args = script.build_parser().parse_args(["--superlink", "10.0.0.1:9093", "--insecure",
                                             "--partition-id", "0"])
    node = script.node_config(args)
    # Assert: router and shared expert only, written out in the node config
    assert node["send-roles"] == "router,shared_expert"
    assert send_roles(node) == {Role.ROUTER, Role.SHARED_EXPERT}
    assert send_roles({}) == send_roles(node)  # a node config without the key: the same


@pytest.mark.slow
def test_a_server_asking_for_routed_experts_gets_a_refusal(tmp_path, make_federation,
                                                           base_model, app_dir):
    # Prepare: two devices with the default policy (router and shared expert may leave);
    # their audit mod records every message in and out
    fed = make_federation(tmp_path)
    run_dir, audit = tmp_path / "run", tmp_path / "audit"
    fed.start_superlink()
    for i in range(2):
        fed.start_node(f"node{i}", {"partition-id": i, "state-dir": str(tmp_path / f"s{i}"),
                                    "audit-dir": str(audit)})
    fed.wait_for_nodes(2)
    overrides = [*TINY, "strategy=fedavg", f"fl.base_model={base_model}", f"run_dir={run_dir}",
                 "fl.num_rounds=1", "fl.round_timeout=300"]
    # Execute
    run_id = fed.run(app_dir, overrides)
    status, _ = fed.wait(run_id, 600)
    # Assert: the server saw two refusals that say why, and aggregated nothing
    assert status.startswith("finished"), dump_logs(fed, run_id)
    results = json.loads((run_dir / "results.json").read_text())
    (round1,) = results["rounds"]
    # (named by node id: a refusal reports no client id)
    assert round1["accepted"] == [] and len(round1["rejected"]) == 2, round1
    for reason in round1["rejected"].values():
        assert reason.startswith("error reply: refused: privacy policy: fl.aggregate="), reason
        assert "routed_experts" in reason and "send-roles" in reason
    # ... what left each device: the refusals, no tensor; no personal state was written
    for i in range(2):
        lines = [json.loads(x) for x in (audit / f"client_{i}.jsonl").read_text().splitlines()]
        out = [m for m in lines if m["direction"] == "out"]
        assert {m["type"] for m in out} == {"train", "evaluate"}
        assert all(m["error"].startswith("refused: privacy policy") and not m["records"]
                   for m in out)
        assert not list((tmp_path / f"s{i}").rglob("personal.safetensors"))
