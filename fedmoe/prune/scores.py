"""Expert utility scores per MoE layer, computed from a client's own data.

Every score is a vector of length E (the layer's *current* experts; on an unpruned model the
ids are the original ones): higher means more useful, and pruning keeps the highest.

- ``frequency``: share of tokens whose top-k picks the expert, ``count_e / T`` (the
  layer's actual routing decision, bias and groups included). Sums to k over experts.
- ``tcess`` (PreMoe, arXiv 2505.17639, "task-conditioned expected selection score"): raw
  router logits ``z = W_g h`` (no softmax, no correction bias); per token keep the ``k``
  largest logits and zero the rest; average the sparse vector over ALL ``T`` tokens:
  ``tcess_e = (1/T) sum_t z_te [e in topk_k(z_t)]``. ``k`` defaults to the model's top-k
  (``prune.tcess_k``; the reference code uses 1). Logits may be negative, so may TCESS.
- ``reap`` (REAP, arXiv 2510.13999): router-weighted expert activation norm,
  ``reap_e = (1/|X_e|) sum_{t in X_e} g_te * ||f_e(h_t)||_2`` where ``X_e`` are the tokens
  whose top-k includes ``e``, ``g_te`` the gate weight the layer applies to expert ``e``'s
  output for token ``t`` (after the family's renormalisation and scaling) and ``f_e(h_t)``
  the expert's output before gating. Mean over routed tokens only; 0 if never routed.
- ``reconstruction`` (NAEE, arXiv 2402.14800): greedy forward selection per layer. Starting
  from no expert, add the expert that minimises ``||Z - Z_S||_F`` where ``Z`` is the layer's
  routed-experts output on calibration tokens and ``Z_S`` the output when every token is
  routed among ``S`` only (logits of the other experts masked, gate weights recomputed the
  family's way, top-min(k, |S|)). Greedy selection is nested, so one run orders all experts
  for every keep count r: ``score_e = (E - rank_e) / E`` (first pick = 1).
- ``random``: seeded uniform scores, the floor baseline.

``frequency`` and ``tcess`` accumulate during local training with no extra pass
(:class:`RoutingStats`); the others need :func:`compute_scores`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmoe.checkpoints import model_device
from fedmoe.config import PRUNE_SCORES as SCORES
from fedmoe.moe.adapter import MoEAdapter, MoELayer
from fedmoe.moe.routing import RoutingTrace, capture_routing
from fedmoe.prune.masked import masked_routing


def check_score(score: str) -> None:
    """A clear error for an unknown score name."""
    if score not in SCORES:
        raise ValueError(f"prune.score={score!r} is not a known score; allowed: {list(SCORES)}")


# ---- routing statistics accumulated during training ------------------------------------------
class RoutingStats:
    """Running per-layer token counts, top-k counts and TCESS sums (what frequency/TCESS need).

    Feed it the routing trace of each training step (``update(trace)``); the update is a
    bincount and a top-k on ``(T, E)`` logits per layer, on CPU.

    Parameters
    ----------
    tcess_k : int or dict, optional
        Logits kept per token for TCESS: one value, a layer -> k map, or ``None`` for each
        layer's router top-k (taken from the trace's ``top_k_index`` width).
    """

    def __init__(self, tcess_k: int | dict[int, int] | None = None) -> None:
        self.tcess_k = tcess_k
        self.tokens: dict[int, int] = {}
        self.counts: dict[int, np.ndarray] = {}  # (E,) float64 top-k selections
        self.tcess_sum: dict[int, np.ndarray] = {}  # (E,) float64 sums of sparse logits

    def _k(self, layer: int, default: int) -> int:
        if isinstance(self.tcess_k, dict):
            return int(self.tcess_k.get(layer, default))
        return int(self.tcess_k or default)

    def update(self, trace: RoutingTrace) -> None:
        """Add every layer of a :func:`fedmoe.moe.routing.capture_routing` trace."""
        for rec in trace:
            self.update_layer(rec.layer, rec.top_k_index, rec.router_logits)

    @torch.no_grad()
    def update_layer(
        self, layer: int, top_k_index: torch.Tensor, router_logits: torch.Tensor
    ) -> None:
        """Add one layer's tokens: ``top_k_index`` ``(T, k)``, raw ``router_logits`` ``(T, E)``."""
        logits = router_logits.detach().float().reshape(-1, router_logits.shape[-1])  # (T, E)
        num_experts = logits.shape[1]
        if layer in self.counts and self.counts[layer].shape[0] != num_experts:
            raise ValueError(
                f"layer {layer} now has {num_experts} experts but the routing statistics hold "
                f"{self.counts[layer].shape[0]}; call select(kept) after pruning"
            )
        index = top_k_index.detach().reshape(-1).long().cpu()
        counts = torch.bincount(index, minlength=num_experts).double().numpy()
        k = self._k(layer, top_k_index.shape[-1])
        top_logits, top_index = logits.topk(k, dim=-1)  # (T, k)
        sparse_sum = torch.zeros(num_experts, dtype=torch.float64)
        sparse_sum.index_add_(0, top_index.reshape(-1).cpu(), top_logits.reshape(-1).double().cpu())
        self.tokens[layer] = self.tokens.get(layer, 0) + logits.shape[0]
        self.counts[layer] = self.counts.get(layer, 0) + counts
        self.tcess_sum[layer] = self.tcess_sum.get(layer, 0) + sparse_sum.numpy()

    def frequency(self) -> dict[int, np.ndarray]:
        """``count_e / T`` per layer."""
        return {i: c / max(self.tokens[i], 1) for i, c in sorted(self.counts.items())}

    def tcess(self) -> dict[int, np.ndarray]:
        """PreMoe TCESS per layer (arXiv 2505.17639)."""
        return {i: s / max(self.tokens[i], 1) for i, s in sorted(self.tcess_sum.items())}

    def scores(self, score: str) -> dict[int, np.ndarray]:
        """``frequency`` or ``tcess`` by name."""
        if score not in ("frequency", "tcess"):
            raise ValueError(f"prune.score={score!r} needs a pass over data; use compute_scores")
        return self.frequency() if score == "frequency" else self.tcess()

    @property
    def num_tokens(self) -> int:
        return max(self.tokens.values(), default=0)

    def select(self, kept: dict[int, list[int]]) -> RoutingStats:
        """The statistics of the kept experts only, re-indexed as the pruned layers are."""
        out = RoutingStats(self.tcess_k)
        for i in self.counts:
            ids = kept.get(i, list(range(self.counts[i].shape[0])))
            out.tokens[i] = self.tokens[i]
            out.counts[i] = self.counts[i][ids].copy()
            out.tcess_sum[i] = self.tcess_sum[i][ids].copy()
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (layer keys as strings)."""
        return {
            "tcess_k": {str(k): v for k, v in self.tcess_k.items()}
            if isinstance(self.tcess_k, dict) else self.tcess_k,
            "layers": {
                str(i): {"tokens": self.tokens[i], "counts": self.counts[i].tolist(),
                         "tcess_sum": self.tcess_sum[i].tolist()}
                for i in sorted(self.counts)
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingStats:
        tcess_k = data.get("tcess_k")
        if isinstance(tcess_k, dict):
            tcess_k = {int(k): int(v) for k, v in tcess_k.items()}
        stats = cls(tcess_k)
        for key, rec in data["layers"].items():
            i = int(key)
            stats.tokens[i] = int(rec["tokens"])
            stats.counts[i] = np.asarray(rec["counts"], dtype=np.float64)
            stats.tcess_sum[i] = np.asarray(rec["tcess_sum"], dtype=np.float64)
        return stats


# ---- pass-based scores --------------------------------------------------------------------------
def compute_scores(
    model: nn.Module,
    blocks: torch.Tensor,
    score: str,
    *,
    tcess_k: int | None = None,
    calibration_tokens: int | None = 512,
    seed: int = 0,
    batch_size: int = 8,
    adapter: MoEAdapter | None = None,
) -> dict[int, np.ndarray]:
    """Utility scores of every MoE layer's current experts (module docstring for definitions).

    Parameters
    ----------
    model : nn.Module
        A model of a supported family (optionally PEFT-wrapped), used in eval mode.
    blocks : Tensor
        ``(N, T)`` token blocks of the client's data; the first ``calibration_tokens`` tokens
        (whole blocks, at least one) are used.
    score : str
        One of ``SCORES``.
    tcess_k : int, optional
        TCESS top-k (default: the model's top-k).
    calibration_tokens : int, optional
        Token cap (``None``: all blocks).

    Returns
    -------
    dict
        Decoder-layer index -> ``(E,)`` float64 scores.
    """
    check_score(score)
    adapter = adapter or MoEAdapter(model)
    if score == "random":
        rng = np.random.default_rng(seed)
        return {layer.index: rng.random(layer.num_experts) for layer in adapter.moe_layers()}
    blocks = _calibration_blocks(blocks, calibration_tokens)
    if score in ("frequency", "tcess"):
        stats = RoutingStats(tcess_k)
        with capture_routing(model, adapter, router_probs=False) as trace:
            _forward(model, blocks, batch_size)
        stats.update(trace)
        return stats.scores(score)
    with _capture_expert_inputs(adapter) as inputs:
        _forward(model, blocks, batch_size)
    fn = reap_scores if score == "reap" else reconstruction_scores
    model_type, cap = adapter.spec.model_type, calibration_tokens
    return {layer.index: fn(layer, model_type, *(x[:cap] for x in inputs[layer.index]))
            for layer in adapter.moe_layers()}


def _calibration_blocks(blocks: torch.Tensor, tokens: int | None) -> torch.Tensor:
    if tokens is None:
        return blocks
    n = max(1, -(-tokens // blocks.shape[1]))  # ceil: whole blocks covering the cap
    return blocks[:n]


@torch.no_grad()
def _forward(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> None:
    was_training = model.training
    model.eval()
    for start in range(0, blocks.shape[0], batch_size):
        model(input_ids=blocks[start : start + batch_size].to(model_device(model)),
              use_cache=False)
    model.train(was_training)


@contextmanager
def _capture_expert_inputs(
    adapter: MoEAdapter,
) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per layer: experts' input ``(T, H)``, ``top_k_index``, ``top_k_weights`` ``(T, k)``."""
    parts: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def hook(layer: MoELayer):
        def on_experts(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            v = dict(zip(names, args, strict=False)) | kwargs
            parts.setdefault(layer.index, []).append(
                tuple(v[n].detach().reshape(-1, v[n].shape[-1]) for n in names)
            )
        return on_experts

    handles = [layer.experts.register_forward_pre_hook(hook(layer), with_kwargs=True)
               for layer in adapter.moe_layers()]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        for i, chunks in parts.items():
            out[i] = tuple(torch.cat(c) for c in zip(*chunks, strict=True))  # type: ignore[assignment]


@torch.no_grad()
def expert_outputs(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's output before gating, ``(E, T, H)``, through the experts' own forward."""
    tokens = hidden.shape[0]
    outs = []
    for e in range(layer.num_experts):
        index = torch.full((tokens, 1), e, dtype=torch.long, device=hidden.device)  # (T, 1)
        weight = torch.ones(tokens, 1, dtype=hidden.dtype, device=hidden.device)
        outs.append(layer.experts(hidden, index, weight))  # (T, H)
    return torch.stack(outs).float()


def reap_scores(
    layer: MoELayer, model_type: str, hidden: torch.Tensor, index: torch.Tensor,
    weights: torch.Tensor,
) -> np.ndarray:
    """REAP (arXiv 2510.13999): mean over routed tokens of gate weight x expert output norm."""
    norms = expert_outputs(layer, hidden).norm(dim=-1)  # (E, T)
    num_experts = norms.shape[0]
    total = torch.zeros(num_experts, dtype=torch.float64)
    count = torch.zeros(num_experts, dtype=torch.float64)
    token = torch.arange(index.shape[0]).unsqueeze(1).expand_as(index)  # (T, k)
    contrib = weights.double() * norms[index, token].double()  # (T, k)
    total.index_add_(0, index.reshape(-1), contrib.reshape(-1))
    count.index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.float64))
    return (total / count.clamp(min=1)).numpy()


@torch.no_grad()
def reconstruction_scores(
    layer: MoELayer, model_type: str, hidden: torch.Tensor, index: torch.Tensor,
    weights: torch.Tensor,
) -> np.ndarray:
    """NAEE (arXiv 2402.14800) greedy expert selection minimising the output error."""
    outputs = expert_outputs(layer, hidden)  # (E, T, H)
    num_experts, tokens = outputs.shape[:2]
    token = torch.arange(tokens).unsqueeze(1)  # (T, 1)
    chosen = outputs[index, token.expand_as(index)]  # (T, k, H)
    target = (weights.float().unsqueeze(-1) * chosen).sum(1)  # (T, H): the layer's routed output
    logits = layer.router(hidden)[0].float()  # (T, E): every router returns logits first
    keep = torch.zeros(num_experts, dtype=torch.bool)
    order: list[int] = []
    for _ in range(num_experts):
        best, best_err = -1, float("inf")
        for e in (e for e in range(num_experts) if not keep[e]):
            keep[e] = True
            # DeepSeek's group limit is dropped while fewer than two experts per group exist.
            w, i = masked_routing(layer.router, model_type, logits, keep,
                                  top_k=min(layer.top_k, len(order) + 1), grouped=False)
            pruned = (w.float().unsqueeze(-1) * outputs[i, token.expand_as(i)]).sum(1)  # (T, H)
            err = (target - pruned).norm().item()
            keep[e] = False
            if err < best_err:
                best, best_err = e, err
        keep[best] = True
        order.append(best)
    scores = np.zeros(num_experts)
    scores[order] = (num_experts - np.arange(num_experts)) / num_experts
    return scores
