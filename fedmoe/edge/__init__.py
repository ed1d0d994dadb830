"""Edge inference: the personalized model under a memory budget.

Routed experts live in a per-expert store on disk (:mod:`fedmoe.edge.store`); each MoE layer
keeps a cache of them under ``edge.budget`` (:mod:`fedmoe.edge.budget`; policies and their
bookkeeping in :mod:`fedmoe.expert_cache`), optionally filled ahead of use by a
router-based prefetcher (:mod:`fedmoe.edge.prefetch`); transformers calls the cache through the
``"fedmoe_offload"`` experts implementation (:mod:`fedmoe.edge.offload`).
"""

from fedmoe.edge.budget import capacities, parse_budget
from fedmoe.edge.offload import IMPLEMENTATION, EdgeConfig, EdgeRuntime, offload
from fedmoe.edge.prefetch import Prefetcher, predict_experts
from fedmoe.edge.store import ExpertStore

__all__ = [
    "IMPLEMENTATION",
    "EdgeConfig",
    "EdgeRuntime",
    "ExpertStore",
    "Prefetcher",
    "capacities",
    "offload",
    "parse_budget",
    "predict_experts",
]
