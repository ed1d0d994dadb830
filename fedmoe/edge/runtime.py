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

from fedmoe.edge.offload import EdgeConfig
from fedmoe.moe.routing import capture_routing


def resolve_model_dir(model_dir: str | None, pretrain_overrides: list[str] | None = None) -> Path:
    """``model_dir``, or the tiny base model ``fedmoe pretrain`` writes (trained if missing)."""
    if model_dir:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model_dir={model_dir!r} holds no config.json: pass a "
                                    f"Hugging Face checkpoint directory of a supported MoE family")
        return path
    from fedmoe.checkpoints import resolve_base_model

    return Path(resolve_base_model(compose_pretrain(pretrain_overrides), progress=False))


def compose_pretrain(overrides: list[str] | None = None) -> DictConfig:
    """The ``pretrain`` primary config (``conf/pretrain.yaml``) with ``overrides``."""
    from fedmoe.compose import compose

    return compose("pretrain", overrides or [])


def load_routing_counts(path: str | Path) -> dict[int, list[float]] | None:
    """Per-layer expert counts from an export's ``fedmoe_experts.json`` (or a statistics file).

    Expert ids are those of the exported, possibly pruned, model. Layouts read:

    - a federated client's export: ``{"routing_stats": {"<layer>": {"counts": [...], ...}}}``;
    - :meth:`fedmoe.prune.RoutingStats.to_dict`, alone or under ``"routing_stats"``:
      ``{"tcess_k": ..., "layers": {"<layer>": {"tokens": ..., "counts": [...], ...}}}``;
    - a bare mapping ``{"<layer>": [count per expert]}``.

    Returns
    -------
    dict or None
        ``{layer: counts}``; ``None`` when the file records no statistics (``fedmoe prune``
        writes ``"routing_stats": null``: it scores experts by one calibration pass only).

    Raises
    ------
    ValueError
        If the file is not one of the layouts above.
    """
    data = json.loads(Path(path).read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object of routing statistics")
    data = data.get("routing_stats", data)
    if not data:
        return None
    if isinstance(data, Mapping) and isinstance(data.get("layers"), Mapping):
        data = data["layers"]  # RoutingStats.to_dict()
    try:
        counts = {int(layer): [float(v) for v in _counts_of(entry)]
                  for layer, entry in data.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not per-layer routing statistics ({{layer: [counts]}}, "
                         f"{{layer: {{'counts': [...]}}}} or RoutingStats.to_dict()): {e!r}") from e
    return counts or None


def _counts_of(entry: Any) -> list:
    return entry["counts"] if isinstance(entry, Mapping) else list(entry)


def check_counts(counts: Mapping[int, list[float]], model: torch.nn.Module,
                 source: str | Path) -> None:
    """Every MoE layer of ``model`` has one count per expert it holds in ``counts``."""
    from fedmoe.moe.adapter import MoEAdapter

    for layer in MoEAdapter(model).moe_layers():
        have = counts.get(layer.index)
        if have is None or len(have) != layer.num_experts:
            got = "none" if have is None else f"{len(have)} counts"
            raise ValueError(f"{source}: MoE layer {layer.index} holds {layer.num_experts} "
                             f"experts but the routing statistics give {got}")


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
