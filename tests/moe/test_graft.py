"""Expert grafting (FLEx, arXiv 2506.00965): a zero graft changes nothing, a grafted copy of
expert e computes expert e's output times its gate, and its parameters have their own role."""

from __future__ import annotations

import math

import pytest
import torch

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.moe.graft import GATE_BIAS_INIT, add_grafts, grafts, init_grafts, most_activated
from fedmoe.prune.scores import expert_outputs
from tests.helpers.models import tiny_model


def test_a_zero_graft_leaves_the_model_unchanged(family):
    # Prepare
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # Execute
    added = add_grafts(model)
    add_grafts(model)  # idempotent: no second graft, no second hook
    with torch.no_grad():
        after = model(input_ids=ids).logits
    # Assert
    adapter = MoEAdapter(model)
    assert len(added) == len(adapter.moe_layers()) == len(grafts(adapter))
    torch.testing.assert_close(after, before)
    graft_names = adapter.names(Role.GRAFT)
    assert graft_names and all(".graft." in n for n in graft_names)
    assert not [n for n in adapter.names(*(set(Role) - {Role.GRAFT})) if ".graft." in n]


def test_a_grafted_copy_of_expert_e_adds_its_gated_output(family):
    # Prepare
    model = tiny_model(family)
    add_grafts(model)
    adapter = MoEAdapter(model)
    layer = adapter.moe_layers()[0]
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    # Execute
    init_grafts(adapter, {layer.index: 3})
    with torch.no_grad():
        out = layer.block.graft(hidden)
        expected = expert_outputs(layer, hidden)[3] / (1 + math.exp(-GATE_BIAS_INIT))
    # Assert: expert 3's own output, scaled by sigmoid(b) (w = 0 at the start)
    torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-5)
    assert out.abs().sum() > 0


def test_most_activated_maps_positions_of_held_experts_to_original_ids():
    frequency = {1: torch.tensor([0.1, 0.7, 0.2]), 2: torch.tensor([0.5, 0.1, 0.1, 0.3])}
    assert most_activated(frequency, {1: [2, 5, 7]}) == {1: 5, 2: 0}


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_graft_gradients_reach_expert_and_gate_only_when_pretrained_experts_are_frozen(family):
    # Prepare
    model = tiny_model(family).train()
    add_grafts(model)
    adapter = MoEAdapter(model)
    init_grafts(adapter, {layer.index: 0 for layer in adapter.moe_layers()})
    for name, p in model.named_parameters():
        p.requires_grad_(adapter.role_of(name) == Role.GRAFT)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    # Execute
    model(input_ids=ids, labels=ids).loss.backward()
    # Assert
    for name, p in model.named_parameters():
        if adapter.role_of(name) == Role.GRAFT:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
