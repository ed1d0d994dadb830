"""LoRA built from roles: each trainable LoRA tensor has the role of the weight it adapts."""

from __future__ import annotations

import pytest
import torch

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.task.lora import apply_lora
from tests.helpers.models import tiny_model

ALL = ["router", "shared_expert", "routed_experts"]


def test_lora_trains_exactly_the_requested_roles(family):
    # Prepare
    model = apply_lora(tiny_model(family), ALL, r=4, alpha=8)
    adapter = MoEAdapter(model)
    # Execute
    trainable = {n: adapter.role_of(n) for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: adapter.role_of(n) for n, p in model.named_parameters() if not p.requires_grad}
    # Assert: routed experts through LoRA factors, router trained in full, backbone frozen
    roles = set(trainable.values())
    assert Role.ROUTER in roles and Role.ROUTED_EXPERTS in roles and Role.BACKBONE not in roles
    has_shared = family in {"qwen2_moe", "deepseek_v3", "granitemoeshared"}
    assert (Role.SHARED_EXPERT in roles) == has_shared
    assert any("lora_A" in n for n, r in trainable.items() if r == Role.ROUTED_EXPERTS)
    assert any("modules_to_save" in n for n, r in trainable.items() if r == Role.ROUTER)
    assert Role.BACKBONE in set(frozen.values())


def test_lora_starts_as_the_base_model():
    base = tiny_model("qwen2_moe")
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        expected = base(ids).logits
        got = apply_lora(tiny_model("qwen2_moe"), ALL)(ids).logits
    torch.testing.assert_close(got, expected)


def test_lora_only_routed_experts():
    model = apply_lora(tiny_model("olmoe"), ["routed_experts"])
    adapter = MoEAdapter(model)
    roles = {adapter.role_of(n) for n, p in model.named_parameters() if p.requires_grad}
    assert roles == {Role.ROUTED_EXPERTS}


def test_lora_on_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="train.trainable"):
        apply_lora(tiny_model("mixtral"), ["backbone"])
