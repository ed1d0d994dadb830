"""The analysis of one model (and optionally one federated run), section by section.

Data flows: model dir -> model + tokenizer; corpus -> per-domain held-out blocks ->
routing of every MoE layer -> consistency (SRP, SCH, cache curves), specialization (usage,
JS divergence), retrieval (TAER), attribution (shares, blocking); ``run_dir`` -> client
usage and federated traffic -> edge vs cloud (with an edge benchmark JSON). Each section
returns plain JSON-able dicts and writes its PNGs into ``out_dir/plots``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from fedmoe.analysis.attribution import blocking_effects, most_used_experts, output_shares
from fedmoe.analysis.collect import Routing, collect_routing, domain_blocks
from fedmoe.analysis.consistency import policy_curves, routing_mask, sch_table, srp
from fedmoe.analysis.cost import edge_vs_cloud, load_bench
from fedmoe.analysis.retrieval import PatternLibrary, evaluate_retrieval, tcess
from fedmoe.analysis.specialization import (
    load_client_usage,
    load_client_usage_by_round,
    pairwise_js,
    specialization_over_rounds,
    usage_from_routing,
)
from fedmoe.artifacts import EXPERTS_FILE, ExpertsInfo
from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.reporting import figures

log = logging.getLogger(__name__)

SECTIONS = ("consistency", "specialization", "retrieval", "attribution", "cost")


# --- consistency ----------------------------------------------------------------------------


def consistency_section(routing: Routing, a: Mapping, out_dir: Path) -> dict:
    """SRP per segment length, SCH per lookahead, policy curves; tables at C = c * k."""
    boot = {"num_bootstrap": int(a["num_bootstrap"]), "confidence": float(a["confidence"]),
            "seed": int(a.get("seed", 0))}
    masks = {layer: routing_mask(idx, routing.num_experts[layer])
             for layer, idx in routing.top_k_index.items()}
    lengths = [int(m) for m in a["segment_lengths"]]
    srp_by_m = {m: {u: vars(r) for u, r in srp(masks, m, **boot).items()} for m in lengths}
    sch = sch_table(routing.top_k_index, routing.num_experts, lengths, **boot)
    curves = policy_curves(routing.top_k_index, routing.num_experts, list(a["policies"]), **boot)
    cache_size = {u: int(a["cache_multiple"]) * routing.top_k * (len(routing.layers)
                                                                 if u == "model" else 1)
                  for u in sch}
    table = []
    for m in lengths:
        row = {"segment_length": m}
        for unit in ("model", *map(str, routing.layers)):
            c = cache_size[unit]
            s, h = srp_by_m[m][unit], sch[unit][m]
            row[unit] = {"srp": s["srp"], "srp_ci": [s["ci_low"], s["ci_high"]], "tau": s["tau"],
                         "sch": h.at(c), "sch_ci": [h.ci_low[c - 1], h.ci_high[c - 1]],
                         "cache_size": c}
        table.append(row)
    baselines = {unit: {p: c.at(cache_size[unit]) for p, c in pol.items()}
                 for unit, pol in curves.items()}
    figures.plot_srp(srp_by_m, out_dir / "plots" / "srp.png")
    for unit in ("model", *map(str, routing.layers)):
        named = {f"SCH L={L}": c for L, c in sch[unit].items()} | curves[unit]
        figures.plot_cache_curves(named, out_dir / "plots" / f"cache_{unit}.png",
                                  title=f"expert cache hit rate ({_unit_name(unit)})",
                                  active=routing.top_k * (len(routing.layers) if unit == "model"
                                                          else 1))
    return {"table": table, "baselines_at_cache_size": baselines, "cache_size": cache_size,
            "srp": {str(m): v for m, v in srp_by_m.items()},
            "sch": {u: {str(L): c.to_dict() for L, c in d.items()} for u, d in sch.items()},
            "curves": {u: {p: c.to_dict() for p, c in d.items()} for u, d in curves.items()},
            "samples": int(next(iter(masks.values())).shape[0]),
            "tokens_per_sample": int(next(iter(masks.values())).shape[1])}


def _unit_name(unit: str) -> str:
    return "model-wide cache" if unit == "model" else f"layer {unit}"


# --- specialization -------------------------------------------------------------------------


def specialization_section(routing: Routing, domain_rows: Mapping[str, np.ndarray],
                           run_dir: Path | None, out_dir: Path) -> dict:
    """Per-domain usage of the analysed model, and per-client usage of a federated run."""
    usage = {d: usage_from_routing({k: v[rows] for k, v in routing.top_k_index.items()},
                                   routing.num_experts) for d, rows in domain_rows.items()}
    js = pairwise_js(usage)
    figures.plot_expert_usage(usage, out_dir / "plots" / "usage_domains.png",
                              title="expert usage by domain", ylabel="domain")
    figures.plot_js_matrix(js, out_dir / "plots" / "js_domains.png",
                           title="JS divergence between domains")
    out = {"domains": {"usage": usage, "js": js}}
    if run_dir is not None and (run_dir / "clients").is_dir():
        clients = load_client_usage(run_dir)
        if clients:
            cjs = pairwise_js(clients)
            figures.plot_expert_usage(clients, out_dir / "plots" / "usage_clients.png",
                                      title="expert usage by client (personal state)")
            figures.plot_js_matrix(cjs, out_dir / "plots" / "js_clients.png",
                                   title="JS divergence between clients")
            out["clients"] = {"usage": clients, "js": cjs}
            rounds = load_client_usage_by_round(run_dir)
            if rounds:  # how specialization between clients evolves over federated rounds
                out["clients"]["over_rounds"] = specialization_over_rounds(rounds,
                                                                           cumulative=False)
    return out


# --- retrieval ------------------------------------------------------------------------------


def client_pruning(model_dir: str | Path, keep: Mapping[int, int]) -> dict | None:
    """The client's own pruning of a client export, as expert ids of the loaded model.

    A pruned export IS the client's pruning: every expert it holds is kept. An unpruned
    export keeps, per layer, the ``keep[layer]`` experts its own routing statistics
    (``fedmoe_experts.json``: TCESS, else selection counts) rank highest, which is what the
    client's ``prune.keep`` would have kept. ``None`` when the directory holds no statistics.
    """
    path = Path(model_dir)
    if not (path / EXPERTS_FILE).is_file():
        return None
    info = ExpertsInfo.read(path)
    held = {layer: len(ids) for layer, ids in info.kept.items()}
    original = info.num_experts_original
    if held and max(held.values()) < original:
        return {"source": "pruned export", "num_experts_original": original,
                "kept": {layer: list(range(n)) for layer, n in held.items()}}
    stats = info.routing_stats or {}
    kept, score = {}, None
    for layer, k in keep.items():
        rec = stats.get(str(layer)) or {}
        values = rec.get("tcess") or rec.get("counts")
        if not values:
            return None
        score = "tcess" if rec.get("tcess") else "frequency"
        kept[layer] = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")[:k].tolist()
    return {"source": f"client routing statistics ({score})", "kept": kept}


def retrieval_section(model: PreTrainedModel, calibration: Mapping[str, torch.Tensor],
                      test: Mapping[str, torch.Tensor], r: Mapping, batch_size: int,
                      model_dir: str | Path | None = None) -> dict:
    """TAER: one pattern per domain from train blocks, retrieval on held-out prompts.

    Judged against the full model, the true domain's pattern (oracle), one static set from
    all domains pooled (``global``) and, for a client export, the client's own pruning.
    """
    adapter = MoEAdapter(model)
    top_k = int(r.get("top_k") or adapter.top_k)
    task_logits = {d: collect_routing(model, blocks, batch_size, adapter).router_logits
                   for d, blocks in calibration.items()}
    keep = {layer.index: max(layer.top_k, round(float(r["keep_fraction"]) * layer.num_experts))
            for layer in adapter.moe_layers()}
    library = PatternLibrary.build(task_logits, top_k, keep=max(keep.values()))
    # What retrieval is judged against, at the same number of experts per layer: one static
    # set for every prompt, from all tasks' calibration pooled, and the client's own pruning.
    pooled = {layer: tcess(np.concatenate([t[layer].reshape(-1, t[layer].shape[-1])
                                           for t in task_logits.values()]), top_k)
              for layer in keep}
    static = {"global": {layer: np.argsort(-s, kind="stable")[: keep[layer]].tolist()
                         for layer, s in pooled.items()}}
    client = client_pruning(model_dir, keep) if model_dir is not None else None
    if client is not None:
        static["client"] = client["kept"]
    result = evaluate_retrieval(model, library, test, int(r["prompt_len"]), top_k, batch_size,
                                static=static)
    result["client_pruning"] = ({k: v for k, v in client.items() if k != "kept"} if client
                                else {"skipped": f"no {EXPERTS_FILE} with routing statistics "
                                                 f"in the model directory"})
    result["keep"] = max(keep.values())
    result["tcess_top_k"] = top_k
    result["patterns"] = {p.task: {str(k): v for k, v in p.experts.items()}
                          for p in library.patterns}
    return result


# --- attribution ----------------------------------------------------------------------------


def attribution_section(model: PreTrainedModel, test: Mapping[str, torch.Tensor],
                        routing_by_domain: Mapping[str, Routing], at: Mapping, batch_size: int,
                        out_dir: Path) -> dict:
    """Shared vs routed output-norm shares and blocking effects per domain."""
    adapter = MoEAdapter(model)
    n = int(at["blocks_per_domain"])
    shares, blocking = {}, {}
    for domain, blocks in test.items():
        sub = blocks[:n]
        shares[domain] = {str(k): v for k, v in
                          output_shares(model, sub, batch_size, adapter).items()}
        r = routing_by_domain[domain]
        top = most_used_experts(r.top_k_index, r.num_experts, int(at["block_top_n"]))
        blocking[domain] = blocking_effects(model, sub, top, batch_size, adapter)
        blocking[domain]["blocked_routed"] = {str(k): v for k, v in top.items()}
    figures.plot_shares(shares, out_dir / "plots" / "attribution_shares.png")
    figures.plot_blocking(blocking, out_dir / "plots" / "attribution_blocking.png")
    return {"shares": shares, "blocking": blocking, "block_top_n": int(at["block_top_n"])}


# --- cost -----------------------------------------------------------------------------------


def cost_section(cost_cfg: Mapping, run_dir: Path | None, bench: Path | None,
                 out_dir: Path) -> dict:
    """Edge vs cloud from measured numbers; skipped (with the reason) when inputs lack."""
    if bench is None or run_dir is None or not (run_dir / "results.json").is_file():
        return {"skipped": "needs edge_bench=<edge benchmark JSON> and run_dir=<simulate run "
                           "dir with results.json>"}
    results = json.loads((run_dir / "results.json").read_text())
    report = edge_vs_cloud(load_bench(bench), results, cost_cfg)
    figures.plot_edge_cloud(report["grid"], out_dir / "plots" / "edge_vs_cloud.png")
    return report


# --- everything -----------------------------------------------------------------------------


def run_analysis(a: Mapping, data: Mapping, model_dir: str | Path, out_dir: str | Path,
                 run_dir: str | Path | None = None, edge_bench: str | Path | None = None,
                 corpus=None, experts_implementation: str | None = None,
                 device: str | torch.device = "cpu") -> dict:
    """Run the configured sections on one model; write ``routing.npz`` and the plots.

    Parameters
    ----------
    a : Mapping
        The ``analysis`` config (``conf/analysis/default.yaml``).
    data : Mapping
        The ``data`` config the corpus is built from (``load_data``).
    corpus : DatasetDict, optional
        Reuse an already loaded corpus.
    experts_implementation : str, optional
        transformers experts forward (``eager``, ``grouped_mm``, ...); speed only.
    device : str or torch.device
        Where the model runs (``fedmoe analyze``'s ``device`` key); results come back to the CPU.

    Returns
    -------
    dict
        One entry per section that ran, plus ``model_dir`` and ``domains``.
    """
    from fedmoe.data import load_data

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir) if run_dir else None
    sections = list(a.get("sections") or SECTIONS)
    torch.manual_seed(int(a.get("seed", 0)))
    if a.get("threads"):
        torch.set_num_threads(int(a["threads"]))
    model, tokenizer = load_checkpoint_dir(model_dir, device=device,
                                           experts_implementation=experts_implementation)
    _check_length(model, int(a["seq_len"]))
    corpus = corpus if corpus is not None else load_data(data)
    seq_len, per_domain, bs = int(a["seq_len"]), int(a["samples_per_domain"]), int(a["batch_size"])
    test = domain_blocks(corpus["test"], tokenizer, seq_len, per_domain)
    if not test:
        raise ValueError(f"no domain of the test split has a full block of seq_len={seq_len} "
                         "tokens (analysis.seq_len)")
    blocks = torch.cat(list(test.values()))  # (N, T), domains one after another
    bounds = np.cumsum([0, *[len(b) for b in test.values()]])
    domain_rows = {d: np.arange(bounds[i], bounds[i + 1]) for i, d in enumerate(test)}
    routing = collect_routing(model, blocks, bs)
    routing.save(out_dir / "routing.npz")
    (out_dir / "routing_domains.json").write_text(json.dumps(
        {d: [int(rows[0]), int(rows[-1]) + 1] for d, rows in domain_rows.items()}))
    report: dict[str, Any] = {"model_dir": str(model_dir), "domains": list(test),
                              "config": {"analysis": dict(a), "data": dict(data)},
                              "samples_per_domain": {d: len(b) for d, b in test.items()},
                              "seq_len": seq_len, "top_k": routing.top_k,
                              "num_experts": {str(k): v for k, v in routing.num_experts.items()}}
    if "consistency" in sections:
        report["consistency"] = consistency_section(routing, a, out_dir)
    if "specialization" in sections:
        report["specialization"] = specialization_section(routing, domain_rows, run_dir, out_dir)
    if "retrieval" in sections:
        r = a["retrieval"]
        calibration = domain_blocks(corpus["train"], tokenizer, seq_len,
                                    int(r["calibration_blocks"]))
        report["retrieval"] = retrieval_section(model, calibration, test, r, bs, model_dir)
    if "attribution" in sections:
        by_domain = {d: routing.select(rows) for d, rows in domain_rows.items()}
        report["attribution"] = attribution_section(model, test, by_domain, a["attribution"],
                                                    bs, out_dir)
    if "cost" in sections:
        report["cost"] = cost_section(a["cost"], run_dir, Path(edge_bench) if edge_bench
                                      else None, out_dir)
    return report


def _check_length(model: PreTrainedModel, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"analysis.seq_len={seq_len} exceeds the model's "
                         f"max_position_embeddings={limit}")
