"""The SuperLink's Control API: through the ``flwr`` CLI (register a node, start a run), or in
this process (run and node status); and the app directory ``flwr run`` bundles."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedmoe.launch.commands import executable
from fedmoe.launch.flower_config import RUN_CONFIG_FILE, write_run_config


def flwr(args: Sequence[str], env: Mapping[str, str], cwd: str | Path | None = None,
         timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``flwr <args>`` (bounded in time); raise with its output when it fails."""
    proc = subprocess.run([executable("flwr"), *args], env=dict(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
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

    def close(self) -> None:
        self.client.close()


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
