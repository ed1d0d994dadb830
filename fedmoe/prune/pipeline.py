"""Score, plan and slice in one call: what the federated client and ``fedmoe prune`` run.

Usage::

    stats = RoutingStats(prune_cfg.tcess_k)       # fed each training step's routing trace
    budget = budget_for_round(prune_cfg, server_round, model)
    if budget is not None:
        report = prune_model(model, blocks, prune_cfg, stats, budget=budget)
        stats = report["stats"]                   # re-indexed to the kept experts
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.models import plain
from fedmoe.prune.budget import _get, check_budget, expert_mb, plan_keep, pruning_enabled
from fedmoe.prune.scores import RoutingStats, compute_scores
from fedmoe.prune.slicing import keep_experts


def budget_for_round(
    prune_cfg: Any, server_round: int, model_or_adapter: nn.Module | MoEAdapter
) -> Mapping[str, Any] | None:
    """The budget to prune with after ``server_round``'s local training, or ``None``.

    One-shot: the config's budget at ``prune.at_round``. Gradual (``prune.schedule``, a list
    of ``[round, keep]``): at each listed round, keep that fraction of the ORIGINAL experts.
    """
    if not pruning_enabled(prune_cfg):
        return None
    schedule = _get(prune_cfg, "schedule")
    if schedule:
        adapter = model_or_adapter if isinstance(model_or_adapter, MoEAdapter) \
            else MoEAdapter(model_or_adapter)
        original = getattr(adapter.config, "fedmoe_num_experts_original", None) \
            or adapter.num_experts
        for step_round, keep in schedule:
            if int(step_round) == server_round:
                return {"keep_per_layer": math.floor(float(keep) * original + 0.5)}
        return None
    return plain(prune_cfg) if int(_get(prune_cfg, "at_round") or 1) == server_round else None


def plan_pruning(
    model: nn.Module,
    blocks: torch.Tensor,
    prune_cfg: Any,
    stats: RoutingStats | None = None,
    *,
    budget: Mapping[str, Any] | None = None,
    held: Mapping[int, list[int]] | None = None,
) -> dict[str, Any]:
    """Score the experts on the client's data and plan the budget; the model is untouched.

    Parameters
    ----------
    model : nn.Module
        The client's model (optionally PEFT).
    blocks : Tensor
        ``(N, T)`` client token blocks, for the scores that need a pass.
    prune_cfg : DictConfig or dict
        The ``prune`` config group (``conf/prune/default.yaml``).
    stats : RoutingStats, optional
        Routing statistics over the held experts, accumulated during training; used for
        ``frequency`` and ``tcess`` instead of a pass when it has seen tokens.
    budget : Mapping, optional
        Overrides the config's budget keys (e.g. from :func:`budget_for_round`).
    held : dict, optional
        Layer -> positions (along the model's expert axis) of the experts the client holds,
        when a shared model restricts routing to them instead of slicing
        (``fedmoe.client.local``); default every expert of the model.

    Returns
    -------
    dict
        ``score``, ``scores`` (layer -> array over the held experts), ``kept_current``
        (layer -> kept positions among the held experts), ``num_experts`` (layer -> count
        after pruning), ``mb_before`` / ``mb_after`` (routed-expert MB), ``stats`` (``stats``
        re-indexed to the kept experts, or None).
    """
    adapter = MoEAdapter(model)
    cfg = plain(prune_cfg) | {"enabled": True}
    if budget is not None:  # the override replaces every budget key of the config
        cfg |= {k: budget.get(k) for k in ("keep", "keep_per_layer", "max_mb")}
    check_budget(cfg, adapter)
    layers = adapter.moe_layers()
    held = {layer.index: list(held[layer.index]) if held else list(range(layer.num_experts))
            for layer in layers}
    score = cfg["score"]
    if score in ("frequency", "tcess") and stats is not None and stats.num_tokens > 0:
        scores = stats.scores(score)
    else:  # a pass over the model: every expert of the axis, then the held ones
        scores = compute_scores(model, blocks, score, tcess_k=cfg.get("tcess_k"),
                                calibration_tokens=cfg.get("calibration_tokens"),
                                seed=int(cfg.get("seed") or 0), adapter=adapter)
        scores = {i: np.asarray(s)[held[i]] if len(s) != len(held[i]) else s
                  for i, s in scores.items()}
    for layer in layers:
        if len(scores[layer.index]) != len(held[layer.index]):
            raise ValueError(f"scores of MoE layer {layer.index} cover {len(scores[layer.index])}"
                             f" experts, the client holds {len(held[layer.index])} (stale stats?)")
    top_k = {layer.index: layer.top_k for layer in layers}
    sizes = expert_mb(adapter)
    kept_current = plan_keep(scores, cfg, top_k, sizes)
    return {
        "score": score,
        "scores": scores,
        "kept_current": kept_current,
        "num_experts": {i: len(kept_current.get(i, held[i])) for i in held},
        "mb_before": sum(sizes[i] * len(ids) for i, ids in held.items()),
        "mb_after": sum(sizes[i] * len(kept_current.get(i, held[i])) for i in held),
        "stats": stats.select(kept_current) if stats is not None else None,
    }


def prune_model(
    model: nn.Module,
    blocks: torch.Tensor,
    prune_cfg: Any,
    stats: RoutingStats | None = None,
    *,
    budget: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the experts on the client's data, plan the budget and slice, in place.

    Parameters are those of :func:`plan_pruning` (without ``held``); rebuild optimizers
    afterwards.

    Returns
    -------
    dict
        :func:`plan_pruning`'s report plus ``kept`` (layer -> ORIGINAL ids now held).
    """
    report = plan_pruning(model, blocks, prune_cfg, stats, budget=budget)
    report["kept"] = keep_experts(model, report["kept_current"])
    return report
