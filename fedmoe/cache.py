"""Where fedmoe keeps what it can rebuild: the corpus, base checkpoints, edge expert stores.

One root for every command and working directory, so a second run anywhere reuses the
pretrained base model: ``$FEDMOE_CACHE`` when set, else the user's cache directory of the
platform (``platformdirs``: ``$XDG_CACHE_HOME/fedmoe`` or ``~/.cache/fedmoe`` on Linux,
``~/Library/Caches/fedmoe`` on macOS, ``%LOCALAPPDATA%\\fedmoe\\Cache`` on Windows).

The YAML configs read the same root through the ``fedmoe.user_cache`` resolver:
``cache_dir: ${oc.env:FEDMOE_CACHE,${fedmoe.user_cache:}}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs
from omegaconf import OmegaConf

ENV_VAR = "FEDMOE_CACHE"


def user_cache_dir() -> Path:
    """The platform's per-user cache directory of fedmoe (ignores ``$FEDMOE_CACHE``)."""
    # appauthor=False: no vendor folder on Windows; the XDG variable is read at each call.
    return Path(platformdirs.user_cache_dir("fedmoe", appauthor=False))


def cache_root() -> Path:
    """``$FEDMOE_CACHE`` when set and not empty, else :func:`user_cache_dir`."""
    return Path(os.environ.get(ENV_VAR) or user_cache_dir())


def register_resolver() -> None:
    """Register ``${fedmoe.user_cache:}`` with OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("fedmoe.user_cache", lambda: str(user_cache_dir()),
                                    replace=True)


register_resolver()
