"""Shared fixtures: offline settings, tiny model families, the test cache, one smoke run."""

from __future__ import annotations

import atexit
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers.models import TINY_FAMILIES
from tests.helpers.runs import SMOKE_BASE, TWO_CLIENTS, Run, fedmoe, prune, simulate

T = TypeVar("T")

# Offline for the whole session (a value the user set wins), so child processes inherit it.
# Tests never change the environment themselves: they give a child process an environment
# of its own (tests/helpers/runs.py: child_env) or use monkeypatch.
for _key, _value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)
# fedmoe's cache defaults to the user's ($XDG_CACHE_HOME/fedmoe): tests never write there.
# FEDMOE_TEST_CACHE shares the pretrained smoke base model between checkouts.
# pytest-xdist (`-n 2`): the process that starts the workers imports this file first and
# makes the session's folder; the workers inherit it through _SESSION, so they share one
# cache (base models are trained once: fedmoe.train.pretrain locks them) and one copy of
# each session fixture (`shared` below). The starting process removes it at exit.
_SESSION = "FEDMOE_TEST_SESSION_DIR"
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_SESSION):
    SESSION_DIR = Path(os.environ[_SESSION])
else:
    SESSION_DIR = Path(tempfile.mkdtemp(prefix="fedmoe-tests-"))
    atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)
    os.environ[_SESSION] = str(SESSION_DIR)
# One torch thread in each worker and its children: with two threads per process on two
# cores, the README's prune example (a 600-step pretraining) ran at 10 s per step, about 25x
# slower than usual, and timed out (a niced benchmark was also running then).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
TEST_CACHE = Path(os.environ.get("FEDMOE_TEST_CACHE") or SESSION_DIR / "cache")
TEST_CACHE.mkdir(parents=True, exist_ok=True)
os.environ["FEDMOE_CACHE"] = str(TEST_CACHE)


def shared(name: str, build: Callable[[Path], T]) -> T:
    """``build(dir)``, once per test session whichever xdist worker asks first; the others
    wait for it and get its (pickled) result."""
    root = SESSION_DIR / "fixtures"
    root.mkdir(exist_ok=True)
    with FileLock(root / f"{name}.lock"):
        done = root / f"{name}.pickle"
        if done.is_file():
            return pickle.loads(done.read_bytes())
        shutil.rmtree(root / name, ignore_errors=True)  # what a failed build left
        (root / name).mkdir()
        value = build(root / name)
        done.write_bytes(pickle.dumps(value))
        return value


@pytest.fixture(params=sorted(TINY_FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def serverapp_identity(monkeypatch):
    """Flower 1.42 stamps new messages with the running task's identity; the ServerApp
    runtime sets it, so tests set it as ``flwr.server.compat.app`` does."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture(scope="session")
def fedmoe_cache() -> Path:
    """One cache (corpus, pretrained base models) for the whole session; ``FEDMOE_TEST_CACHE``
    shares it between sessions."""
    return TEST_CACHE


@pytest.fixture(scope="session")
def smoke_base(fedmoe_cache) -> Path:
    """The base model of ``experiment=smoke``, pretrained once into the test cache."""
    from fedmoe.fl.bridge import compose
    from fedmoe.train.pretrain import ensure_base_model

    return ensure_base_model(compose(["experiment=smoke", f"cache_dir={fedmoe_cache}"]),
                             progress=False)


@pytest.fixture(scope="session")
def smoke_run(fedmoe_cache, smoke_base) -> Run:
    """One real ``fedmoe simulate experiment=smoke`` (4 clients, 2 rounds), audited and its
    wire observed, shared by every test that reads a finished run."""
    return shared("smoke_run", lambda root: simulate(root, fedmoe_cache, "experiment=smoke"))


@pytest.fixture(scope="session")
def smoke_prune(fedmoe_cache, smoke_base) -> tuple[dict, str]:
    """One real ``fedmoe prune`` of the smoke base model (TCESS, half the experts kept): its
    ``prune.json`` (``export``: the pruned checkpoint) and its stdout."""
    return shared("smoke_prune", lambda root: prune(root / "run", fedmoe_cache, *SMOKE_BASE,
                                                    "prune.score=tcess", "prune.keep=0.5"))


@pytest.fixture(scope="session")
def pruned_run(fedmoe_cache) -> tuple[Path, str]:
    """A real ``fedmoe simulate experiment=smoke prune.keep=0.5`` (2 clients, 2 rounds) in a
    fresh interpreter: its run dir and what it printed."""
    def build(run_dir: Path) -> tuple[Path, str]:
        proc = fedmoe(fedmoe_cache, "simulate", "experiment=smoke", "prune.keep=0.5",
                      *TWO_CLIENTS, f"hydra.run.dir={run_dir}", timeout=900)
        return run_dir, proc.stdout

    return shared("pruned_run", build)
