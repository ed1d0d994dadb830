"""Edge vs cloud: latency, cost per response and the Edge-First utility per unit cost.

"Edge-First Language Model Inference: Models, Metrics, and Tradeoffs" (arXiv 2505.16508)
compares deployments by a utility ``U = alpha * Q + (1 - alpha) * R`` per unit cost. Every
throughput, byte count and memory figure here is measured; only prices, link bandwidths,
the response shape and the cloud's speed-up over the measured hardware come from the user
(``conf/analysis/cost.yaml``).

Measured inputs
    - edge benchmark rows (``fedmoe edge bench`` JSON): ``policy``, ``budget``,
      ``hit_rate``, ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``bytes_loaded``,
      ``peak_rss_mb``;
    - a federated ``results.json``: ``rounds[*].bytes_up`` / ``bytes_down`` (all clients of
      the round) and the clients' final perplexity.

Per response of ``n_in`` prompt and ``n_out`` generated tokens, over a link of ``bw``:

- edge latency ``L_e = n_in / prefill_tps + n_out / decode_tps`` (+ ``bytes_loaded * 8 /
  bw`` when the expert store sits across the link, ``edge.remote_expert_store``);
- cloud latency ``L_c = rtt + 8 * (n_in + n_out) * bytes_per_token / bw + n_in /
  (s * prefill_tps_ref) + n_out / (s * decode_tps_ref)``, with the reference row the
  benchmark of the full model (``cloud.bench_policy``; default the largest budget) and ``s``
  the user's ``cloud.speedup``;
- edge cost ``price_per_hour * L_e / 3600 + transfer_price_per_gb * F / 1e9`` where ``F`` is
  one client's federated traffic per round divided by ``responses_per_round``;
- cloud cost ``(n_in * price_in + n_out * price_out) / 1000 + transfer_price_per_gb *
  (n_in + n_out) * bytes_per_token / 1e9``.

Quality ``Q_x = min(ppl_e, ppl_c) / ppl_x`` and responsiveness ``R_x = min(L_e, L_c) / L_x``
are relative to the better option (so both lie in (0, 1], 1 for the better one); edge
perplexity defaults to the clients' mean final perplexity in ``results.json``, cloud
perplexity to the same value (quality ties). Edge wins where it fits in ``edge.memory_mb``
and ``U_e / cost_e > U_c / cost_c``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe.reporting.metrics import run_metrics

BENCH_KEYS = ("policy", "budget", "hit_rate", "prefill_tokens_per_s", "decode_tokens_per_s",
              "bytes_loaded", "peak_rss_mb")


def load_bench(path: str | Path) -> list[dict]:
    """Benchmark rows: ``fedmoe edge bench``'s ``{"contenders": [...]}``, a list, one row, or
    ``{"results"|"rows": [...]}``."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, Mapping):
        data = next((data[k] for k in ("contenders", "results", "rows") if k in data), [data])
    rows = [dict(r) for r in data]
    for i, row in enumerate(rows):
        missing = [k for k in BENCH_KEYS if k not in row]
        if missing:
            raise ValueError(f"{path}: benchmark row {i} lacks {missing}; expected {BENCH_KEYS}")
    return rows


def federated_traffic(results: Mapping[str, Any]) -> dict[str, float]:
    """Bytes per round in total and per participating client, and the mean final ppl
    (:mod:`fedmoe.reporting.metrics`)."""
    m = run_metrics(results)
    if not m.rounds:
        raise ValueError("results.json has no rounds: cannot measure federated traffic")
    return {"bytes_per_round": (m.bytes_up + m.bytes_down) / m.rounds,
            "bytes_per_client_round": m.bytes_per_client_round,
            "rounds": m.rounds,
            "mean_final_ppl": m.ppl_mean if m.ppl_mean is not None else math.nan}


def edge_latency(row: Mapping, cfg: Mapping, bandwidth_mbps: float) -> float:
    """Seconds per response on the edge device from a benchmark row."""
    seconds = (cfg["prompt_tokens"] / row["prefill_tokens_per_s"]
               + cfg["output_tokens"] / row["decode_tokens_per_s"])
    if cfg["edge"].get("remote_expert_store"):
        seconds += row["bytes_loaded"] * 8 / (bandwidth_mbps * 1e6)
    return seconds


def cloud_latency(reference: Mapping, cfg: Mapping, bandwidth_mbps: float) -> float:
    """Seconds per response in the cloud: round trip, text over the link, compute."""
    c = cfg["cloud"]
    wire = 8 * (cfg["prompt_tokens"] + cfg["output_tokens"]) * cfg["bytes_per_token"]
    compute = (cfg["prompt_tokens"] / (c["speedup"] * reference["prefill_tokens_per_s"])
               + cfg["output_tokens"] / (c["speedup"] * reference["decode_tokens_per_s"]))
    return c["rtt_ms"] / 1000 + wire / (bandwidth_mbps * 1e6) + compute


def edge_cost(latency_s: float, traffic: Mapping, cfg: Mapping) -> float:
    """Cost of one edge response: device time plus its share of federated traffic."""
    federated = traffic["bytes_per_client_round"] / cfg["responses_per_round"]
    return (cfg["edge"]["price_per_hour"] * latency_s / 3600
            + cfg["transfer_price_per_gb"] * federated / 1e9)


def cloud_cost(cfg: Mapping) -> float:
    """Cost of one cloud response: token prices plus the text's transfer."""
    c = cfg["cloud"]
    tokens = cfg["prompt_tokens"] + cfg["output_tokens"]
    return ((cfg["prompt_tokens"] * c["price_per_1k_input_tokens"]
             + cfg["output_tokens"] * c["price_per_1k_output_tokens"]) / 1000
            + cfg["transfer_price_per_gb"] * tokens * cfg["bytes_per_token"] / 1e9)


def utility(alpha: float, quality: float, responsiveness: float) -> float:
    """Edge-First utility ``U = alpha * Q + (1 - alpha) * R``."""
    return alpha * quality + (1 - alpha) * responsiveness


def compare(row: Mapping, reference: Mapping, traffic: Mapping, cfg: Mapping, alpha: float,
            bandwidth_mbps: float) -> dict[str, float | bool]:
    """Edge vs cloud for one benchmark row at one ``alpha`` and link bandwidth."""
    q = cfg.get("quality") or {}
    ppl_e = q.get("edge_ppl") or traffic["mean_final_ppl"]
    ppl_c = q.get("cloud_ppl") or ppl_e
    lat_e, lat_c = edge_latency(row, cfg, bandwidth_mbps), cloud_latency(reference, cfg,
                                                                          bandwidth_mbps)
    q_e, q_c = min(ppl_e, ppl_c) / ppl_e, min(ppl_e, ppl_c) / ppl_c
    r_e, r_c = min(lat_e, lat_c) / lat_e, min(lat_e, lat_c) / lat_c
    cost_e, cost_c = edge_cost(lat_e, traffic, cfg), cloud_cost(cfg)
    u_e, u_c = utility(alpha, q_e, r_e), utility(alpha, q_c, r_c)
    fits = row["peak_rss_mb"] <= cfg["edge"]["memory_mb"]
    v_e, v_c = _per_cost(u_e, cost_e), _per_cost(u_c, cost_c)
    return {"latency_edge_s": lat_e, "latency_cloud_s": lat_c, "cost_edge": cost_e,
            "cost_cloud": cost_c, "Q_edge": q_e, "Q_cloud": q_c, "R_edge": r_e, "R_cloud": r_c,
            "U_edge": u_e, "U_cloud": u_c, "U_per_cost_edge": v_e, "U_per_cost_cloud": v_c,
            "fits": bool(fits), "edge_wins": bool(fits and v_e > v_c)}


def _per_cost(u: float, cost: float) -> float:
    return u / cost if cost > 0 else math.inf


def pick_row(rows: Sequence[Mapping], policy: str | None, budget: Any | None,
             memory_mb: float | None = None, largest: bool = False) -> Mapping:
    """The benchmark row of ``policy``/``budget``; unset: the fastest row that fits in
    ``memory_mb`` (or, ``largest=True``, the row with the largest budget)."""
    chosen = [r for r in rows if (policy is None or r["policy"] == policy)
              and (budget is None or r["budget"] == budget)]
    if not chosen:
        raise ValueError(f"no benchmark row with policy={policy!r} budget={budget!r}")
    if largest:
        return max(chosen, key=lambda r: (_budget_value(r["budget"]), r["decode_tokens_per_s"]))
    fitting = [r for r in chosen if memory_mb is None or r["peak_rss_mb"] <= memory_mb] or chosen
    return max(fitting, key=lambda r: r["decode_tokens_per_s"])


def _budget_value(budget: Any) -> float:
    try:
        return float(budget)
    except (TypeError, ValueError):
        return math.inf  # "full", "all", None: no limit


def edge_vs_cloud(rows: Sequence[Mapping], results: Mapping, cfg: Mapping) -> dict:
    """The whole comparison: a table at the reference point and a win map over the grid.

    Returns
    -------
    dict
        ``traffic``, ``reference_row``, ``edge_row``, ``table`` (one entry per benchmark row
        at ``reference.alpha`` and ``reference.bandwidth_mbps``), and ``grid`` with
        ``alphas``, ``bandwidths_mbps`` and ``log_ratio`` (alphas x bandwidths: log10 of
        edge over cloud utility per cost; > 0 where edge wins).
    """
    traffic = federated_traffic(results)
    c = cfg["cloud"]
    reference = pick_row(rows, c.get("bench_policy"), c.get("bench_budget"), largest=True)
    edge = pick_row(rows, cfg["edge"].get("policy"), cfg["edge"].get("budget"),
                    cfg["edge"]["memory_mb"])
    ref = cfg["reference"]
    table = [{k: r[k] for k in ("contender", *BENCH_KEYS) if k in r}
             | compare(r, reference, traffic, cfg, ref["alpha"], ref["bandwidth_mbps"])
             for r in rows]
    alphas = np.linspace(0.0, 1.0, int(cfg["alpha_steps"]))
    bandwidths = [float(b) for b in cfg["bandwidths_mbps"]]
    log_ratio = np.zeros((len(alphas), len(bandwidths)))
    for i, a in enumerate(alphas):
        for j, bw in enumerate(bandwidths):
            res = compare(edge, reference, traffic, cfg, float(a), bw)
            ratio = res["U_per_cost_edge"] / res["U_per_cost_cloud"]
            log_ratio[i, j] = math.log10(ratio) if res["fits"] else -math.inf
    return {"traffic": traffic, "reference_row": dict(reference), "edge_row": dict(edge),
            "table": table, "grid": {"alphas": alphas.tolist(), "bandwidths_mbps": bandwidths,
                                     "log_ratio": log_ratio.tolist()}}
