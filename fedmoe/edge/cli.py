"""`fedmoe edge generate` and `fedmoe edge bench`: the offloaded model from the command line.

    fedmoe edge generate model_dir=<checkpoint> 'prompt="def f(x):"' edge.budget=2x edge.policy=lru
    fedmoe edge bench model_dir=<checkpoint> budgets=[1x,2x] policies=[lru,consistency]
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TextStreamer

from fedmoe.artifacts import EXPERTS_FILE
from fedmoe.checkpoints import load_checkpoint_dir
from fedmoe.edge.bench import KEYS, bench_model, contender_configs, print_table
from fedmoe.edge.offload import EdgeConfig, offload
from fedmoe.edge.runtime import (
    check_counts,
    edge_config,
    load_routing_counts,
    resolve_model_dir,
    routing_counts,
)
from fedmoe.edge.store import INDEX, ExpertStore

log = logging.getLogger(__name__)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Stream a greedy generation of ``model_dir`` with its experts offloaded under ``edge``.

    Returns
    -------
    dict
        ``text`` (prompt and continuation) and the runtime's ``stats``.
    """
    if cfg.edge.threads:
        torch.set_num_threads(int(cfg.edge.threads))
    model_dir = resolve_model_dir(cfg.model_dir, list(cfg.pretrain_overrides))
    # The routed experts are never loaded: the store is written from the checkpoint and the
    # runtime reads them from it (the device holds the dense part plus its cache).
    model, tokenizer = load_checkpoint_dir(model_dir, cfg.edge.dtype, cfg.edge.device,
                                           offloaded=True)
    input_ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(cfg.edge.device)
    store = _open_store(model, model_dir, store_dir(cfg, model_dir))
    budget = edge_config(cfg.edge, None).budget
    runtime = offload(model, store, EdgeConfig(budget=budget, policy="none"))
    config = edge_config(cfg.edge, _static_counts(cfg, model, model_dir, input_ids))
    if config.policy == "belady":  # the oracle needs this very run's trace: record it first
        _generate(model, input_ids, cfg.max_new_tokens, streamer=None)
        config.trace, config.prefetch = runtime.trace(), False
    runtime.configure(config)
    streamer = TextStreamer(tokenizer)
    out = _generate(model, input_ids, cfg.max_new_tokens, streamer)
    stats = runtime.stats()
    runtime.close()
    if cfg.stats:
        _print_stats(stats)
    return {"text": tokenizer.decode(out[0], skip_special_tokens=True), "stats": stats}


def bench(cfg: DictConfig) -> dict[str, Any]:
    """Every contender on one model: table on stdout, rows in ``edge_bench.json``."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.edge.threads:
        torch.set_num_threads(int(cfg.edge.threads))
    model_dir = resolve_model_dir(cfg.model_dir, list(cfg.pretrain_overrides))
    model, tokenizer = load_checkpoint_dir(model_dir, cfg.edge.dtype, cfg.edge.device)
    input_ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids.to(cfg.edge.device)
    calibration = tokenizer(cfg.calibration_text, return_tensors="pt").input_ids
    counts = _static_counts(cfg, model, model_dir, calibration.to(cfg.edge.device))
    configs = contender_configs(list(cfg.budgets), list(cfg.policies), list(cfg.prefetch),
                                int(cfg.edge.window), counts)
    with tempfile.TemporaryDirectory(prefix="fedmoe-store-") as tmp:
        rows = bench_model(model, input_ids, cfg.edge.store_dir or tmp,
                           max_new_tokens=int(cfg.max_new_tokens), in_memory=list(cfg.in_memory),
                           configs=configs)
    print_table(rows, f"fedmoe edge bench: {model_dir}")
    output = Path(cfg.output or Path(HydraConfig.get().runtime.output_dir) / "edge_bench.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {"model_dir": str(model_dir), "prompt_tokens": input_ids.shape[1],
              "max_new_tokens": int(cfg.max_new_tokens), "keys": list(KEYS),
              "config": OmegaConf.to_container(cfg, resolve=True), "contenders": rows}
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    return result


@torch.inference_mode()
def _generate(model, input_ids: torch.Tensor, max_new_tokens: int, streamer) -> torch.Tensor:
    return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                          streamer=streamer)


def _static_counts(cfg: DictConfig, model, model_dir: Path,
                   calibration_ids: torch.Tensor) -> dict[int, list[float]] | None:
    """Routing counts for ``static``: the configured file, the export's, or a calibration."""
    policies = set(cfg.get("policies", [])) | {cfg.edge.policy}
    if "static" not in policies:
        return None
    path = Path(cfg.edge.routing_stats or model_dir / EXPERTS_FILE)
    if cfg.edge.routing_stats and not path.is_file():
        raise FileNotFoundError(f"edge.routing_stats={cfg.edge.routing_stats!r} does not exist")
    counts = load_routing_counts(path) if path.is_file() else None
    if counts is not None:
        check_counts(counts, model, path)
        return counts
    if cfg.edge.routing_stats:
        raise ValueError(f"edge.routing_stats={cfg.edge.routing_stats!r} records no routing "
                         f"statistics; drop the key to calibrate on calibration_text")
    # No file, or an export without statistics (`fedmoe prune` scores by one pass only).
    log.info("no routing statistics in %s: calibrating the static policy on %d tokens",
             model_dir, calibration_ids.numel())
    return routing_counts(model, calibration_ids)


def store_dir(cfg: DictConfig, model_dir: Path) -> Path:
    """``edge.store_dir``, else a directory of the cache named after the model's path and the
    dtype it is loaded in: a model directory may be read-only or shared (the base-model
    cache), so nothing is written into it."""
    if cfg.edge.store_dir:
        return Path(cfg.edge.store_dir)
    key = f"{Path(model_dir).resolve()}|{cfg.edge.dtype}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.cache_dir) / "expert_store" / f"{Path(model_dir).resolve().name}-{digest}"


def _open_store(model, model_dir: Path, directory: Path) -> ExpertStore:
    """The store in ``directory``, (re)built when missing or older than the model's weights."""
    index = directory / INDEX
    newest = max((p.stat().st_mtime for p in model_dir.glob("*.safetensors")), default=0.0)
    if index.is_file() and index.stat().st_mtime >= newest:
        return ExpertStore(directory)
    log.info("writing the expert store to %s", directory)
    if any(p.is_meta for p in model.parameters()):  # loaded offloaded: stream the experts
        return ExpertStore.build_from_checkpoint(model, model_dir, directory)
    return ExpertStore.build(model, directory)


def _print_stats(stats: dict[str, Any]) -> None:
    overall = stats["overall"]
    layers = " ".join(f"{i}:{s['hit_rate']:.2f}" for i, s in stats["layers"].items())
    print(f"\n[edge] policy={stats['policy']} budget={stats['budget']} "
          f"hit rate {overall['hit_rate']:.3f} ({overall['cold_misses']} cold misses; "
          f"per layer {layers}); {stats['bytes_loaded'] / 1e6:.1f} MB loaded; experts held "
          f"{stats['resident_expert_bytes'] / 1e6:.1f} of {stats['total_expert_bytes'] / 1e6:.1f}"
          f" MB")
    if stats["prefetch"]:
        p = stats["prefetch"]
        print(f"[edge] prefetch precision {p['precision']:.2f} recall {p['recall']:.2f}")
