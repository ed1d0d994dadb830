"""A run that trained nothing says why and exits non-zero; client actors fit in memory."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from fedmoe.fl.bridge import compose
from fedmoe.fl.results import client_entries, run_failure
from fedmoe.fl.simulation import ACTOR_OVERHEAD_BYTES, max_concurrent
from fedmoe.fl.strategy import RoundLog


def test_a_round_with_no_accepted_reply_is_a_failure_with_one_line():
    ok = {"round": 1, "sampled": 2, "accepted": [0, 1], "rejected": {}}
    oom = {"round": 2, "sampled": 2, "accepted": [],
           "rejected": {"0": "Traceback (most recent call last):\n  File x\n"
                             "ray.exceptions.OutOfMemoryError: Task was killed due to low memory",
                        "1": "killed"}}
    silent = {"round": 1, "sampled": 3, "accepted": [], "rejected": {}}
    assert run_failure({"rounds": [ok]}) is None
    line = run_failure({"rounds": [ok, oom]})
    assert line.startswith("round 2: 0 of 2 clients trained: ray.exceptions.OutOfMemoryError")
    assert "lower fl.max_concurrent_clients or use train=lora" in line and "\n" not in line
    assert run_failure({"rounds": [silent]}) == ("round 1: 0 of 3 clients trained: no reply "
                                                 "within fl.round_timeout -- raise "
                                                 "fl.round_timeout")
    assert run_failure({"rounds": []}) == "no round ran: no client ever trained"


def test_rounds_trained_counts_accepted_rounds_only():
    history = {1: RoundLog(accepted=[0], rejected={1: "error reply: boom\nmore"}),
               2: RoundLog(accepted=[0, 1])}
    clients = client_entries(history, payload_bytes=10)
    assert clients["0"]["rounds_trained"] == 2
    assert clients["1"]["rounds_trained"] == 1 and clients["1"]["rounds_rejected"] == 1
    assert clients["1"]["last_error"] == "error reply: boom"


def test_clients_at_once_follow_memory(tmp_path):
    # A 10 GiB checkpoint (a sparse file: its size without the disk) on a machine with room
    # for one copy runs one client at a time; the config's cap wins over memory.
    (tmp_path / "model.safetensors").open("wb").truncate(10 * 2**30)
    cfg = compose(["experiment=smoke"])
    n, why = max_concurrent(cfg, tmp_path, cpus=8, available=20 * 2**30)
    assert n == 1 and why.startswith("memory:")
    per_actor = 10 * 2**30 * 1.25 + ACTOR_OVERHEAD_BYTES
    n, _ = max_concurrent(cfg, tmp_path, cpus=8, available=int(4 * per_actor / 0.8) + 1)
    assert n == 4
    n, why = max_concurrent(compose(["experiment=smoke", "fl.max_concurrent_clients=3"]),
                            tmp_path, cpus=8, available=2**50)
    assert (n, why) == (3, "fl.max_concurrent_clients")
    assert max_concurrent(cfg, "some/hub-id", cpus=2)[0] == 2  # unknown size: the CPUs
    # an actor running two torch threads takes two CPUs
    threads = compose(["experiment=smoke", "fl.client_threads=2"])
    assert max_concurrent(threads, "some/hub-id", cpus=2)[0] == 1
    assert max_concurrent(threads, "some/hub-id", cpus=8)[0] == 4


def test_simulate_exits_non_zero_when_no_client_trained(fedmoe_cache, tmp_path):
    if torch.cuda.is_available():  # the failure below is "no CUDA device"
        return
    env = dict(os.environ, FEDMOE_CACHE=str(fedmoe_cache))
    proc = subprocess.run(
        [sys.executable, "-m", "fedmoe.cli", "simulate", "experiment=smoke",
         "data.num_clients=2", "fl.num_rounds=1", "train.device=cuda",
         f"cache_dir={fedmoe_cache}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmoe simulate: round 1: 0 of 2 clients trained"), last
