"""``flower-superlink`` and ``flower-supernode`` command lines, and their environment."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from fedmoe.launch.certs import TlsFiles


def executable(name: str, bin_dir: str | Path | None = None) -> str:
    """An executable of ``bin_dir`` (another environment's), else of this interpreter's
    environment (the venv), else from PATH."""
    if bin_dir is not None:
        path = Path(bin_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"{bin_dir} has no {name}: install fedmoe in that "
                                    "environment (pip install fedmoe)")
        return str(path)
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flwr_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None,
             bin_dir: str | Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private ``FLWR_HOME``, no runtime installs.

    ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` keeps Flower from building a virtual
    environment per run (with uv, downloading torch); telemetry and update checks are off.
    The SuperNode's SuperExec polls for a message to run every 0.1 s instead of 1 s (each
    message waited half a second on average before its ClientApp process started).
    The environment's executables come first on ``PATH`` (a SuperNode starts its SuperExec
    and ClientApps by name): ``bin_dir``'s, else this interpreter's. Another environment
    gets no ``PYTHONPATH`` of ours: it runs what is installed in it.
    """
    env = dict(os.environ)
    if bin_dir is not None:
        env.pop("PYTHONPATH", None)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
        "PATH": f"{bin_dir or Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    })
    env.update(extra or {})
    return env


def superlink_command(
    port: int,
    *,
    tls: TlsFiles | None,
    auth: bool = True,
    host: str = "127.0.0.1",
    database: str | Path | None = None,
    simulation: bool = False,
) -> list[str]:
    """``flower-superlink`` arguments: TLS unless ``tls`` is None, SuperNode auth when ``auth``.

    With ``database`` the SuperLink keeps its state (runs, registered nodes) in that SQLite
    file across restarts; without it, in memory.
    """
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                "--ssl-keyfile", str(tls.server_key)]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    if simulation:
        cmd.append("--simulation")
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    node_config: Mapping[str, str | int | float | bool],
    *,
    root_certificates: str | Path | None,
    private_key: str | Path | None = None,
    host: str = "127.0.0.1",
    max_wait_time: float | None = None,
    bin_dir: str | Path | None = None,
    prestart: bool = True,
) -> list[str]:
    """``flower-supernode`` arguments.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``host:port``.
    port : int
        This SuperNode's own local API port (unique per SuperNode on a host).
    node_config : Mapping
        The node config its ClientApp reads (``partition-id`` or ``data-path``,
        ``state-dir``, ``memory-budget-mb``, ...).
    root_certificates : str or Path or None
        CA certificate of the SuperLink; ``None`` connects with ``--insecure``.
    private_key : str or Path or None
        The node's private key (SuperNode authentication).
    max_wait_time : float or None
        Give up reconnecting to the SuperLink after this many seconds.
    bin_dir : str or Path or None
        The ``bin`` directory of the environment to run it from (e.g. a device's slim venv);
        ``None``: this interpreter's. Run it with :func:`flwr_env` of the same ``bin_dir``.
    prestart : bool
        Run it under :mod:`fedmoe.fl.prestart`, whose SuperExec keeps the next ClientApp
        process started ahead of its message; ``False``: Flower's own SuperExec, which starts
        each ClientApp process when its message arrives.
    """
    python = executable("python", bin_dir) if bin_dir is not None else sys.executable
    launcher = ([python, "-m", "fedmoe.fl.prestart"] if prestart
                else [executable("flower-supernode", bin_dir)])
    cmd = [*launcher, "--superlink", superlink, "--host", host,
           "--port", str(port), "--node-config", node_config_arg(node_config)]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def node_config_arg(node_config: Mapping[str, str | int | float | bool]) -> str:
    """The ``--node-config`` string of a SuperNode: ``key=value`` pairs, TOML values.

    Strings are double-quoted; Flower's parser takes a quoted value up to the next double
    quote, so a string holding one is refused.
    """
    parts = []
    for key, value in node_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            value = str(value)
            if '"' in value or "\\" in value:
                raise ValueError(f"node config {key}={value!r}: no '\"' or '\\' allowed")
            text = f'"{value}"'
        parts.append(f"{key}={text}")
    return " ".join(parts)
