"""`fedmoe inspect`: the parameter-role table of a model (per layer and total)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from fedmoe.checkpoints import load_model
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import ROLES
from fedmoe.moe.models import DTYPES, build_config, from_pretrained, validate_config


def role_table(model: nn.Module) -> dict:
    """Tensors, parameters and MB per role, per decoder layer (``"global"`` for the rest)."""
    adapter = MoEAdapter(model)
    empty = {"tensors": 0, "params": 0, "mb": 0.0}
    layers: dict[str, dict[str, dict]] = defaultdict(lambda: {r: dict(empty) for r in ROLES})
    total = {r: dict(empty) for r in ROLES}
    for name, p in model.named_parameters():
        role = adapter.role_of(name).value
        layer = adapter.layer_of(name)
        key = "global" if layer is None else str(layer)
        for bucket in (layers[key][role], total[role]):
            bucket["tensors"] += 1
            bucket["params"] += p.numel()
            bucket["mb"] += p.numel() * p.element_size() / 2**20
    return {
        "family": model.config.model_type,
        "num_experts": adapter.num_experts,
        "top_k": adapter.top_k,
        "moe_layers": [layer.index for layer in adapter.moe_layers()],
        "layers": dict(layers),
        "total": total,
        "total_params": sum(v["params"] for v in total.values()),
        "total_mb": sum(v["mb"] for v in total.values()),
    }


def _model_for_inspection(cfg: DictConfig) -> nn.Module:
    """The model of ``cfg.model``, on the meta device unless real weights are asked for."""
    if not cfg.meta_device:
        return load_model(cfg.model)
    if cfg.model.path:
        config = from_pretrained(AutoConfig, cfg.model.path)
        validate_config(config, where=f"config of {cfg.model.path}")
    else:
        config = build_config(cfg.model)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])


def print_table(table: dict, title: str) -> None:
    rich_table = Table(title=title)
    rich_table.add_column("layer")
    for role in ROLES:
        rich_table.add_column(f"{role}\ntensors / params / MB", justify="right")
    order = sorted((k for k in table["layers"] if k != "global"), key=int) + ["global"]
    for key in [k for k in order if k in table["layers"]]:
        moe = " (moe)" if key != "global" and int(key) in table["moe_layers"] else ""
        rich_table.add_row(key + moe, *[_cell(table["layers"][key][r]) for r in ROLES])
    rich_table.add_row("total", *[_cell(table["total"][r]) for r in ROLES], style="bold")
    Console(width=160).print(rich_table)
    print(f"{table['family']}: {table['total_params']:,} parameters, {table['total_mb']:.1f} MB, "
          f"{table['num_experts']} routed experts per MoE layer, top-{table['top_k']}, "
          f"MoE layers {table['moe_layers']}")


def _cell(bucket: dict) -> str:
    return f"{bucket['tensors']} / {bucket['params']:,} / {bucket['mb']:.2f}"


def main(cfg: DictConfig) -> dict:
    """Print the role table of ``cfg.model`` and write ``inspect.json`` in the run directory."""
    from hydra.core.hydra_config import HydraConfig

    table = role_table(_model_for_inspection(cfg))
    table["model"] = OmegaConf.to_container(cfg.model, resolve=True)
    print_table(table, f"parameter roles of {cfg.model.name} ({table['family']})")
    out = Path(HydraConfig.get().runtime.output_dir) / "inspect.json"
    out.write_text(json.dumps(table, indent=2))
    print(f"wrote {out}")
    return table
