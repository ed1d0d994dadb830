"""Pruning-test helpers: reference routing restricted to kept experts, seeded token ids."""

from __future__ import annotations

import torch
from torch import nn

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune.masked import masked_routing


def mask_routers(model: nn.Module, kept: dict[int, list[int]], grouped: bool = True) -> list:
    """Forward hooks making every router route among ``kept`` only (the pruning reference)."""
    adapter = MoEAdapter(model)
    handles = []
    for layer in adapter.moe_layers():
        keep = torch.zeros(layer.num_experts, dtype=torch.bool)
        keep[kept.get(layer.index, range(layer.num_experts))] = True

        def hook(router, _args, out, keep=keep):
            return (out[0], *masked_routing(router, adapter.spec.model_type, out[0], keep,
                                            grouped=grouped))

        handles.append(layer.router.register_forward_hook(hook))
    return handles


def input_ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))
