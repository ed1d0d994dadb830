"""Task-adaptive expert retrieval (PreMoe TAER, arXiv 2505.17639) and expert restriction.

Offline, each task (here: a domain of the corpus) gets a pattern: its TCESS vector per MoE
layer. TCESS (task-conditioned expected selection score) is the mean over all of the task's
tokens of the raw router logits with all but the top-k zeroed (no softmax, no bias). The
pattern's key is its first-MoE-layer TCESS vector; its experts are the ``keep`` highest-TCESS
experts of every layer.

Online, a prompt runs only up to the first MoE router; its TCESS vector over the prompt's
tokens retrieves the nearest key (L2) and the model then runs with only that pattern's
experts: :func:`restrict_experts` masks the router logits of every other expert to -inf with
a forward hook on the router and re-routes, as if those router rows had been sliced away.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.moe.adapter import MoEAdapter

# --- TCESS ------------------------------------------------------------------------------


def tcess(router_logits: np.ndarray | torch.Tensor, top_k: int) -> np.ndarray:
    """Mean over tokens of the router logits with all but each token's top-k zeroed.

    Parameters
    ----------
    router_logits : array
        ``(..., E)`` raw router logits; every leading axis is a token axis.
    top_k : int
        Experts kept per token (the model's top-k; PreMoe's released code uses 1).

    Returns
    -------
    np.ndarray
        ``(E,)`` float64.
    """
    z = torch.as_tensor(np.asarray(router_logits, dtype=np.float64)).reshape(
        -1, np.shape(router_logits)[-1])  # (tokens, E)
    values, index = z.topk(top_k, dim=-1)
    sparse = torch.zeros_like(z).scatter_(1, index, values)  # (tokens, E)
    return sparse.mean(0).numpy()


@dataclass
class Pattern:
    """One task's stored pattern: its key and its kept experts per layer."""

    task: str
    key: np.ndarray  # (E,) first-MoE-layer TCESS
    scores: dict[int, np.ndarray]  # layer -> (E,) TCESS
    experts: dict[int, list[int]]  # layer -> kept expert ids, best first


class PatternLibrary:
    """TCESS patterns of several tasks, and nearest-pattern retrieval.

    Parameters
    ----------
    patterns : Sequence[Pattern]
        One per task.
    """

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        if not patterns:
            raise ValueError("a pattern library needs at least one task")
        self.patterns = list(patterns)
        self.keys = np.stack([p.key for p in self.patterns])  # (tasks, E)

    @classmethod
    def build(cls, task_logits: Mapping[str, Mapping[int, np.ndarray]], top_k: int,
              keep: int) -> PatternLibrary:
        """Patterns from each task's router logits ``{task: {layer: (..., E)}}``."""
        patterns = []
        for task, logits in task_logits.items():
            scores = {layer: tcess(z, top_k) for layer, z in sorted(logits.items())}
            first = min(scores)
            experts = {layer: np.argsort(-s, kind="stable")[:keep].tolist()
                       for layer, s in scores.items()}
            patterns.append(Pattern(task, scores[first], scores, experts))
        return cls(patterns)

    @property
    def tasks(self) -> list[str]:
        return [p.task for p in self.patterns]

    def distances(self, key: np.ndarray) -> np.ndarray:
        """L2 distance of a query key ``(E,)`` to every stored key ``(tasks,)``."""
        return np.linalg.norm(self.keys - np.asarray(key)[None], axis=1)

    def retrieve(self, key: np.ndarray) -> Pattern:
        """The pattern whose key is nearest to ``key`` (ties: the first stored)."""
        return self.patterns[int(self.distances(key).argmin())]


class _StopForward(Exception):
    """Raised by the first router's hook: nothing past it is needed."""


@torch.no_grad()
def prompt_keys(model: nn.Module, prompts: torch.Tensor, top_k: int | None = None,
                adapter: MoEAdapter | None = None) -> np.ndarray:
    """The first-MoE-layer TCESS vector of each prompt ``(N, E)``.

    The forward stops at the first MoE router: later layers are never computed.
    """
    adapter = adapter or MoEAdapter(model)
    first = adapter.moe_layers()[0]
    k = top_k or first.top_k
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output
        captured.append(logits.detach().float().reshape(-1, logits.shape[-1]))  # (T, E)
        raise _StopForward

    handle = first.router.register_forward_hook(hook)
    keys = []
    try:
        for row in prompts:  # one prompt at a time: its key is over its own tokens only
            try:
                model(input_ids=row[None], use_cache=False)
            except _StopForward:
                pass
            keys.append(tcess(captured.pop().numpy(), k))
    finally:
        handle.remove()
    return np.stack(keys)


# --- restricting a model to some experts --------------------------------------------------


def _reroute(router: nn.Module, model_type: str, logits: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_weights, top_k_index) from (masked) router logits, as the family routes."""
    k = router.top_k
    if model_type == "deepseek_v3":
        return _reroute_grouped_sigmoid(router, logits, dtype)
    if model_type == "granitemoeshared":  # top-k of the logits, softmax over those k
        top_logits, index = logits.float().topk(k, dim=-1)
        return top_logits.softmax(-1).to(dtype), index
    probs = logits.float().softmax(-1)  # (T, E)
    weights, index = probs.topk(k, dim=-1)  # (T, k)
    if model_type == "mixtral" or getattr(router, "norm_topk_prob", False):
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(dtype), index


def _reroute_grouped_sigmoid(router: nn.Module, logits: torch.Tensor,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing: sigmoid scores, bias for the choice, group-limited top-k."""
    scores = logits.float().sigmoid()  # (T, E); a masked expert scores 0
    choice = (scores + router.e_score_correction_bias).masked_fill(logits.isinf(), -math.inf)
    groups = choice.view(-1, router.num_group, router.num_experts // router.num_group)
    group_scores = groups.topk(2, dim=-1)[0].sum(-1)  # (T, G)
    group_idx = group_scores.topk(router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand_as(groups).reshape(choice.shape)
    choice = choice.masked_fill(~score_mask.bool(), -math.inf)
    index = choice.topk(router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, index)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return (weights * router.routed_scaling_factor).to(dtype), index


@contextmanager
def restrict_experts(model: nn.Module, keep: Mapping[int, Sequence[int]],
                     adapter: MoEAdapter | None = None) -> Iterator[None]:
    """Inside the block, each listed layer routes only among its ``keep`` experts.

    The router's logits of the other experts are set to -inf by a forward hook and top-k
    is redone with the family's own rule, so weights renormalise over the kept experts,
    exactly as if the other router rows had been sliced away.

    Parameters
    ----------
    keep : Mapping
        Decoder-layer index -> expert ids to keep (at least one); layers not listed keep all.
    """
    adapter = adapter or MoEAdapter(model)
    model_type = adapter.spec.model_type
    handles = []
    for layer_index, experts in keep.items():
        layer = adapter.layer(layer_index)
        if not experts:
            raise ValueError(f"restrict_experts: layer {layer_index} must keep >= 1 expert")
        allowed = torch.zeros(layer.num_experts, dtype=torch.bool)
        allowed[list(experts)] = True
        handles.append(layer.router.register_forward_hook(_masking_hook(allowed, model_type)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _masking_hook(allowed: torch.Tensor, model_type: str):
    def hook(module: nn.Module, _args: tuple, output: tuple) -> tuple:
        logits, weights, _ = output
        masked = logits.masked_fill(~allowed.to(logits.device), -math.inf)
        new_weights, index = _reroute(module, model_type, masked, weights.dtype)
        return masked, new_weights, index

    return hook


# --- evaluation ---------------------------------------------------------------------------


@torch.no_grad()
def continuation_loss(model: nn.Module, blocks: torch.Tensor, start: int,
                      batch_size: int = 8) -> torch.Tensor:
    """Per-block mean cross-entropy of predicting tokens ``start + 1 ..`` ``(N,)``."""
    losses = []
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, start:-1]  # (B, T', V)
        ce = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, start + 1 :],
                             reduction="none")  # (B, T')
        losses.append(ce.mean(1))
    return torch.cat(losses)


def evaluate_retrieval(model: nn.Module, library: PatternLibrary,
                       test_blocks: Mapping[str, torch.Tensor], prompt_len: int,
                       top_k: int | None = None, batch_size: int = 8,
                       static: Mapping[str, Mapping[int, Sequence[int]]] | None = None) -> dict:
    """Retrieval accuracy on held-out prompts of known task, and perplexities.

    Each test block's first ``prompt_len`` tokens retrieve a pattern; perplexity is measured
    on the rest of the block with the full model, with the retrieved pattern's experts, with
    the true task's pattern (the oracle), and with each ``static`` expert set (one set for
    every prompt, e.g. the client's own pruning): what retrieval is judged against.

    Parameters
    ----------
    static : Mapping, optional
        Name -> ``{layer: kept expert ids}``; reported as ``ppl_<name>``.

    Returns
    -------
    dict
        ``accuracy``, ``confusion`` ``{true: {retrieved: count}}``, per task
        ``{"accuracy", "ppl_full", "ppl_retrieved", "ppl_oracle", "ppl_<static>", "prompts"}``
        under ``tasks``, and totals over all prompts under the same ``ppl_*`` keys.
    """
    adapter = MoEAdapter(model)
    static = dict(static or {})
    by_task = {p.task: p for p in library.patterns}
    per_task, confusion = {}, {}
    losses: dict[str, list[torch.Tensor]] = {"full": [], "retrieved": [], "oracle": []}
    for task, blocks in test_blocks.items():
        keys = prompt_keys(model, blocks[:, :prompt_len], top_k, adapter)
        picked = [library.retrieve(key) for key in keys]
        confusion[task] = {t: sum(p.task == t for p in picked) for t in library.tasks}
        full = continuation_loss(model, blocks, prompt_len, batch_size)
        retrieved = torch.empty_like(full)
        for pattern in {p.task: p for p in picked}.values():
            rows = [i for i, p in enumerate(picked) if p.task == pattern.task]
            with restrict_experts(model, pattern.experts, adapter):
                retrieved[rows] = continuation_loss(model, blocks[rows], prompt_len, batch_size)
        oracle = full
        if task in by_task:
            with restrict_experts(model, by_task[task].experts, adapter):
                oracle = continuation_loss(model, blocks, prompt_len, batch_size)
        measured = {"full": full, "retrieved": retrieved, "oracle": oracle}
        for name, keep in static.items():
            with restrict_experts(model, keep, adapter):
                measured[name] = continuation_loss(model, blocks, prompt_len, batch_size)
        per_task[task] = {"accuracy": confusion[task].get(task, 0) / len(picked),
                          "prompts": len(picked),
                          **{f"ppl_{name}": _ppl(v) for name, v in measured.items()}}
        for name, value in measured.items():
            losses.setdefault(name, []).append(value)
    correct = sum(c.get(t, 0) for t, c in confusion.items())
    total = sum(sum(c.values()) for c in confusion.values())
    return {"accuracy": correct / max(total, 1), "prompts": total, "confusion": confusion,
            "tasks": per_task,
            **{f"ppl_{name}": _ppl(torch.cat(v)) for name, v in losses.items() if v}}


def _ppl(losses: torch.Tensor) -> float:
    """Perplexity of blocks of equal length (mean of their mean losses)."""
    return math.exp(min(float(losses.mean()), 50.0))

