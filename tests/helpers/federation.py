"""What only the deployment tests do to a LocalFederation: read the ServerApp's log, run an
app with a slow node, restart a SuperNode they crashed."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from fedmoe.launch.control import Control, stage_app
from fedmoe.launch.federation import LocalFederation
from fedmoe.launch.processes import Service

REPO = Path(__file__).resolve().parents[2]


def server_app_log(control: Control, run_id: int) -> str:
    """What the run's ServerApp has logged so far (``flwr log <run-id> --show``)."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    for response in control.client.StreamLogs(StreamLogsRequest(run_id=run_id,
                                                                 after_timestamp=0.0)):
        return response.log_output
    return ""


def stage_slow_app(dst: Path) -> Path:
    """The Flower App as :func:`~fedmoe.launch.control.stage_app` stages it, with
    :mod:`tests.helpers.slow_device` as its ClientApp: a node whose node config sets
    ``test-delay-s`` is that much slower in round ``test-delay-round``."""
    app = stage_app(REPO, dst)
    shutil.copy2(Path(__file__).with_name("slow_device.py"), app / "slow_device.py")
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    for line, new in (('clientapp = "fedmoe.fl.client_app:app"', 'clientapp = "slow_device:app"'),
                      ("fab-include = [", 'fab-include = ["slow_device.py", ')):
        if line not in text:
            raise AssertionError(f"{pyproject}: no {line!r} to change")
        text = text.replace(line, new)
    pyproject.write_text(text)
    return app


def restart_node(fed: LocalFederation, name: str,
                 node_config: Mapping[str, str | int | float | bool],
                 timeout: float = 180.0) -> Service:
    """Start SuperNode ``name`` again (same keys, same node config) after a crash.

    Flower 1.42 refuses to activate an authenticated node whose previous session it still
    counts as online (until 2 heartbeat intervals, 2 x 30 s, after its last heartbeat):
    it prints Flower exit code 305 and exits. This retries until the node is admitted.
    """
    keys = fed.node_keys(name, register=False) if fed.auth else None
    deadline = time.monotonic() + timeout
    while True:
        node = fed.start_node(name, node_config, keys=keys)
        try:
            node.wait_for(r"SuperNode ID: \d+", timeout=max(deadline - time.monotonic(), 1),
                          since=node.log_start)
            return node
        except RuntimeError:  # exited: not admitted (yet)
            fed.nodes.remove(node)
            node.stop()
            if (time.monotonic() > deadline
                    or "Failed to activate" not in node.log(since_start=True)):
                raise
            time.sleep(3.0)
