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

import ctypes
import ctypes.util
import functools
import os
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


# oneDNN (PyTorch's CPU kernels for bf16) caches up to 1024 compiled primitives per process,
# one per input shape, with their buffers; a MoE's experts see a new token count at almost
# every call, so the cache fills with primitives that never come back: about 0.3 GB of an
# OLMoE-shaped client's heap after one round. 64 keeps the repeated shapes (attention, dense).
ONEDNN_CACHE_CAPACITY = "64"


def limit_kernel_cache() -> None:
    """Cap oneDNN's primitive cache (unless the user set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``).

    oneDNN reads the variable when it first creates a primitive, so this works in a process
    that imported torch but ran no bf16 kernel yet; Ray actors inherit it from the driver.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_CAPACITY)


def release_free_memory() -> None:
    """Hand the heap memory glibc keeps after ``free`` back to the OS (``malloc_trim``).

    A round's activations and scoring buffers are freed when it ends, but glibc keeps the
    pages for reuse, so they would stay in the client process's peak for the rest of the run
    (about 0.25 GB of an OLMoE-shaped client). No-op where the C library has no
    ``malloc_trim`` (macOS, musl).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    """The C library, found once (``find_library`` runs ``ldconfig``: not per message)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
