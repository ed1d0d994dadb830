"""Expert caches: replacement policies and the one simulator, shared by edge and analysis.

A *step* is one forward call of one MoE layer and the experts it needs: one token's top-k
(in router order) while decoding, the union over the prompt (ascending ids) during prefill.
The edge runtime (:mod:`fedmoe.edge.offload`) drives :class:`CacheState` with real weights,
:func:`simulate_cache_stats` drives it with a recorded trace, and the stack algorithm
(:func:`stack_depths`, :func:`capacity_hits`) gives the same hits for every capacity at once,
for the analysis curves. They follow one set of rules, those of moe-lrc's reference code
(arXiv 2505.16056, ``src/50_chr_calc.py``):

1. **Lookup at the start of the step.** Every expert of a step is looked up against the cache
   as it was when the step began; a resident one is a hit.
2. **Use in turn.** Then the step's experts are used one after another: each use is told to
   the policy when it happens (a recency tick, an LFU count), and an expert that is out
   enters, evicting the policy's victim among the resident ones, which may be an expert the
   step uses later (it re-enters in its turn; the runtime still holds its weights).
3. **First use into a free slot is a hit.** An expert's first use (``first_uses``) can be
   avoided by no cache; when the cache still has a free slot, it counts as a hit
   (``free_slot_hits``), as in moe-lrc, so every curve reaches 1.0 at C = E and a cache
   holding every expert scores 1.0. A first use that finds the cache full is a *cold miss*.
   Policies that admit nothing (``static``, ``none``) have no free slot. ``hit_rate_strict``
   counts every first use as a miss: the lookups a run serves without a load.
"""

from fedmoe.expert_cache.policies import (
    POLICIES,
    BeladyPolicy,
    ConsistencyPolicy,
    LFUPolicy,
    LRUPolicy,
    NoCachePolicy,
    Policy,
    SCHPolicy,
    StaticPolicy,
    make_policy,
)
from fedmoe.expert_cache.simulate import CacheState, CacheStats, simulate_cache_stats, steps_of
from fedmoe.expert_cache.stack import STACK_POLICIES, capacity_hits, stack_depths

__all__ = [
    "POLICIES",
    "STACK_POLICIES",
    "BeladyPolicy",
    "CacheState",
    "CacheStats",
    "ConsistencyPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "NoCachePolicy",
    "Policy",
    "SCHPolicy",
    "StaticPolicy",
    "capacity_hits",
    "make_policy",
    "simulate_cache_stats",
    "stack_depths",
    "steps_of",
]
