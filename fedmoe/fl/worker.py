"""A device's warm worker: one long-lived process that runs the ClientApp's messages.

Flower 1.42 has no long-lived ClientApp: its SuperNode starts a fresh ``flwr-clientapp``
process for every message, which handles that one message and exits
(``flwr/supernode/runtime/run_clientapp.py``). Done there, every round would pay torch's and
transformers' imports, the model build and the tokenization again: seconds on a laptop,
minutes on a small board. With the node config ``warm-worker = true`` (the default of
fedmoe's SuperNode launchers) the ClientApp process, which imports only Flower and fedmoe's
config code, hands the message to this worker instead: started by the first message, it keeps
the imports, the base model and the tokenized data, and exits once idle for
``warm-worker-idle-s`` seconds (default 900) or when the SuperNode's process is gone.

Trust: the worker listens on a Unix socket in a directory only the device's user can enter,
and a connection must prove it holds a random key kept in a file only that user can read
(``multiprocessing.connection``'s HMAC challenge) before anything is unpickled. One worker
serves one node (its state dir, partition and data path) with one package version.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from flwr.app import Context, RecordDict

log = logging.getLogger(__name__)

ENABLE_KEY = "warm-worker"  # node config: true to run messages in the warm worker
IDLE_KEY = "warm-worker-idle-s"  # node config: seconds idle before the worker exits
DEFAULT_IDLE_S = 900.0
START_TIMEOUT_S = 300.0  # imports of a cold machine


def enabled(node_config) -> bool:
    """Whether the node config asks for the warm worker."""
    return str(node_config.get(ENABLE_KEY, "false")).lower() in ("1", "true", "yes")


def call(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Run one message's work in this node's worker (started if none runs) and return the
    reply content; an exception the work raised is raised here."""
    address = _address(context.node_config)
    for attempt in (1, 2):
        with _connect(address, context) as conn:
            try:
                conn.send((kind, content, context))
                status, value = conn.recv()
            except (EOFError, ConnectionError) as error:
                # The worker exited (idle timeout, killed) between accepting and answering:
                # a fresh one takes the message once.
                if attempt == 2:
                    raise RuntimeError(f"the warm worker at {address} stopped while handling "
                                       f"a {kind} message; see {_log_path(address)}") from error
                log.warning("warm worker at %s went away (%s); starting another", address,
                            type(error).__name__)
                continue
        if status == "error":
            raise value
        return value
    raise AssertionError("unreachable")


# --- where a node's worker listens ---------------------------------------------------------
def _address(node_config) -> Path:
    """The socket of this node's worker: one per state dir, partition, data path, package
    and interpreter. Under the temp dir (a Unix socket path must stay short), in a directory
    only this user may enter."""
    package = Path(__file__).resolve().parents[1]
    ident = "\0".join(str(node_config.get(k, "")) for k in ("state-dir", "partition-id",
                                                            "data-path", "base-model"))
    digest = hashlib.sha256(f"{ident}\0{package}\0{sys.executable}".encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"fedmoe-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    if root.stat().st_uid != os.getuid() or root.stat().st_mode & 0o077:
        raise PermissionError(f"{root} must belong to this user alone (mode 0700)")
    return root / f"w{digest}.sock"


def _key_path(address: Path) -> Path:
    return address.with_suffix(".key")


def _log_path(address: Path) -> Path:
    return address.with_suffix(".log")


def _key(address: Path) -> bytes:
    """The worker's authentication key, made (0600) on first use."""
    path = _key_path(address)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


@contextlib.contextmanager
def _connect(address: Path, context: Context):
    """A connection to the node's worker, starting it when none answers."""
    conn = _try_connect(address)
    if conn is None:
        with open(address.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter; others wait, then connect
            conn = _try_connect(address) or _start(address, context)
    try:
        yield conn
    finally:
        conn.close()


def _try_connect(address: Path) -> Connection | None:
    if not address.exists():
        return None
    try:
        return Client(str(address), family="AF_UNIX", authkey=_key(address))
    except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
        return None  # no worker, or one that is exiting


def _start(address: Path, context: Context) -> Connection:
    """Start the node's worker and wait until it accepts a connection."""
    with contextlib.suppress(FileNotFoundError):
        address.unlink()  # a stale socket of a worker that is gone
    _key(address)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    idle = float(context.node_config.get(IDLE_KEY, DEFAULT_IDLE_S))
    cmd = [sys.executable, "-m", "fedmoe.fl.worker", "--address", str(address),
           "--idle-s", str(idle), "--parent-pid", str(os.getppid())]
    with open(_log_path(address), "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    log.info("started the warm worker (pid %d) at %s", proc.pid, address)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = _try_connect(address)
        if conn is not None:
            return conn
        if proc.poll() is not None:
            raise RuntimeError(f"the warm worker exited with code {proc.returncode} before "
                               f"serving; see {_log_path(address)}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the warm worker did not serve within {START_TIMEOUT_S:.0f} s; "
                       f"see {_log_path(address)}")


# --- the worker process --------------------------------------------------------------------
class _Worker:
    """Accepts one connection at a time; exits when idle or orphaned."""

    def __init__(self, address: Path, idle_s: float, parent_pid: int) -> None:
        from fedmoe.fl import client_task  # the imports kept warm

        self.handle = client_task.handle
        self.address, self.idle_s, self.parent_pid = address, idle_s, parent_pid
        self.lock = threading.Lock()  # held while a message is handled
        self.last = time.monotonic()
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
        self.listener = Listener(str(address), family="AF_UNIX", authkey=_key(address))
        os.chmod(address, 0o600)

    def serve(self) -> None:
        threading.Thread(target=self._watch, daemon=True).start()
        log.info("warm worker %d serving at %s", os.getpid(), self.address)
        while True:
            try:
                conn = self.listener.accept()
            except (AuthenticationError, OSError, EOFError) as error:  # a wrong key
                log.warning("connection refused: %s", error)
                continue
            with self.lock, conn:
                try:
                    self._answer(conn)
                except (EOFError, OSError) as error:  # the ClientApp process went away
                    log.warning("a ClientApp connection broke: %s", error)
                self.last = time.monotonic()

    def _answer(self, conn: Connection) -> None:
        kind, content, context = conn.recv()
        start = time.perf_counter()
        try:
            reply = ("ok", self.handle(kind, content, context))
        except Exception as error:
            log.exception("%s message of run %s failed", kind, context.run_id)
            reply = ("error", _portable(error))
        log.info("%s message of run %s handled in %.2f s", kind, context.run_id,
                 time.perf_counter() - start)
        conn.send(reply)

    def _watch(self) -> None:
        """Exit when idle for ``idle_s`` or when the parent (the SuperNode side) is gone."""
        while True:
            time.sleep(1.0)
            with self.lock:
                orphaned = not alive(self.parent_pid)
                if orphaned or time.monotonic() - self.last > self.idle_s:
                    log.info("warm worker exits: %s", "parent gone" if orphaned else "idle")
                    self.listener.close()
                    with contextlib.suppress(FileNotFoundError):
                        self.address.unlink()
                    os._exit(0)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling, else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description="fedmoe's warm ClientApp worker")
    parser.add_argument("--address", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _Worker(args.address, args.idle_s, args.parent_pid).serve()


if __name__ == "__main__":
    main()
