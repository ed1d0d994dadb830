"""Replacement policies of an expert cache: each one an eviction priority over experts.

A policy is told when a step begins, each use of an expert (in the step's order), and each
admission ahead of use (the prefetcher); it is asked for a victim. Every policy that admits
and never bypasses orders experts by :meth:`Policy.key` (lowest leaves first), a total order
that does not depend on the cache size, so the stack algorithm
(:mod:`fedmoe.expert_cache.stack`) can drive the same objects for every capacity at once.

``lru``          evict the least recently used expert.
``lfu``          evict the expert used least often so far (whole history), ties by recency;
                 each use counts when it happens, so within a step the first expert can evict
                 the second (moe-lrc's ``calc_lfu``).
``static``       pin the ``capacity`` experts this client's routing statistics use most; never
                 admit others (a miss computes from a transient copy).
``consistency``  segment-aware, online: evict the expert used least in the last ``window``
                 steps (the current one included), ties by recency.
``sch``          moe-lrc's segment cache, offline: evict the expert used least in the next
                 ``lookahead`` steps (the current one included, less the uses already made in
                 it), ties by recency. ``lookahead=1`` is LRU.
``belady``       offline oracle: evict the expert whose next use is farthest. With ``bypass``
                 (the edge default) the incoming expert competes too and stays out if its next
                 use is the farthest: the upper bound of every policy here. Without, it is
                 moe-lrc's Belady, the best policy that admits every miss.
``none``         naive offloading, the baseline: load on every use, keep nothing.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence

POLICIES: tuple[str, ...] = ("lru", "lfu", "static", "consistency", "sch", "belady")


class Policy:
    """Eviction priority over experts; the lowest :meth:`key` among the resident ones leaves.

    A logical clock ticks once per use or admission, so ties broken "by recency" are
    deterministic (the least recently used leaves).
    """

    name = "base"
    admits = True  # False: misses are served without entering the cache

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[int, int] = {}

    def begin(self, step: int, experts: Sequence[int]) -> None:
        """Step ``step`` (0, 1, ...) needs ``experts`` (distinct, in the order of use)."""

    def used(self, expert: int) -> None:
        """``expert`` is used now (told before it is admitted, if it is out)."""
        self.clock += 1
        self.last_use[expert] = self.clock

    def admitted(self, expert: int) -> None:
        """``expert`` entered the cache ahead of its use (prefetched)."""
        self.clock += 1
        self.last_use[expert] = self.clock

    def evicted(self, expert: int) -> None:
        """``expert`` left the cache."""

    def key(self, expert: int) -> tuple[int | float, ...]:
        """Eviction priority: the resident expert with the lowest key leaves first."""
        return (self.last_use.get(expert, 0),)

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        """The expert to evict to make room for ``incoming`` (``incoming`` itself = bypass)."""
        return min(resident, key=self.key)

    def pinned(self, capacity: int) -> list[int]:
        """Experts loaded before the first step."""
        return []


class LRUPolicy(Policy):
    name = "lru"


class LFUPolicy(Policy):
    """Frequency over the whole history ("perfect" LFU), ties by least recent use."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[int] = Counter()

    def used(self, expert: int) -> None:
        super().used(expert)
        self.counts[expert] += 1  # counted in turn, not at the start of the step

    def key(self, expert: int) -> tuple[int, int]:
        return self.counts[expert], self.last_use.get(expert, 0)


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

    moe-lrc's SCH evicts the expert used least in the next ``L`` steps; online, the last
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

    def begin(self, step: int, experts: Sequence[int]) -> None:
        self.recent.append(experts)
        self.in_window.update(experts)
        if len(self.recent) > self.window:
            self.in_window.subtract(self.recent.popleft())

    def key(self, expert: int) -> tuple[int, int]:
        return self.in_window[expert], self.last_use.get(expert, 0)


class SCHPolicy(Policy):
    """moe-lrc's segment cache: the fewest uses in the next ``lookahead`` steps leave.

    The window of step i holds steps ``i .. i+L-1``; each use made leaves it, so an expert
    the current step has yet to use outranks one it has used already.

    Parameters
    ----------
    trace : sequence of sequences of int
        The steps this cache will see, in order.
    lookahead : int
        ``L`` >= 1.
    """

    name = "sch"

    def __init__(self, trace: Sequence[Sequence[int]], lookahead: int) -> None:
        super().__init__()
        if not lookahead or lookahead < 1:
            raise ValueError(f"SCH needs a lookahead L >= 1, got {lookahead}")
        self.trace, self.lookahead = trace, lookahead
        self.ahead: Counter[int] = Counter()
        for step in trace[:lookahead - 1]:
            self.ahead.update(step)

    def begin(self, step: int, experts: Sequence[int]) -> None:
        if step + self.lookahead - 1 < len(self.trace):  # step i+L-1 enters the window
            self.ahead.update(self.trace[step + self.lookahead - 1])

    def used(self, expert: int) -> None:
        super().used(expert)
        self.ahead[expert] -= 1  # this use leaves the window

    def key(self, expert: int) -> tuple[int, int]:
        return self.ahead[expert], self.last_use.get(expert, 0)


class BeladyPolicy(Policy):
    """Belady's MIN on a recorded trace: the expert whose next use is farthest leaves.

    Parameters
    ----------
    trace : sequence of sequences of int
        The steps this cache will see, in order (a runtime must replay exactly them).
    bypass : bool
        The incoming expert competes too; if its next use is the farthest it stays out
        (ties evict a resident expert). Next uses count from the next step: the current
        step's lookups are served, so an expert it has yet to use may leave too. Keeping the
        ``capacity`` experts with the nearest next uses is then optimal: no policy here
        scores higher. Without bypass (moe-lrc's Belady), next uses count per use, so an
        expert the current step has yet to use is needed next and stays.
    warm : bool
        Start full with the experts used first (the optimal preload): the bound for
        policies that preload, such as ``static``.
    """

    name = "belady"

    def __init__(self, trace: Sequence[Iterable[int]], *, bypass: bool = True,
                 warm: bool = False) -> None:
        super().__init__()
        self.bypass, self.warm = bypass, warm
        self.step = -1
        self.positions: defaultdict[int, list[int]] = defaultdict(list)  # of each use
        self.steps: defaultdict[int, list[int]] = defaultdict(list)  # of each use
        position = 0
        for t, experts in enumerate(trace):
            for e in dict.fromkeys(experts):
                self.positions[int(e)].append(position)
                self.steps[int(e)].append(t)
                position += 1
        self.made: Counter[int] = Counter()  # uses made so far, per expert

    def pinned(self, capacity: int) -> list[int]:
        if not self.warm:
            return []
        return sorted(sorted(self.positions, key=lambda e: self.positions[e][0])[:capacity])

    def begin(self, step: int, experts: Sequence[int]) -> None:
        self.step = step

    def used(self, expert: int) -> None:
        super().used(expert)
        self.made[expert] += 1

    def next_use(self, expert: int) -> float:
        """Position of the next use (no bypass), or step of the next use after this one."""
        if self.bypass:
            steps = self.steps.get(expert, [])
            i = bisect.bisect_right(steps, self.step)
            return steps[i] if i < len(steps) else math.inf
        positions, made = self.positions.get(expert, ()), self.made[expert]
        return positions[made] if made < len(positions) else math.inf

    def key(self, expert: int) -> tuple[float, int]:
        return -self.next_use(expert), self.last_use.get(expert, 0)

    def victim(self, resident: Iterable[int], incoming: int) -> int:
        if not self.bypass:
            return super().victim(resident, incoming)
        # Ties (e.g. never used again) evict a resident expert rather than bypass.
        return max([*resident, incoming],
                   key=lambda e: (self.next_use(e), e != incoming, -self.last_use.get(e, 0)))


def make_policy(name: str, *, window: int = 16, lookahead: int | None = None,
                counts: Sequence[float] | None = None,
                trace: Sequence[Sequence[int]] | None = None, warm: bool = False,
                bypass: bool = True) -> Policy:
    """A fresh policy by name (``edge.policy``, or an analysis policy).

    ``static`` needs ``counts``; ``sch`` a ``trace`` and ``lookahead``; ``belady`` a
    ``trace`` (``warm``: the optimal preload; ``bypass``: see :class:`BeladyPolicy`).
    """
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
    if name in ("sch", "belady") and trace is None:
        raise ValueError(f"policy {name} is an offline oracle: it needs the recorded routing "
                         f"trace of the run it replays")
    if name == "sch":
        return SCHPolicy(trace, lookahead)
    if name == "belady":
        return BeladyPolicy(trace, bypass=bypass, warm=warm)
    raise ValueError(f"edge.policy={name!r} is unknown; one of {[*POLICIES, 'none']}")
