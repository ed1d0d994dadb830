"""Export a client's personalized, pruned model as a standard Hugging Face checkpoint.

The directory loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)`` (no fedmoe
import): ``config.json`` carries the reduced expert count, weights are safetensors, and the
tokenizer sits next to them. ``fedmoe_experts.json`` adds what transformers does not keep:
the ORIGINAL ids of each layer's kept experts, their scores and routing statistics.

A PEFT model is exported merged (LoRA folded into the weights of a copy; the live model is
untouched) and its unmerged adapter goes to ``adapter/``: it loads with
``PeftModel.from_pretrained`` onto the base model pruned to the same experts
(``keep_experts(base, ExpertsInfo.read(path).kept)`` on an unpruned base). Routed experts
a client held in 4 or 8 bits (``train.quantize``) are written dequantized, in the checkpoint's
dtype, with their factors folded in (as QLoRA merges).

HF configs hold ONE expert count per model, so a model whose MoE layers keep different
numbers of experts (a ``prune.max_mb`` budget) is refused rather than padded: padding
cannot be exact, since a padded expert's router row still competes for the top-k.

Every export carries a Hugging Face model card, ``README.md`` (:mod:`fedmoe.prune.card`):
base model, kept experts per layer, held-out perplexity and the run's config as YAML metadata.

The directory is written atomically: a temporary sibling directory renamed into place.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from fedmoe.artifacts import ExpertsInfo
from fedmoe.moe.adapter import MoEAdapter, normalize_name
from fedmoe.moe.families import Role
from fedmoe.prune.card import CARD_FILE, model_card
from fedmoe.prune.scores import RoutingStats
from fedmoe.prune.slicing import _deepseek_grouping, kept_experts
from fedmoe.train.expert_lora import (
    IMPLEMENTATION,
    PARTS,
    has_expert_lora,
    merged_expert_weights,
)
from fedmoe.train.quantize import is_quantized

# Exported tensors wait in memory until their file is written, so files are cut at this size
# (an OLMoE-1B-7B layer's experts, 0.4 GB at 32 kept, go in two files).
SHARD_BYTES = 256 * 2**20


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    kept: dict[int, list[int]] | None = None,
    scores: dict[int, np.ndarray] | None = None,
    routing_stats: RoutingStats | dict | None = None,
    select: dict[int, list[int]] | None = None,
    card: Mapping[str, Any] | None = None,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write ``model`` (pruned or not, optionally PEFT) as an HF checkpoint in ``out_dir``.

    Tensors are merged (LoRA folded in), sliced and written one at a time, in the checkpoint
    layout transformers saves (``revert_weight_conversion``), into files of at most
    ``max_shard_bytes``: the live model is never copied, so exporting a 7B model costs about
    one fused expert tensor, its per-expert copies and one file of memory.

    Parameters
    ----------
    model : nn.Module
        A model of a supported family, optionally a ``PeftModel`` or with fedmoe's expert
        LoRA (:mod:`fedmoe.train.expert_lora`).
    tokenizer : PreTrainedTokenizerBase or None
        Saved alongside when given.
    out_dir : str or Path
        Target directory; replaced atomically if it exists.
    kept : dict, optional
        Layer -> original ids of the exported experts (default: what slicing recorded, or
        ``select`` on an unpruned model).
    scores : dict, optional
        Layer -> the scores pruning used.
    routing_stats : RoutingStats or dict, optional
        The client's routing statistics (``RoutingStats.to_dict()`` form is stored).
    select : dict, optional
        Layer -> positions along the model's expert axis to export (default: all), for a
        shared model whose routing is restricted rather than sliced (``fedmoe.client.local``).
    card : Mapping, optional
        What the model card adds to the family and kept experts: the keyword arguments of
        :func:`fedmoe.prune.card.model_card` (``name``, ``base_model``, ``held_out_ppl``,
        ``base_ppl``, ``dataset``, ``config``).
    max_shard_bytes : int
        Largest weights file (a tensor larger than this gets a file of its own).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        If MoE layers would hold different numbers of experts.
    """
    out = Path(out_dir)
    adapter = MoEAdapter(model)
    layers = adapter.moe_layers()
    select = {layer.index: list(select[layer.index]) if select and layer.index in select
              else list(range(layer.num_experts)) for layer in layers}
    counts = {i: len(ids) for i, ids in select.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"cannot export a model whose MoE layers keep different numbers of experts "
            f"{counts}: an HF config has one expert count. Prune with prune.keep or "
            f"prune.keep_per_layer (equal counts) instead of prune.max_mb to export"
        )
    if kept is None:
        held = kept_experts(model)
        kept = {i: [held[i][j] for j in ids] for i, ids in select.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, tokenizer, tmp, adapter, kept, select, scores, routing_stats,
               max_shard_bytes)
        info = ExpertsInfo.read(tmp)
        model_card(family=info.family, kept=info.kept,
                   num_experts_original=info.num_experts_original,
                   **(card or {})).save(tmp / CARD_FILE)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model: nn.Module, tokenizer: Any, tmp: Path, adapter: MoEAdapter,
           kept: dict[int, list[int]], select: dict[int, list[int]],
           scores: dict[int, np.ndarray] | None,
           routing_stats: RoutingStats | dict | None, max_shard_bytes: int) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    sliced = any(len(ids) != layer.num_experts for layer, ids in
                 zip(adapter.moe_layers(), select.values(), strict=True))
    if hasattr(model, "merge_and_unload") and not sliced:  # a PeftModel's unmerged adapter
        model.save_pretrained(tmp / "adapter")
    weight_map = _write_shards(model, base, adapter, select, tmp, max_shard_bytes)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(weight_map.pop("__bytes__").values())},
         "weight_map": weight_map}, indent=2))
    _export_config(base, adapter, kept, select).save_pretrained(tmp)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if isinstance(routing_stats, RoutingStats):
        routing_stats = routing_stats.to_dict()
    ExpertsInfo(
        family=adapter.spec.model_type,
        num_experts_original=getattr(adapter.config, "fedmoe_num_experts_original", None)
        or adapter.num_experts,
        kept=kept,
        scores=None if scores is None
        else {int(i): np.asarray(s, dtype=np.float64).tolist() for i, s in scores.items()},
        routing_stats=routing_stats,
    ).write(tmp)


def _export_config(base: nn.Module, adapter: MoEAdapter, kept: dict[int, list[int]],
                   select: dict[int, list[int]]):
    """The config of the exported model: its expert count, the original ids, no fedmoe
    experts implementation (plain transformers loads it)."""
    config = copy.deepcopy(base.config)
    if getattr(config, "fedmoe_num_experts_original", None) is None:
        config.fedmoe_num_experts_original = adapter.num_experts
    setattr(config, adapter.spec.num_experts_key, len(next(iter(select.values()))))
    config.fedmoe_kept_experts = {str(i): [int(e) for e in ids] for i, ids in kept.items()}
    if getattr(config, "_experts_implementation", None) in (IMPLEMENTATION, "fedmoe_offload"):
        config._experts_implementation = None
    if adapter.spec.model_type == "deepseek_v3":
        positions = {i: torch.tensor(ids) for i, ids in select.items()}
        if not _deepseek_grouping(adapter, positions, "auto"):
            config.n_group = config.topk_group = 1
    return config


@torch.no_grad()
def _write_shards(model: nn.Module, base: nn.Module, adapter: MoEAdapter,
                  select: dict[int, list[int]], tmp: Path, max_bytes: int) -> dict:
    """The weights, merged and sliced one tensor at a time, in the original checkpoint layout,
    in safetensors files of at most ``max_bytes`` (a larger tensor gets a file of its own);
    a decoder layer never shares a file with another. Returns the weight map (and sizes)."""
    groups: dict[str, list[str]] = {}
    tensors = _base_tensors(model, base)
    for name in tensors:
        layer = adapter.layer_of(name)
        groups.setdefault("rest" if layer is None else f"layer{layer:04d}", []).append(name)
    merges = _lora_merges(model)
    files: list[tuple[Path, list[str], int]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal size
        if pending:
            path = tmp / f"part-{len(files):05d}.safetensors"
            save_file(pending, str(path), metadata={"format": "pt"})
            files.append((path, list(pending), size))
            pending.clear()
            size = 0

    for group in sorted(groups):
        for name in groups[group]:
            for key, part in _exported(name, tensors[name], merges, adapter, select, base,
                                       max_bytes):
                if pending and size + _nbytes(part) > max_bytes:
                    flush()
                pending[key] = part.contiguous()
                size += _nbytes(part)
        flush()
    weight_map: dict = {"__bytes__": {}}
    for n, (path, keys, size) in enumerate(files, 1):
        file = f"model-{n:05d}-of-{len(files):05d}.safetensors"
        path.rename(tmp / file)
        weight_map |= {k: file for k in keys}
        weight_map["__bytes__"][file] = size
    return weight_map


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Chunk(NamedTuple):
    select: dict[int, list[int]]  # the experts exported in this piece
    offset: int | None  # position of its first expert in the export (None: the whole tensor)


_EXPERT_KEY = re.compile(r"\.experts\.(\d+)\.")


def _expert_chunks(name: str, tensor: torch.Tensor, adapter: MoEAdapter,
                   select: dict[int, list[int]], max_bytes: int) -> list[_Chunk]:
    """A fused routed-expert tensor larger than ``max_bytes`` in pieces of experts, each at
    most ``max_bytes``: transformers' reversion to the per-expert checkpoint layout copies
    what it splits, so a whole tensor would be held twice (2 x 0.27 GB for an OLMoE-1B-7B
    layer's gate/up at 32 experts). Anything else is one piece."""
    layer = adapter.layer_of(name)
    whole = [_Chunk(select, None)]
    if layer is None or layer not in select or name.endswith(adapter.spec.router_buffers) \
            or adapter.role_of(name) != Role.ROUTED_EXPERTS \
            or tensor.shape[:1] != (adapter.layer(layer).num_experts,):
        return whole
    rows = select[layer]
    per_expert = _nbytes(tensor) // tensor.shape[0]
    step = max(max_bytes // max(per_expert, 1), 1)
    if per_expert * len(rows) <= max_bytes:
        return whole
    return [_Chunk(select | {layer: rows[a:a + step]}, a) for a in range(0, len(rows), step)]


def _exported(name: str, tensor: torch.Tensor, merges: dict[str, _Merge], adapter: MoEAdapter,
              select: dict[int, list[int]], base: nn.Module, max_bytes: int
              ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) pairs of one model tensor as exported, a large fused expert
    tensor a piece of experts at a time (:func:`_expert_chunks`), numbered as in the whole."""
    for chunk in _expert_chunks(name, tensor, adapter, select, max_bytes):
        parts = revert_weight_conversion(
            base, {name: _export_tensor(name, tensor, merges, adapter, chunk.select)})
        if chunk.offset is not None:
            parts = _renumbered(parts, chunk.offset)
            if parts is None:  # a checkpoint layout with the experts fused: export it whole
                yield from _exported(name, tensor, merges, adapter, select, base, 2**62)
                return
        yield from parts.items()


def _renumbered(parts: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor] | None:
    """Per-expert checkpoint keys of a piece starting at ``offset``, numbered as in the whole
    export; ``None`` when the keys are not per expert."""
    out = {}
    for key, part in parts.items():
        m = _EXPERT_KEY.search(key)
        if m is None:
            return None
        out[f"{key[:m.start()]}.experts.{int(m[1]) + offset}.{key[m.end():]}"] = part
    return out


def _base_tensors(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """Base-model name -> tensor, the trained copy of PEFT's ``modules_to_save`` taking the
    place of the original; LoRA factors and tied duplicates left out."""
    out: dict[str, torch.Tensor] = {}
    trained: set[str] = set()
    for name, tensor in base.state_dict(keep_vars=True).items():
        if ".lora_A." in name or ".lora_B." in name:  # PEFT's factors
            continue
        if name.rsplit(".", 1)[-1].startswith("lora_"):  # fedmoe's expert LoRA factors
            continue
        key = normalize_name(name)
        if ".original_module." in name and key in trained:
            continue
        if ".modules_to_save." in name:
            trained.add(key)
        out[key] = tensor
    if getattr(base.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    return out


class _Merge(NamedTuple):
    """How a tensor's LoRA is folded in on export: ``delta()`` is added to a PEFT layer's
    weight; ``merged(rows)`` is a fedmoe expert tensor already merged (one expert at a time)."""

    delta: Callable[[], torch.Tensor] | None = None
    merged: Callable[[list[int] | None], torch.Tensor] | None = None


def _lora_merges(model: nn.Module) -> dict[str, _Merge]:
    """Base name -> how its LoRA is merged (PEFT layers, fedmoe experts); experts stored
    packed (``train.quantize``) are exported dequantized, with or without factors."""
    from peft.tuners.lora import LoraLayer

    merges: dict[str, _Merge] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            name = getattr(module, "parameter_name", None) or "weight"
            merges[normalize_name(f"{path}.{name}")] = _Merge(delta=partial(
                lambda m: sum(m.get_delta_weight(a) for a in m.active_adapters), module))
        elif has_expert_lora(module) or is_quantized(module):
            for part in PARTS:
                merges[normalize_name(f"{path}.{part}_proj")] = _Merge(merged=partial(
                    lambda m, p, rows: merged_expert_weights(m, rows, (p,))[f"{p}_proj"],
                    module, part))
    return merges


def _export_tensor(name: str, tensor: torch.Tensor, merges: dict[str, _Merge],
                   adapter: MoEAdapter, select: dict[int, list[int]]) -> torch.Tensor:
    """One tensor as exported: LoRA merged, expert-indexed rows cut to ``select``."""
    layer_index = adapter.layer_of(name)
    rows = None
    if layer_index is not None and layer_index in select:
        layer = adapter.layer(layer_index)
        role = adapter.role_of(name) if not name.endswith(adapter.spec.router_buffers) \
            else Role.ROUTER
        if role in (Role.ROUTER, Role.ROUTED_EXPERTS) and tensor.shape[:1] == \
                (layer.num_experts,):
            rows = select[layer_index]
    merge = merges.get(name, _Merge())
    if merge.merged is not None:
        return merge.merged(rows).cpu()
    value = tensor.detach()
    if merge.delta is not None:
        value = (value.float() + merge.delta().float()).to(tensor.dtype)
    if rows is not None and len(rows) != tensor.shape[0]:
        value = value[torch.tensor(rows, device=value.device)]
    return value.to("cpu")  # written before anything changes the model: no copy


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped aside, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


