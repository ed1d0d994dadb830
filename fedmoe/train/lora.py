"""LoRA on a MoE model, built from parameter roles (arXiv 2106.09685).

- routed experts: fedmoe's per-expert factors (:mod:`fedmoe.train.expert_lora`), computed on
  the routed tokens only -- PEFT's ``target_parameters`` would fold ``W + BA`` over every
  expert of a layer on each forward;
- the shared expert: PEFT LoRA on its Linear layers (``target_modules``);
- the router: trained in full (its weight is ``E x H``: small).

Roles then apply to the LoRA tensors exactly as to the base weights
(`fedmoe.moe.adapter.normalize_name`). Every LoRA ``A`` is drawn from a generator seeded by
the run seed and the tensor's name, so the server (which builds the model on the ``meta``
device) and every client start from the same factors on any device.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedmoe.moe.adapter import MoEAdapter, normalize_name
from fedmoe.moe.families import Role
from fedmoe.train.expert_lora import IMPLEMENTATION, add_expert_lora

# PEFT 0.21 maps target names ending in gate_proj/up_proj/down_proj to the fused routed-expert
# tensors for these families, so their shared-expert Linears cannot be LoRA targets: the
# shared expert is trained in full instead.
_PEFT_RENAMES_SHARED = {"deepseek_v3"}


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a tensor name (stable across processes)."""
    digest = hashlib.sha256(f"{seed}:{normalize_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def lora_config(model: nn.Module, roles: Iterable[str], r: int = 8, alpha: float = 16,
                dropout: float = 0.0) -> LoraConfig | None:
    """PEFT's part: LoRA on the shared expert's Linear layers (``None`` if there is none)."""
    adapter = MoEAdapter(model)
    spec = adapter.spec
    if Role.SHARED_EXPERT not in {Role(x) for x in roles} or spec.model_type in \
            _PEFT_RENAMES_SHARED:
        return None
    targets = sorted(_shared_linears(model, spec.shared))
    if not targets:
        return None
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)


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


def apply_lora(model: nn.Module, roles: Iterable[str], r: int = 8, alpha: float = 16,
               dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """LoRA on the given roles (everything else frozen); trainable tensors in float32.

    Returns the model, wrapped by PEFT when the shared expert gets LoRA factors.
    """
    roles = {Role(x) for x in roles}
    if Role.BACKBONE in roles:
        raise ValueError("train.trainable: LoRA on the backbone is not supported; "
                         "use train.method=full to train backbone tensors")
    for p in model.parameters():
        p.requires_grad_(False)
    config = lora_config(model, roles, r, alpha, dropout)
    if config is not None:
        model = get_peft_model(model, config)
    adapter = MoEAdapter(model)
    full = [Role.ROUTER] if Role.ROUTER in roles else []
    if Role.SHARED_EXPERT in roles and adapter.spec.model_type in _PEFT_RENAMES_SHARED:
        full.append(Role.SHARED_EXPERT)
    params = dict(model.named_parameters())
    for name in adapter.names(*full):
        params[name].requires_grad_(True)
    if Role.ROUTED_EXPERTS in roles:
        for layer in adapter.moe_layers():
            gen = torch.Generator().manual_seed(name_seed(seed, f"layer{layer.index}.experts"))
            add_expert_lora(layer.experts, r, alpha, gen)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_experts_implementation(IMPLEMENTATION)
    _seed_peft_factors(model, seed)
    _float32_master(model)
    return model


@torch.no_grad()
def _seed_peft_factors(model: nn.Module, seed: int) -> None:
    """PEFT's ``A`` factors redrawn per name (PEFT draws them from the global RNG in module
    order); ``B`` stays zero. Meta tensors (a server's model) get real storage here."""
    for name, p in list(model.named_parameters()):
        device = "cpu" if p.is_meta else p.device
        if ".lora_A." in name:
            gen = torch.Generator().manual_seed(name_seed(seed, name))
            bound = 1.0 / math.sqrt(p.shape[-1])  # kaiming_uniform_(a=sqrt(5))
            _replace(model, name, ((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
                     .to(device=device, dtype=p.dtype))
        elif ".lora_B." in name and p.is_meta:
            _replace(model, name, torch.zeros(p.shape, dtype=p.dtype))


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set parameter ``name`` to ``value`` (a new Parameter: a meta one cannot take data)."""
    module_name, _, attr = name.rpartition(".")
    old = getattr(model.get_submodule(module_name), attr)
    setattr(model.get_submodule(module_name), attr,
            nn.Parameter(value, requires_grad=old.requires_grad))


def _float32_master(model: nn.Module) -> None:
    """Trainable tensors in float32 (optimizer steps on a bf16 tensor lose small updates);
    forwards of a bf16/fp16 model run under autocast (`fedmoe.train.loop.autocast_for`)."""
    for p in model.parameters():
        if p.requires_grad and not p.is_meta and p.dtype != torch.float32:
            p.data = p.data.float()
