"""Slicing experts is exact: a pruned model equals the unpruned one with masked routing."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune import keep_experts, kept_experts, masked_routing
from tests.helpers.models import tiny_model
from tests.helpers.prune import input_ids, mask_routers


def _kept(model, counts=(3, 5, 4)) -> dict[int, list[int]]:
    """Different kept sets (and counts) per MoE layer, not a prefix of the ids."""
    gen = torch.Generator().manual_seed(1)
    layers = MoEAdapter(model).moe_layers()
    return {layer.index: sorted(torch.randperm(8, generator=gen)[:n].tolist())
            for layer, n in zip(layers, counts, strict=False)}


def test_masked_routing_with_all_experts_is_the_family_router(family):
    # Prepare
    model = tiny_model(family)
    adapter = MoEAdapter(model)
    hidden = torch.randn(20, 32)
    # Execute / Assert
    for layer in adapter.moe_layers():
        logits, weights, index = layer.router(hidden)
        w, i = masked_routing(layer.router, family, logits)
        order, ref_order = i.sort(-1), index.sort(-1)
        assert torch.equal(order.values, ref_order.values)
        torch.testing.assert_close(w.gather(1, order.indices), weights.gather(1, ref_order.indices))


def test_slicing_is_exact_against_masked_routing(family):
    # Prepare
    pruned, reference = tiny_model(family), tiny_model(family)
    kept = _kept(pruned)
    ids = input_ids()
    mask_routers(reference, kept, grouped=False)
    # Execute
    with pytest.warns(UserWarning, match="group") if family == "deepseek_v3" else nullcontext():
        original = keep_experts(pruned, kept)
    # Assert
    assert original == {**kept_experts(reference), **kept}
    for layer in MoEAdapter(pruned).moe_layers():
        assert layer.num_experts == len(kept[layer.index])
        assert layer.experts.num_experts == len(kept[layer.index])
        assert layer.experts.gate_up_proj.shape[0] == len(kept[layer.index])
    with torch.no_grad():
        logits = pruned(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=0)
        assert (logits - tiny_model(family)(ids).logits).abs().max() > 1e-4  # pruning mattered


@pytest.mark.filterwarnings("ignore:the kept experts")
def test_equal_counts_update_the_config_and_repeated_pruning_composes_ids(family):
    # Prepare
    model = tiny_model(family)
    layers = [layer.index for layer in MoEAdapter(model).moe_layers()]
    # Execute
    keep_experts(model, dict.fromkeys(layers, [0, 2, 5, 7]))
    original = keep_experts(model, dict.fromkeys(layers, [1, 3]))
    # Assert
    key = MoEAdapter(model).spec.num_experts_key
    assert getattr(model.config, key) == 2
    assert model.config.fedmoe_num_experts_original == 8
    assert original == dict.fromkeys(layers, [2, 7])
    assert model.config.fedmoe_kept_experts == {str(i): [2, 7] for i in layers}


def test_deepseek_balanced_groups_keep_group_limited_routing():
    # Prepare: n_group=2 (experts 0-3 and 4-7), topk_group=1; two experts from each group
    pruned, reference = tiny_model("deepseek_v3"), tiny_model("deepseek_v3")
    kept = {1: [0, 2, 5, 7], 2: [1, 3, 4, 6]}
    mask_routers(reference, kept, grouped=True)
    # Execute
    keep_experts(pruned, kept)
    # Assert
    assert pruned.config.n_group == 2 and pruned.model.layers[1].mlp.gate.num_group == 2
    ids = input_ids(3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_deepseek_unbalanced_groups_error_mode():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match="n_group=2"):
        keep_experts(model, {1: [0, 1, 2, 5]}, deepseek_groups="error")


def test_invalid_kept_sets_are_rejected():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="top-k"):
        keep_experts(model, {0: [3]})
    with pytest.raises(ValueError, match="distinct"):
        keep_experts(model, {0: [1, 1, 9]})
