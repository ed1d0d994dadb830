"""fedmoe.fl.prestart's executor: one ClientApp process started ahead of its task, handed the
task's token on stdin, the next one started only after that task's process has exited.

The spares here are real processes running a stand-in for Flower's ClientApp (it writes the
token it receives and waits for a file before exiting), so the hand-over can be observed; the
whole path with Flower's ``run_clientapp`` runs in tests/deploy (every launcher-started
SuperNode is prestarted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec

from fedmoe.fl import prestart
from fedmoe.fl.prestart import PrestartedExecutor
from tests.helpers.runs import REPO

# Writes the token line it is given to <dir>/<pid>.json, then exits when <dir>/release exists.
STAND_IN = """
import json, os, sys, time
from pathlib import Path
out = Path(sys.argv[1])
token = sys.stdin.buffer.readline().decode().strip()
(out / f"{os.getpid()}.json").write_text(json.dumps({"token": token}))
while not (out / "release").exists():
    time.sleep(0.05)
"""


class StandIn(PrestartedExecutor):
    def __init__(self, out: Path) -> None:
        super().__init__("127.0.0.1:9", insecure=True, root_certificates_path=None)
        self.out = out

    def spare_command(self) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(self.out)]


def spec(token: str, task_type: TaskType = TaskType.CLIENT_APP, **kw) -> ExecutionSpec:
    fields = {"task_type": task_type, "runtime_api_address": "127.0.0.1:9", "token": token,
              "insecure": True, "root_certificates_path": None,
              "runtime_dependency_install": False, "parent_pid": None,
              "suppress_output": False, "task_id": 1} | kw
    return ExecutionSpec(**fields)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def executor(tmp_path):
    ex = StandIn(tmp_path)
    yield ex
    (tmp_path / "release").touch()
    ex.close()
    for proc in (ex.spare, ex.task):
        if proc is not None:
            proc.wait(timeout=10)


def test_a_clientapp_task_goes_to_the_spare_and_the_next_spare_waits_for_it_to_exit(
        executor, tmp_path):
    # Prepare
    executor.reconcile()
    first = executor.spare

    # Execute: a task arrives; the loop reconciles while it runs, then after it exited
    assert executor.launch(spec("a" * 64)).status.value == "accepted"
    wait_for(lambda: (tmp_path / f"{first.pid}.json").exists())
    executor.reconcile()
    spare_while_running = executor.spare
    (tmp_path / "release").touch()
    first.wait(timeout=10)
    executor.reconcile()

    # Assert
    assert json.loads((tmp_path / f"{first.pid}.json").read_text()) == {"token": "a" * 64}
    assert spare_while_running is None  # no imports competing with the running task
    assert executor.spare is not None and executor.spare.pid != first.pid
    assert executor.spare.poll() is None


def test_without_a_ready_spare_or_for_other_tasks_flower_starts_the_process(executor):
    # Prepare: a spare is ready
    executor.reconcile()
    spare = executor.spare

    # Execute / Assert: what the spare cannot run is not handed to it
    for other in (spec("b" * 64, TaskType.SERVER_APP), spec("c" * 64, insecure=False,
                                                             root_certificates_path="/ca.crt"),
                  spec("d" * 64, runtime_dependency_install=True)):
        assert not executor.takes(other)
    assert executor.takes(spec("e" * 64))
    spare.kill()
    spare.wait(timeout=10)
    assert not executor.takes(spec("e" * 64))  # died: Flower's launch instead


def test_a_spare_that_dies_without_a_task_is_started_again_only_after_a_pause(executor,
                                                                             monkeypatch):
    # Prepare
    monkeypatch.setattr(prestart, "SPARE_RETRY_S", 0.5)
    executor.reconcile()
    dead = executor.spare
    dead.kill()
    dead.wait(timeout=10)

    # Execute
    executor.reconcile()
    right_after = executor.spare
    time.sleep(0.6)
    executor.reconcile()

    # Assert
    assert right_after is None
    assert executor.spare is not None and executor.spare.pid != dead.pid


def test_a_task_still_running_after_the_grace_period_does_not_hold_up_the_next_spare(
        executor, tmp_path, monkeypatch):
    # Prepare: a task that never ends (its stand-in waits for the release file)
    monkeypatch.setattr(prestart, "TASK_GRACE_S", 0.5)
    executor.reconcile()
    stuck = executor.spare
    executor.launch(spec("f" * 64))
    wait_for(lambda: (tmp_path / f"{stuck.pid}.json").exists())

    # Execute
    executor.reconcile()
    within_grace = executor.spare
    time.sleep(0.6)
    executor.reconcile()

    # Assert: the next message still finds a process started ahead
    assert within_grace is None and stuck.poll() is None
    assert executor.spare is not None and executor.takes(spec("g" * 64))


def test_close_stops_the_spare(tmp_path):
    executor = StandIn(tmp_path)
    executor.reconcile()
    spare = executor.spare
    executor.close()
    assert spare.wait(timeout=10) is not None


def test_a_real_spare_imports_flower_but_no_heavy_library_and_exits_with_its_superexec():
    # Prepare: a parent that is gone at once (the spare's SuperExec)
    parent = subprocess.Popen([sys.executable, "-c", "pass"])
    parent.wait()
    code = ("import json, sys, runpy; sys.argv = ['x', '--spare', '--runtime-api-address', "
            "'127.0.0.1:9', '--insecure', '--parent-pid', sys.argv[1]]; "
            "import fedmoe.fl.prestart as p; import flwr.supernode.runtime.run_clientapp; "
            "print(json.dumps(sorted(sys.modules)), flush=True); p.main()")

    # Execute: it waits on stdin (kept open) until its parent's absence is noticed
    proc = subprocess.Popen([sys.executable, "-c", code, str(parent.pid)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    loaded = json.loads(proc.stdout.readline())
    code = proc.wait(timeout=30)

    # Assert
    assert code == 0
    assert not any(m.split(".")[0] in ("torch", "transformers", "datasets", "ray")
                   for m in loaded)
