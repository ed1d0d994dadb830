"""A whole federation on this machine: one SuperLink and SuperNodes on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedmoe.launch.certs import NodeKeys, generate_supernode_keys, generate_tls_certificates
from fedmoe.launch.commands import flwr_env, superlink_command, supernode_command
from fedmoe.launch.control import Control, register_supernode, start_run
from fedmoe.launch.flower_config import write_superlink_connection
from fedmoe.launch.processes import Service, free_port, stop_all, wait_for_port


class LocalFederation:
    """One SuperLink and any number of SuperNodes on 127.0.0.1: tests, benchmarks, demos.

    TLS and SuperNode authentication are on unless turned off. Every process is stopped by
    its pid on :meth:`stop` (or leaving the ``with`` block).

    Parameters
    ----------
    root : str or Path
        Working directory: ``flwr/`` (FLWR_HOME), ``certs/``, ``keys/``, ``logs/``.
    tls : bool
        Serve TLS with a fresh test CA (off: ``--insecure`` everywhere).
    auth : bool
        ``--enable-supernode-auth``: only registered SuperNode keys may join.
    database : bool
        Keep the SuperLink's state in ``superlink.db`` (registered nodes survive a restart).
    env : Mapping[str, str] or None
        Extra environment for every process (e.g. ``FEDMOE_CACHE``).
    connection : str
        Name of the SuperLink connection in ``$FLWR_HOME/config.toml``.

    The SuperLink runs from this interpreter's environment; a SuperNode may run from another
    (:meth:`start_node` with ``python``), e.g. a device's slim install.
    """

    def __init__(self, root: str | Path, *, tls: bool = True, auth: bool = True,
                 database: bool = False, env: Mapping[str, str] | None = None,
                 connection: str = "fedmoe") -> None:
        self.root = Path(root).resolve()
        self.extra_env = dict(env or {})
        self.env = flwr_env(self.root / "flwr", self.extra_env)
        self.tls = generate_tls_certificates(self.root / "certs") if tls else None
        self.auth, self.connection = auth, connection
        self.database = self.root / "superlink.db" if database else None
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.superlink: Service | None = None
        self.nodes: list[Service] = []
        self._control: Control | None = None
        write_superlink_connection(self.root / "flwr", connection, self.address,
                                   root_certificates=self.tls.ca_cert if self.tls else None,
                                   insecure=self.tls is None)

    @property
    def ca_cert(self) -> Path | None:
        return self.tls.ca_cert if self.tls else None

    def start_superlink(self, timeout: float = 60.0) -> Service:
        """Start (or restart, on the same port) the SuperLink and wait until it serves."""
        cmd = superlink_command(self.port, tls=self.tls, auth=self.auth, database=self.database)
        self.superlink = Service("superlink", cmd, self.root / "logs" / "superlink.log",
                                 self.env).start()
        wait_for_port("127.0.0.1", self.port, timeout)
        self.superlink.wait_for(r"Uvicorn running|Starting the SuperLink Fleet", timeout,
                                since=self.superlink.log_start)
        self._control = None
        return self.superlink

    @property
    def control(self) -> Control:
        if self._control is None:
            self._control = Control(self.address, self.ca_cert)
        return self._control

    def node_keys(self, name: str, register: bool = True) -> NodeKeys:
        """A key pair for SuperNode ``name`` (reused if present), registered when asked."""
        keys = NodeKeys(self.root / "keys" / name, self.root / "keys" / f"{name}.pub")
        if not keys.private_key.exists():
            keys = generate_supernode_keys(self.root / "keys", name)
        if register and self.auth:
            register_supernode(keys.public_key, self.connection, self.env)
        return keys

    def start_node(self, name: str, node_config: Mapping[str, str | int | float | bool], *,
                   keys: NodeKeys | None = None, register: bool = True,
                   python: str | Path | None = None, prestart: bool = True) -> Service:
        """Start a SuperNode with ``node_config``; with auth, its keys are made and registered
        first unless ``keys`` are given (``register=False``: an unregistered node).

        ``python``: the interpreter of the environment to run it from (its ``bin`` directory
        holds ``flower-supernode``, and the SuperExec and ClientApps it starts are taken from
        there too); ``None``: this process's. ``prestart``: its next ClientApp process is
        started ahead of the message (:mod:`fedmoe.fl.prestart`); ``False``: Flower's SuperExec.
        """
        if self.auth and keys is None:
            keys = self.node_keys(name, register=register)
        # Not resolved: a venv's bin/python links to the base interpreter, outside the venv.
        bin_dir = None if python is None else Path(python).parent
        env = self.env if bin_dir is None else flwr_env(self.root / "flwr", self.extra_env,
                                                        bin_dir)
        cmd = supernode_command(self.address, free_port(), node_config,
                                root_certificates=self.ca_cert,
                                private_key=keys.private_key if keys else None, bin_dir=bin_dir,
                                prestart=prestart)
        node = Service(name, cmd, self.root / "logs" / f"{name}.log", env).start()
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while True:
            online = [n for n, status in self.control.nodes().items() if status == "online"]
            if len(online) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(online)} of {count} SuperNodes online after "
                                   f"{timeout:.0f} s: {self.control.nodes()}")
            time.sleep(0.5)

    def run(self, app_dir: str | Path, overrides: Sequence[str],
            federation_config: str | None = None) -> int:
        """``flwr run <app_dir> <connection>`` with the Hydra ``overrides``; the run id."""
        return start_run(app_dir, self.connection, overrides, self.env, federation_config)

    def wait(self, run_id: int, timeout: float) -> tuple[str, str]:
        """Wait for the run to finish; ``(status, details)``."""
        return self.control.wait_for_run(run_id, timeout)

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, each by its pid (and its children)."""
        if self._control is not None:
            self._control.close()
            self._control = None
        stop_all([*self.nodes, self.superlink])

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
