"""Per-layer expert caches under a capacity, their replacement policies, and a trace simulator.

A *step* is one forward call of one MoE layer and the set of experts it needs: one token's
top-k while decoding, the union over the prompt during prefill. All experts of a step are
looked up against the cache as it was at the start of the step (the convention of moe-lrc,
arXiv 2505.16056), then the misses are admitted one by one, each evicting the policy's victim.
The same bookkeeping (:class:`CacheState`) drives the runtime cache of expert weights and the
pure simulator :func:`simulate_cache`, so a recorded runtime trace replays to the same hits.

Policies
--------
``lru``          evict the least recently used expert.
``lfu``          evict the expert used least often so far (whole history), ties by recency.
``static``       pin the ``capacity`` experts this client's routing statistics use most; never
                 admit others (a miss computes from a transient copy).
``consistency``  segment-aware (moe-lrc's SCH, made online): evict the expert used least in
                 the last ``window`` steps, ties by recency.
``belady``       offline oracle on a recorded trace: evict the expert (or bypass the incoming
                 one) whose next use is farthest. An upper bound on every policy above.
``none``         naive offloading, the baseline: load on every use, keep nothing.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter, deque
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

POLICIES: tuple[str, ...] = ("lru", "lfu", "static", "consistency", "belady")


@dataclass
class CacheStats:
    """Hit/miss accounting of one layer's cache (or the sum over layers).

    ``cold_misses`` are first uses of an expert (no cache of any size avoids them);
    ``hit_rate_warm`` leaves them out of the denominator.
    """

    lookups: int = 0
    hits: int = 0
    cold_misses: int = 0
    steps: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def hit_rate_warm(self) -> float:
        warm = self.lookups - self.cold_misses
        return self.hits / warm if warm else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(self.lookups + other.lookups, self.hits + other.hits,
                          self.cold_misses + other.cold_misses, self.steps + other.steps)

    def as_dict(self) -> dict[str, float | int]:
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.misses,
                "cold_misses": self.cold_misses, "steps": self.steps,
                "hit_rate": self.hit_rate, "hit_rate_warm": self.hit_rate_warm}


# ---- policies ---------------------------------------------------------------------------------


class Policy:
    """Replacement policy: told of every access and admission, asked for victims.

    A logical clock orders accesses (one tick per expert per step, ascending expert ids within
    a step), so ties broken "by recency" are deterministic.
    """

    name = "base"
    admits = True  # False: misses are served without entering the cache

    def __init__(self) -> None:
        self.clock = 0
        self.step = -1  # index of the current step
        self.last_use: dict[int, int] = {}

    def access(self, experts: Sequence[int], step: int) -> None:
        """Step ``step`` needs ``experts`` (sorted, distinct)."""
        self.step = step
        for e in experts:
            self.clock += 1
            self.last_use[e] = self.clock

    def admitted(self, expert: int) -> None:
        """``expert`` entered the cache (on a miss, or ahead of use by the prefetcher)."""
        self.clock += 1
        self.last_use[expert] = self.clock

    def evicted(self, expert: int) -> None:
        """``expert`` left the cache."""

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        """The expert to evict to make room for ``incoming`` (``incoming`` itself = bypass)."""
        raise NotImplementedError

    def pinned(self, capacity: int) -> list[int]:
        """Experts loaded before the first step."""
        return []

    def _recency(self, e: int) -> int:
        return self.last_use.get(e, -1)


class LRUPolicy(Policy):
    name = "lru"

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        return min(resident, key=self._recency)


class LFUPolicy(Policy):
    """Frequency over the whole history ("perfect" LFU), ties by least recent use."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[int] = Counter()

    def access(self, experts: Sequence[int], step: int) -> None:
        super().access(experts, step)
        self.counts.update(experts)

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        return min(resident, key=lambda e: (self.counts[e], self._recency(e)))


class StaticPolicy(Policy):
    """Pins the most-used experts of this client's routing statistics; admits nothing else.

    Parameters
    ----------
    counts : sequence of int
        Tokens routed to each expert of this layer (e.g. ``fedmoe_experts.json`` or a
        calibration pass); ties go to the lower expert id.
    """

    name = "static"
    admits = False

    def __init__(self, counts: Sequence[float]) -> None:
        super().__init__()
        self.counts = [float(c) for c in counts]

    def pinned(self, capacity: int) -> list[int]:
        order = sorted(range(len(self.counts)), key=lambda e: (-self.counts[e], e))
        return sorted(order[:capacity])

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        return incoming


class NoCachePolicy(Policy):
    """Naive offloading: every use loads the expert, nothing stays (the baseline)."""

    name = "none"
    admits = False

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        return incoming


class ConsistencyPolicy(Policy):
    """Segment-aware eviction exploiting local routing consistency (moe-lrc, arXiv 2505.16056).

    moe-lrc's SCH evicts the expert used least in the next ``L`` tokens; online, the last
    ``window`` steps stand in for the next ones: experts a segment keeps using stay, and the
    one used least within the window leaves (ties: least recently used).
    """

    name = "consistency"

    def __init__(self, window: int = 16) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"edge.window={window} must be >= 1 (steps of the recent window)")
        self.window = window
        self.recent: deque[Sequence[int]] = deque()
        self.in_window: Counter[int] = Counter()

    def access(self, experts: Sequence[int], step: int) -> None:
        super().access(experts, step)
        self.recent.append(experts)
        self.in_window.update(experts)
        if len(self.recent) > self.window:
            self.in_window.subtract(self.recent.popleft())

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        return min(resident, key=lambda e: (self.in_window[e], self._recency(e)))


class BeladyPolicy(Policy):
    """Belady's MIN with bypass on a recorded trace: the offline upper bound.

    Among the resident experts and the incoming one, the one whose next use is farthest
    leaves (if that is the incoming expert, it is not admitted). Keeping the ``capacity``
    experts with the nearest next uses is optimal, so no online policy scores higher.

    Parameters
    ----------
    trace : sequence of iterables of int
        The steps this cache will see, in order (the runtime must replay exactly them).
    warm : bool
        Start full with the experts used first (the optimal preload): the bound for
        policies that preload, such as ``static``.
    """

    name = "belady"

    def __init__(self, trace: Sequence[Iterable[int]], warm: bool = False) -> None:
        super().__init__()
        self.warm = warm
        self.uses: dict[int, list[int]] = {}
        for t, experts in enumerate(trace):
            for e in set(experts):
                self.uses.setdefault(int(e), []).append(t)

    def pinned(self, capacity: int) -> list[int]:
        if not self.warm:
            return []
        return sorted(sorted(self.uses, key=lambda e: self.uses[e][0])[:capacity])

    def next_use(self, expert: int) -> float:
        uses = self.uses.get(expert, [])
        i = bisect.bisect_right(uses, self.step)
        return uses[i] if i < len(uses) else math.inf

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        # Ties (e.g. never used again) evict a resident expert rather than bypass.
        return max([*resident, incoming],
                   key=lambda e: (self.next_use(e), e != incoming, -self._recency(e)))


def make_policy(name: str, *, window: int = 16, counts: Sequence[float] | None = None,
                trace: Sequence[Iterable[int]] | None = None, warm: bool = False) -> Policy:
    """A fresh policy by name (``edge.policy``); ``static`` needs counts, ``belady`` a trace
    (``warm``: Belady starts with the optimal preload)."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "consistency":
        return ConsistencyPolicy(window)
    if name == "none":
        return NoCachePolicy()
    if name == "static":
        if counts is None:
            raise ValueError("edge.policy=static needs per-layer routing counts "
                             "(edge.routing_stats=<fedmoe_experts.json> or a calibration pass)")
        return StaticPolicy(counts)
    if name == "belady":
        if trace is None:
            raise ValueError("edge.policy=belady is an offline oracle: it needs the recorded "
                             "routing trace of the run it replays")
        return BeladyPolicy(trace, warm)
    raise ValueError(f"edge.policy={name!r} is unknown; one of {[*POLICIES, 'none']}")


# ---- bookkeeping shared by the runtime cache and the simulator --------------------------------


@dataclass
class CacheState:
    """Which experts one layer holds, under ``capacity``, with hit/miss accounting."""

    capacity: int
    policy: Policy
    resident: dict[int, None] = field(default_factory=dict)  # insertion-ordered set
    seen: set[int] = field(default_factory=set)
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 expert per layer, got {self.capacity}")
        for e in self.policy.pinned(self.capacity):
            self.resident[e] = None
            self.seen.add(e)

    def lookup(self, needed: Iterable[int]) -> tuple[list[int], list[int]]:
        """Count one step; the hits and misses among ``needed`` (sorted, distinct)."""
        experts = sorted({int(e) for e in needed})
        hits = [e for e in experts if e in self.resident]
        misses = [e for e in experts if e not in self.resident]
        self.stats.steps += 1
        self.stats.lookups += len(experts)
        self.stats.hits += len(hits)
        self.stats.cold_misses += sum(e not in self.seen for e in misses)
        self.seen.update(experts)
        self.policy.access(experts, self.stats.steps - 1)
        return hits, misses

    def admit(self, expert: int, protect: Collection[int] = ()) -> tuple[bool, int | None]:
        """Try to bring ``expert`` in; ``(admitted, evicted expert or None)``.

        ``protect``: experts that may not be evicted for it (a prefetched expert arriving as
        a step starts must not push out what that step needs); with nothing else to evict,
        ``expert`` stays out.
        """
        if expert in self.resident:
            return True, None
        if not self.policy.admits:
            return False, None
        evicted = None
        if len(self.resident) >= self.capacity:
            candidates = [e for e in self.resident if e not in protect]
            if not candidates:
                return False, None
            evicted = self.policy.victim(candidates, expert)
            if evicted == expert:
                return False, None
            del self.resident[evicted]
            self.policy.evicted(evicted)
        self.resident[expert] = None
        self.policy.admitted(expert)
        return True, evicted


# ---- the simulator -----------------------------------------------------------------------------


def _steps(trace: Any) -> list[list[int]]:
    """A trace as a list of steps: rows of a ``(T, k)`` tensor/array, or iterables of ids."""
    if isinstance(trace, torch.Tensor):
        trace = trace.detach().cpu().numpy()
    if isinstance(trace, np.ndarray):
        return [[int(e) for e in np.atleast_1d(row)] for row in trace]
    return [[int(e) for e in step] for step in trace]


def simulate_cache_stats(trace: Any, capacity: int, policy: str, *, window: int = 16,
                         counts: Sequence[float] | None = None, warm: bool = False) -> CacheStats:
    """Replay one layer's routing trace through a cache; the full accounting.

    Parameters
    ----------
    trace : (T, k) tensor or array, or sequence of iterables of int
        Experts needed per step (a token's top-k, or a forward call's union).
    capacity : int
        Experts the cache holds.
    policy : str
        One of :data:`POLICIES`; ``belady`` looks ahead in ``trace`` itself.
    window, counts
        ``consistency``'s window; ``static``'s per-expert counts (default: the counts of
        ``trace`` itself, i.e. an oracle calibration).
    warm : bool
        ``belady`` starts with the optimal preload (compare it so with ``static``, which
        preloads its pins).
    """
    steps = _steps(trace)
    if policy == "static" and counts is None:
        counts = _counts(steps)
    state = CacheState(capacity, make_policy(policy, window=window, counts=counts, trace=steps,
                                             warm=warm))
    for needed in steps:
        _, misses = state.lookup(needed)
        for e in misses:
            state.admit(e)
    return state.stats


def simulate_cache(trace: Any, capacity: int, policy: str, **kwargs: Any) -> float:
    """Hit rate of ``policy`` with ``capacity`` experts on one layer's ``trace``.

    See :func:`simulate_cache_stats` for the arguments; usable without any model.
    """
    return simulate_cache_stats(trace, capacity, policy, **kwargs).hit_rate


def _counts(steps: Sequence[Sequence[int]]) -> list[int]:
    counter = Counter(e for step in steps for e in set(step))
    size = max(counter, default=-1) + 1
    return [counter[e] for e in range(size)]


# ---- budgets --------------------------------------------------------------------------------

_MEMORY = re.compile(r"^\s*([0-9.]+)\s*(KB|MB|GB|KIB|MIB|GIB)\s*$", re.IGNORECASE)
_UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(budget: int | str, *, top_k: int, num_experts: int, expert_nbytes: int,
                 num_layers: int) -> int:
    """Experts per layer that ``edge.budget`` allows.

    ``budget`` is an int (experts per layer), ``"<m>x"`` (m times the active experts,
    ``top_k``), ``"all"``, or memory for the routed experts of all MoE layers together
    (``"64MB"``, ``"1.5GiB"``). The result is clipped to ``num_experts``.
    """
    text = str(budget).strip().lower()
    if text == "all":
        return num_experts
    if isinstance(budget, int) or text.isdigit():
        per_layer = int(text)
    elif text.endswith("x"):
        per_layer = math.floor(float(text[:-1]) * top_k)
    elif m := _MEMORY.match(text):
        total = float(m.group(1)) * _UNITS[m.group(2).lower()]
        per_layer = int(total // (expert_nbytes * num_layers))
    else:
        raise ValueError(f"edge.budget={budget!r} not understood: use experts per layer (4), "
                         f"a multiple of the active experts ('2x'), 'all', or memory ('64MB')")
    if per_layer < 1:
        raise ValueError(f"edge.budget={budget!r} holds less than one expert per layer "
                         f"({expert_nbytes} bytes per expert x {num_layers} MoE layers)")
    return min(per_layer, num_experts)


def capacities(budget: int | str, layer_sizes: Mapping[int, int], *, top_k: int,
               expert_nbytes: int) -> dict[int, int]:
    """Per-layer capacities for layers of (possibly pruned) sizes ``{layer: num_experts}``."""
    return {i: parse_budget(budget, top_k=top_k, num_experts=n, expert_nbytes=expert_nbytes,
                            num_layers=len(layer_sizes))
            for i, n in layer_sizes.items()}
