"""The Simulation Engine's backend config (Ray), from ``fl.backend`` and ``fl.client_resources``.

``fl.backend.init_args`` go to ``ray.init`` as they are, over fedmoe's quiet defaults: set
``address`` to join a running Ray cluster (``auto``, ``<head ip>:6379`` or
``ray://<head ip>:10001``) instead of starting one on this machine; ``num_cpus``,
``num_gpus`` or ``object_store_memory`` size a local one. ``fl.client_resources`` is what each
virtual client (a Ray actor) reserves, so it also sets how many run at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf


def backend_config(fl: DictConfig | Mapping[str, Any], verbose: bool = False) -> dict[str, Any]:
    """``{"client_resources": ..., "init_args": ...}`` for ``flwr``'s Ray backend.

    Parameters
    ----------
    fl : DictConfig or Mapping
        The ``fl`` config group (``client_resources`` and optionally ``backend.init_args``).
    verbose : bool
        Ray's own logs at INFO and forwarded to this process (else errors only).
    """
    plain = OmegaConf.to_container(OmegaConf.create(fl), resolve=True)  # nested nodes too
    defaults = {"logging_level": "INFO" if verbose else "ERROR", "log_to_driver": verbose,
                "include_dashboard": False, "configure_logging": True}
    init_args = (plain.get("backend") or {}).get("init_args") or {}
    user = {k: v for k, v in init_args.items() if v is not None}  # null: Ray's own default
    if user.get("address"):
        # A running cluster has its dashboard settled already; ray.init refuses the key then.
        defaults.pop("include_dashboard")
    return {"client_resources": dict(plain.get("client_resources") or {}),
            "init_args": defaults | user}
