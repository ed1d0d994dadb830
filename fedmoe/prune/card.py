"""The Hugging Face model card (``README.md``) that every exported checkpoint carries.

Its YAML header is the Hub's metadata (``huggingface_hub.ModelCardData``): ``library_name``,
``pipeline_tag``, ``tags``, ``base_model`` (when the base is a hub id; a local base is named
under ``fedmoe.base_model`` instead, since the Hub accepts only repo ids there) and a
``model-index`` entry with the client's held-out perplexity. fedmoe's own block holds the
experts kept per MoE layer (count and original ids) and the run's resolved config, so the
checkpoint says how it was made without the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_FILE = "README.md"
TAGS = ["fedmoe", "mixture-of-experts", "federated-learning", "personalized"]


def model_card(
    *,
    family: str,
    kept: Mapping[int, list[int]],
    num_experts_original: int,
    name: str = "fedmoe export",
    base_model: str | None = None,
    held_out_ppl: float | None = None,
    base_ppl: float | None = None,
    dataset: str = "held-out data",
    config: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card of one export.

    Parameters
    ----------
    family : str
        The transformers ``model_type`` (``qwen2_moe``, ``olmoe``, ...).
    kept : Mapping
        MoE layer -> ORIGINAL ids of the experts the export holds.
    num_experts_original : int
        Routed experts per MoE layer before pruning.
    name : str
        The ``model-index`` name (e.g. ``fedmoe client 3 (tiny)``).
    base_model : str, optional
        The checkpoint the run started from: a hub id or a local directory.
    held_out_ppl, base_ppl : float, optional
        Perplexity of this model, and of the shared starting model, on ``dataset``.
    dataset : str
        What ``held_out_ppl`` was measured on.
    config : Mapping, optional
        The resolved fedmoe config of the run (``fedmoe.config`` in the YAML).
    """
    counts = {str(layer): len(ids) for layer, ids in sorted(kept.items())}
    pruned = any(n < num_experts_original for n in counts.values())
    hub_base = base_model if base_model and _is_hub_id(base_model) else None
    results = [] if held_out_ppl is None else [EvalResult(
        task_type="text-generation", dataset_type="local", dataset_name=dataset,
        metric_type="perplexity", metric_name="held-out perplexity",
        metric_value=round(float(held_out_ppl), 4))]
    fedmoe: dict[str, Any] = {
        "family": family, "base_model": base_model, "held_out_ppl": held_out_ppl,
        "base_ppl": base_ppl, "num_experts_original": num_experts_original,
        "experts_kept": counts,
        "kept_expert_ids": {str(layer): [int(e) for e in ids] for layer, ids in
                            sorted(kept.items())},
        "config": dict(config) if config is not None else None,
    }
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", base_model=hub_base,
        tags=[*TAGS, family, *(["pruned-experts"] if pruned else [])], model_name=name,
        eval_results=results or None, fedmoe={k: v for k, v in fedmoe.items() if v is not None},
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(name, fedmoe, pruned)}")


def _body(name: str, info: Mapping[str, Any], pruned: bool) -> str:
    kept = ", ".join(f"layer {layer}: {n}" for layer, n in info["experts_kept"].items())
    lines = [
        f"# {name}",
        "",
        f"A personalized Mixture-of-Experts model ({info['family']}) made with fedmoe: in "
        "federated training the router and shared experts are aggregated across clients, the "
        "routed experts are trained on the client's own data only.",
        "",
        f"- base model: `{info.get('base_model') or 'not recorded'}`",
        f"- routed experts kept per MoE layer (of {info['num_experts_original']}): {kept}"
        + (" (pruned to this client's own routing)" if pruned else ""),
    ]
    if info.get("held_out_ppl") is not None:
        start = info.get("base_ppl")
        lines.append(f"- held-out perplexity: {info['held_out_ppl']:.3f}"
                     + (f" (shared starting model: {start:.3f})" if start is not None else ""))
    lines += [
        "",
        "Loads with plain transformers: `AutoModelForCausalLM.from_pretrained(<this dir>)`. "
        "`fedmoe_experts.json` maps each layer's experts to their original ids; "
        "`fedmoe edge generate model_dir=<this dir>` runs it with the experts offloaded.",
        "",
    ]
    return "\n".join(lines)


def _is_hub_id(source: str) -> bool:
    """``owner/name`` that is no local path (what the Hub accepts as ``base_model``)."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists() \
        and not source.startswith((".", "~"))


def read_card(model_dir: str | Path) -> ModelCard:
    """The card of an exported checkpoint."""
    return ModelCard.load(Path(model_dir) / CARD_FILE)


def client_card(cfg: Any, client_id: int, base_model: str | Path,
                metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The :func:`model_card` arguments of a federated client's export: its held-out and
    shared-start perplexity (its evaluate metrics) and the run's resolved config."""
    from omegaconf import OmegaConf

    metrics = metrics or {}
    return {"name": f"fedmoe client {client_id} ({cfg.model.name})",
            "base_model": str(base_model), "held_out_ppl": metrics.get("eval_ppl"),
            "base_ppl": metrics.get("base_ppl"),
            "dataset": f"client {client_id} held-out split ({cfg.data.name})",
            "config": OmegaConf.to_container(cfg, resolve=True)}
