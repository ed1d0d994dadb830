"""`fedmoe edge generate|bench` and `fedmoe export gguf`: the model on a device, from the
command line (fedmoe's offloading runtime, or a GGUF file for llama.cpp).

    fedmoe edge generate model_dir=<checkpoint> 'prompt="def f(x):"' edge.budget=2x edge.policy=lru
    fedmoe edge bench model_dir=<checkpoint> budgets=[1x,2x] policies=[lru,consistency]
    fedmoe export gguf model_dir=<checkpoint> quant=q8_0
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

from fedmoe.edge.bench import KEYS, bench_model, contender_configs, print_table
from fedmoe.edge.offload import EdgeConfig, offload
from fedmoe.edge.runtime import (
    ROUTING_FILE,
    check_counts,
    edge_config,
    load_model,
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
    model, tokenizer = load_model(model_dir, cfg.edge.dtype, cfg.edge.device, offloaded=True)
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
    model, tokenizer = load_model(model_dir, cfg.edge.dtype, cfg.edge.device)
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


def export_gguf(cfg: DictConfig) -> dict[str, Any]:
    """Write ``model_dir`` as a GGUF file; with llama-cpp-python installed, run it and compare
    llama.cpp's greedy continuation of ``check_prompt`` with the HF model's.

    Returns
    -------
    dict
        ``path``, ``quant``, ``bytes``, ``architecture`` and, when checked, ``check``
        (``hf`` and ``llama_cpp`` token ids, ``agree``: the leading tokens that are equal).
    """
    from hydra.core.hydra_config import HydraConfig

    from fedmoe.config import ConfigError
    from fedmoe.edge import gguf_export

    if not cfg.model_dir:
        raise ConfigError("model_dir is required: a fedmoe export (fedmoe prune, or a client's "
                          "export of fedmoe simulate) or another HF MoE checkpoint directory")
    if cfg.quant not in gguf_export.QUANTS:
        raise ConfigError(f"quant={cfg.quant!r}: expected one of {list(gguf_export.QUANTS)}")
    model_dir = resolve_model_dir(cfg.model_dir)
    # fedmoe's exports are folders named `model` (clients/client_0003/model): the parent's name.
    name = model_dir.resolve().name
    name = model_dir.resolve().parent.name if name == "model" else name
    out = Path(cfg.out or Path(HydraConfig.get().runtime.output_dir) / f"{name}-{cfg.quant}.gguf")
    model, tokenizer = load_model(model_dir)
    written = gguf_export.export_gguf(model_dir, out, cfg.quant, model=model,
                                      threads=cfg.threads)
    print(f"wrote {written.path} ({written.architecture}, {written.quant}, "
          f"{written.bytes / 1e6:.1f} MB, {written.tensors} tensors, "
          f"tokenizer pre-tokenizer {written.tokenizer_pre!r})")
    result = {"path": str(written.path), "quant": written.quant, "bytes": written.bytes,
              "architecture": written.architecture}
    if cfg.check:
        result["check"] = _check_gguf(cfg, model, tokenizer, written.path)
    print(f"run it: llama-cli -m {written.path} -p {cfg.check_prompt!r} -n 64 --cpu-moe")
    return result


def _check_gguf(cfg: DictConfig, model, tokenizer, path: Path) -> dict[str, Any] | None:
    """Greedy tokens of llama.cpp and of the HF model after ``check_prompt``, and how many
    leading ones agree; ``None`` (with a hint) when llama-cpp-python is not installed."""
    import importlib.util
    from contextlib import closing

    if importlib.util.find_spec("llama_cpp") is None:
        print("not checked in llama.cpp: llama-cpp-python is not installed "
              "(pip install 'fedmoe[gguf]')")
        return None
    from fedmoe.edge import llamacpp

    prompt = tokenizer(cfg.check_prompt).input_ids
    hf = _generate(model, torch.tensor([prompt]), int(cfg.check_tokens), streamer=None)
    hf = hf[0, len(prompt):].tolist()
    with closing(llamacpp.load(path, threads=cfg.threads)) as llm:
        ours = llamacpp.greedy(llm, prompt, int(cfg.check_tokens)).tokens
        same_tokens = llamacpp.tokenize(llm, cfg.check_prompt) == prompt
    agree = next((i for i, (a, b) in enumerate(zip(hf, ours, strict=False)) if a != b),
                 min(len(hf), len(ours)))
    print(f"llama.cpp check: {agree} of {len(hf)} greedy tokens after {cfg.check_prompt!r} "
          f"equal the HF model's; its tokenizer gives {'the same' if same_tokens else 'OTHER'} "
          f"prompt ids" + ("" if agree == len(hf) or cfg.quant in ("f32", "f16", "bf16")
                           else " (a quantized file may drift from the HF model)"))
    return {"hf": hf, "llama_cpp": ours, "agree": agree, "same_prompt_ids": same_tokens}


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
    path = Path(cfg.edge.routing_stats or model_dir / ROUTING_FILE)
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
