"""Basic-refinement attribution: what the shared expert vs the routed experts contribute.

"Decoding Knowledge Attribution in Mixture-of-Experts: A Framework of Basic-Refinement
Collaboration and Efficiency Analysis" (arXiv 2505.24593) finds that shared experts carry
general knowledge and routed experts refine domain-specific facts. Two reproducible
measures, per MoE layer and per domain:

- **output-norm share**: per token t, ``s_t = ||shared_t||`` (for qwen2_moe the gated
  contribution ``sigmoid(shared_expert_gate(h)) * shared_expert(h)``, the term actually
  added) and ``r_t = ||routed_t||`` (the experts module's weighted sum);
  ``shared_share = sum_t s_t / sum_t (s_t + r_t)`` and ``routed_share = 1 - shared_share``.
- **blocking**: the loss increase when the shared expert's output is zeroed, vs when the
  ``n`` most used routed experts of each layer (on that domain) are masked to -inf in the
  router (the others are re-routed, see :func:`fedmoe.analysis.retrieval.restrict_experts`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedmoe.analysis.retrieval import restrict_experts
from fedmoe.checkpoints import model_device
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.train.loop import evaluate_lm


def _shared_modules(adapter: MoEAdapter, index: int) -> tuple[list[nn.Module], nn.Module | None]:
    """The shared expert modules of a decoder layer, and its sigmoid gate if it has one."""
    base = adapter.model.get_base_model() if hasattr(adapter.model, "get_base_model") else (
        adapter.model)
    decoder_layer = base.model.layers[index]
    experts, gate = [], None
    for path in adapter.spec.shared:
        try:
            module = decoder_layer.get_submodule(path)
        except AttributeError:
            continue
        if path.endswith("_gate"):
            gate = module
        else:
            experts.append(module)
    return experts, gate


class _ShareRecorder:
    """Sums of per-token output norms of one layer's shared and routed parts."""

    def __init__(self) -> None:
        self.shared: list[torch.Tensor] = []
        self.gate: list[torch.Tensor] = []
        self.routed: list[torch.Tensor] = []
        self.shared_sum = 0.0
        self.routed_sum = 0.0

    def on_shared(self, _m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        self.shared.append(out.detach().float().reshape(-1, out.shape[-1]))  # (T, H)

    def on_gate(self, _m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        self.gate.append(out.detach().float().reshape(-1, 1).sigmoid())  # (T, 1)

    def on_routed(self, _m: nn.Module, _a: tuple, out: torch.Tensor) -> None:
        self.routed.append(out.detach().float().reshape(-1, out.shape[-1]))  # (T, H)

    def on_layer_done(self, *_args) -> None:
        # Everything of this layer's forward has run; pair the parts token by token.
        shared = sum(self.shared) if self.shared else None  # several shared modules add up
        if shared is not None and self.gate:
            shared = self.gate[-1] * shared
        routed = self.routed[-1]
        self.routed_sum += float(routed.norm(dim=-1).sum())
        if shared is not None:
            self.shared_sum += float(shared.norm(dim=-1).sum())
        self.shared, self.gate, self.routed = [], [], []

    def shares(self) -> dict[str, float]:
        total = self.shared_sum + self.routed_sum
        shared = self.shared_sum / total if total else float("nan")
        return {"shared": shared, "routed": 1.0 - shared}


@torch.no_grad()
def output_shares(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
                  adapter: MoEAdapter | None = None) -> dict[int, dict[str, float]]:
    """Per MoE layer: the share of the MoE output norm from the shared vs routed experts.

    Returns
    -------
    dict
        ``{layer: {"shared": s, "routed": 1 - s}}``; ``shared`` is 0 for a family
        without shared experts.
    """
    adapter = adapter or MoEAdapter(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    recorders, handles = {}, []
    for layer in adapter.moe_layers():
        rec = recorders[layer.index] = _ShareRecorder()
        shared, gate = _shared_modules(adapter, layer.index)
        handles += [m.register_forward_hook(rec.on_shared) for m in shared]
        if gate is not None:
            handles.append(gate.register_forward_hook(rec.on_gate))
        handles.append(layer.experts.register_forward_hook(rec.on_routed))
        handles.append(base.model.layers[layer.index].register_forward_hook(rec.on_layer_done))
    try:
        model.eval()
        for start in range(0, blocks.shape[0], batch_size):
            model(input_ids=blocks[start : start + batch_size].to(model_device(model)),
                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {index: rec.shares() for index, rec in recorders.items()}


@contextmanager
def block_shared_experts(model: nn.Module, adapter: MoEAdapter | None = None) -> Iterator[int]:
    """Inside the block, every shared expert outputs zeros; yields how many were blocked."""
    adapter = adapter or MoEAdapter(model)
    handles = []
    for layer in adapter.moe_layers():
        shared, _ = _shared_modules(adapter, layer.index)
        handles += [m.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
                    for m in shared]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def most_used_experts(top_k_index: Mapping[int, np.ndarray], num_experts: Mapping[int, int],
                      n: int) -> dict[int, list[int]]:
    """Per layer, the ``n`` experts selected most often (ties: lower id first)."""
    out = {}
    for layer, idx in top_k_index.items():
        counts = np.bincount(np.asarray(idx).ravel(), minlength=num_experts[layer])
        out[layer] = np.argsort(-counts, kind="stable")[:n].tolist()
    return out


def blocking_effects(model: nn.Module, blocks: torch.Tensor, top_routed: Mapping[int, list[int]],
                     batch_size: int = 8, adapter: MoEAdapter | None = None) -> dict[str, float]:
    """Loss of the full model and its increase when blocking shared vs top routed experts.

    Parameters
    ----------
    top_routed : Mapping
        Layer -> the routed experts to block (e.g. :func:`most_used_experts` on this domain).

    Returns
    -------
    dict
        ``loss``, ``loss_block_shared``, ``loss_block_routed`` and the increases
        ``delta_shared``, ``delta_routed`` (NaN shared figures for a family without one).
    """
    adapter = adapter or MoEAdapter(model)
    full = evaluate_lm(model, blocks, batch_size)["loss"]
    with block_shared_experts(model, adapter) as blocked:
        shared = evaluate_lm(model, blocks, batch_size)["loss"] if blocked else float("nan")
    keep = {layer: [e for e in range(adapter.layer(layer).num_experts) if e not in set(top)]
            for layer, top in top_routed.items()}
    with restrict_experts(model, keep, adapter):
        routed = evaluate_lm(model, blocks, batch_size)["loss"]
    return {"loss": full, "loss_block_shared": shared, "loss_block_routed": routed,
            "delta_shared": shared - full, "delta_routed": routed - full}
