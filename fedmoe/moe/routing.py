"""Routing capture: what every MoE layer decided for every token.

The record is taken at the experts' own input (a forward pre-hook on ``experts``), so it is
exactly what the experts computed with, for every family and every experts implementation;
router logits come from a hook on the router.

Usage::

    with capture_routing(model) as trace:
        model(input_ids)
    trace[layer_index].top_k_index     # (T, k) expert ids picked per token
    trace[layer_index].top_k_weights   # (T, k) their gate weights
    trace[layer_index].router_probs    # (T, E) full router probabilities
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmoe.moe.adapter import MoEAdapter, MoELayer


@dataclass
class LayerRouting:
    """Routing of one MoE layer over every token seen (forward calls concatenated)."""

    layer: int
    top_k_index: torch.Tensor  # (T, k) int64
    top_k_weights: torch.Tensor  # (T, k) float32
    router_logits: torch.Tensor  # (T, E) float32
    router_probs: torch.Tensor  # (T, E) float32

    @property
    def num_tokens(self) -> int:
        return self.top_k_index.shape[0]

    def mask(self, num_experts: int | None = None) -> torch.Tensor:
        """Routing mask ``a[t, e]`` in {0, 1}: did token t pick expert e (T, E)."""
        e = num_experts or self.router_probs.shape[1]
        a = torch.zeros(self.num_tokens, e, dtype=torch.bool)
        a.scatter_(1, self.top_k_index, True)
        return a

    def counts(self, num_experts: int | None = None) -> torch.Tensor:
        """How many tokens picked each expert ``(E,)``."""
        return self.mask(num_experts).sum(0)


@dataclass
class RoutingTrace:
    """Per-layer routing records; index by decoder-layer index."""

    layers: dict[int, LayerRouting] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> LayerRouting:
        return self.layers[layer]

    def __iter__(self) -> Iterator[LayerRouting]:
        return iter(self.layers[i] for i in sorted(self.layers))

    def __len__(self) -> int:
        return len(self.layers)


class _LayerRecorder:
    """Accumulates one layer's routing across forward calls (detached, on CPU)."""

    def __init__(self, layer: MoELayer, keep_probs: bool) -> None:
        self.layer = layer
        self.keep_probs = keep_probs
        self.index: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def on_router(self, _module: nn.Module, _args: tuple, output: tuple) -> None:
        # Every supported router returns (router_logits, top_k_weights, top_k_index).
        logits = output[0] if isinstance(output, tuple) else output
        self.logits.append(logits.detach().float().reshape(-1, logits.shape[-1]).cpu())

    def on_experts(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        # experts.forward(hidden_states, top_k_index, top_k_weights)
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = dict(zip(names, args, strict=False)) | kwargs
        self.index.append(values["top_k_index"].detach().reshape(-1, self.layer.top_k).cpu())
        w = values["top_k_weights"].detach().float()
        self.weights.append(w.reshape(-1, self.layer.top_k).cpu())

    def result(self) -> LayerRouting:
        empty = torch.empty(0, self.layer.top_k)
        logits = torch.cat(self.logits) if self.logits else torch.empty(0, self.layer.num_experts)
        return LayerRouting(
            layer=self.layer.index,
            top_k_index=torch.cat(self.index).long() if self.index else empty.long(),
            top_k_weights=torch.cat(self.weights) if self.weights else empty,
            router_logits=logits,
            router_probs=self.layer.scores(logits) if self.keep_probs else torch.empty(0),
        )


@contextmanager
def capture_routing(
    model: nn.Module, adapter: MoEAdapter | None = None, router_probs: bool = True
) -> Iterator[RoutingTrace]:
    """Record per MoE layer and token the top-k ids, gate weights and router probabilities.

    Parameters
    ----------
    model : nn.Module
        Any model of a supported family.
    adapter : MoEAdapter, optional
        Reused if given.
    router_probs : bool
        Also compute the full ``(T, E)`` router probabilities (softmax or sigmoid of the
        logits, as the family scores them).

    Yields
    ------
    RoutingTrace
        Filled in when the ``with`` block exits.
    """
    adapter = adapter or MoEAdapter(model)
    trace = RoutingTrace()
    recorders = [_LayerRecorder(layer, router_probs) for layer in adapter.moe_layers()]
    handles = []
    for rec in recorders:
        handles.append(rec.layer.router.register_forward_hook(rec.on_router))
        experts = rec.layer.experts
        handles.append(experts.register_forward_pre_hook(rec.on_experts, with_kwargs=True))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()
        trace.layers.update({rec.layer.index: rec.result() for rec in recorders})
