"""LoRA on fused routed experts without materializing ``W + BA`` (arXiv 2106.09685).

PEFT 0.21 reaches fused 3-D expert tensors through ``target_parameters``, but its
``ParamWrapper`` folds the whole ``W + scale * B @ A`` of every expert of a layer on each
forward (a parametrization): on OLMoE-1B-7B that is a second 0.8 GB copy of a layer's
experts per forward, kept for backward unless activations are recomputed. Here each expert
gets its own factors and the low-rank path runs only on the tokens routed to it::

    y_e = x W_e^T + scale * (x A_e^T) B_e^T          A_e: (r, in), B_e: (out, r), B_e = 0 at start

The factors live on the experts module as ``lora_gate_up_A (E, r, H)``, ``lora_gate_up_B
(E, 2I, r)``, ``lora_down_A (E, r, I)``, ``lora_down_B (E, H, r)`` -- expert index first,
like the fused weights, so pruning slices them with the experts and personal state is
``E x r x (in + out)`` numbers per tensor, not ``E x in x out``. The forward is transformers'
eager experts loop plus the low-rank path, registered as the experts implementation
``"fedmoe_lora"`` of :class:`transformers.integrations.moe.ExpertsInterface`; it also runs
experts stored packed by ``train.quantize`` (:mod:`fedmoe.train.quantize`), with or without
factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from fedmoe.train.quantize import PARTS, expert_linear, expert_weight, experts_device

IMPLEMENTATION = "fedmoe_lora"
SCALING_ATTR = "_fedmoe_lora_scaling"


def factor_names(part: str) -> tuple[str, str]:
    return f"lora_{part}_A", f"lora_{part}_B"


def has_expert_lora(experts: nn.Module) -> bool:
    return hasattr(experts, SCALING_ATTR)


def add_expert_lora(experts: nn.Module, r: int, alpha: float, generator: torch.Generator,
                    dtype: torch.dtype = torch.float32) -> None:
    """Give every expert of ``experts`` LoRA factors on ``gate_up_proj`` and ``down_proj``.

    A starts as PEFT's default (Kaiming-uniform, ``a=sqrt(5)``, per expert), B at zero, so
    the model is unchanged until the first step. ``generator`` makes the draw reproducible
    on any device and in any order.
    """
    for part in PARTS:
        weight = getattr(experts, f"{part}_proj")  # (E, out, in)
        num_experts, out_features, in_features = weight.shape
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        a = (torch.rand(num_experts, r, in_features, generator=generator) * 2 - 1) * bound
        name_a, name_b = factor_names(part)
        device = experts_device(experts)  # the packed buffers' when quantized
        experts.register_parameter(name_a, nn.Parameter(a.to(device=device, dtype=dtype)))
        experts.register_parameter(name_b, nn.Parameter(
            torch.zeros(num_experts, out_features, r, device=device, dtype=dtype)))
    setattr(experts, SCALING_ATTR, alpha / r)


def _project(experts: nn.Module, part: str, e: int, x: torch.Tensor,
             scaling: float | None) -> torch.Tensor:
    """``x W_e^T + scaling * (x A_e^T) B_e^T`` for expert ``e``'s ``<part>_proj`` (no low-rank
    path when the experts have no factors); x: (n, in) -> (n, out)."""
    out = expert_linear(experts, part, e, x)
    if scaling is None:
        return out
    name_a, name_b = factor_names(part)
    a, b = getattr(experts, name_a)[e], getattr(experts, name_b)[e]
    return out + scaling * F.linear(F.linear(x, a), b)


def lora_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                         top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"fedmoe_lora"`` experts implementation: the eager loop with each expert's
    low-rank path (``self``: the experts module; hidden_states (T, H), index/weights (T, k))."""
    scaling = getattr(self, SCALING_ATTR, None)
    final = torch.zeros_like(hidden_states)  # (T, H)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        top_k_pos, token_idx = torch.where(mask[e])
        x = hidden_states[token_idx]  # (n, H)
        gate_up = _project(self, "gate_up", e, x, scaling)  # (n, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        h = _project(self, "down", e, self.act_fn(gate) * up, scaling)  # (n, H)
        h = h * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, h.to(final.dtype))
    return final


ExpertsInterface.register(IMPLEMENTATION, lora_experts_forward)


@torch.no_grad()
def merged_expert_weights(experts: nn.Module, select: list[int] | None = None,
                          parts: tuple[str, ...] = PARTS) -> dict[str, torch.Tensor]:
    """``W_e + scaling * B_e @ A_e`` of the ``select``-ed experts (all by default), in the
    weights' dtype; merged one expert at a time (for export: no full-layer fp32 copy).
    ``parts``: which fused tensors (``gate_up``, ``down``); export asks for one at a time.
    Packed experts (``train.quantize``) are dequantized; without factors, ``W_e`` alone."""
    scaling = getattr(experts, SCALING_ATTR, None)
    out = {}
    for part in parts:
        weight = getattr(experts, f"{part}_proj")  # (E, out, in); meta when packed
        ids = list(range(weight.shape[0])) if select is None else list(select)
        name_a, name_b = factor_names(part)
        merged = torch.empty((len(ids), *weight.shape[1:]), dtype=weight.dtype)
        for j, e in enumerate(ids):
            value = expert_weight(experts, part, e).float()  # (out, in)
            if scaling is not None:  # W + scaling * B @ A: (out, r) @ (r, in), one new tensor
                a, b = getattr(experts, name_a)[e], getattr(experts, name_b)[e]
                value = torch.addmm(value, b.float(), a.float(), alpha=scaling)
            merged[j] = value.to(weight.dtype)
        out[f"{part}_proj"] = merged
    return out
