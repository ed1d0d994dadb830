"""Long-running processes (SuperLink, SuperNode) with their logs, stopped by pid."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out as outgoing connections' source ports (inclusive)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS and Windows use 49152-65535


_handed_out: set[int] = set()  # a port given twice here would be shared or lost


def free_port(host: str = "127.0.0.1", span: int = 12000) -> int:
    """A TCP port that is free on ``host`` now, chosen outside the kernel's ephemeral range.

    A port the kernel picks (``bind(0)``) lies in that range, so between this check and the
    server's own bind any outgoing connection on the machine — a SuperNode's retries, a poll
    of the SuperLink — may take it as its source port ("address already in use"). Outside the
    range only another listener can take it. The port is drawn from up to ``span`` ports below
    the range (or above it, where the range starts too low); ``bind(0)`` where neither has room.
    A process never gets the same port twice, as two services started together would.
    """
    low, high = ephemeral_range()
    below, above = (max(1024, low - span), low), (high + 1, min(65536, high + 1 + span))
    room = next((r for r in (below, above) if r[1] - r[0] >= 1000), None)
    rng = random.SystemRandom()
    for _ in range(100 if room else 0):
        port = rng.randrange(*room)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
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
        Environment (see :func:`fedmoe.launch.commands.flwr_env`).
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
    trees = [p for service in services if service is not None and service.proc is not None
             for p in _tree(service.proc.pid)]
    _signal(trees, kill=False)
    psutil.wait_procs(trees, timeout=timeout)
    for service in services:
        if service is not None:
            service.stop(timeout=timeout)  # kills what is left, reaps, clears the group


def stop_tree(pid: int, timeout: float = 10.0, kill: bool = False) -> None:
    """Terminate (or kill) process ``pid`` and all its descendants, each by its own pid."""
    procs = _tree(pid)
    _signal(procs, kill=kill)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    _signal(alive, kill=True)
    psutil.wait_procs(alive, timeout=timeout)


def _tree(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(procs: Sequence[psutil.Process], kill: bool) -> None:
    """SIGKILL (``kill``) or SIGTERM each of ``procs`` by its own pid; gone ones are skipped."""
    for p in procs:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass


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
