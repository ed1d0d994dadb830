"""Hits of one trace for every cache size at once: Mattson's stack algorithm.

A policy that always admits and orders experts by a priority that does not depend on the
capacity (:meth:`~fedmoe.expert_cache.policies.Policy.key`) has a cache of size C holding the
top C entries of one priority stack, so one pass gives the hits of every C. This is the fast
path for hit-rate curves; it equals :func:`~fedmoe.expert_cache.simulate.simulate_cache_stats`
at each C (tested), with the same lookup rules.
"""

from __future__ import annotations

import numpy as np

from fedmoe.expert_cache.policies import Policy, make_policy

STACK_POLICIES: tuple[str, ...] = ("lru", "lfu", "consistency", "sch", "belady")


def stack_depths(seq: np.ndarray, num_experts: int, policy: str,
                 lookahead: int | None = None, *, window: int = 16) -> tuple[np.ndarray, int]:
    """Hits of one sample for every cache size at once.

    Parameters
    ----------
    seq : np.ndarray
        ``(T, k)`` expert ids per token (distinct within a token), in router order.
    policy : str
        One of :data:`STACK_POLICIES`: ``"sch"`` needs ``lookahead``, ``"consistency"`` uses
        ``window``; ``"belady"`` admits every miss (moe-lrc's, no bypass).

    Returns
    -------
    depth_hits : np.ndarray
        ``(E,)``: accesses found at stack depth d at the start of their token; a cache of
        size C holds those with d < C.
    first_uses : int
        Distinct experts of the sample (the u-th first use, u = 0, 1, ..., finds a free slot
        in every cache larger than u).
    """
    if policy not in STACK_POLICIES:
        raise ValueError(f"unknown cache policy {policy!r} for the stack algorithm; "
                         f"one of {STACK_POLICIES}")
    steps = seq.tolist()  # (T, k) as lists: the hot loop is plain Python
    prio = make_policy(policy, window=window, lookahead=lookahead, trace=steps, bypass=False)
    depth_hits = np.zeros(num_experts, dtype=np.int64)
    stack: list[int] = []  # experts, top (highest priority) first
    for i, token in enumerate(steps):
        depth = {e: d for d, e in enumerate(stack)}
        for e in token:  # looked up against the state at the start of the token
            if e in depth:
                depth_hits[depth[e]] += 1
        prio.begin(i, token)
        for x in token:
            prio.used(x)
            _push(stack, x, prio)
    return depth_hits, len(stack)


def _push(stack: list[int], x: int, prio: Policy) -> None:
    """Move ``x`` to the top; the lowest-priority entry of each prefix sinks to x's slot."""
    try:
        d = stack.index(x)
    except ValueError:
        d = len(stack)
        stack.append(x)
    if d == 0:
        return
    carried, stack[0] = stack[0], x
    carried_key = prio.key(carried)
    for i in range(1, d):
        key = prio.key(stack[i])
        if key < carried_key:  # the lower priority keeps sinking
            stack[i], carried, carried_key = carried, stack[i], key
    stack[d] = carried


def capacity_hits(seq: np.ndarray, num_experts: int, policy: str,
                  lookahead: int | None = None, *, window: int = 16,
                  frequency: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Hits, resident hits and cold misses of one sample for C = 1..E, each ``(E,)``.

    The counts :class:`~fedmoe.expert_cache.simulate.CacheStats` gives at each C
    (``hits``, ``resident_hits``, ``cold_misses``). ``static`` keeps the C experts most
    frequent in ``frequency`` ``(E,)`` (ties to the lower id), preloaded and admitting nothing:
    no free slot, so the first use of each expert it does not pin is a cold miss.
    """
    capacities = np.arange(1, num_experts + 1)
    if policy == "static":
        order = np.argsort(-np.asarray(frequency), kind="stable")  # most frequent first
        rank = np.empty(num_experts, dtype=np.int64)
        rank[order] = np.arange(num_experts)
        hits = np.cumsum(np.bincount(rank[seq.ravel()], minlength=num_experts))  # (E,)
        used = np.bincount(rank[np.unique(seq)], minlength=num_experts)  # (E,) per rank
        cold = used.sum() - np.cumsum(used)  # distinct experts ranked C or lower
        return hits, hits, cold
    depth_hits, distinct = stack_depths(seq, num_experts, policy, lookahead, window=window)
    resident = np.cumsum(depth_hits)  # (E,) hits of cached experts, C = 1..E
    hits = resident + np.minimum(distinct, capacities)
    return hits, resident, np.maximum(distinct - capacities, 0)
