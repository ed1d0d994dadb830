"""Speculative expert prefetch: guess layer l+1's experts while layer l computes.

Layer l+1's router applied to layer l's expert input predicts which experts l+1 will pick
(Mixtral-offloading, arXiv 2312.17238; Pre-gated MoE, arXiv 2308.12066, trains a gate for
this). The residual stream changes little between adjacent layers, so the guess is good and
the load overlaps layer l's compute: a background thread reads the files, and on CUDA copies
from pinned host memory on a side stream, so the default stream never waits for the disk.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from fedmoe.edge.store import ExpertStore
from fedmoe.moe.adapter import MoELayer


def predict_experts(hidden_states: torch.Tensor, next_layer: MoELayer, limit: int) -> list[int]:
    """Experts ``next_layer``'s router would pick for ``hidden_states`` (at most ``limit``).

    Parameters
    ----------
    hidden_states : (T, H) tensor
        Input of the current layer's experts.
    next_layer : MoELayer
        The MoE block that runs next.
    limit : int
        Cap on the prediction (the cache capacity): the experts picked by most tokens.
    """
    return most_voted(predicted_top_k(hidden_states, next_layer), limit)


def predicted_top_k(hidden_states: torch.Tensor, next_layer: MoELayer) -> torch.Tensor:
    """Per token, the top-k ids ``next_layer``'s router gives ``hidden_states`` ``(T, k)``."""
    router = next_layer.router
    logits = torch.nn.functional.linear(hidden_states, router.weight,
                                        getattr(router, "bias", None))  # (T, E)
    scores = next_layer.scores(logits)  # (T, E)
    for name in next_layer.router_buffers:  # e.g. DeepSeek-V3's selection bias
        scores = scores + getattr(router, name).float()
    top_k = min(next_layer.top_k, scores.shape[-1])
    return scores.topk(top_k, dim=-1).indices  # (T, k)


def most_voted(top_k_ids: torch.Tensor, limit: int) -> list[int]:
    """The ``limit`` experts most tokens picked in ``top_k_ids`` ``(T, k)`` (ties: lower id)."""
    votes = Counter(top_k_ids.flatten().tolist())
    return [e for e, _ in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]]


@dataclass
class Pending:
    """A load in flight: the weights arrive in ``future``; on CUDA wait on its event."""

    expert: int
    future: Future

    def result(self) -> dict[str, torch.Tensor]:
        tensors, event = self.future.result()
        if event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(event)
            for t in tensors.values():
                t.record_stream(stream)  # the caching allocator must not reuse them early
        return tensors


class Prefetcher:
    """Loads experts on a background thread (and a side CUDA stream on GPU).

    Parameters
    ----------
    store : ExpertStore
        The slow tier.
    device : torch.device
        Where the weights are used.
    """

    def __init__(self, store: ExpertStore, device: torch.device) -> None:
        self.store = store
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmoe-prefetch")

    def submit(self, layer: int, expert: int) -> Pending:
        return Pending(expert, self.pool.submit(self._load, layer, expert))

    def _load(self, layer: int, expert: int) -> tuple[dict[str, torch.Tensor], object | None]:
        if not self.cuda:
            return self.store.load(layer, expert), None
        host = self.store.load(layer, expert, pin_memory=True)
        with torch.cuda.stream(self.stream):
            tensors = {n: t.to(self.device, non_blocking=True) for n, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return tensors, event

    def close(self) -> None:
        self.pool.shutdown(wait=True)
