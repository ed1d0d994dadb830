"""Build or load a MoE causal LM from a ``model`` config group entry.

A preset (``conf/model/*.yaml``) names a family, optionally a ``path`` (hub id or local
directory) and the keyword arguments of the family's transformers config class. With no path,
the model is built from config (random weights; ``fedmoe pretrain`` trains it).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from fedmoe.moe.families import family_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def plain(cfg: Any) -> dict:
    """An OmegaConf node or mapping as a plain dict."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg) if isinstance(cfg, Mapping) else cfg


def build_config(model_cfg: Any, vocab_size: int | None = None) -> PretrainedConfig:
    """The transformers config of a preset built from ``model.config`` keys.

    Raises
    ------
    ValueError
        On an unsupported family or a top-k above the number of experts, naming the key.
    """
    m = plain(model_cfg)
    spec = family_spec(m["family"])
    kwargs = dict(m.get("config") or {})
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    config = AutoConfig.for_model(spec.model_type, **kwargs)
    validate_config(config, where="model.config")
    return config


def validate_config(config: PretrainedConfig, where: str = "model") -> None:
    """Reject a config whose routing cannot work, naming the offending key."""
    spec = family_spec(config.model_type)
    num_experts = getattr(config, spec.num_experts_key)
    top_k = getattr(config, spec.top_k_key)
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"{where}.{spec.top_k_key}={top_k} must be between 1 and "
            f"{where}.{spec.num_experts_key}={num_experts}"
        )


def load_model(
    model_cfg: Any, checkpoint: str | Path | None = None, vocab_size: int | None = None
) -> PreTrainedModel:
    """Load the model a preset describes.

    Parameters
    ----------
    model_cfg : DictConfig or dict
        A ``model`` group entry (``family``, ``path``, ``dtype``, ``config``).
    checkpoint : str or Path, optional
        Used when the preset has no ``path`` (e.g. the output of ``fedmoe pretrain``).
    vocab_size : int, optional
        Vocabulary size when building from config.
    """
    m = plain(model_cfg)
    dtype = DTYPES[m.get("dtype") or "float32"]
    source = m.get("path") or checkpoint
    if source:
        model = _from_pretrained(str(source), dtype)
        if model.config.model_type != family_spec(m["family"]).model_type:
            raise ValueError(
                f"model.path={source!r} holds a {model.config.model_type!r} model, "
                f"but model.family={m['family']!r}"
            )
        validate_config(model.config, where=f"config.json of {source}")
    else:
        model = AutoModelForCausalLM.from_config(build_config(m, vocab_size), dtype=dtype)
    if m.get("experts_implementation"):
        model.set_experts_implementation(m["experts_implementation"])
    return model


def _from_pretrained(source: str, dtype: torch.dtype) -> PreTrainedModel:
    """``from_pretrained``, with a one-line error naming the checkpoint when its weights file
    is truncated or corrupt (safetensors and torch name neither the file nor the cause)."""
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (SafetensorError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint {source!r}: its weights file is truncated or corrupt "
                         f"({first})") from e


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
