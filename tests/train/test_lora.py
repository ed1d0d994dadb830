"""LoRA built from roles: each trainable LoRA tensor has the role of the weight it adapts."""

from __future__ import annotations

import pytest
import torch

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from fedmoe.train.expert_lora import merged_expert_weights
from fedmoe.train.lora import apply_lora
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
    routed = [n for n, r in trainable.items() if r == Role.ROUTED_EXPERTS]
    assert routed and all(n.rsplit(".", 1)[1].startswith("lora_") for n in routed)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in trainable)  # W frozen
    assert any(n.endswith("gate.weight") or n.endswith("router.weight")
               for n, r in trainable.items() if r == Role.ROUTER)
    assert Role.BACKBONE in set(frozen.values())
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


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


def test_expert_lora_forward_equals_the_merged_weights(family):
    # Prepare: random B, so the low-rank path changes the output
    model = apply_lora(tiny_model(family), ["routed_experts"], r=2, alpha=4, seed=3)
    adapter = MoEAdapter(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter.moe_layers():
            for name in ("lora_gate_up_B", "lora_down_B"):
                p = getattr(layer.experts, name)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    merged = tiny_model(family)
    merged_adapter = MoEAdapter(merged)
    with torch.no_grad():
        for layer, target in zip(adapter.moe_layers(), merged_adapter.moe_layers(), strict=True):
            for part, value in merged_expert_weights(layer.experts).items():
                getattr(target.experts, part).copy_(value)
    ids = torch.arange(12).reshape(2, 6) % 90
    # Execute
    with torch.no_grad():
        got, expected = model(ids).logits, merged(ids).logits
    # Assert: x W^T + s (x A^T) B^T on the routed tokens == x (W + s B A)^T
    assert not torch.allclose(expected, tiny_model(family)(ids).logits, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_lora_factors_are_the_same_on_meta_and_real_models():
    # The server builds its model on the meta device; both sides must start equal.
    real = apply_lora(tiny_model("qwen2_moe"), ALL, r=4, seed=7)
    with torch.device("meta"):
        meta_base = tiny_model("qwen2_moe")
    meta = apply_lora(meta_base, ALL, r=4, seed=7)
    factors = {n: p for n, p in real.named_parameters() if "lora" in n}
    meta_factors = dict(meta.named_parameters())
    assert factors
    for name, value in factors.items():
        assert not meta_factors[name].is_meta, name
        torch.testing.assert_close(meta_factors[name], value, atol=0, rtol=0)
    other = apply_lora(tiny_model("qwen2_moe"), ALL, r=4, seed=8)
    assert not torch.equal(dict(other.named_parameters())[next(iter(factors))],
                           next(iter(factors.values())))
