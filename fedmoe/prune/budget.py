"""Memory budgets: how many routed experts each MoE layer keeps, and which.

A budget is one of (the first one set wins, in this order):

- ``max_mb``: total size of the kept routed experts over all MoE layers, in MB (2**20 bytes,
  at the model's current dtype). Every layer first keeps its top-k best experts; the rest of
  the budget goes to the experts with the highest *normalised* score over all layers, where
  a layer's scores are shifted to start at 0 and divided by their sum (an expert's share of
  its layer's utility), so layers with different score scales compete fairly. Layers may
  end with different counts (see :mod:`fedmoe.prune.export` for what that means).
- ``keep_per_layer``: the same count in every layer.
- ``keep``: a fraction of each layer's experts (rounded half up), e.g. 0.5.

No layer ever keeps fewer than its top-k experts; a budget that would need that is a
``ValueError`` naming the config key, raised by :func:`check_budget` before any training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune.scores import check_score
from fedmoe.prune.slicing import base_experts

MB = 2**20


def _adapter(model_or_adapter: nn.Module | MoEAdapter) -> MoEAdapter:
    if isinstance(model_or_adapter, MoEAdapter):
        return model_or_adapter
    return MoEAdapter(model_or_adapter)


def expert_mb(model_or_adapter: nn.Module | MoEAdapter) -> dict[int, float]:
    """Size of ONE routed expert per MoE layer, in MB (base weights, LoRA excluded)."""
    sizes = {}
    for layer in _adapter(model_or_adapter).moe_layers():
        experts = base_experts(layer.experts)
        params = [p for n, p in experts.named_parameters(recurse=False)
                  if p.shape[:1] == (layer.num_experts,) and not n.startswith("lora_")]
        sizes[layer.index] = sum(p[0].numel() * p.element_size() for p in params) / MB
    return sizes


def routed_mb(model_or_adapter: nn.Module | MoEAdapter) -> float:
    """Total size of the routed experts now in the model, in MB."""
    adapter = _adapter(model_or_adapter)
    sizes = expert_mb(adapter)
    return sum(sizes[layer.index] * layer.num_experts for layer in adapter.moe_layers())


def _get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` of a dict or DictConfig, ``None`` when absent."""
    try:
        return cfg.get(key, None)
    except Exception:  # a struct DictConfig without the key
        return None


def plan_keep(
    scores: dict[int, np.ndarray],
    budget: Mapping[str, Any],
    top_k: dict[int, int],
    expert_mb: dict[int, float] | None = None,
) -> dict[int, list[int]]:
    """The experts each layer keeps: the highest-scoring, as many as the budget allows.

    Parameters
    ----------
    scores : dict
        Layer -> ``(E,)`` scores of the layer's current experts.
    budget : Mapping
        ``max_mb``, ``keep_per_layer`` or ``keep`` (module docstring); ``prune`` config node.
    top_k : dict
        Layer -> experts per token (the floor of every layer).
    expert_mb : dict, optional
        Layer -> MB of one expert (needed for ``max_mb``).

    Returns
    -------
    dict
        Layer -> sorted ids (positions in ``scores[layer]``) of the kept experts.
    """
    order = {i: _ranking(np.asarray(s, dtype=np.float64)) for i, s in scores.items()}
    counts = _counts(scores, budget, top_k, expert_mb)
    return {i: sorted(int(e) for e in order[i][: counts[i]]) for i in sorted(scores)}


def _ranking(s: np.ndarray) -> np.ndarray:
    """Expert ids by descending score (ties: lower id first)."""
    return np.lexsort((np.arange(len(s)), -s))


def _counts(scores: dict[int, np.ndarray], budget: Mapping[str, Any], top_k: dict[int, int],
            expert_mb: dict[int, float] | None) -> dict[int, int]:
    sizes = {i: len(s) for i, s in scores.items()}
    if _get(budget, "max_mb") is not None:
        if expert_mb is None:
            raise ValueError("prune.max_mb needs the size of each layer's experts (expert_mb)")
        return _counts_by_mb(scores, float(_get(budget, "max_mb")), top_k, expert_mb)
    if _get(budget, "keep_per_layer") is not None:
        n = int(_get(budget, "keep_per_layer"))
        for i, e in sizes.items():
            if not top_k[i] <= n <= e:
                raise ValueError(
                    f"prune.keep_per_layer={n} must be between the top-k ({top_k[i]}) and the "
                    f"number of experts ({e}) of MoE layer {i}"
                )
        return dict.fromkeys(sizes, n)
    keep = _get(budget, "keep")
    if keep is None:
        raise ValueError("no pruning budget: set one of prune.keep, prune.keep_per_layer, "
                         "prune.max_mb")
    keep = float(keep)
    counts = {i: math.floor(keep * e + 0.5) for i, e in sizes.items()}
    for i, n in counts.items():
        if not 0 < keep <= 1 or n < top_k[i]:
            raise ValueError(
                f"prune.keep={keep} keeps {n} of {sizes[i]} experts in MoE layer {i}, fewer "
                f"than its top-k ({top_k[i]}); use a fraction in (0, 1] keeping >= top-k"
            )
    return counts


def _counts_by_mb(scores: dict[int, np.ndarray], max_mb: float, top_k: dict[int, int],
                  expert_mb: dict[int, float]) -> dict[int, int]:
    """Greedy global allocation of ``max_mb`` by normalised score, floor top-k per layer."""
    floor_mb = sum(top_k[i] * expert_mb[i] for i in scores)
    if max_mb < floor_mb - 1e-9:
        raise ValueError(
            f"prune.max_mb={max_mb} is below {floor_mb:.4f} MB, the size of top-k experts in "
            f"every MoE layer (the least a layer can keep and still route)"
        )
    counts = {i: top_k[i] for i in scores}
    left = max_mb - floor_mb
    candidates = []  # (normalised score, layer, rank) of every expert beyond the top-k
    for i, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        shifted = s - s.min()
        share = shifted / shifted.sum() if shifted.sum() > 0 else np.full_like(s, 1 / len(s))
        ranked = _ranking(s)
        candidates += [(-share[e], i, r) for r, e in enumerate(ranked) if r >= top_k[i]]
    # Within a layer, ranks are taken in order, so a layer's count is its next free rank.
    for _neg_share, i, rank in sorted(candidates):
        if rank == counts[i] and expert_mb[i] <= left + 1e-9:
            counts[i] += 1
            left -= expert_mb[i]
    return counts


def pruning_enabled(prune_cfg: Any) -> bool:
    """Pruning runs when ``prune.enabled`` is set or any budget key (keep, keep_per_layer,
    max_mb, schedule) is given, so ``prune.keep=0.5`` alone turns it on."""
    if prune_cfg is None:
        return False
    return bool(_get(prune_cfg, "enabled")) or any(
        _get(prune_cfg, k) is not None for k in ("keep", "keep_per_layer", "max_mb", "schedule"))


def check_budget(cfg_prune: Any, model_or_adapter: nn.Module | MoEAdapter) -> None:
    """Reject a pruning config the model cannot satisfy, naming the key (before training).

    Checks ``prune.score``, ``prune.tcess_k``, ``prune.at_round``, the budget and every step
    of ``prune.schedule`` against each MoE layer's top-k, expert count and expert size.
    """
    if not pruning_enabled(cfg_prune):
        return
    adapter = _adapter(model_or_adapter)
    check_score(str(_get(cfg_prune, "score")))
    layers = adapter.moe_layers()
    top_k = {layer.index: layer.top_k for layer in layers}
    fake = {layer.index: np.zeros(layer.num_experts) for layer in layers}
    tcess_k = _get(cfg_prune, "tcess_k")
    if tcess_k is not None and not all(1 <= int(tcess_k) <= len(s) for s in fake.values()):
        raise ValueError(f"prune.tcess_k={tcess_k} must be between 1 and the number of experts")
    at_round = _get(cfg_prune, "at_round")
    if at_round is not None and int(at_round) < 1:
        raise ValueError(f"prune.at_round={at_round} must be a round number >= 1")
    _counts(fake, cfg_prune, top_k, expert_mb(adapter))
    for step in _get(cfg_prune, "schedule") or []:
        if len(step) != 2 or int(step[0]) < 1:
            raise ValueError(f"prune.schedule entry {list(step)} must be [round >= 1, keep]")
        _counts(fake, {"keep": step[1]}, top_k, None)
