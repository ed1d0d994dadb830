"""Flower's config files: SuperLink connections in ``$FLWR_HOME/config.toml``, run configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "config.toml"
RUN_CONFIG_FILE = "run_config.toml"
LOCAL_ADDRESS = ":local:"


def write_superlink_connection(
    flwr_home: str | Path,
    name: str,
    address: str,
    *,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    default: bool = True,
) -> Path:
    """Add (or replace) the connection ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``.

    Parameters
    ----------
    flwr_home : str or Path
        The ``FLWR_HOME`` of the machine that runs ``flwr`` (created when missing).
    name : str
        Connection name: the second argument of ``flwr run . <name>``.
    address : str
        The SuperLink's ``host:port``, or ``":local:"`` for a managed local simulation.
    root_certificates : str or Path or None
        CA certificate that signed the SuperLink's certificate (TLS).
    insecure : bool
        Plain HTTP (only for a SuperLink started with ``--insecure``).
    default : bool
        Make it the default connection.

    Returns
    -------
    Path
        The config file.
    """
    import tomli
    import tomli_w

    if address != LOCAL_ADDRESS and not insecure and root_certificates is None:
        raise ValueError(f"connection {name!r}: a TLS SuperLink needs root_certificates "
                         "(the CA certificate), or insecure=True for an --insecure one")
    path = Path(flwr_home) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tomli.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    entry: dict = {"address": address}
    if root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    if insecure:
        entry["insecure"] = True
    superlink[name] = entry
    if default or "default" not in superlink:
        superlink["default"] = name
    path.write_text(tomli_w.dumps(config))
    return path


def write_run_config(path: str | Path, overrides: Sequence[str]) -> Path:
    """A ``--run-config`` TOML file carrying the Hydra ``overrides`` (the one bridge)."""
    import tomli_w

    from fedmoe.fl.bridge import to_run_config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(to_run_config(list(overrides))))
    return path
