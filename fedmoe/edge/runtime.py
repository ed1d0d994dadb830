"""From a checkpoint directory to an offloaded model: loading, routing statistics, config.

Used by the ``fedmoe edge ...`` commands and ``scripts/bench_edge.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from fedmoe.edge.offload import EdgeConfig
from fedmoe.moe.routing import capture_routing

ROUTING_FILE = "fedmoe_experts.json"


def resolve_model_dir(model_dir: str | None, pretrain_overrides: list[str] | None = None) -> Path:
    """``model_dir``, or the tiny base model ``fedmoe pretrain`` writes (trained if missing)."""
    if model_dir:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir={model_dir!r} holds no config.json: pass a "
                                    f"Hugging Face checkpoint directory of a supported MoE family")
        return path
    from fedmoe.task.pretrain import ensure_base_model

    return ensure_base_model(compose_pretrain(pretrain_overrides), progress=False)


def compose_pretrain(overrides: list[str] | None = None) -> DictConfig:
    """The ``pretrain`` primary config (``conf/pretrain.yaml``) with ``overrides``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fedmoe.cli import conf_dir

    # Inside a running Hydra app, composing needs the global instance: set it aside.
    hydra = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose("pretrain", overrides=list(overrides or []))
    finally:
        if hydra is not None:
            GlobalHydra.instance().initialize(hydra)


def load_model(model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
               offloaded: bool = False) -> tuple[PreTrainedModel, Any]:
    """Model (eval mode, on ``device``) and tokenizer of a checkpoint directory.

    ``offloaded``: the routed experts are not read (they stay on the ``meta`` device): the
    runtime serves them from its expert store (``ExpertStore.build_from_checkpoint``), so a
    device never holds more than the dense part of the model plus its expert cache.
    """
    from fedmoe.checkpoints import load_model as load_checkpoint
    from fedmoe.moe.adapter import role_of_name
    from fedmoe.moe.families import Role

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    skip = (lambda name: role_of_name(model_type, name) == Role.ROUTED_EXPERTS) \
        if offloaded else None
    model = load_checkpoint({"family": model_type, "path": str(model_dir), "dtype": dtype},
                            device=device, skip=skip)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model.eval(), tokenizer


def load_routing_counts(path: str | Path) -> dict[int, list[float]]:
    """Per-layer expert counts from an export's ``fedmoe_experts.json``.

    Reads ``{"routing_statistics": {"<layer>": [count per expert] | {"counts": [...]}}}``
    (expert ids as in the exported, possibly pruned, model); a bare ``{"<layer>": ...}``
    mapping is accepted too.
    """
    data = json.loads(Path(path).read_text())
    stats = data.get("routing_statistics", data.get("routing_stats", data))
    counts = {}
    for layer, entry in stats.items():
        values = entry["counts"] if isinstance(entry, Mapping) else entry
        counts[int(layer)] = [float(v) for v in values]
    if not counts:
        raise ValueError(f"{path} holds no per-layer routing statistics")
    return counts


@torch.inference_mode()
def routing_counts(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[int, list[int]]:
    """A calibration pass: tokens routed to each expert, per MoE layer."""
    with capture_routing(model, router_probs=False) as trace:
        model(input_ids=input_ids, use_cache=False)
    return {r.layer: r.counts(_num_experts(model, r.layer)).tolist() for r in trace}


def _num_experts(model: torch.nn.Module, layer: int) -> int:
    from fedmoe.moe.adapter import MoEAdapter

    return MoEAdapter(model).layer(layer).num_experts


def edge_config(edge: DictConfig | Mapping[str, Any],
                counts: Mapping[int, list[float]] | None = None) -> EdgeConfig:
    """The ``edge`` config group as an :class:`EdgeConfig`."""
    e = OmegaConf.to_container(edge, resolve=True) if isinstance(edge, DictConfig) else dict(edge)
    return EdgeConfig(budget=e["budget"], policy=e["policy"], window=int(e["window"]),
                      prefetch=bool(e["prefetch"]), counts=counts)
