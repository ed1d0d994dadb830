"""Memory controls of client processes: oneDNN's kernel cache capped, freed heap returned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedmoe.memory import ONEDNN_CACHE_CAPACITY

HEAP_SCRIPT = """
import torch
from fedmoe.memory import release_free_memory

def heap_pss():
    pss, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = fields[-1] == "[heap]"
        elif inside and fields[0] == "Pss:":
            pss += int(fields[1]) * 1024
    return pss

torch.set_num_threads(1)
blocks = [torch.ones(64 * 1024) for _ in range(4000)]  # 1 GB of 256 KB blocks
keep = blocks[::400]  # a few survivors pin the heap's top, so it cannot simply shrink
del blocks
before = heap_pss()
release_free_memory()
print(before, heap_pss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os():
    # Execute: a process frees most of 1 GB of heap blocks, then releases the free pages
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True,
                         check=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20)))
    before, after = map(int, out.stdout.split())
    # Assert: the heap held most of it before and returned most of it after
    assert before > 0.5e9, before
    assert after < before / 4, (before, after)


@pytest.mark.parametrize(("module", "user"), [("fedmoe.fl.client_task", None),
                                            ("fedmoe.fl.client_task", "500"),
                                            ("fedmoe.fl.simulation", None)])
def test_client_processes_cap_onednn_kernel_cache_unless_the_user_set_it(module, user):
    # The simulation's driver sets it for the Ray actors, which inherit its environment.
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if user:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user
    out = subprocess.run(
        [sys.executable, "-c", f"import os, {module}; "
         "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
        capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == (user or ONEDNN_CACHE_CAPACITY)
