"""Memory as the machine sees it: PSS of a process tree, sampled while work runs.

Summed RSS double-counts pages that processes share (Ray workers share the object store and
every library's code): proportional set size (PSS) charges each shared page to its sharers
in equal parts, so the PSS of a process tree adds up to what the tree really holds.

Usage::

    with PeakMemory() as peak:          # this process and all its descendants
        run()
    peak.peak_bytes
"""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

GiB = 2**30


def tree_pss(pid: int | None = None) -> int:
    """PSS bytes of process ``pid`` (default: this one) and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a process that ended between the listing and the read
    return total


class PeakMemory:
    """Sample :func:`tree_pss` every ``interval`` seconds in a thread; keep the peak.

    Parameters
    ----------
    pid : int, optional
        Root of the tree (default: this process).
    interval : float
        Seconds between samples.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fedmoe-pss")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, tree_pss(self.pid))
                self.samples += 1
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def checkpoint_bytes(path: str | Path | None) -> int | None:
    """Bytes of a local checkpoint's weight files (``None`` for a hub id or no path)."""
    if not path or not Path(path).is_dir():
        return None
    files = list(Path(path).glob("*.safetensors")) or list(Path(path).glob("*.bin"))
    return sum(f.stat().st_size for f in files) or None


def available_bytes() -> int:
    """System ``MemAvailable``: what can be allocated without swapping or evicting."""
    return int(psutil.virtual_memory().available)
