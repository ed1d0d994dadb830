"""`fedmoe prune`: prune one model's routed experts, outside any federation.

    fedmoe prune                                     # the tiny base model, TCESS, 50% kept
    fedmoe prune model.path=<dir> prune.score=reap prune.keep=0.25
    fedmoe prune domain=c_headers prune.keep_per_layer=4      # calibrate on one domain
    fedmoe prune data=hf data.path=my.jsonl model.path=<dir> out_dir=<dir>

Data flows: the ``data`` group's train split -> calibration blocks -> :func:`prune_model`
(the same scoring, budget and slicing a federated client runs) -> the validation split's
perplexity before and after -> :func:`export_checkpoint` into ``<run dir>/model`` (or
``out_dir``), a plain HF checkpoint. The run dir also gets ``prune.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer

from fedmoe.checkpoints import load_model, resolve_base_model, resolve_device
from fedmoe.data import load_data, tokenize_blocks
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune.budget import expert_mb
from fedmoe.prune.export import export_checkpoint
from fedmoe.prune.pipeline import prune_model
from fedmoe.train.loop import evaluate_lm

log = logging.getLogger(__name__)

SUMMARY_FILE = "prune.json"


# ---- data ---------------------------------------------------------------------------------
def select_domain(corpus: datasets.DatasetDict, domain: str | None) -> datasets.DatasetDict:
    """The splits of ``corpus`` restricted to the rows of ``domain`` (all rows for ``None``)."""
    if domain is None:
        return corpus
    known = sorted(set(corpus["train"]["domain"]))
    if domain not in known:
        raise ValueError(f"domain={domain!r} is not a domain of the data; one of {known}")
    return datasets.DatasetDict(
        {split: ds.filter(lambda row: row["domain"] == domain) for split, ds in corpus.items()})


def interleaved_blocks(ds: datasets.Dataset, tokenizer: Any, block_size: int,
                       max_blocks: int | None) -> torch.Tensor:
    """Up to ``max_blocks`` token blocks ``(N, T)``, taken round-robin over the domains.

    The corpus lists its domains one after another, and scoring keeps the first blocks only
    (``prune.calibration_tokens``): round-robin makes every prefix a balanced domain mix.
    """
    labels = np.asarray(ds["domain"], dtype=object)
    domains = list(dict.fromkeys(labels.tolist()))
    quota = None if max_blocks is None else -(-max_blocks // len(domains))  # ceil
    parts = [tokenize_blocks(ds.select(np.flatnonzero(labels == d)), tokenizer, block_size, quota)
             for d in domains]
    order = sorted((i, d) for d, part in enumerate(parts) for i in range(len(part)))
    if not order:
        return torch.zeros(0, block_size, dtype=torch.long)
    blocks = torch.stack([parts[d][i] for i, d in order])  # (N, T)
    return blocks if max_blocks is None else blocks[:max_blocks]


def prune_data(cfg: DictConfig, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration blocks (train split) and held-out blocks (validation split) of ``cfg``."""
    corpus = select_domain(load_data(cfg.data), cfg.domain)
    block_size = int(cfg.data.block_size)
    tokens = cfg.prune.calibration_tokens
    calibration = interleaved_blocks(corpus["train"], tokenizer, block_size,
                                     None if tokens is None else math.ceil(tokens / block_size))
    held_out = interleaved_blocks(corpus["validation"], tokenizer, block_size, cfg.eval_blocks)
    for name, blocks in (("train", calibration), ("validation", held_out)):
        if len(blocks) == 0:
            raise ValueError(f"the {name} split of data.name={cfg.data.name} "
                             f"(domain={cfg.domain}) has no full block of "
                             f"data.block_size={block_size} tokens")
    return calibration, held_out


# ---- command ------------------------------------------------------------------------------
def layer_rows(counts: dict[int, int], kept: dict[int, list[int]],
               sizes: dict[int, float]) -> list[dict[str, Any]]:
    """Per MoE layer: experts before (``counts``) and kept (original ids), routed MB."""
    return [{"layer": i, "experts_before": n, "experts_kept": len(kept[i]),
             "kept": [int(e) for e in kept[i]], "mb_before": n * sizes[i],
             "mb_after": len(kept[i]) * sizes[i]}
            for i, n in sorted(counts.items())]


def print_report(summary: dict[str, Any]) -> None:
    """The per-layer table and the perplexity line."""
    table = Table(title=f"expert pruning: score={summary['score']}, {summary['budget']}")
    for col in ("MoE layer", "experts kept", "routed MB before", "routed MB after"):
        table.add_column(col, justify="right")
    for r in summary["layers"]:
        table.add_row(str(r["layer"]), f"{r['experts_kept']} / {r['experts_before']}",
                      f"{r['mb_before']:.3f}", f"{r['mb_after']:.3f}")
    table.add_row("total", "", f"{summary['routed_mb_before']:.3f}",
                  f"{summary['routed_mb_after']:.3f}", style="bold")
    Console(width=120).print(table)
    before, after = summary["ppl_before"], summary["ppl_after"]
    where = f"domain {summary['domain']}" if summary["domain"] else "all domains"
    print(f"held-out perplexity ({summary['eval_blocks']} validation blocks, {where}): "
          f"{before:.2f} -> {after:.2f} ({100 * (after / before - 1):+.1f}%); routed experts "
          f"{summary['routed_mb_before']:.3f} -> {summary['routed_mb_after']:.3f} MB")


def export(model: torch.nn.Module, tokenizer: Any, out_dir: Path, report: dict[str, Any],
           card: dict[str, Any] | None = None) -> Path | None:
    """The pruned model as an HF checkpoint in ``out_dir``; ``None`` if it has no HF form."""
    try:
        return export_checkpoint(model, tokenizer, out_dir, kept=report["kept"],
                                 scores=report["scores"], card=card)
    except ValueError as e:  # unequal expert counts per layer (prune.max_mb): no HF config
        log.warning("no export: %s", e)
        return None


def main(cfg: DictConfig) -> dict[str, Any]:
    """Hydra task of ``fedmoe prune``: score, prune, evaluate and export one model.

    Returns
    -------
    dict
        What ``prune.json`` holds: per-layer rows, perplexities, MB, the export dir.
    """
    from hydra.core.hydra_config import HydraConfig

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    device = resolve_device(cfg.get("device"), key="device")
    checkpoint = resolve_base_model(cfg)  # model.path when set, else the (cached) base model
    model = load_model(cfg.model, checkpoint=checkpoint, device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    calibration, held_out = prune_data(cfg, tokenizer)
    adapter = MoEAdapter(model)
    sizes = expert_mb(adapter)  # MB of one expert per layer: slicing keeps it
    counts = {layer.index: layer.num_experts for layer in adapter.moe_layers()}
    before = evaluate_lm(model, held_out, cfg.batch_size)
    report = prune_model(model, calibration, cfg.prune)
    after = evaluate_lm(model, held_out, cfg.batch_size)
    card = {"name": f"fedmoe prune: {cfg.model.name} ({report['score']})",
            "base_model": str(checkpoint), "held_out_ppl": after["ppl"],
            "base_ppl": before["ppl"], "dataset": f"validation split ({cfg.data.name}, "
            f"{cfg.domain or 'all domains'})", "config": OmegaConf.to_container(cfg, resolve=True)}
    out_dir = export(model, tokenizer, Path(cfg.out_dir or run_dir / "model"), report, card)
    # The key that decided, in plan_keep's order of precedence.
    budget = next({k: cfg.prune[k]} for k in ("max_mb", "keep_per_layer", "keep")
                  if cfg.prune[k] is not None)
    summary = {
        "checkpoint": str(checkpoint), "export": None if out_dir is None else str(out_dir),
        "score": report["score"], "budget": budget, "domain": cfg.domain,
        "calibration_blocks": len(calibration), "eval_blocks": len(held_out),
        "block_size": int(cfg.data.block_size),
        "layers": layer_rows(counts, report["kept"], sizes),
        "routed_mb_before": report["mb_before"], "routed_mb_after": report["mb_after"],
        "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "loss_before": before["loss"], "loss_after": after["loss"],
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    print_report(summary)
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    print(f"pruned model: {out_dir}; summary: {run_dir / SUMMARY_FILE}")
    return summary
