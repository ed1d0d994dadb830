"""Build or load a MoE causal LM from a ``model`` config group entry.

A preset (``conf/model/*.yaml``) names a family, optionally a ``path`` (hub id or local
directory) and the keyword arguments of the family's transformers config class. With no path,
the model is built from config (random weights; ``fedmoe pretrain`` trains it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

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


def from_pretrained(loader: Any, source: str | Path, key: str = "model.path", **kwargs) -> Any:
    """``loader.from_pretrained(source, **kwargs)`` (a transformers Auto class); a source
    that is neither a local directory nor a hub model in the local HF cache (offline, or no
    network) raises a one-line ``FileNotFoundError`` naming ``key`` instead of transformers'
    multi-line ``OSError``."""
    path = Path(str(source)).expanduser()
    if str(source).startswith(("/", ".", "~")) and not path.exists():
        raise FileNotFoundError(f"{key}={str(source)!r} does not exist (a local checkpoint "
                                "directory or a hub id such as allenai/OLMoE-1B-7B-0924)")
    try:
        return loader.from_pretrained(str(path if path.exists() else source), **kwargs)
    except OSError as error:
        if path.exists():
            raise
        raise FileNotFoundError(
            f"{key}={str(source)!r}: no such local directory, and the hub model could not be "
            f"loaded (offline or not in the local Hugging Face cache): download it once with "
            f"`hf download {source}` where there is network, or set {key}=<local dir>"
        ) from error


def check_model_path(source: str | Path, key: str = "model.path") -> str:
    """``source`` as a string when its config loads (a local checkpoint, or a hub model that
    is cached or reachable); else :func:`from_pretrained`'s one-line error. Cheap: the
    config only, before a launcher starts workers that would each fail on it."""
    from_pretrained(AutoConfig, source, key)
    return str(source)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
