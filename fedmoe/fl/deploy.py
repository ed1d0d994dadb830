"""Deployment helpers: TLS certificates, SuperNode keys, Flower config, processes, `flwr`.

Everything a launcher (``scripts/deploy/*``) or a deployment test needs to run fedmoe on a
real Flower federation (Flower 1.42): one ``flower-superlink`` and one ``flower-supernode``
per device, the run started with ``flwr run . <connection>``. The Hydra configuration reaches
the apps through the one bridge (:mod:`fedmoe.fl.bridge`), written as a run-config TOML file.

Flower 1.42 facts this module relies on:

- The SuperLink serves its Fleet, Control and Runtime APIs on one HTTP(S) port (``--port``);
  TLS needs ``--ssl-ca-certfile``, ``--ssl-certfile`` and ``--ssl-keyfile`` together.
- ``--enable-supernode-auth`` admits only SuperNodes whose public key was registered with
  ``flwr supernode register <public key> <connection>``; a SuperNode signs with
  ``--auth-supernode-private-key``. Keys are NIST EC curves in OpenSSH format.
- ``flwr`` reads SuperLink connections from ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``
  with ``address``, ``root-certificates`` or ``insecure``); ``address = ":local:"`` makes
  ``flwr`` start a managed local SuperLink in simulation mode.
- Every SuperNode on one host needs its own ``--port`` (its ClientAppIo/Runtime API).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

CONFIG_FILE = "config.toml"
RUN_CONFIG_FILE = "run_config.toml"
LOCAL_ADDRESS = ":local:"


# --- TLS certificates and SuperNode keys ---------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test certificate authority and the SuperLink's server certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's ECDSA key pair (OpenSSH formats, as Flower expects)."""

    private_key: Path
    public_key: Path


def _write_secret(path: Path, data: bytes) -> Path:
    """Write a private key readable by its owner only, whatever mode an old file had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # open's mode applies to a new file only; before any byte is written
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def generate_tls_certificates(
    out_dir: str | Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
) -> TlsFiles:
    """A self-signed CA and a server certificate for ``hosts``, signed by it.

    Parameters
    ----------
    out_dir : str or Path
        Directory for ``ca.crt``, ``server.pem`` and ``server.key`` (created).
    hosts : Sequence[str]
        Names the SuperLink is reached by: IP addresses become IP SANs, others DNS SANs.
        The first one is the certificate's common name.
    days : int
        Validity of both certificates.

    Returns
    -------
    TlsFiles
        The CA certificate (give it to SuperNodes and to ``flwr``), the server certificate
        and its private key (give them to the SuperLink).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=days))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmoe test CA")])
    ca_cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(x509, cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder(**valid)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(x509, cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_secret(files.server_key, server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


def _key_usage(x509, cert_sign: bool):
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def generate_supernode_keys(out_dir: str | Path, name: str) -> NodeKeys:
    """An ECDSA P-384 key pair for SuperNode authentication.

    Writes ``<name>`` (OpenSSH private key, mode 600: it stays on the device, passed to
    ``flower-supernode --auth-supernode-private-key``) and ``<name>.pub`` (OpenSSH public
    key: registered with ``flwr supernode register``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    out = Path(out_dir)
    keys = NodeKeys(out / name, out / f"{name}.pub")
    _write_secret(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


# --- Flower configuration ------------------------------------------------------------------


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


# --- commands ------------------------------------------------------------------------------


def _bin(name: str, bin_dir: str | Path | None = None) -> str:
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
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port),
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
    launcher = ([_bin("python", bin_dir) if bin_dir is not None else sys.executable, "-m",
                 "fedmoe.fl.prestart"] if prestart else [_bin("flower-supernode", bin_dir)])
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


# --- processes -----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Service:
    """A long-running process (SuperLink, SuperNode) with its log file; stopped by its pid.

    Parameters
    ----------
    name : str
        For messages.
    cmd : Sequence[str]
        The command.
    log_path : str or Path
        stdout and stderr go here (appended, so a restart keeps the history).
    env : Mapping[str, str] or None
        Environment (see :func:`flwr_env`).
    cwd : str or Path or None
        Working directory.
    """

    def __init__(self, name: str, cmd: Sequence[str], log_path: str | Path,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> None:
        self.name, self.cmd = name, list(cmd)
        self.log_path = Path(log_path)
        self.env, self.cwd = dict(env) if env else None, cwd
        self.proc: subprocess.Popen | None = None
        self.log_start = 0

    def start(self) -> Service:
        """Start the process in a session of its own (its pid is its process group id), so
        :meth:`stop` also reaches children it left behind; ``log_start`` is where this start's
        output begins in the log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.log_start = self.log_path.stat().st_size
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self, since_start: bool = False, since: int = 0) -> str:
        """The log's text from byte offset ``since`` (this start's part with ``since_start``)."""
        if not self.log_path.exists():
            return ""
        offset = self.log_start if since_start else since
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> re.Match:
        """Wait until ``pattern`` (a regex) appears in the log after byte offset ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(since=since))
            if match:
                return match
            if not self.alive():
                code = self.proc.returncode if self.proc else "-"
                raise RuntimeError(f"{self.name} exited ({code}) before logging {pattern!r}; "
                                   f"log tail:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {pattern!r} within {timeout:.0f} s; "
                                   f"log tail:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self, timeout: float = 10.0, kill: bool = False) -> None:
        """Stop the process and every process it started (ServerApp, ClientApps), by pid.

        ``kill=True`` sends SIGKILL at once: a crash, as a test of faults needs it.
        """
        if self.proc is None:
            return
        stop_tree(self.proc.pid, timeout=timeout, kill=kill)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)
        # Children the process left behind (e.g. a SuperExec whose SuperNode exited) are
        # still in its process group, whose id is its pid.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(services: Sequence[Service | None], timeout: float = 10.0) -> None:
    """Stop many services at once: terminate every process tree, then wait for all."""
    trees = []
    for service in services:
        if service is not None and service.proc is not None:
            try:
                root = psutil.Process(service.proc.pid)
                trees += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    for p in trees:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(trees, timeout=timeout)
    for service in services:
        if service is not None:
            service.stop(timeout=timeout)  # kills what is left, reaps, clears the group


def stop_tree(pid: int, timeout: float = 10.0, kill: bool = False) -> None:
    """Terminate (or kill) process ``pid`` and all its descendants, each by its own pid."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


# --- the `flwr` CLI ------------------------------------------------------------------------


def flwr(args: Sequence[str], env: Mapping[str, str], cwd: str | Path | None = None,
         timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``flwr <args>`` (bounded in time); raise with its output when it fails."""
    proc = subprocess.run([_bin("flwr"), *args], env=dict(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"`flwr {' '.join(args)}` failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _json_out(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object ``flwr ... --format json`` printed (it may follow other lines)."""
    text = proc.stdout
    for start in [m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)]:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    raise RuntimeError(f"no JSON in `flwr` output:\n{text[-2000:]}")


def register_supernode(public_key: str | Path, connection: str, env: Mapping[str, str]) -> int:
    """``flwr supernode register``: admit the key's owner to the SuperLink; its node id."""
    proc = flwr(["supernode", "register", str(public_key), connection, "--format", "json"], env)
    return int(_json_out(proc)["node-id"])


def start_run(app_dir: str | Path, connection: str, overrides: Sequence[str],
              env: Mapping[str, str], federation_config: str | None = None,
              timeout: float = 180.0) -> int:
    """``flwr run <app_dir> <connection>`` with the Hydra ``overrides``; the run id.

    The overrides travel as the run config's ``hydra-overrides`` key, from a TOML file next
    to Flower's config (so no shell quoting is involved).
    """
    run_config = write_run_config(Path(env["FLWR_HOME"]) / RUN_CONFIG_FILE, overrides)
    args = ["run", str(app_dir), connection, "--run-config", str(run_config), "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    out = _json_out(flwr(args, env, cwd=app_dir, timeout=timeout))
    if not out.get("success"):
        raise RuntimeError(f"flwr run did not start a run: {out}")
    return int(out["run-id"])


class Control:
    """The SuperLink's Control API, in this process (polling with ``flwr list`` would start a
    Python process per poll).

    Parameters
    ----------
    address : str
        The SuperLink's ``host:port``.
    root_certificates : str or Path or None
        CA certificate of a TLS SuperLink; ``None`` for an ``--insecure`` one.
    """

    def __init__(self, address: str, root_certificates: str | Path | None) -> None:
        from flwr.supercore.control import ControlHttpClient

        self.client = ControlHttpClient.from_server_address(
            address, insecure=root_certificates is None,
            root_certificates=None if root_certificates is None else str(root_certificates),
            interceptors=[])

    def run_status(self, run_id: int) -> tuple[str, str]:
        """``(status, details)`` of a run; status is ``pending``, ``starting``, ``running``
        or ``finished:<completed|failed|stopped>``."""
        from flwr.proto.control_pb2 import ListRunsRequest

        runs = self.client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise RuntimeError(f"run {run_id} unknown to the SuperLink")
        status = runs[run_id].status
        text = status.status + (f":{status.sub_status}" if status.sub_status else "")
        return text, status.details

    def wait_for_run(self, run_id: int, timeout: float, poll: float = 1.0) -> tuple[str, str]:
        """Wait until the run has finished; its final ``(status, details)``."""
        deadline = time.monotonic() + timeout
        while True:
            status, details = self.run_status(run_id)
            if status.startswith("finished"):
                return status, details
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {status} after {timeout:.0f} s")
            time.sleep(poll)

    def nodes(self) -> dict[int, str]:
        """Node id -> status (``registered``, ``online``, ``offline``, ...) of every node."""
        from flwr.proto.control_pb2 import ListNodesRequest

        response = self.client.ListNodes(ListNodesRequest())
        return {int(info.node_id): info.status for info in response.nodes_info}

    def logs(self, run_id: int) -> str:
        """What the run's ServerApp has logged so far (``flwr log <run-id> --show``)."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        for response in self.client.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                                  after_timestamp=0.0)):
            return response.log_output
        return ""

    def close(self) -> None:
        self.client.close()


# --- a whole federation on this machine ----------------------------------------------------


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

    def restart_node(self, name: str, node_config: Mapping[str, str | int | float | bool],
                     timeout: float = 180.0) -> Service:
        """Start SuperNode ``name`` again (same keys, same node config) after a crash.

        Flower 1.42 refuses to activate an authenticated node whose previous session it still
        counts as online (until 2 heartbeat intervals, 2 x 30 s, after its last heartbeat):
        it prints Flower exit code 305 and exits. This retries until the node is admitted.
        """
        keys = self.node_keys(name, register=False) if self.auth else None
        deadline = time.monotonic() + timeout
        while True:
            node = self.start_node(name, node_config, keys=keys)
            try:
                node.wait_for(r"SuperNode ID: \d+", timeout=max(deadline - time.monotonic(), 1),
                              since=node.log_start)
                return node
            except RuntimeError:  # exited: not admitted (yet)
                self.nodes.remove(node)
                node.stop()
                if (time.monotonic() > deadline
                        or "Failed to activate" not in node.log(since_start=True)):
                    raise
                time.sleep(3.0)

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


def stage_app(app_dir: str | Path, dst: str | Path) -> Path:
    """Copy what the Flower App bundle holds (``pyproject.toml``, ``fedmoe/``, ``conf/``) to
    ``dst``: ``flwr run`` on the copy skips walking a repository's virtualenv and caches."""
    src, dst = Path(app_dir).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fedmoe", "conf"):
        shutil.copytree(src / name, dst / name, ignore=ignore, dirs_exist_ok=True)
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst
