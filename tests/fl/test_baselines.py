"""The published baselines as strategies on fedmoe's own code, each in a real federated smoke
simulation (2 clients, rounds of a few seconds) observed on the server's Grid
(tests/helpers/wire.py, independent of fedmoe's audit_mod):

- ``strategy=fedmoe_sub``: FedMoE (arXiv 2408.11304), a sub-MoE per client chosen by its own
  activation frequency, every expert averaged over its holders only;
- ``strategy=flex``: FLEx (arXiv 2506.00965), a grafted personal expert per MoE layer beside the
  frozen pretrained MoE, only the backbone aggregated;
- ``strategy=fedavg_lora``: FlowerTune's FedAvg of LoRA adapters on a frozen base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmoe.checkpoints import load_model
from fedmoe.fl.aggregate import masked_aggregate
from fedmoe.moe.adapter import MoEAdapter, normalize_name
from fedmoe.moe.families import Role
from tests.helpers.runs import FAST, TWO_CLIENTS, Run, simulate

pytestmark = pytest.mark.slow


def base_model_of(run: Run):
    cfg = run.results["config"]
    return load_model(cfg["model"], checkpoint=cfg["fl"]["base_model"])


def roles_of(model) -> dict[Role, set[str]]:
    adapter = MoEAdapter(model)
    names = [n for n, _ in model.named_parameters()]
    return {role: {n for n in names if adapter.role_of(n) == role} for role in Role}


def audited(run: Run) -> set[str]:
    return {name for m in run.audit for record in m["records"].values()
            for name in record.get("arrays", {})}


# --- fedmoe_sub: FedMoE ---------------------------------------------------------------------


def test_fedmoe_sub_keeps_each_clients_most_used_experts_and_sends_only_those(fedmoe_cache,
                                                                              tmp_path):
    # Prepare / Execute: pruned after round 1's training, round 2 trains the sub-MoE
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, "strategy=fedmoe_sub",
                   "fl.num_rounds=2", "train.local_steps=2")
    res = run.results
    base = base_model_of(run)
    num_experts = MoEAdapter(base).num_experts
    # Assert: the name, and each client holds half of each layer's experts: those its own
    # round-1 routing selected most often
    assert res["strategy"]["name"] == "fedmoe_sub"
    assert [r["accepted"] for r in res["rounds"]] == [[0, 1], [0, 1]]
    kept = {}
    for client in (0, 1):
        meta = json.loads((run.dir / "clients" / f"client_{client:04d}" / "meta.json")
                          .read_text())
        assert meta["score"] == "frequency" and meta["pruned_at"] == 1
        counts = meta["expert_counts_by_round"]["1"]
        kept[client] = {int(k): v for k, v in meta["kept"].items()}
        for layer, ids in kept[client].items():
            assert len(ids) == num_experts // 2
            c = np.asarray(counts[str(layer)])
            # kept experts were selected at least as often as any dropped one
            dropped = sorted(set(range(num_experts)) - set(ids))
            assert c[ids].min() >= c[dropped].max(), (client, layer)
    assert kept[0] != kept[1]  # the clients' data differ, so do their sub-MoEs
    # ... and in round 2 each sends only its held experts' rows (wire, server side)
    adapter = MoEAdapter(base)
    up2 = [m for m in run.wire if m["direction"] == "up" and m["type"] == "train"][2:]
    assert len(up2) == 2
    for m in up2:
        arrays = m["arrays"]["arrays"]
        for layer in adapter.moe_layers():
            i = layer.index
            for name in (f"model.layers.{i}.mlp.gate.weight",
                         f"model.layers.{i}.mlp.experts.gate_up_proj",
                         f"model.layers.{i}.mlp.experts.down_proj"):
                assert arrays[name][0] == num_experts // 2, name
    assert run.sent_tensors() == audited(run)  # both observers agree


def test_modular_aggregation_averages_an_expert_over_its_holders_only():
    # Prepare: 5 experts, rows of 1 value; client a holds [0, 1, 2], client b holds [1, 3];
    # nobody holds expert 4
    current = {"w": np.full((5, 1), 9.0, dtype=np.float32),
               "shared": np.array([0.0], dtype=np.float32)}
    a = {"w": np.array([[1.0], [2.0], [3.0]], dtype=np.float32),
         "shared": np.array([1.0], dtype=np.float32)}
    b = {"w": np.array([[6.0], [7.0]], dtype=np.float32),
         "shared": np.array([4.0], dtype=np.float32)}
    # Execute: weights 1 and 3 (examples)
    out = masked_aggregate([a, b], [{0: [0, 1, 2]}, {0: [1, 3]}], [1.0, 3.0], current, {"w": 0})
    # Assert: experts 0 and 2 from a alone, 3 from b alone, 1 from both (1:3), 4 unchanged
    np.testing.assert_allclose(out["w"][:, 0], [1.0, (2.0 * 1 + 6.0 * 3) / 4, 3.0, 7.0, 9.0])
    np.testing.assert_allclose(out["shared"], [(1.0 + 4.0 * 3) / 4])


# --- flex: FLEx -----------------------------------------------------------------------------


def test_flex_trains_a_personal_graft_that_never_leaves_and_keeps_the_moe_frozen(fedmoe_cache,
                                                                               tmp_path):
    # Prepare / Execute: 2 rounds, the clients export their grafted models
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, "strategy=flex",
                   "fl.num_rounds=2", "fl.export=true")
    base = base_model_of(run)
    roles = roles_of(base)
    base_state = base.state_dict()
    # Assert: the name; only backbone tensors cross the wire, either way, in any message
    assert run.results["strategy"]["name"] == "flex"
    sent = run.sent_tensors()
    assert sent == run.sent_tensors("up") == run.sent_tensors("down") == roles[Role.BACKBONE]
    assert not [n for n in sent | audited(run) if ".graft." in n]
    for client in (0, 1):
        state = run.dir / "clients" / f"client_{client:04d}"
        personal = load_file(state / "personal.safetensors")
        meta = json.loads((state / "meta.json").read_text())
        # The graft and its gate are all the client keeps, and they were trained: the expert
        # moved off the pretrained expert it copied, the gate off its start
        assert personal and all(".mlp.graft." in n for n in personal)
        assert meta["rounds"] == 2 and len(meta["graft_source"]) == 4
        for layer, e in meta["graft_source"].items():
            prefix = f"model.layers.{layer}.mlp"
            for t in ("gate_up_proj", "down_proj"):
                graft = personal[f"{prefix}.graft.expert.{t}"]
                source = base_state[f"{prefix}.experts.{t}"][e : e + 1]
                assert graft.shape == source.shape
                assert not torch.equal(graft, source), (client, layer, t)
                # ... a fine-tuned copy: far closer to its source than to another expert
                other = base_state[f"{prefix}.experts.{t}"][(e + 1) % 16 : (e + 1) % 16 + 1]
                assert (graft - source).norm() < 0.5 * (graft - other).norm()
            # (the gate starts at w = 0; two Adam steps of opposite sign can bring b back)
            assert personal[f"{prefix}.graft.expert_gate.weight"].abs().max() > 1e-3
        # The export holds the graft beside a standard checkpoint whose router and experts
        # are the pretrained ones; fedmoe's loader reads it back as the grafted model
        exported = {}
        for f in sorted((state / "model").glob("*.safetensors")):
            exported |= load_file(f)
        cfg = run.results["config"]
        reloaded = load_model(cfg["model"], checkpoint=state / "model").state_dict()
        for name, value in personal.items():
            torch.testing.assert_close(exported[name], value.to(exported[name].dtype))
            torch.testing.assert_close(reloaded[name], exported[name], rtol=0, atol=0)
        for name in roles[Role.ROUTER] | roles[Role.ROUTED_EXPERTS] | roles[Role.SHARED_EXPERT]:
            torch.testing.assert_close(reloaded[name], base_state[name], rtol=0, atol=0)
    assert [r["accepted"] for r in run.results["rounds"]] == [[0, 1], [0, 1]]


# --- fedavg_lora: FlowerTune ---------------------------------------------------------------


def test_fedavg_lora_sends_every_lora_factor_and_nothing_of_the_frozen_base(fedmoe_cache,
                                                                           tmp_path):
    # Prepare / Execute
    run = simulate(tmp_path, fedmoe_cache, *FAST, *TWO_CLIENTS, "strategy=fedavg_lora",
                   "fl.num_rounds=1")
    roles = roles_of(base_model_of(run))
    # Assert: the name; LoRA factors of the routed and shared experts plus the router (what
    # PEFT's modules_to_save carries) travel, both ways; no frozen base weight does
    assert run.results["strategy"]["name"] == "fedavg_lora"
    assert run.results["config"]["train"]["method"] == "lora"
    sent = run.sent_tensors()
    assert sent == run.sent_tensors("up") == run.sent_tensors("down") == audited(run)
    lora = {n for n in sent if ".lora_" in n}  # fedmoe's expert factors and PEFT's
    assert {n for n in lora if ".mlp.experts.lora_" in n}
    assert {n for n in lora if ".shared_expert.up_proj.lora_A." in n}
    # Beside the factors only the router, in full, and no frozen base weight
    assert {normalize_name(n) for n in sent - lora} == roles[Role.ROUTER]
    # Nothing stays personal: every trained tensor is averaged
    personal = run.dir / "clients" / "client_0000" / "personal.safetensors"
    assert not personal.exists() or not load_file(personal)
