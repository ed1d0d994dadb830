"""Per-client expert pruning under a memory budget, and export of the pruned model.

- :mod:`~fedmoe.prune.scores`: expert utility (frequency, PreMoe TCESS, REAP, NAEE, random)
  and :class:`RoutingStats`, accumulated during training.
- :mod:`~fedmoe.prune.budget`: how many experts each layer keeps (fraction, count, MB).
- :mod:`~fedmoe.prune.slicing`: slicing experts and router rows in place.
- :mod:`~fedmoe.prune.export`: a standard HF checkpoint of the pruned model.
- :mod:`~fedmoe.prune.pipeline`: all of it in one call, :func:`prune_model`.
"""

from fedmoe.prune.budget import check_budget, expert_mb, plan_keep, pruning_enabled, routed_mb
from fedmoe.prune.export import export_checkpoint
from fedmoe.prune.masked import masked_routing
from fedmoe.prune.pipeline import budget_for_round, prune_model
from fedmoe.prune.scores import SCORES, RoutingStats, compute_scores
from fedmoe.prune.slicing import keep_experts, kept_experts

__all__ = [
    "SCORES",
    "RoutingStats",
    "budget_for_round",
    "check_budget",
    "compute_scores",
    "expert_mb",
    "export_checkpoint",
    "keep_experts",
    "kept_experts",
    "masked_routing",
    "plan_keep",
    "prune_model",
    "pruning_enabled",
    "routed_mb",
]
