"""Real ``fedmoe`` commands in a child process, and the override lists the tests share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import wire

REPO = Path(__file__).resolve().parents[2]

# The base-model keys of experiment=smoke: a command given these (and model=tiny, seed=0)
# reuses the smoke base model the cache already holds.
SMOKE_BASE = ["pretraining=smoke", "data.max_mb_per_domain=0.5", "data.block_size=64"]
# Rounds of a few seconds, for tests of plumbing rather than of learning.
FAST = ["experiment=smoke", "train.local_steps=1", "data.max_train_blocks_per_client=8",
        "data.max_eval_blocks_per_client=2", "fl.export=false"]
TWO_CLIENTS = ["data.num_clients=2", "fl.min_train_nodes=2", "fl.min_evaluate_nodes=2",
               "fl.min_available_nodes=2"]


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    """This process's environment for a child ``fedmoe``: offline, the test cache, the repo
    importable (``tests.helpers.wire``). Ours stays as it is."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"FEDMOE_CACHE": str(cache), "WANDB_MODE": "offline",
                         "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                         "PYTHONPATH": path, **extra}


def fedmoe(cache: Path, *args: str, timeout: float = 600,
           check: bool = True) -> subprocess.CompletedProcess:
    """``fedmoe <args>`` in a child process; ``check``: fail with its output unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", "fedmoe.cli", *args], env=child_env(cache),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@dataclass
class Run:
    """A finished ``fedmoe simulate``: its run dir and what was seen on the wire."""

    dir: Path
    audit: list[dict]  # audit_mod's lines: every message in and out of every client
    wire: list[dict]  # the ServerApp's Grid, observed by tests/helpers/wire.py
    output: str  # stdout and stderr

    @property
    def results(self) -> dict:
        return json.loads((self.dir / "results.json").read_text())

    def sent_tensors(self, direction: str | None = None) -> set[str]:
        """Names of every tensor in a message on the wire (``"up"``, ``"down"`` or both)."""
        return {name for m in self.wire if direction in (None, m["direction"])
                for record in m["arrays"].values() for name in record}


def simulate(root: Path, cache: Path, *overrides: str, timeout: float = 600) -> Run:
    """``fedmoe simulate <overrides>`` in ``root/run``, audited, its wire observed."""
    run_dir, audit_dir, wire_log = root / "run", root / "audit", root / "wire.jsonl"
    cmd = [sys.executable, "-m", "tests.helpers.wire", str(wire_log), "simulate",
           f"cache_dir={cache}", f"hydra.run.dir={run_dir}", f"fl.audit_dir={audit_dir}",
           *overrides]
    proc = subprocess.run(cmd, env=child_env(cache), capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    audit = [json.loads(line) for f in sorted(audit_dir.glob("client_*.jsonl"))
             for line in f.read_text().splitlines()]
    return Run(run_dir, audit, wire.read(wire_log), output)


# `fedmoe prune` at test size: 8 held-out blocks, 4 calibration blocks of 64 tokens.
PRUNE_FAST = ["data.block_size=64", "eval_blocks=8", "prune.calibration_tokens=256", "threads=1"]


def prune(run_dir: Path, cache: Path, *overrides: str) -> tuple[dict, str]:
    """``fedmoe prune`` in a child process: its ``prune.json`` and its stdout."""
    proc = fedmoe(cache, "prune", *PRUNE_FAST, f"hydra.run.dir={run_dir}", *overrides)
    return json.loads((run_dir / "prune.json").read_text()), proc.stdout
