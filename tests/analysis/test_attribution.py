"""Shared vs routed output shares and expert-blocking effects: tiny models, and the sign of
the effects on the pretrained smoke base model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedmoe.analysis.attribution import (
    block_shared_experts,
    blocking_effects,
    most_used_experts,
    output_shares,
)
from fedmoe.analysis.collect import collect_routing, domain_blocks
from fedmoe.data import load_data
from fedmoe.fl.bridge import compose
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune import keep_experts
from fedmoe.train.loop import evaluate_lm
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


@pytest.mark.slow
def test_blocking_raises_a_trained_models_loss_as_blocked_copies_do(smoke_base, fedmoe_cache):
    # Prepare: the pretrained smoke base model on held-out code, and the two blockings built
    # without the hooks under test: the shared experts' output projections zeroed, and the
    # most used routed experts sliced out of the model (fedmoe.prune's slicing)
    model = AutoModelForCausalLM.from_pretrained(smoke_base).eval()
    tokenizer = AutoTokenizer.from_pretrained(smoke_base)
    data = compose(["experiment=smoke", f"cache_dir={fedmoe_cache}"]).data
    blocks = domain_blocks(load_data(data)["validation"], tokenizer, 64, 8)["python_code"]
    routing = collect_routing(model, blocks, batch_size=8)
    top = most_used_experts(routing.top_k_index, routing.num_experts, 2)
    no_shared = copy.deepcopy(model)
    for layer in no_shared.model.layers:
        torch.nn.init.zeros_(layer.mlp.shared_expert.down_proj.weight)
    without_top = copy.deepcopy(model)
    keep_experts(without_top, {layer: [e for e in range(routing.num_experts[layer])
                                       if e not in ids] for layer, ids in top.items()})
    # Execute
    res = blocking_effects(model, blocks, top, batch_size=8)
    # Assert: the losses of the blocked copies, and both blockings hurt the trained model
    assert res["loss"] == pytest.approx(evaluate_lm(model, blocks)["loss"], rel=1e-6)
    assert res["loss_block_shared"] == pytest.approx(evaluate_lm(no_shared, blocks)["loss"],
                                                     rel=1e-5)
    assert res["loss_block_routed"] == pytest.approx(evaluate_lm(without_top, blocks)["loss"],
                                                     rel=1e-5)
    # How much depends on the pretraining trajectory, which depends on the CPU's float sums
    # (delta_shared 1.9 on one Xeon, 0.04 on an AVX-512 one): only the sign is the model's.
    assert res["delta_shared"] > 0 and res["delta_routed"] > 0, res
