"""Offloaded routed experts behind transformers' ``ExpertsInterface``.

:func:`offload` writes (or opens) the expert store, frees the fused 3-D expert parameters
(they become ``meta`` tensors of the same shape) and selects the experts implementation
``"fedmoe_offload"``, registered here. Every MoE block then calls
:func:`offload_experts_forward` with ``(hidden_states, top_k_index, top_k_weights)``; it asks
the layer's cache for the weights, loading misses from the store, so ``model.generate()`` runs
unchanged on every supported family, and greedy outputs equal the in-memory ``eager`` ones
bit for bit (same per-expert ops, summed in the same ascending expert order).

Memory: each layer holds at most its cache capacity; with ``prefetch`` the guesses for the
next layer (at most that layer's capacity, while decoding its top-k) are in flight on top of
it until that layer runs, where they are admitted without evicting anything it needs.

Usage::

    runtime = offload(model, "store/", EdgeConfig(budget="2x", policy="consistency",
                                                  prefetch=True))
    model.generate(input_ids, max_new_tokens=32)
    runtime.stats()["overall"]["hit_rate"]
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from fedmoe.edge.budget import capacities
from fedmoe.edge.prefetch import Pending, Prefetcher, predict_experts
from fedmoe.edge.store import INDEX, ExpertStore
from fedmoe.expert_cache import CacheState, CacheStats, make_policy
from fedmoe.moe.adapter import MoEAdapter, MoELayer

IMPLEMENTATION = "fedmoe_offload"
_ATTR = "_fedmoe_offload"
# An experts module carrying this attribute, ``fn(previous_hidden (T, H), limit) -> ids``,
# has its prefetch guess made by ``fn`` instead of by its router.
PREDICTOR_ATTR = "_fedmoe_predictor"


@dataclass
class EdgeConfig:
    """How the offloaded experts are cached (the ``edge`` config group).

    Attributes
    ----------
    budget : int or str
        Experts per layer (``4``), a multiple of the active ones (``"2x"``), ``"all"``, or
        memory for all routed experts (``"64MB"``); see :func:`fedmoe.edge.budget.parse_budget`.
    policy : str
        ``lru`` | ``lfu`` | ``static`` | ``consistency`` | ``belady``.
    window : int
        Steps in ``consistency``'s recent window.
    prefetch : bool
        Speculatively load the next layer's experts (not with ``static``/``belady``, whose
        contents are fixed or oracle-chosen).
    counts : mapping, optional
        ``{decoder layer: per-expert routing counts}`` for ``static``.
    trace : mapping, optional
        ``{decoder layer: steps}`` recorded from the same run, for ``belady``.
    """

    budget: int | str = "2x"
    policy: str = "lru"
    window: int = 16
    prefetch: bool = False
    counts: Mapping[int, Sequence[float]] | None = None
    trace: Mapping[int, Sequence[Sequence[int]]] | None = None


@dataclass
class PrefetchStats:
    """Pooled over steps: predicted experts, experts actually needed, and their overlap."""

    predicted: int = 0
    actual: int = 0
    correct: int = 0

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.actual if self.actual else 0.0

    def __add__(self, other: PrefetchStats) -> PrefetchStats:
        return PrefetchStats(self.predicted + other.predicted, self.actual + other.actual,
                             self.correct + other.correct)

    def as_dict(self) -> dict[str, float | int]:
        return {"predicted": self.predicted, "actual": self.actual, "correct": self.correct,
                "precision": self.precision, "recall": self.recall}


@dataclass
class OffloadedLayer:
    """One MoE layer's experts served from the store through a cache."""

    layer: MoELayer
    store: ExpertStore
    device: torch.device
    next: OffloadedLayer | None = None
    prefetcher: Prefetcher | None = None
    cache: CacheState | None = None
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    pending: list[Pending] = field(default_factory=list)
    predicted: list[int] | None = None
    prefetch_stats: PrefetchStats = field(default_factory=PrefetchStats)
    trace: list[list[int]] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.layer.index

    def reset(self, cache: CacheState, prefetcher: Prefetcher | None) -> None:
        """Start over with an empty (or pinned) cache; drops every held weight."""
        self.drain()
        self.cache, self.prefetcher = cache, prefetcher
        self.weights = {e: self._load(e) for e in cache.resident}
        self.predicted, self.prefetch_stats, self.trace = None, PrefetchStats(), []

    def drain(self) -> None:
        for p in self.pending:
            p.future.result()
        self.pending = []

    def _load(self, expert: int) -> dict[str, torch.Tensor]:
        return self.store.load(self.index, expert, device=self.device)

    def _admit(self, expert: int, tensors: dict[str, torch.Tensor],
               protect: Collection[int] = ()) -> bool:
        """Prefetched ``expert`` enters ahead of use; whether it did."""
        return self._hold(expert, tensors, *self.cache.admit(expert, protect))

    def _use(self, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """The step has used ``expert``: the cache counts the use and keeps it if it can."""
        self._hold(expert, tensors, *self.cache.use(expert))

    def _hold(self, expert: int, tensors: dict[str, torch.Tensor], resident: bool,
              evicted: int | None) -> bool:
        """Keep the weights the cache holds, drop those it evicted."""
        if evicted is not None:
            del self.weights[evicted]
        if resident:
            self.weights[expert] = tensors
        return resident

    def predict(self, previous_hidden: torch.Tensor) -> list[int]:
        """This layer's experts guessed from the previous layer's expert input (at most the
        cache capacity); a predictor set on the experts module (``PREDICTOR_ATTR``, e.g. a
        benchmark replaying recorded routing) replaces the router's guess."""
        override = getattr(self.layer.experts, PREDICTOR_ATTR, None)
        if override is not None:
            return override(previous_hidden, self.cache.capacity)
        return predict_experts(previous_hidden, self.layer, self.cache.capacity)

    def expect(self, experts: list[int]) -> None:
        """The previous layer predicts ``experts``: start loading the missing ones."""
        self.predicted = experts
        for e in experts:
            if e not in self.cache.resident:
                self.pending.append(self.prefetcher.submit(self.index, e))

    def forward(self, experts: nn.Module, hidden_states: torch.Tensor,
                top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)
        needed = sorted(set(top_k_index.flatten().tolist()))
        # Prefetched experts enter the cache before the lookup, evicting none of the experts
        # this step needs (the router has run); one that finds no room is still used once.
        staged = {}
        for p in self.pending:
            tensors = p.result()
            if not self._admit(p.expert, tensors, protect=needed):
                staged[p.expert] = tensors
        self.pending = []
        self.trace.append(needed)
        if self.prefetcher is not None and self.next is not None:
            self.next.expect(self.next.predict(hidden_states))
        hits, _ = self.cache.lookup(needed)
        if self.predicted is not None:
            correct = len(set(self.predicted) & set(needed))
            self.prefetch_stats += PrefetchStats(len(self.predicted), len(needed), correct)
            self.predicted = None
        # Hold the hits now: a miss entering below may evict one not yet computed (it
        # re-enters in its turn, from the held copy).
        held = {e: self.weights[e] for e in hits}
        final = torch.zeros_like(hidden_states)  # (T, H)
        slots = top_k_index.T  # (k, T)
        for e in needed:  # ascending, as eager sums, so results match it bit for bit
            w = held[e] if e in held else staged.get(e) or self._load(e)
            top_k_pos, token_idx = torch.where(slots == e)
            x = hidden_states[token_idx]  # (n, H)
            h = experts._apply_gate(nn.functional.linear(x, w["gate_up_proj"]))  # (n, I)
            out = nn.functional.linear(h, w["down_proj"])  # (n, H)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
            self._use(e, w)
        return final


def offload_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                            top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"fedmoe_offload"`` experts implementation (``self``: the experts module)."""
    layer = getattr(self, _ATTR, None)
    if layer is None:
        raise RuntimeError(f"experts_implementation={IMPLEMENTATION!r} is set but this experts "
                           f"module was never offloaded; call fedmoe.edge.offload(model, ...)")
    return layer.forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, offload_experts_forward)


class EdgeRuntime:
    """The handle :func:`offload` returns: reconfigure the caches, read the statistics."""

    def __init__(self, model: nn.Module, store: ExpertStore, layers: list[OffloadedLayer]):
        self.model, self.store, self.layers = model, store, layers
        self.config = EdgeConfig()
        self.capacities: dict[int, int] = {}
        self.preload_bytes = 0
        self._prefetcher: Prefetcher | None = None

    def configure(self, config: EdgeConfig) -> None:
        """Fresh caches under ``config`` (pinned experts are loaded now); counters reset."""
        first = self.layers[0].layer
        sizes = {ol.index: ol.layer.num_experts for ol in self.layers}
        self.capacities = capacities(config.budget, sizes, top_k=first.top_k,
                                     expert_nbytes=self.store.expert_nbytes(first.index))
        prefetch = config.prefetch and config.policy not in {"static", "belady"}
        if prefetch and self._prefetcher is None:
            self._prefetcher = Prefetcher(self.store, self.layers[0].device)
        self.store.reset_counters()
        for ol in self.layers:
            policy = make_policy(
                config.policy, window=config.window,
                counts=None if config.counts is None else _layer_entry(config.counts, ol.index),
                trace=None if config.trace is None else _layer_entry(config.trace, ol.index))
            ol.reset(CacheState(self.capacities[ol.index], policy),
                     self._prefetcher if prefetch else None)
        self.preload_bytes = self.store.bytes_loaded
        self.store.reset_counters()
        self.config = config

    def trace(self) -> dict[int, list[list[int]]]:
        """Experts needed per step and layer since the last :meth:`configure`."""
        return {ol.index: [list(s) for s in ol.trace] for ol in self.layers}

    @property
    def resident_expert_nbytes(self) -> int:
        """Bytes the caches may hold at most (capacity x expert size, all layers)."""
        return sum(c * self.store.expert_nbytes(i) for i, c in self.capacities.items())

    def stats(self) -> dict[str, Any]:
        """Hit rates per layer and overall, bytes loaded, prefetch precision and recall."""
        total, prefetch = CacheStats(), PrefetchStats()
        layers = {}
        for ol in self.layers:
            layers[ol.index] = {**ol.cache.stats.as_dict(), "capacity": ol.cache.capacity}
            total, prefetch = total + ol.cache.stats, prefetch + ol.prefetch_stats
        return {"policy": self.config.policy, "budget": self.config.budget,
                "layers": layers, "overall": total.as_dict(),
                "prefetch": prefetch.as_dict() if self.config.prefetch else None,
                "bytes_loaded": self.store.bytes_loaded, "loads": self.store.loads,
                "preload_bytes": self.preload_bytes,
                "resident_expert_bytes": self.resident_expert_nbytes,
                "total_expert_bytes": self.store.total_nbytes}

    def close(self) -> None:
        for ol in self.layers:
            ol.drain()
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


def _layer_entry(per_layer: Mapping, index: int) -> Any:
    for key in (index, str(index)):
        if key in per_layer:
            return per_layer[key]
    raise KeyError(f"no entry for decoder layer {index} (have {sorted(per_layer)})")


def offload(model: nn.Module, store: ExpertStore | str | Path,
            config: EdgeConfig | None = None, adapter: MoEAdapter | None = None) -> EdgeRuntime:
    """Serve ``model``'s routed experts from ``store`` through per-layer caches.

    Parameters
    ----------
    model : nn.Module
        A model of a supported family, on its final device (its expert parameters become
        ``meta`` tensors, which cannot move afterwards).
    store : ExpertStore, str or Path
        An opened store, or a directory: opened if it holds a store, else built from
        ``model`` there.
    config : EdgeConfig, optional
        Budget, policy and prefetch (default: LRU at twice the active experts).
    adapter : MoEAdapter, optional
        Reused if given.

    Returns
    -------
    EdgeRuntime
        Reconfigure with :meth:`EdgeRuntime.configure`; statistics from
        :meth:`EdgeRuntime.stats`.
    """
    adapter = adapter or MoEAdapter(model)
    if not isinstance(store, ExpertStore):
        store = (ExpertStore(store) if (Path(store) / INDEX).is_file()
                 else ExpertStore.build(model, store, adapter))
    device = next(model.parameters()).device
    layers = []
    for layer in adapter.moe_layers():
        _check_layout(layer, store)
        for name, (shape, dtype) in store.shapes(layer.index).items():
            # The resident copy goes; shapes and dtypes stay visible (state_dict keys, tools).
            empty = torch.empty(shape, dtype=dtype, device="meta")
            setattr(layer.experts, name, nn.Parameter(empty, requires_grad=False))
        layers.append(OffloadedLayer(layer, store, device))
        setattr(layer.experts, _ATTR, layers[-1])
    for here, after in zip(layers, layers[1:], strict=False):
        here.next = after
    model.set_experts_implementation(IMPLEMENTATION)
    runtime = EdgeRuntime(model, store, layers)
    runtime.configure(config or EdgeConfig())
    return runtime


def _check_layout(layer: MoELayer, store: ExpertStore) -> None:
    experts = layer.experts
    where = f"layer {layer.index} ({type(experts).__name__})"
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or \
            not getattr(experts, "has_gate", True):
        raise NotImplementedError(f"{where}: offloading supports gated, untransposed, bias-free "
                                  f"fused experts (gate_up_proj, down_proj)")
    if layer.index not in store.layers:
        raise ValueError(f"{where} is missing from the expert store {store.directory}")
    want = {n: tuple(getattr(experts, n).shape) for n in layer.expert_param_names()}
    have = {n: s for n, (s, _) in store.shapes(layer.index).items()}
    if want != have:
        raise ValueError(f"{where}: expert store {store.directory} holds {have}, the model {want}"
                         f"; rebuild the store from this model")
