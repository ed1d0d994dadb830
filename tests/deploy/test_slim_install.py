"""The slim device install (`pip install .`, no extras) in a fresh venv: it lacks Ray,
datasets, W&B and matplotlib, its commands that need them say which extra in one line, and
its SuperNodes take part in a real round (TLS, SuperNode authentication) with a SuperLink
that runs from the full install.

The venv is built once per pyproject.toml (under the test cache, ``FEDMOE_TEST_CACHE`` keeps
it between sessions); each session reinstalls this checkout's fedmoe into it without
dependencies, so it always runs the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from fedmoe.install import create_venv, importable, pip
from fedmoe.launch.commands import flwr_env
from fedmoe.launch.processes import Service, free_port
from tests.helpers.runs import FAST, REPO

from .conftest import dump_logs

pytestmark = pytest.mark.slow

ABSENT = ("ray", "datasets", "wandb", "matplotlib")
LAUNCHER = REPO / "scripts" / "deploy" / "start_supernode.py"


@pytest.fixture(scope="module")
def slim_python(fedmoe_cache) -> Path:
    """The interpreter of a venv holding the slim install of this checkout."""
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    root = fedmoe_cache / "venvs" / f"slim-{key}"
    done = root / ".complete"  # written last: a half-built venv is built again
    if done.exists():
        pip(root / "bin" / "python", "--no-deps", "--force-reinstall", str(REPO))
    else:
        shutil.rmtree(root, ignore_errors=True)
        create_venv(root, REPO)
        done.write_text(key)
    return root / "bin" / "python"


def slim_env(python: Path, cache: Path) -> dict[str, str]:
    """Offline, the test cache, nothing of this process's PYTHONPATH (the slim venv runs what
    is installed in it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
                  "FEDMOE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def notes(path: Path, topic: str) -> Path:
    """A device's own jsonl notes on one topic."""
    words = [topic, "router", "expert", "battery", "cache", "sensor", "weekly", "summary"]
    rows = [{"text": " ".join(words[(i * 3 + j) % len(words)] for j in range(20)) + f" {i}."}
            for i in range(240)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_slim_install_lacks_simulation_and_tracking(slim_python):
    assert importable(slim_python, ABSENT) == []
    assert importable(slim_python, ("fedmoe", "flwr", "torch", "transformers", "peft",
                                    "hydra")) == ["fedmoe", "flwr", "torch", "transformers",
                                                  "peft", "hydra"]


@pytest.mark.parametrize(("args", "message"), [
    (["simulate", "experiment=smoke"],
     "fedmoe simulate needs the simulation extra (ray is not installed): "
     "pip install 'fedmoe[sim]'"),
    (["pretrain", "experiment=smoke"],
     "fedmoe pretrain needs the simulation extra (datasets is not installed): "
     "pip install 'fedmoe[sim]'"),
])
def test_a_command_that_needs_an_extra_says_which(slim_python, fedmoe_cache, tmp_path, args,
                                                   message):
    proc = subprocess.run([str(slim_python.parent / "fedmoe"), *args,
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          env=slim_env(slim_python, fedmoe_cache), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message, proc.stderr[-3000:]


def start_with_launcher(fed, name: str, python: Path, node_config: dict[str, str]) -> Service:
    """SuperNode ``name`` started as a device starts it: scripts/deploy/start_supernode.py run
    by the slim venv's interpreter, outside the checkout."""
    keys = fed.node_keys(name)
    args = [str(python), str(LAUNCHER), "--superlink", fed.address, "--ca", str(fed.ca_cert),
            "--key", str(keys.private_key), "--port", str(free_port())]
    for key, value in node_config.items():
        args += [f"--{key}", str(value)]
    env = flwr_env(fed.root / "flwr", fed.extra_env, bin_dir=python.parent)
    node = Service(name, args, fed.root / "logs" / f"{name}.log", env,
                   cwd=fed.root).start()
    fed.nodes.append(node)
    return node


def process_tree(node: Service) -> list[list[str]]:
    """Command lines of a node's process and every live process it started."""
    root = psutil.Process(node.pid)
    tree = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            tree.append(proc.cmdline())
        except psutil.ZombieProcess:  # an exited ClientApp that its parent has not reaped
            continue
    return tree


def test_slim_supernodes_run_a_round_over_tls_with_authentication(
        tmp_path, slim_python, make_federation, base_model, app_dir):
    # Prepare: the SuperLink from this (full) venv; two SuperNodes from the slim one, each
    # with its own data file: one by LocalFederation, one by the device launcher
    fed = make_federation(tmp_path / "federation")  # TLS and node authentication on
    run_dir = tmp_path / "run"
    overrides = [*FAST, f"fl.base_model={base_model}", f"run_dir={run_dir}", "fl.num_rounds=1",
                 "fl.round_timeout=300", "fl.min_available_nodes=2"]
    fed.start_superlink()
    nodes = [
        fed.start_node("node0", {"partition-id": 0, "base-model": str(base_model),
                                 "data-path": str(notes(tmp_path / "n0.jsonl", "garden")),
                                 "state-dir": str(tmp_path / "s0")}, python=slim_python),
        start_with_launcher(fed, "node1", slim_python, {
            "partition-id": 1, "base-model": base_model,
            "data-path": notes(tmp_path / "n1.jsonl", "cycling"), "state-dir": tmp_path / "s1"}),
    ]
    fed.wait_for_nodes(2)

    # Execute
    run_id = fed.run(app_dir, overrides)
    status = fed.wait(run_id, 600)

    # Assert: each SuperNode and the SuperExec that started its ClientApps ran from the slim
    # venv; both clients' replies accepted, each trained on its own file
    for node in nodes:
        tree = process_tree(node)
        assert len(tree) >= 2 and all(any(arg.startswith(str(slim_python.parent))
                                          for arg in cmdline[:2]) for cmdline in tree), tree
    assert status == ("finished:completed", ""), dump_logs(fed, run_id)
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["round"], r["accepted"], r["rejected"]) for r in results["rounds"]] == [
        (1, [0, 1], {})]
    assert all(results["clients"][c]["examples"] > 0 for c in ("0", "1"))
    for state in ("s0/client_0000", "s1/client_0001"):
        meta = json.loads((tmp_path / state / "meta.json").read_text())
        assert (meta["rounds"], meta["last_round"]) == (1, 1)
