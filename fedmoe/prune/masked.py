"""Routing restricted to a subset of experts, computed the way each family routes.

This is the definition of what a pruned MoE layer does: every dropped expert's router logit
is masked out (``-inf``) and the family's own top-k and gate-weight rule runs on the rest.
Slicing experts (:mod:`fedmoe.prune.slicing`) must give exactly this routing, and NAEE's
reconstruction search (:func:`fedmoe.prune.scores.reconstruction_scores`) evaluates candidate
expert sets with it without touching the model.

Usage::

    weights, index = masked_routing(layer.router, "qwen3_moe", router_logits, keep)
"""

from __future__ import annotations

import torch
from torch import nn

# How a family turns router logits into (top_k_weights, top_k_index), as in transformers 5.x.
ROUTING_STYLE: dict[str, str] = {
    "qwen2_moe": "softmax_topk",  # softmax over E, top-k, renormalise if norm_topk_prob
    "qwen3_moe": "softmax_topk",
    "olmoe": "softmax_topk",
    "mixtral": "softmax_topk",  # always renormalises (no norm_topk_prob attribute)
    "granitemoeshared": "topk_softmax",  # top-k of logits, softmax over the k
    "deepseek_v3": "sigmoid_grouped",  # sigmoid + correction bias, group-limited top-k
}


def masked_routing(
    router: nn.Module,
    model_type: str,
    router_logits: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    top_k: int | None = None,
    grouped: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gate weights and expert ids of tokens routed among the ``keep`` experts only.

    Parameters
    ----------
    router : nn.Module
        The layer's router (read for ``top_k``, ``norm_topk_prob``, DeepSeek's group settings
        and ``e_score_correction_bias``).
    model_type : str
        ``config.model_type`` of the family.
    router_logits : Tensor
        ``(T, E)`` raw router logits.
    keep : Tensor, optional
        ``(E,)`` bool, the experts tokens may use (all when ``None``).
    top_k : int, optional
        Experts per token (the router's ``top_k`` by default).
    grouped : bool
        DeepSeek-V3 only: apply group-limited routing (``n_group`` / ``topk_group``).

    Returns
    -------
    (Tensor, Tensor)
        ``top_k_weights`` ``(T, k)`` and ``top_k_index`` ``(T, k)`` (ids among all E).
    """
    style = ROUTING_STYLE[model_type]
    k = top_k or router.top_k
    logits = router_logits.float()  # (T, E)
    dropped = None if keep is None else ~keep.to(logits.device)
    if style == "sigmoid_grouped":
        return _sigmoid_grouped(router, logits, dropped, k, grouped)
    if dropped is not None:
        logits = logits.masked_fill(dropped, float("-inf"))
    if style == "topk_softmax":
        top_logits, index = logits.topk(k, dim=-1)  # (T, k)
        return top_logits.softmax(dim=-1).to(router.weight.dtype), index
    probs = logits.softmax(dim=-1)  # (T, E): a softmax over the kept experts only
    weights, index = probs.topk(k, dim=-1)  # (T, k)
    if model_type == "mixtral" or getattr(router, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if model_type != "mixtral":  # Mixtral keeps fp32 gate weights
        weights = weights.to(router_logits.dtype)
    return weights, index


def _sigmoid_grouped(
    router: nn.Module, logits: torch.Tensor, dropped: torch.Tensor | None, k: int, grouped: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores choose (with the bias) and weigh (without it)."""
    scores = logits.sigmoid()  # (T, E)
    choice = scores + router.e_score_correction_bias
    if dropped is not None:
        # Masked after the sigmoid: a dropped expert must be unselectable, not score 0 + bias.
        choice = choice.masked_fill(dropped, float("-inf"))
    num_experts, num_group = choice.shape[-1], router.num_group
    if grouped and num_group > 1:
        per_group = choice.view(-1, num_group, num_experts // num_group)  # (T, G, E/G)
        group_scores = per_group.topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
        group_idx = group_scores.topk(router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(-1, num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    index = choice.topk(k, dim=-1, sorted=False)[1]  # (T, k)
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, index


# --- pruning a shared model without slicing it ------------------------------------------------

KEEP_ATTR = "_fedmoe_keep"  # on a restricted router: (E,) bool, the experts it may pick


class RoutingRestriction:
    """Restrict a model's routing to some experts per layer, in place and reversibly.

    Many clients share one base model in a process (``fedmoe.client.local``); a pruned client
    must route as its sliced model would without the model being sliced or copied. A
    forward hook on each restricted router replaces its top-k weights and ids by
    :func:`masked_routing` over the held experts -- exactly the routing of the sliced model
    (the module docstring) -- and marks the router with ``_fedmoe_keep`` so the load-balancing
    loss counts the held experts only. The dropped experts' weights stay in memory, unused.

    Parameters
    ----------
    adapter : MoEAdapter
        Of the shared model.
    """

    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.handles: list = []
        self.routers: list[nn.Module] = []

    def clear(self) -> None:
        """Every router routes among all its experts again."""
        for handle in self.handles:
            handle.remove()
        for router in self.routers:
            if hasattr(router, KEEP_ATTR):
                delattr(router, KEEP_ATTR)
        self.handles, self.routers = [], []

    def set(self, held: dict[int, list[int]] | None) -> None:
        """Route each layer among ``held[layer]`` (positions along its expert axis); layers
        not listed, or ``None``, route among all experts."""
        from fedmoe.prune.slicing import _deepseek_grouping

        self.clear()
        layers = {layer.index: layer for layer in self.adapter.moe_layers()}
        held = {i: ids for i, ids in (held or {}).items() if len(ids) < layers[i].num_experts}
        if not held:
            return
        index = {i: torch.tensor(sorted(ids)) for i, ids in held.items()}
        grouped = _deepseek_grouping(self.adapter, index, "auto")
        model_type = self.adapter.spec.model_type
        for i, ids in index.items():
            layer = layers[i]
            keep = torch.zeros(layer.num_experts, dtype=torch.bool)
            keep[ids] = True
            keep = keep.to(layer.router.weight.device)
            setattr(layer.router, KEEP_ATTR, keep)
            self.routers.append(layer.router)
            self.handles.append(layer.router.register_forward_hook(
                _restricted(model_type, keep, layer.top_k, grouped)))


def _restricted(model_type: str, keep: torch.Tensor, top_k: int, grouped: bool):
    def hook(router: nn.Module, _args, output):
        logits = output[0]
        weights, index = masked_routing(router, model_type, logits, keep, top_k=top_k,
                                        grouped=grouped)
        return logits, weights, index

    return hook
