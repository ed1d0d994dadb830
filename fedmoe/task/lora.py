"""PEFT LoRA on a MoE model, built from parameter roles.

Routed experts get LoRA through ``target_parameters`` (their fused 3-D tensors), the shared
expert through ``target_modules`` (its Linear layers), the router is trained in full through
``modules_to_save``. Roles then apply to the LoRA tensors exactly as to the base weights
(`fedmoe.moe.adapter.normalize_name`).
"""

from __future__ import annotations

from collections.abc import Iterable

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role

# PEFT 0.21 maps target names ending in gate_proj/up_proj/down_proj to the fused routed-expert
# tensors for these families, so their shared-expert Linears cannot be LoRA targets: the
# shared expert is trained in full (modules_to_save) instead.
_PEFT_RENAMES_SHARED = {"deepseek_v3"}


def lora_config(model: nn.Module, roles: Iterable[str], r: int = 8, alpha: int = 16,
                dropout: float = 0.0) -> LoraConfig:
    """A LoRA config that trains exactly the given roles of ``model``."""
    adapter = MoEAdapter(model)
    roles = {Role(x) for x in roles}
    if Role.BACKBONE in roles:
        raise ValueError("train.trainable: LoRA on the backbone is not supported; "
                         "use train.method=full to train backbone tensors")
    spec = adapter.spec
    layers = adapter.moe_layers()
    target_parameters, target_modules, to_save = [], [], []
    if Role.ROUTED_EXPERTS in roles and layers:
        target_parameters = [f"{spec.moe_block}.experts.{p}"
                             for p in layers[0].expert_param_names()]
    if Role.SHARED_EXPERT in roles and spec.model_type in _PEFT_RENAMES_SHARED:
        to_save += list(spec.shared)
    elif Role.SHARED_EXPERT in roles:
        target_modules = sorted(_shared_linears(model, spec.shared))
    if Role.ROUTER in roles:
        to_save.append(f"{spec.moe_block}.{spec.router}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules or None,
                      target_parameters=target_parameters or None,
                      modules_to_save=to_save or None)


def _shared_linears(model: nn.Module, shared_paths: tuple[str, ...]) -> set[str]:
    """Layer-relative names (e.g. ``mlp.shared_expert.up_proj``) of shared-expert Linears."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set()
    for decoder_layer in base.model.layers:
        for path in shared_paths:
            try:
                module = decoder_layer.get_submodule(path)
            except AttributeError:
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, nn.Linear):
                    names.add(f"{path}.{name}" if name else path)
    return names


def apply_lora(model: nn.Module, roles: Iterable[str], r: int = 8, alpha: int = 16,
               dropout: float = 0.0) -> PeftModel:
    """Wrap ``model`` with LoRA on the given roles (everything else frozen)."""
    return get_peft_model(model, lora_config(model, roles, r, alpha, dropout))
