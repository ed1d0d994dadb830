"""Analyses of MoE models and federated runs: routing consistency, specialization,
task-adaptive expert retrieval, basic-refinement attribution, edge-vs-cloud trade-offs.

The main path (``fedmoe analyze``, :func:`run_analysis`): routing of held-out blocks
(:func:`collect_routing`) -> :func:`srp` / :func:`sch_table` / :func:`policy_curves` ->
:func:`pairwise_js` of expert usage -> :class:`PatternLibrary` retrieval under
:func:`restrict_experts` -> :func:`output_shares` and :func:`blocking_effects` ->
:func:`edge_vs_cloud` from measured numbers.
"""

from fedmoe.analysis.attribution import (
    block_shared_experts,
    blocking_effects,
    most_used_experts,
    output_shares,
)
from fedmoe.analysis.collect import Routing, collect_routing, domain_blocks
from fedmoe.analysis.consistency import (
    CacheCurve,
    SRPResult,
    cache_curve,
    model_trace,
    policy_curves,
    routing_mask,
    sch_table,
    srp,
    window_count_histogram,
)
from fedmoe.analysis.cost import edge_vs_cloud, federated_traffic, load_bench, utility
from fedmoe.analysis.pipeline import run_analysis
from fedmoe.analysis.retrieval import (
    Pattern,
    PatternLibrary,
    evaluate_retrieval,
    prompt_keys,
    restrict_experts,
    tcess,
)
from fedmoe.analysis.specialization import (
    entropy_bits,
    js_divergence,
    load_client_usage,
    load_client_usage_by_round,
    pairwise_js,
    specialization_over_rounds,
    usage_from_routing,
)

__all__ = [
    "CacheCurve",
    "Pattern",
    "PatternLibrary",
    "Routing",
    "SRPResult",
    "block_shared_experts",
    "blocking_effects",
    "cache_curve",
    "collect_routing",
    "domain_blocks",
    "edge_vs_cloud",
    "entropy_bits",
    "evaluate_retrieval",
    "federated_traffic",
    "js_divergence",
    "load_bench",
    "load_client_usage",
    "load_client_usage_by_round",
    "model_trace",
    "most_used_experts",
    "output_shares",
    "pairwise_js",
    "policy_curves",
    "prompt_keys",
    "restrict_experts",
    "routing_mask",
    "run_analysis",
    "sch_table",
    "specialization_over_rounds",
    "srp",
    "tcess",
    "usage_from_routing",
    "utility",
    "window_count_histogram",
]
