"""The one bridge between the Hydra config and Flower's run config.

Flower's run config holds scalars only, so the whole Hydra configuration travels as the list of
Hydra overrides that produced it, under one key (``hydra-overrides``); every app re-composes
the same config from it. Nothing else reads ``context.run_config``. A device applies only the
overrides its policy accepts (:func:`device_config`, :mod:`fedmoe.fl.policy`).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from functools import lru_cache

from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_KEY = "hydra-overrides"
PRIMARY_CONFIG = "simulate"


def to_run_config(overrides: Sequence[str]) -> dict[str, str]:
    """Flower run config carrying ``overrides`` (each shell-quoted, space separated)."""
    return {RUN_CONFIG_KEY: " ".join(shlex.quote(o) for o in overrides)}


def overrides_from_run_config(run_config: Mapping[str, object]) -> list[str]:
    """The Hydra overrides a run config carries (none when the key is absent or empty)."""
    return shlex.split(str(run_config.get(RUN_CONFIG_KEY, "") or ""))


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the ``simulate`` primary config with ``overrides`` (read-only result)."""
    return _compose(tuple(overrides))


@lru_cache(maxsize=8)
def _compose(overrides: tuple[str, ...]) -> DictConfig:
    from fedmoe.compose import compose as compose_primary

    cfg = compose_primary(PRIMARY_CONFIG, overrides)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def config_from_run_config(run_config: Mapping[str, object]) -> DictConfig:
    """The Hydra config a Flower app runs with (cached per process)."""
    return compose(overrides_from_run_config(run_config))


def device_config(run_config: Mapping[str, object], node_config: Mapping[str, object],
                  extra: Sequence[str] = ()) -> DictConfig:
    """The config a ClientApp runs with: the run config's overrides a device accepts (all of
    them in the server's own trust domain), then ``extra`` settings of the node itself.

    Raises
    ------
    fedmoe.client.guards.Refused
        Naming the first override the device does not accept.
    """
    from fedmoe.fl.policy import device_overrides, trusts_run_config

    overrides = overrides_from_run_config(run_config)
    if not trusts_run_config(node_config):
        overrides = device_overrides(overrides)
    return compose([*overrides, *extra])
