"""What a ClientApp process imports before it handles a message, and the warm worker.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message, so whatever
``fedmoe.fl.client_app`` imports is paid per message on every device. The time it takes is
measured by ``scripts/bench_deploy.py``; here the list is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedmoe.errors import Refused
from fedmoe.fl import worker
from fedmoe.fl.bridge import to_run_config
from tests.helpers.runs import REPO

# Heavy libraries and fedmoe's model, data and training code: the round's work imports
# them (in the warm worker, once), never the glue a message's process runs first.
HEAVY = ("torch", "transformers", "peft", "datasets", "flwr_datasets", "ray", "wandb",
         "matplotlib", "pandas", "safetensors", "fedmoe.train", "fedmoe.client",
         "fedmoe.checkpoints", "fedmoe.data", "fedmoe.prune", "fedmoe.fl.client_task",
         "fedmoe.fl.strategy")


def test_the_clientapp_module_imports_no_heavy_library():
    code = ("import json, sys; import flwr.supernode.runtime.run_clientapp; "
            "import fedmoe.fl.client_app; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    loaded = json.loads(out.stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY
                   or any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []
    assert "fedmoe.fl.worker" in loaded  # the hand-over to the warm worker is light too


def _context(tmp_path, *overrides: str, **node) -> Context:
    node_config = {"partition-id": 0, "state-dir": str(tmp_path / "state"),
                   "warm-worker": True, "warm-worker-idle-s": 30} | node
    return Context(run_id=7, node_id=11, node_config=node_config, state=RecordDict(),
                   run_config=to_run_config(["experiment=smoke", *overrides]))


@pytest.mark.slow
def test_warm_worker_serves_messages_in_one_process_and_raises_the_clients_errors(
        tmp_path, smoke_base):
    # Prepare: an evaluate instruction without global tensors (the base model's own)
    context = _context(tmp_path, **{"base-model": str(smoke_base)})
    content = RecordDict({"config": ConfigRecord({"server-round": 1}),
                          "arrays": ArrayRecord()})
    address = worker._address(context.node_config)
    try:
        # Execute: two messages, then one the device refuses (a role it does not send)
        first = worker.call("evaluate", content, context)
        with pytest.raises(AuthenticationError):  # only who holds the key may talk to it
            Client(str(address), family="AF_UNIX", authkey=b"x" * 32)
        second = worker.call("evaluate", content, context)
        refused = _context(tmp_path, "fl.aggregate=[router,routed_experts]",
                           **{"base-model": str(smoke_base)})
        with pytest.raises(Refused, match="routed_experts"):
            worker.call("train", content, refused)
    finally:
        _stop_worker(address)
    # Assert: the same model and data gave the same held-out loss, in one worker process,
    # reachable by this user alone
    assert first["metrics"]["eval_loss"] == second["metrics"]["eval_loss"]
    log = worker._log_path(address).read_text()
    assert log.count("serving at") == 1
    assert log.count("evaluate message of run 7 handled") == 2
    assert address.parent.stat().st_mode & 0o777 == 0o700
    assert worker._key_path(address).stat().st_mode & 0o777 == 0o600


def _stop_worker(address) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "fedmoe.fl.worker" in cmd and str(address) in cmd:
            proc.kill()
            proc.wait(10)
