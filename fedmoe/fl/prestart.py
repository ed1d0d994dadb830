"""A SuperNode whose next ClientApp process is already started when its message arrives.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process that handles it and exits
(``flwr/supernode/runtime/run_clientapp.py``; there is no long-lived ClientApp mode, and
:mod:`fedmoe.fl.worker` keeps the model warm between those processes). Its SuperExec starts
that process only once the message is there, so each message first waits for an interpreter
and Flower's imports: 1.3-1.5 s on a 2-core machine, before the handler runs.

``python -m fedmoe.fl.prestart <flower-supernode arguments>`` runs ``flower-supernode
--isolation process`` as its child and, in its own process, Flower's SuperExec loop
(``run_superexec``) with :class:`PrestartedExecutor`. One spare ClientApp process waits for its
task token on stdin with Flower's modules imported (then runs Flower's ``run_clientapp``); a
ClientApp task hands the token to it, and the next spare starts once that task's process has
exited (or after ``TASK_GRACE_S``), so a spare's imports do not compete with a running round.
Other tasks, and one that asks for runtime dependency installation, start as Flower starts
them. The spare imports only Flower ahead of the task: the ClientApp it runs is the run's FAB,
loaded after the token as in Flower's own process.

The wrapper exits with the SuperNode (and the SuperNode with it when stopped by signal); the
SuperExec's Runtime API calls are authenticated with a fresh secret shared with the SuperNode
through a 0600 file (Flower's own subprocess mode runs without one). The fedmoe launchers
(``fedmoe.launch.commands.supernode_command``) start SuperNodes this way unless told not to.
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from logging import DEBUG, INFO, WARNING
from pathlib import Path

from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

from fedmoe.fl.worker import alive

# Set in a spare's environment when its token arrives (seconds since the epoch); the ClientApp
# measures its start from it (fedmoe.fl.client_app), not from the spare's creation.
TASK_RECEIVED = "FEDMOE_TASK_RECEIVED"
SPARE_RETRY_S = 10.0  # a spare that died without a task is started again after this long
# The next spare waits for the last task's process to exit, or this long: a long round pays one
# spare's imports, and a task stuck on its SuperNode does not hold up the next message's.
TASK_GRACE_S = 30.0


class PrestartedExecutor(SubprocessExecutor):
    """Flower's subprocess executor, with one ClientApp process started ahead of its task.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API (``host:port``).
    insecure : bool
        Connect to it without TLS (fedmoe's launchers: a local HTTP API).
    root_certificates_path : str or None
        Its CA certificate otherwise.
    """

    def __init__(self, runtime_api_address: str, insecure: bool,
                 root_certificates_path: str | None) -> None:
        self.address = runtime_api_address
        self.insecure = insecure
        self.root_certificates_path = root_certificates_path
        self.spare: subprocess.Popen | None = None
        self.task: subprocess.Popen | None = None  # the last spare handed a token
        self.task_since = 0.0
        self.retry_at = 0.0

    def spare_command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedmoe.fl.prestart", "--spare",
               "--runtime-api-address", self.address, "--parent-pid", str(os.getpid())]
        if self.insecure:
            cmd.append("--insecure")
        elif self.root_certificates_path is not None:
            cmd += ["--root-certificates", self.root_certificates_path]
        return cmd

    def reconcile(self) -> None:
        """Called by the SuperExec loop before each poll: keep one spare ready, started only
        while no task process runs."""
        if self.spare is not None and self.spare.poll() is not None:
            log(WARNING, "prestart: ClientApp process %d exited (code %s) before its task; the "
                "next one starts in %.0f s", self.spare.pid, self.spare.returncode, SPARE_RETRY_S)
            self.spare = None  # died without a task (e.g. a broken install): retry later
            self.retry_at = time.monotonic() + SPARE_RETRY_S
        if self.task is not None and (self.task.poll() is not None
                                      or time.monotonic() - self.task_since > TASK_GRACE_S):
            self.task = None
        if self.spare is None and self.task is None and time.monotonic() >= self.retry_at:
            self.spare = subprocess.Popen(self.spare_command(), stdin=subprocess.PIPE)
            log(DEBUG, "prestart: ClientApp process %d waits for its task", self.spare.pid)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Hand a ClientApp task's token to the spare; any other task as Flower launches it."""
        if not self.takes(spec):
            if spec.task_type == TaskType.CLIENT_APP:
                log(INFO, "prestart: no ClientApp process ready (%s): Flower starts one",
                    "the last one still runs" if self.task is not None else "none started")
            return super().launch(spec)
        spare, self.spare = self.spare, None
        try:
            spare.stdin.write(spec.token.encode() + b"\n")
            spare.stdin.close()
        except OSError:  # the spare died since the last reconcile
            return super().launch(spec)
        self.task, self.task_since = spare, time.monotonic()
        log(DEBUG, "prestart: task %d handed to ClientApp process %d", spec.task_id, spare.pid)
        return LaunchResult.accepted()

    def takes(self, spec: ExecutionSpec) -> bool:
        return (spec.task_type == TaskType.CLIENT_APP and not spec.runtime_dependency_install
                and self.spare is not None and self.spare.poll() is None
                and (spec.runtime_api_address, spec.insecure, spec.root_certificates_path)
                == (self.address, self.insecure, self.root_certificates_path))

    def close(self) -> None:
        if self.spare is not None and self.spare.poll() is None:
            self.spare.terminate()
            try:
                self.spare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.spare.kill()


def run_spare(argv: list[str]) -> None:
    """A ClientApp process that imports Flower's, then waits for its task token on stdin and
    runs the task as ``flwr-clientapp`` does (``run_clientapp``)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    parser = argparse.ArgumentParser(prog="fedmoe.fl.prestart --spare")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates")
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    while not select.select([sys.stdin], [], [], 0.5)[0]:
        if args.parent_pid is not None and not alive(args.parent_pid):
            sys.exit(0)  # the SuperExec is gone: no task will come
    token = sys.stdin.buffer.readline(256).decode().strip()
    if not token:
        sys.exit(0)  # stdin closed without a task: the SuperExec stopped
    os.environ[TASK_RECEIVED] = repr(time.time())
    run_clientapp(runtime_api_address=args.runtime_api_address, token=token,
                  insecure=args.insecure,
                  certificates=validate_and_resolve_root_certificates(args.root_certificates,
                                                                      args.insecure),
                  parent_pid=args.parent_pid)


def run_supernode(argv: list[str]) -> int:
    """``flower-supernode <argv> --isolation process`` as a child, and the SuperExec here."""
    import flwr.supercore.superexec.run_superexec as flower_superexec

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    parser.add_argument("--isolation")
    known, _ = parser.parse_known_args(argv)
    if known.isolation is not None:
        sys.exit("fedmoe.fl.prestart sets --isolation process itself")
    secret_dir = Path(tempfile.mkdtemp(prefix="fedmoe-superexec-"))  # 0700
    atexit.register(shutil.rmtree, secret_dir, ignore_errors=True)
    secret = secrets.token_bytes(32)
    secret_file = secret_dir / "secret"
    secret_file.touch(mode=0o600)
    secret_file.write_bytes(secret)
    binary = Path(sys.executable).parent / "flower-supernode"
    node = subprocess.Popen([str(binary) if binary.exists() else "flower-supernode", *argv,
                             "--isolation", "process",
                             "--superexec-auth-secret-file", str(secret_file)])
    atexit.register(_stop, node)

    def exit_with_node() -> None:
        node.wait()
        os.kill(os.getpid(), signal.SIGINT)  # Flower's handler: close the executor, exit

    threading.Thread(target=exit_with_node, daemon=True).start()
    executor = PrestartedExecutor(f"{known.host}:{known.port}", insecure=True,
                                  root_certificates_path=None)
    # Flower 1.42 chooses its executor from a fixed list (get_executor); this is the one place
    # fedmoe puts its own in, so the rest of the SuperExec loop stays Flower's.
    if not callable(getattr(flower_superexec, "get_executor", None)):
        sys.exit("this Flower version has no SuperExec get_executor: run flower-supernode "
                 "without fedmoe.fl.prestart")
    flower_superexec.get_executor = lambda *args, **kwargs: executor
    try:
        flower_superexec.run_superexec(runtime_api_address=f"{known.host}:{known.port}",
                                       insecure=True, superexec_auth_secret=secret)
    except (SystemExit, KeyboardInterrupt):  # the node exited, or a signal (before Flower's
        pass                                  # handlers were in place)
    _stop(node)
    return node.returncode if node.returncode is not None else 0


def _stop(node: subprocess.Popen) -> None:
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=10)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):  # or a second signal: at once
            node.kill()
            node.wait()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--spare"]:
        run_spare(argv[1:])
    else:
        sys.exit(run_supernode(argv))


if __name__ == "__main__":
    main()
