"""Shared vs routed output shares and expert-blocking effects on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmoe.analysis.attribution import (
    block_shared_experts,
    blocking_effects,
    most_used_experts,
    output_shares,
)
from fedmoe.moe.adapter import MoEAdapter
from tests.helpers.models import tiny_model


def test_qwen2_shares_measure_the_gated_shared_output():
    # Prepare: recompute one layer's parts from its input by hand.
    model = tiny_model("qwen2_moe")
    adapter = MoEAdapter(model)
    layer = adapter.moe_layers()[0]
    block = layer.block
    ids = torch.randint(0, 96, (2, 16))
    inputs = []
    handle = block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    # Execute
    shares = output_shares(model, ids, batch_size=2)
    handle.remove()
    # Assert
    h = inputs[0].reshape(-1, 32)
    with torch.no_grad():
        shared = F.sigmoid(block.shared_expert_gate(h)) * block.shared_expert(h)  # (T, H)
        routed = block(inputs[0]).reshape(-1, 32) - shared
    s, r = shared.norm(dim=-1).sum(), routed.norm(dim=-1).sum()
    assert shares[layer.index]["shared"] == pytest.approx(float(s / (s + r)), rel=1e-4)
    for v in shares.values():
        assert v["shared"] + v["routed"] == pytest.approx(1.0)
        assert 0 < v["shared"] < 1


def test_family_without_shared_expert_has_zero_share_and_no_blocking():
    model = tiny_model("mixtral")
    shares = output_shares(model, torch.randint(0, 96, (1, 8)))
    assert all(v["shared"] == 0.0 for v in shares.values())
    with block_shared_experts(model) as blocked:
        assert blocked == 0


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "granitemoeshared"])
def test_blocking_shared_zeroes_its_contribution(family):
    # Prepare
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 12))
    # Execute
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with block_shared_experts(model) as blocked:
            shares = output_shares(model, ids)
            without = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    # Assert
    assert blocked == len(MoEAdapter(model).moe_layers())
    assert all(v["shared"] == 0.0 for v in shares.values())
    assert not torch.allclose(full, without)
    torch.testing.assert_close(after, full)  # hooks removed


def test_blocking_effects_report_loss_increases():
    # Prepare: the most used experts of each layer on this data.
    model = tiny_model("qwen2_moe")
    adapter = MoEAdapter(model)
    ids = torch.randint(0, 96, (4, 16))
    from fedmoe.analysis.collect import collect_routing

    routing = collect_routing(model, ids, batch_size=4)
    top = most_used_experts(routing.top_k_index, routing.num_experts, 2)
    # Execute
    res = blocking_effects(model, ids, top, batch_size=4, adapter=adapter)
    # Assert
    assert set(top) == {layer.index for layer in adapter.moe_layers()}
    assert all(len(v) == 2 for v in top.values())
    assert res["delta_shared"] == pytest.approx(res["loss_block_shared"] - res["loss"])
    assert res["delta_routed"] == pytest.approx(res["loss_block_routed"] - res["loss"])
    assert res["delta_shared"] != 0 and res["delta_routed"] != 0
