"""Family adapters: every parameter gets exactly one role; views alias the right slices."""

from __future__ import annotations

import pytest
import torch

from fedmoe.moe.adapter import MoEAdapter, normalize_name
from fedmoe.moe.families import FAMILIES, Role
from tests.helpers.models import TINY_FAMILIES, tiny_model


def test_every_family_is_tested():
    assert set(TINY_FAMILIES) == set(FAMILIES)


def test_roles_cover_every_parameter_exactly_once(family):
    # Prepare
    model = tiny_model(family)
    adapter = MoEAdapter(model)
    # Execute
    roles = adapter.roles()
    # Assert: one role per parameter, all four roles where the family has them
    assert set(roles) == {n for n, _ in model.named_parameters()}
    by_role = {r: adapter.names(r) for r in Role}
    assert sum(len(v) for v in by_role.values()) == len(roles)
    assert by_role[Role.ROUTER] and by_role[Role.ROUTED_EXPERTS] and by_role[Role.BACKBONE]
    has_shared = family in {"qwen2_moe", "deepseek_v3", "granitemoeshared"}
    assert bool(by_role[Role.SHARED_EXPERT]) == has_shared
    for name in by_role[Role.ROUTED_EXPERTS]:
        assert dict(model.named_parameters())[name].dim() == 3, name
    for name in by_role[Role.ROUTER]:
        assert dict(model.named_parameters())[name].shape[0] == 8, name


def test_dense_layers_inside_moe_models_are_backbone():
    # qwen2_moe fixture: mlp_only_layers=[0]; deepseek_v3: first_k_dense_replace=1
    for family in ("qwen2_moe", "deepseek_v3"):
        adapter = MoEAdapter(tiny_model(family))
        assert [layer.index for layer in adapter.moe_layers()] == [1, 2]
        layer0 = [n for n in adapter.roles() if ".layers.0." in n]
        assert layer0 and all(adapter.role_of(n) == Role.BACKBONE for n in layer0)


def test_expert_views_alias_the_right_slices(family):
    # Prepare
    model = tiny_model(family)
    layer = MoEAdapter(model).moe_layers()[-1]
    views = layer.expert_tensors(5)
    # Execute: write through the view
    with torch.no_grad():
        for v in views.values():
            v.fill_(7.0)
        layer.router_rows(5).fill_(-3.0)
    # Assert: exactly expert 5's slices changed
    for name in layer.expert_param_names():
        full = getattr(layer.experts, name)
        assert torch.all(full[5] == 7.0)
        assert not torch.any(full[4] == 7.0) and not torch.any(full[6] == 7.0)
    assert torch.all(layer.router.weight[5] == -3.0)
    assert not torch.any(layer.router.weight[4] == -3.0)
    assert layer.num_experts == 8 and layer.top_k == 2
    assert layer.router_rows([1, 5]).shape == (2, 32)


def test_unclaimed_parameter_is_a_clear_error():
    model = tiny_model("mixtral")
    model.model.register_parameter("mystery", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"model\.mystery.*matches no role"):
        MoEAdapter(model).roles()


def test_overlapping_patterns_are_a_clear_error(monkeypatch):
    from fedmoe.moe import families

    spec = families.FAMILIES["olmoe"]
    patterns = dict(spec.patterns)
    patterns[Role.SHARED_EXPERT] = ("model.layers.{L}.mlp.gate.weight",)
    monkeypatch.setitem(
        families.FAMILIES, "olmoe", families.FamilySpec(**{**spec.__dict__, "patterns": patterns})
    )
    with pytest.raises(ValueError, match=r"mlp\.gate\.weight.*several roles"):
        MoEAdapter(tiny_model("olmoe")).roles()


def test_unsupported_family_names_the_key():
    model = tiny_model("mixtral")
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match="model.family"):
        MoEAdapter(model)


@pytest.mark.parametrize(
    ("peft_name", "base"),
    [
        ("base_model.model.model.layers.1.mlp.gate.modules_to_save.default.weight",
         "model.layers.1.mlp.gate.weight"),
        ("base_model.model.model.layers.1.mlp.gate.original_module.weight",
         "model.layers.1.mlp.gate.weight"),
        ("base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight",
         "model.layers.2.self_attn.q_proj.weight"),
        ("base_model.model.model.layers.2.self_attn.q_proj.base_layer.weight",
         "model.layers.2.self_attn.q_proj.weight"),
    ],
)
def test_peft_names_map_to_base_roles(peft_name, base):
    assert normalize_name(peft_name) == base
