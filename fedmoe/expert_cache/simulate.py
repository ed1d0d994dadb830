"""One layer's expert cache under a capacity, its accounting, and the trace simulator.

:class:`CacheState` is the bookkeeping the edge runtime drives with real weights and
:func:`simulate_cache_stats` drives with a recorded trace, so a runtime trace replays to the
same hits. The lookup rules are in the docstring of :mod:`fedmoe.expert_cache`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedmoe.expert_cache.policies import Policy, make_policy


@dataclass
class CacheStats:
    """Hit/miss accounting of one layer's cache (or the sum over layers).

    ``resident_hits`` found the expert cached at the start of the step; ``free_slot_hits``
    are first uses that found a free slot, hits by the moe-lrc convention; ``first_uses``
    are all first uses of an expert not pinned, i.e. loads no cache of any size avoids.
    """

    lookups: int = 0
    resident_hits: int = 0
    free_slot_hits: int = 0
    first_uses: int = 0
    steps: int = 0

    @property
    def hits(self) -> int:
        return self.resident_hits + self.free_slot_hits

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def cold_misses(self) -> int:
        """First uses that found no free slot."""
        return self.first_uses - self.free_slot_hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def hit_rate_strict(self) -> float:
        """Every first use a miss: the share of lookups served without a load."""
        return self.resident_hits / self.lookups if self.lookups else 0.0

    @property
    def hit_rate_warm(self) -> float:
        """Resident hits among the lookups that were not first uses."""
        warm = self.lookups - self.first_uses
        return self.resident_hits / warm if warm else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(self.lookups + other.lookups,
                          self.resident_hits + other.resident_hits,
                          self.free_slot_hits + other.free_slot_hits,
                          self.first_uses + other.first_uses, self.steps + other.steps)

    def as_dict(self) -> dict[str, float | int]:
        return {"lookups": self.lookups, "hits": self.hits, "misses": self.misses,
                "resident_hits": self.resident_hits, "free_slot_hits": self.free_slot_hits,
                "first_uses": self.first_uses, "cold_misses": self.cold_misses,
                "steps": self.steps, "hit_rate": self.hit_rate,
                "hit_rate_strict": self.hit_rate_strict, "hit_rate_warm": self.hit_rate_warm}


@dataclass
class CacheState:
    """Which experts one layer holds, under ``capacity``, with hit/miss accounting.

    Per step: :meth:`lookup` all its experts, then :meth:`use` each in turn. :meth:`admit`
    brings an expert in ahead of use (the prefetcher).
    """

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
        """Count one step; the hits and misses among ``needed`` against the cache as it is.

        ``needed``: the step's experts in the order they will be used (duplicates dropped).
        """
        experts = list(dict.fromkeys(int(e) for e in needed))
        hits = [e for e in experts if e in self.resident]
        misses = [e for e in experts if e not in self.resident]
        first = [e for e in misses if e not in self.seen]
        free = self.capacity - len(self.resident) if self.policy.admits else 0
        self.stats.steps += 1
        self.stats.lookups += len(experts)
        self.stats.resident_hits += len(hits)
        self.stats.first_uses += len(first)
        self.stats.free_slot_hits += min(len(first), max(free, 0))
        self.seen.update(experts)
        self.policy.begin(self.stats.steps - 1, experts)
        return hits, misses

    def use(self, expert: int) -> tuple[bool, int | None]:
        """The step uses ``expert`` now: the policy is told, and it enters if it is out.

        Returns ``(resident now, evicted expert or None)``; the victim may be an expert the
        step still needs (it re-enters when its turn comes).
        """
        self.policy.used(expert)
        return self._insert(expert, ())

    def admit(self, expert: int, protect: Collection[int] = ()) -> tuple[bool, int | None]:
        """Bring ``expert`` in ahead of its use; ``(admitted, evicted expert or None)``.

        ``protect``: experts that may not be evicted for it (a prefetched expert arriving as
        a step starts must not push out what that step needs); with nothing else to evict,
        ``expert`` stays out.
        """
        if expert in self.resident:
            return True, None
        admitted, evicted = self._insert(expert, protect)
        if admitted:
            self.policy.admitted(expert)
        return admitted, evicted

    def _insert(self, expert: int, protect: Collection[int]) -> tuple[bool, int | None]:
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
        return True, evicted


def steps_of(trace: Any) -> list[list[int]]:
    """A trace as a list of steps: rows of a ``(T, k)`` tensor/array, or iterables of ids.

    Each step keeps its order (router order for a token's top-k), duplicates dropped.
    """
    if isinstance(trace, torch.Tensor):
        trace = trace.detach().cpu().numpy()
    if isinstance(trace, np.ndarray):
        trace = [np.atleast_1d(row).tolist() for row in trace]
    return [list(dict.fromkeys(int(e) for e in step)) for step in trace]


def simulate_cache_stats(trace: Any, capacity: int, policy: str, *, window: int = 16,
                         lookahead: int | None = None, counts: Sequence[float] | None = None,
                         warm: bool = False, bypass: bool = True) -> CacheStats:
    """Replay one layer's routing trace through a cache; the full accounting.

    Parameters
    ----------
    trace : (T, k) tensor or array, or sequence of iterables of int
        Experts needed per step (a token's top-k in router order, or a forward call's union).
    capacity : int
        Experts the cache holds.
    policy : str
        One of :data:`~fedmoe.expert_cache.policies.POLICIES` or ``none``; ``sch`` and
        ``belady`` look ahead in ``trace`` itself.
    window, lookahead
        ``consistency``'s window; ``sch``'s lookahead.
    counts
        ``static``'s per-expert counts (default: the counts of ``trace`` itself, i.e. an
        oracle calibration).
    warm, bypass
        ``belady`` starts with the optimal preload (compare it so with ``static``, which
        preloads its pins); ``belady`` may leave the incoming expert out.
    """
    steps = steps_of(trace)
    if policy == "static" and counts is None:
        counts = _counts(steps)
    state = CacheState(capacity, make_policy(policy, window=window, lookahead=lookahead,
                                             counts=counts, trace=steps, warm=warm,
                                             bypass=bypass))
    for needed in steps:
        state.lookup(needed)
        for e in needed:
            state.use(e)
    return state.stats


def _counts(steps: Sequence[Sequence[int]]) -> list[int]:
    counter = Counter(e for step in steps for e in step)
    size = max(counter, default=-1) + 1
    return [counter[e] for e in range(size)]
