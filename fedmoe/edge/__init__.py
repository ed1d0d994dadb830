"""Edge inference: the personalized model under a memory budget.

Routed experts live in a per-expert store on disk (:mod:`fedmoe.edge.store`); each MoE layer
keeps a budgeted cache of them (:mod:`fedmoe.edge.cache`), optionally filled ahead of use by a
router-based prefetcher (:mod:`fedmoe.edge.prefetch`); transformers calls the cache through the
``"fedmoe_offload"`` experts implementation (:mod:`fedmoe.edge.offload`).
"""

from fedmoe.edge.cache import (
    POLICIES,
    CacheState,
    CacheStats,
    make_policy,
    parse_budget,
    simulate_cache,
    simulate_cache_stats,
)
from fedmoe.edge.offload import IMPLEMENTATION, EdgeConfig, EdgeRuntime, offload
from fedmoe.edge.prefetch import Prefetcher, predict_experts
from fedmoe.edge.store import ExpertStore

__all__ = [
    "IMPLEMENTATION",
    "POLICIES",
    "CacheState",
    "CacheStats",
    "EdgeConfig",
    "EdgeRuntime",
    "ExpertStore",
    "Prefetcher",
    "make_policy",
    "offload",
    "parse_budget",
    "predict_experts",
    "simulate_cache",
    "simulate_cache_stats",
]
