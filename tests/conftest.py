"""Shared fixtures: offline settings, tiny model families, the test cache, one smoke run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from tests.helpers.models import TINY_FAMILIES
from tests.helpers.runs import SMOKE_BASE, Run, prune, simulate

# Offline for the whole session (a value the user set wins), so child processes inherit it.
# Tests never change the environment themselves: they give a child process an environment
# of its own (tests/helpers/runs.py: child_env) or use monkeypatch.
for _key, _value in {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}.items():
    os.environ.setdefault(_key, _value)
# fedmoe's cache defaults to the user's ($XDG_CACHE_HOME/fedmoe): tests never write there.
# FEDMOE_TEST_CACHE shares the pretrained smoke base model between checkouts.
if os.environ.get("FEDMOE_TEST_CACHE"):
    TEST_CACHE = Path(os.environ["FEDMOE_TEST_CACHE"])
else:
    TEST_CACHE = Path(tempfile.mkdtemp(prefix="fedmoe-cache-"))
    atexit.register(shutil.rmtree, TEST_CACHE, ignore_errors=True)
os.environ["FEDMOE_CACHE"] = str(TEST_CACHE)


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
    from fedmoe.task.pretrain import ensure_base_model

    return ensure_base_model(compose(["experiment=smoke", f"cache_dir={fedmoe_cache}"]),
                             progress=False)


@pytest.fixture(scope="session")
def smoke_run(fedmoe_cache, smoke_base, tmp_path_factory) -> Run:
    """One real ``fedmoe simulate experiment=smoke`` (4 clients, 2 rounds), audited and its
    wire observed, shared by every test that reads a finished run."""
    return simulate(tmp_path_factory.mktemp("smoke"), fedmoe_cache, "experiment=smoke")


@pytest.fixture(scope="session")
def smoke_prune(fedmoe_cache, smoke_base, tmp_path_factory) -> tuple[dict, str]:
    """One real ``fedmoe prune`` of the smoke base model (TCESS, half the experts kept): its
    ``prune.json`` (``export``: the pruned checkpoint) and its stdout."""
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    return prune(run_dir, fedmoe_cache, *SMOKE_BASE, "prune.score=tcess", "prune.keep=0.5")


@pytest.fixture(scope="session")
def pruned_run(fedmoe_cache, tmp_path_factory) -> tuple[Path, str]:
    """A real ``fedmoe simulate experiment=smoke prune.keep=0.5`` (2 clients, 2 rounds) in a
    fresh interpreter: its run dir and what it printed."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("pruned_run")
    env = os.environ | {"FEDMOE_CACHE": str(fedmoe_cache), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "simulate", "experiment=smoke", "prune.keep=0.5",
         "data.num_clients=2", "fl.min_train_nodes=2", "fl.min_evaluate_nodes=2",
         "fl.min_available_nodes=2", f"hydra.run.dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run_dir, proc.stdout
