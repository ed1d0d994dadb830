"""Export a client's personalized, pruned model as a standard Hugging Face checkpoint.

The directory loads with plain ``AutoModelForCausalLM.from_pretrained(out_dir)`` (no fedmoe
import): ``config.json`` carries the reduced expert count, weights are safetensors, and the
tokenizer sits next to them. ``fedmoe_experts.json`` adds what transformers does not keep:
the ORIGINAL ids of each layer's kept experts, their scores and routing statistics.

A PEFT model is exported merged (LoRA folded into the weights of a copy; the live model is
untouched) and its unmerged adapter goes to ``adapter/``: it loads with
``PeftModel.from_pretrained`` onto the base model pruned to the same experts
(``keep_experts(base, fedmoe_experts.json["kept"])`` on an unpruned base).

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
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedmoe.moe.adapter import MoEAdapter
from fedmoe.prune.card import CARD_FILE, model_card
from fedmoe.prune.scores import RoutingStats
from fedmoe.prune.slicing import kept_experts

EXPERTS_FILE = "fedmoe_experts.json"


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    kept: dict[int, list[int]] | None = None,
    scores: dict[int, np.ndarray] | None = None,
    routing_stats: RoutingStats | dict | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (pruned or not, optionally PEFT) as an HF checkpoint in ``out_dir``.

    Parameters
    ----------
    model : nn.Module
        A model of a supported family, optionally a ``PeftModel``.
    tokenizer : PreTrainedTokenizerBase or None
        Saved alongside when given.
    out_dir : str or Path
        Target directory; replaced atomically if it exists.
    kept : dict, optional
        Layer -> original ids of the kept experts (default: what slicing recorded).
    scores : dict, optional
        Layer -> the scores pruning used.
    routing_stats : RoutingStats or dict, optional
        The client's routing statistics (``RoutingStats.to_dict()`` form is stored).
    card : Mapping, optional
        What the model card adds to the family and kept experts: the keyword arguments of
        :func:`fedmoe.prune.card.model_card` (``name``, ``base_model``, ``held_out_ppl``,
        ``base_ppl``, ``dataset``, ``config``).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        If MoE layers hold different numbers of experts.
    """
    out = Path(out_dir)
    adapter = MoEAdapter(model)
    counts = {layer.index: layer.num_experts for layer in adapter.moe_layers()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"cannot export a model whose MoE layers keep different numbers of experts "
            f"{counts}: an HF config has one expert count. Prune with prune.keep or "
            f"prune.keep_per_layer (equal counts) instead of prune.max_mb to export"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(model, tokenizer, tmp, adapter, kept or kept_experts(model), scores, routing_stats)
        info = load_experts_info(tmp)
        model_card(family=info["family"], kept=info["kept"],
                   num_experts_original=info["num_experts_original"],
                   **(card or {})).save(tmp / CARD_FILE)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model: nn.Module, tokenizer: Any, tmp: Path, adapter: MoEAdapter,
           kept: dict[int, list[int]], scores: dict[int, np.ndarray] | None,
           routing_stats: RoutingStats | dict | None) -> None:
    if hasattr(model, "merge_and_unload"):  # a PeftModel
        model.save_pretrained(tmp / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if isinstance(routing_stats, RoutingStats):
        routing_stats = routing_stats.to_dict()
    info = {
        "family": adapter.spec.model_type,
        "num_experts_original": getattr(adapter.config, "fedmoe_num_experts_original", None)
        or adapter.num_experts,
        "kept": {str(i): [int(e) for e in ids] for i, ids in sorted(kept.items())},
        "scores": None if scores is None
        else {str(i): np.asarray(s, dtype=np.float64).tolist() for i, s in sorted(scores.items())},
        "routing_stats": routing_stats,
    }
    (tmp / EXPERTS_FILE).write_text(json.dumps(info, indent=1))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped aside, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_experts_info(path: str | Path) -> dict[str, Any]:
    """The ``fedmoe_experts.json`` of an exported checkpoint, layer keys as ints."""
    info = json.loads((Path(path) / EXPERTS_FILE).read_text())
    info["kept"] = {int(k): v for k, v in info["kept"].items()}
    if info.get("scores") is not None:
        info["scores"] = {int(k): np.asarray(v) for k, v in info["scores"].items()}
    return info
