"""The one way to compose fedmoe's Hydra configs outside a command line.

``conf_dir()`` finds ``conf/``; ``compose(primary, overrides)`` composes one of its primary
configs (``simulate``, ``pretrain``, ``analyze``, ...) exactly as the ``fedmoe`` command would,
also from inside a running Hydra app; ``hydra_value`` writes a value as an override.
(Named ``compose``, not ``conf``: an installed wheel holds ``conf/`` as ``fedmoe/conf``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def conf_dir() -> Path:
    """``conf/`` inside an installed wheel, else the repository's top-level ``conf/``."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def compose(primary: str, overrides: Sequence[str] = (), *,
            return_hydra_config: bool = False) -> DictConfig:
    """The primary config ``conf/<primary>.yaml`` with ``overrides``.

    Inside a running Hydra app (a ``fedmoe`` command composing a config), the app's config
    search path is used, so configs a user added to it (``hydra.searchpath``) are found.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import fedmoe.config  # noqa: F401  (fedmoe's resolvers)

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(primary, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(primary, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def hydra_value(value: object) -> str:
    """``value`` as a Hydra override value that reads back as the same string: as is when
    it does, else quoted (a sweep's job directories hold ``=`` and ``,``, which Hydra would
    read as a key or a sweep list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = str(value)
    try:
        if OverridesParser.create().parse_override(f"k={text}").value() == text:
            return text
    except Exception:  # a parse error: quote it
        pass
    return "'" + text.replace("'", "\\'") + "'"
