"""Slice routed experts out of a model in place, so top-k runs among the kept experts only.

For every MoE layer this slices the fused expert tensors (every experts parameter or buffer
whose first dim indexes experts: ``gate_up_proj``, ``down_proj``, biases), their PEFT LoRA
factors when ``target_parameters`` wraps them, the router rows (and the copies PEFT's
``modules_to_save`` keeps) and per-expert router buffers (DeepSeek-V3's
``e_score_correction_bias``), then sets every stored expert count (router, experts, the
``*ForCausalLM`` aux-loss attribute, the config key). The result routes exactly as the
unpruned model with the dropped experts' logits masked out
(:func:`fedmoe.prune.masked.masked_routing`).

Bookkeeping lives in the config (and so in an exported ``config.json``):
``fedmoe_kept_experts`` maps each MoE layer (as a string) to the ORIGINAL ids of the experts
it holds, ``fedmoe_num_experts_original`` the expert count before any pruning.

Per-layer counts may differ (a ``max_mb`` budget). The model then runs, but an HF config has
ONE expert count: ``config.<num_experts key>`` is set to the largest count, the router
load-balancing loss (``output_router_logits=True``) cannot concatenate unequal layers, and
:func:`fedmoe.prune.export.export_checkpoint` refuses such a model.

DeepSeek-V3 group-limited routing splits the experts into ``n_group`` contiguous groups. If
every layer keeps the same number m >= 2 of experts from every group (and
``topk_group * m >= top_k``) the groups survive slicing and routing is exact. Otherwise
(``deepseek_groups="auto"``, the default) grouping is switched off for the whole model
(``n_group = topk_group = 1``, with a warning): tokens then pick their top-k among all kept
experts, which is NOT the original group-limited routing. ``"error"`` refuses instead.

Parameters are replaced, not resized: rebuild any optimizer after pruning.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import nn

from fedmoe.moe.adapter import MoEAdapter, MoELayer


def base_experts(experts: nn.Module) -> nn.Module:
    """The transformers experts module under any PEFT ``ParamWrapper`` layers."""
    while _is_param_wrapper(experts):
        experts = experts.base_layer
    return experts


def _is_param_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A")


def kept_experts(model: nn.Module) -> dict[int, list[int]]:
    """Original ids of the experts each MoE layer holds now."""
    adapter = MoEAdapter(model)
    stored = getattr(adapter.config, "fedmoe_kept_experts", None) or {}
    return {layer.index: list(stored.get(str(layer.index), range(layer.num_experts)))
            for layer in adapter.moe_layers()}


@torch.no_grad()
def keep_experts(
    model: nn.Module,
    kept: dict[int, list[int]],
    *,
    deepseek_groups: Literal["auto", "error"] = "auto",
) -> dict[int, list[int]]:
    """Keep only the given experts of each MoE layer (others are dropped), in place.

    Parameters
    ----------
    model : nn.Module
        A model of a supported family, optionally PEFT-wrapped.
    kept : dict
        Decoder-layer index -> ids of the layer's CURRENT experts to keep (on an unpruned
        model, the original ids). Layers not listed keep all their experts.
    deepseek_groups : {"auto", "error"}
        What to do when the kept experts break DeepSeek-V3's groups (module docstring).

    Returns
    -------
    dict
        Layer -> original ids of the experts the layer now holds.
    """
    adapter = MoEAdapter(model)
    original = kept_experts(model)
    config = adapter.config
    if getattr(config, "fedmoe_num_experts_original", None) is None:
        config.fedmoe_num_experts_original = adapter.num_experts
    ids = {i: _validate(adapter.layer(i), kept[i]) for i in sorted(kept)}
    grouped = _deepseek_grouping(adapter, ids, deepseek_groups)
    for i, index in ids.items():
        layer = adapter.layer(i)
        _slice_router(layer, getattr(layer.block, adapter.spec.router), index)
        _slice_experts(layer.block.experts, index)  # the outermost (PEFT) wrapper
        original[i] = [original[i][j] for j in index.tolist()]
    if not grouped:
        for layer in adapter.moe_layers():
            layer.router.num_group = layer.router.topk_group = 1
        config.n_group = config.topk_group = 1
    counts = [layer.num_experts for layer in adapter.moe_layers()]
    setattr(config, adapter.spec.num_experts_key, max(counts))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "num_experts"):  # the aux-loss expert count of *ForCausalLM
        base.num_experts = max(counts)
    config.fedmoe_kept_experts = {str(i): ids_ for i, ids_ in original.items()}
    return original


def _validate(layer: MoELayer, ids: list[int]) -> torch.Tensor:
    index = sorted(int(e) for e in ids)
    if len(set(index)) != len(index) or not all(0 <= e < layer.num_experts for e in index):
        raise ValueError(
            f"kept experts of MoE layer {layer.index} must be distinct ids in "
            f"[0, {layer.num_experts}), got {list(ids)}"
        )
    if len(index) < layer.top_k:
        raise ValueError(
            f"MoE layer {layer.index} would keep {len(index)} experts, fewer than its top-k "
            f"({layer.top_k})"
        )
    return torch.tensor(index, dtype=torch.long)


def _deepseek_grouping(adapter: MoEAdapter, ids: dict[int, torch.Tensor], mode: str) -> bool:
    """Whether group-limited routing survives this pruning (True also when there is none)."""
    num_group = getattr(adapter.config, "n_group", 1) or 1
    if adapter.spec.model_type != "deepseek_v3" or num_group == 1:
        return True
    for i, index in ids.items():
        layer = adapter.layer(i)
        per_group = torch.bincount(index // (layer.num_experts // num_group), minlength=num_group)
        m = int(per_group[0])
        if not (bool((per_group == m).all()) and m >= 2
                and adapter.config.topk_group * m >= layer.top_k):
            break
    else:
        return True
    message = (
        f"the kept experts of MoE layer {i} ({ids[i].tolist()}) are not the same number (>= 2) "
        f"from each of the n_group={num_group} expert groups"
    )
    if mode == "error":
        raise ValueError(f"{message}; keep balanced groups or use deepseek_groups='auto'")
    warnings.warn(f"{message}: group-limited routing is switched off (n_group=topk_group=1), "
                  "which changes how tokens are routed", stacklevel=4)
    return False


def _slice_router(layer: MoELayer, router: nn.Module, index: torch.Tensor) -> None:
    # PEFT's modules_to_save keeps the original router and a trained copy per adapter.
    copies = [router]
    if hasattr(router, "modules_to_save") and hasattr(router, "original_module"):
        copies = [router.original_module, *router.modules_to_save.values()]
    for r in copies:
        if _is_param_wrapper(r):
            raise NotImplementedError("LoRA on the router weight (target_parameters) cannot be "
                                      "sliced; train the router with modules_to_save")
        _slice_first_dim(r, index, names=("weight", "bias", *layer.router_buffers))
        r.num_experts = len(index)


def _slice_experts(experts: nn.Module, index: torch.Tensor) -> None:
    module = experts
    while _is_param_wrapper(module):
        _slice_lora(module, index)
        module.num_experts = len(index)
        module = module.base_layer
    num_experts = module.num_experts
    names = [n for n, t in [*module.named_parameters(recurse=False),
                            *module.named_buffers(recurse=False)] if t.shape[:1] == (num_experts,)]
    _slice_first_dim(module, index, names=names)
    module.num_experts = len(index)


def _slice_lora(wrapper: nn.Module, index: torch.Tensor) -> None:
    """Slice a LoRA ``ParamWrapper``'s factors: A is ``(E*r, in)``, B is ``(out, r*E)``."""
    num_experts = wrapper.num_experts
    for name, lora_a in wrapper.lora_A.items():
        lora_b = wrapper.lora_B[name]
        a = lora_a.weight.view(num_experts, -1, lora_a.weight.shape[-1])  # (E, r, in)
        b = lora_b.weight.view(lora_b.weight.shape[0], -1, num_experts)  # (out, r, E)
        a, b = a[index].flatten(0, 1), b[:, :, index].flatten(1, 2)  # (E'r, in), (out, rE')
        lora_a.weight = nn.Parameter(a.clone(), requires_grad=lora_a.weight.requires_grad)
        lora_b.weight = nn.Parameter(b.clone(), requires_grad=lora_b.weight.requires_grad)
        lora_a.out_features, lora_b.in_features = a.shape[0], b.shape[1]


def _slice_first_dim(module: nn.Module, index: torch.Tensor, names: tuple[str, ...] | list[str]
                     ) -> None:
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        sliced = tensor.data[index.to(tensor.device)].clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, sliced, persistent=persistent)
