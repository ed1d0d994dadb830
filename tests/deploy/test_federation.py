"""fedmoe on real Flower 1.42 processes on 127.0.0.1: `flwr run` against a SuperLink and
SuperNodes (TLS and node authentication on, as the launchers default), under faults.

Every process is started by :class:`fedmoe.launch.federation.LocalFederation` and stopped
by its pid at teardown. Rounds are tiny (one local step on 8 blocks); most of each round is
Flower starting a fresh ClientApp process per message (torch and transformers imports).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from fedmoe.checkpoints import load_model
from fedmoe.fl.bridge import compose
from fedmoe.launch.commands import flwr_env, superlink_command
from fedmoe.launch.control import Control, start_run
from fedmoe.launch.federation import LocalFederation
from fedmoe.launch.flower_config import write_superlink_connection
from fedmoe.launch.processes import Service, free_port
from fedmoe.moe.adapter import MoEAdapter
from fedmoe.moe.families import Role
from tests.helpers.federation import restart_node, server_app_log, stage_slow_app
from tests.helpers.runs import FAST

from .conftest import dump_logs

pytestmark = pytest.mark.slow

MARKER = "zebra-quartz-7731"  # a word only the device's own data holds


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def wait_for_file(path: Path, timeout: float, fed: LocalFederation, run_id: int) -> None:
    """Wait for a file the run writes; fail at once (with the logs) if the run ended."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        status, _ = fed.control.run_status(run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            raise AssertionError(f"no {path} (run {status})\n{dump_logs(fed, run_id)}")
        time.sleep(0.5)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def device_data(path: Path) -> Path:
    """A device's own notes: jsonl rows, one of them holding MARKER."""
    words = ["alpha", "router", "expert", "gradient", "tensor", "device", "battery", "cache"]
    rows = [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(24)) + f" note {i}."}
            for i in range(240)]
    rows[5]["text"] += f" {MARKER}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- a managed local simulation -----------------------------------------------------------


def test_flwr_run_on_a_local_simulation_superlink_with_dp(tmp_path, base_model, app_dir,
                                                          fedmoe_cache):
    """`flwr run . local` where `local` is `address = ":local:"`: Flower's managed SuperLink
    in simulation mode (started here on a free port, so this test owns its pid)."""
    # Prepare
    port = free_port()
    env = flwr_env(tmp_path / "flwr", {"FEDMOE_CACHE": str(fedmoe_cache),
                                       "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)})
    write_superlink_connection(tmp_path / "flwr", "local", ":local:")
    superlink = Service("superlink", superlink_command(port, tls=None, auth=False,
                                                       simulation=True),
                        tmp_path / "superlink.log", env)
    overrides = [*FAST, f"fl.base_model={base_model}", "fl.num_rounds=1", "data.num_clients=2",
                 f"run_dir={tmp_path / 'run'}", f"fl.state_dir={tmp_path / 'state'}",
                 "strategy.dp.enabled=true", "strategy.dp.noise_multiplier=0.1",
                 "strategy.dp.clipping_norm=0.5"]
    try:
        superlink.start()
        superlink.wait_for("Uvicorn running", 60)
        # Execute
        run_id = start_run(app_dir, "local", overrides, env,
                           federation_config="num-supernodes=2")
        control = Control(f"127.0.0.1:{port}", None)
        status = control.wait_for_run(run_id, 300)
        logs = server_app_log(control, run_id)
    finally:
        superlink.stop()
    # Assert
    assert status == ("finished:completed", ""), logs[-3000:]
    rounds = read_json(tmp_path / "run" / "results.json")["rounds"]
    assert [(r["round"], r["accepted"]) for r in rounds] == [(1, [0, 1])]
    assert "fixedclipping_mod: parameters are clipped by value: 0.5" in logs
    assert "central DP noise with 0.0250 stdev added" in logs  # 0.1 * 0.5 / 2


# --- TLS, authentication, a device's own data, a SuperLink crash -------------------------


@pytest.fixture(scope="module")
def secure(tmp_path_factory, base_model, app_dir, fedmoe_cache):
    """Two registered SuperNodes (one with its own data file) and an unregistered one; a
    2-round run whose SuperLink is killed during round 2, restarted, and the run started
    again on the same run_dir."""
    root = tmp_path_factory.mktemp("secure")
    data = device_data(root / "notes.jsonl")
    fed = LocalFederation(root / "federation", tls=True, auth=True, database=True,
                          env={"FEDMOE_CACHE": str(fedmoe_cache)})
    run_dir, audit = root / "run", root / "audit"
    overrides = [*FAST, f"fl.base_model={base_model}", f"run_dir={run_dir}",
                 "fl.num_rounds=2", "fl.round_timeout=300", "fl.min_available_nodes=2"]
    try:
        fed.start_superlink()
        # Each device keeps its own audit log (a server's fl.audit_dir does not steer it)
        # In warm workers (the launchers' default): they outlive the SuperLink's crash.
        nodes = [fed.start_node("node0", {"partition-id": 0, "state-dir": str(root / "s0"),
                                          "audit-dir": str(audit), "warm-worker": True}),
                 fed.start_node("node1", {"partition-id": 1, "data-path": str(data),
                                          "state-dir": str(root / "s1"),
                                          "audit-dir": str(audit), "warm-worker": True})]
        intruder = fed.start_node("intruder", {"partition-id": 9, "state-dir": str(root / "s9")},
                                  register=False)
        fed.wait_for_nodes(2)
        first = fed.run(app_dir, overrides)
        wait_for_file(run_dir / "server_state" / "round_1.json", 400, fed, first)
        for node in nodes:  # both hold their round-2 instruction: the crash is mid-round
            node.wait_for(r"Receiving: train message[\s\S]*Receiving: train message"
                          r"[\s\S]*Received successfully", 120)
        fed.superlink.stop(kill=True)  # the SuperLink and its ServerApp process
        fed.start_superlink()
        fed.wait_for_nodes(2)
        second = fed.run(app_dir, overrides)
        status = fed.wait(second, 600)
        yield SimpleNamespace(fed=fed, root=root, run_dir=run_dir, audit=audit, data=data,
                              intruder=intruder, runs=(first, second), status=status,
                              logs=server_app_log(fed.control, second))
    finally:
        fed.stop()


def test_secure_run_completes_every_round(secure):
    assert secure.status == ("finished:completed", ""), dump_logs(secure.fed, secure.runs[1])
    rounds = read_json(secure.run_dir / "results.json")["rounds"]
    assert [(r["round"], r["accepted"], r["rejected"]) for r in rounds] == [
        (1, [0, 1], {}), (2, [0, 1], {})]
    assert all(r["eval_ppl_mean"] > 1 for r in rounds)


def test_run_resumes_after_a_superlink_crash_from_the_last_checkpoint(secure):
    # The second ServerApp started from round 1's checkpoint, not from the base model
    assert "resuming from the checkpoint of round 1" in secure.logs
    assert "round 2: train loss" in secure.logs and "round 1: train loss" not in secure.logs
    state = sorted(p.name for p in (secure.run_dir / "server_state").iterdir())
    assert state == ["round_1.json", "round_1.safetensors", "round_2.json",
                     "round_2.safetensors"]
    # Clients resumed their personal experts from disk: round 2 was trained in both runs
    # (its first replies died with the SuperLink), round 1 once
    for state_dir in ("s0/client_0000", "s1/client_0001"):
        meta = read_json(secure.root / state_dir / "meta.json")
        assert (meta["rounds"], meta["last_round"]) == (3, 2)


def test_an_unregistered_supernode_cannot_join(secure):
    intruder = secure.intruder
    assert not intruder.alive()
    assert "SuperNode ID" not in intruder.log()
    assert "Failed to activate" in intruder.log() or "not registered" in intruder.log()
    assert len(secure.fed.control.nodes()) == 2  # the two registered keys only
    assert "9" not in read_json(secure.run_dir / "results.json")["clients"]


def aggregated_and_routed(base_model: Path) -> tuple[set[str], set[str]]:
    adapter = MoEAdapter(load_model(compose(["experiment=smoke"]).model, base_model))
    return (set(adapter.names(Role.ROUTER, Role.SHARED_EXPERT)),
            set(adapter.names(Role.ROUTED_EXPERTS)))


def test_no_routed_expert_tensor_crosses_the_wire(secure, base_model):
    # Prepare
    aggregated, routed = aggregated_and_routed(base_model)
    # Execute: every message in and out of each ClientApp, as audit_mod logged it
    messages = {client: [json.loads(line) for line in
                         (secure.audit / f"client_{client}.jsonl").read_text().splitlines()]
                for client in (0, 1)}
    # Assert
    for client, lines in messages.items():
        kinds = {(m["direction"], m["type"]) for m in lines}
        assert kinds == {(d, t) for d in ("in", "out") for t in ("train", "evaluate")}, client
        sent = set().union(*(set(r.get("arrays", {})) for m in lines
                             for r in m["records"].values()))
        assert sent == aggregated and not sent & routed


def test_device_data_stays_on_the_device(secure):
    # Nothing but counts and metrics leave node1: not its text, not even its file's path
    out = [json.loads(line) for line in (secure.audit / "client_1.jsonl").read_text()
           .splitlines() if '"out"' in line]
    for message in out:
        for name, record in message["records"].items():
            assert record["kind"] in ("ArrayRecord", "MetricRecord"), name
    server_side = [*secure.run_dir.rglob("*"), *(secure.root / "federation").rglob("*")]
    for path in server_side:
        if path.is_file() and "keys" not in path.parts and "logs" not in path.parts:
            text = path.read_bytes()
            assert MARKER.encode() not in text and str(secure.data).encode() not in text, path
    assert MARKER not in secure.logs and str(secure.data) not in secure.logs
    clients = read_json(secure.run_dir / "results.json")["clients"]
    assert clients["1"]["examples"] > 0  # its held-out blocks were counted, on the device


# --- faults: a slow node, a crashed node and its restart --------------------------------


def test_slow_and_crashed_nodes_miss_their_round_only(tmp_path, make_federation, base_model):
    """Round 1: node1 takes longer than the round timeout (the test's slow-device ClientApp)
    and is dropped. Round 2: node2 is killed after receiving its instruction; the round
    completes with the others. Then node2 restarts on its state dir and, in round 3, trains
    from its experts on disk."""
    # Prepare
    timeout = 60
    fed = make_federation(tmp_path)
    run_dir = tmp_path / "run"
    configs = [{"partition-id": i, "state-dir": str(tmp_path / f"s{i}")} for i in range(3)]
    configs[1] |= {"test-delay-s": timeout + 5, "test-delay-round": 1}
    overrides = [*FAST, f"fl.base_model={base_model}", f"run_dir={run_dir}", "fl.num_rounds=3",
                 "fl.fraction_evaluate=0", f"fl.round_timeout={timeout}",
                 # every round waits for and samples all 3 nodes (round 3: the restarted one;
                 # FedAvg sizes its sample before waiting); 1 accepted reply makes a round
                 "fl.min_available_nodes=3", "fl.min_train_nodes=3", "fl.min_replies=1"]
    fed.start_superlink()
    nodes = [fed.start_node(f"node{i}", c) for i, c in enumerate(configs)]
    fed.wait_for_nodes(3)
    personal = tmp_path / "s2" / "client_0002" / "personal.safetensors"
    # Execute
    run_id = fed.run(stage_slow_app(tmp_path / "app"), overrides)
    wait_for_file(run_dir / "server_state" / "round_1.json", 400, fed, run_id)
    before_crash = sha256(personal)
    nodes[2].wait_for(r"Receiving: train message[\s\S]*Receiving: train message", 300)
    nodes[2].stop(kill=True)
    restart_node(fed, "node2", configs[2], timeout=240)
    status = fed.wait(run_id, 600)
    logs = server_app_log(fed.control, run_id)
    # Assert
    assert status == ("finished:completed", ""), dump_logs(fed, run_id)
    rounds = {r["round"]: r for r in read_json(run_dir / "results.json")["rounds"]}
    assert rounds[1]["accepted"] == [0, 2]  # node1 too slow
    assert 2 not in rounds[2]["accepted"] and 0 in rounds[2]["accepted"]  # node2 crashed
    assert rounds[3]["accepted"] == [0, 1, 2]  # both back
    assert "no train reply from node(s)" in logs and "dropped from this round" in logs
    # node2 trained rounds 1 and 3; round 3 started from round 1's file, bit for bit
    meta = read_json(personal.parent / "meta.json")
    assert (meta["rounds"], meta["last_round"]) == (2, 3)
    assert sha256(personal.parent / "personal.prev.safetensors") == before_crash


# --- load ---------------------------------------------------------------------------------


def test_six_supernodes_three_rounds_in_warm_workers(tmp_path, make_federation, base_model,
                                                     app_dir):
    """Six SuperNodes for 3 rounds, with TLS and SuperNode authentication on (the default
    deployment: six key pairs registered before the run), each running its rounds in its
    warm worker (the launchers' default), which exits with its SuperNode."""
    # Prepare
    fed = make_federation(tmp_path)
    run_dir = tmp_path / "run"
    overrides = [*FAST, f"fl.base_model={base_model}", f"run_dir={run_dir}", "fl.num_rounds=3",
                 "fl.fraction_evaluate=0", "data.num_clients=6", "fl.min_available_nodes=6",
                 "fl.round_timeout=600"]
    fed.start_superlink()
    nodes = [fed.start_node(f"node{i}", {"partition-id": i, "state-dir": str(tmp_path / f"s{i}"),
                                         "warm-worker": True}) for i in range(6)]
    fed.wait_for_nodes(6)
    spares_before = wait_for_spares(nodes)
    # Execute
    run_id = fed.run(app_dir, overrides)
    status = fed.wait(run_id, 900)
    spares_after = wait_for_spares(nodes)
    logs = [log.read_text() for log in worker_logs() if f"of run {run_id} handled" in
            log.read_text()]
    fed.stop()
    # Assert: every round of every node ran in that node's one worker ...
    assert status == ("finished:completed", ""), dump_logs(fed, run_id)
    rounds = read_json(run_dir / "results.json")["rounds"]
    assert [r["accepted"] for r in rounds] == [list(range(6))] * 3
    assert all(r["bytes_up"] == 6 * r["payload_bytes"] for r in rounds)
    assert len(logs) == 6
    assert all(log.count("serving at") == 1 and
               log.count(f"train message of run {run_id} handled") == 3 for log in logs)
    # ... and the workers are gone with their SuperNodes
    pids = [int(line.split("warm worker ")[1].split()[0]) for log in logs
            for line in log.splitlines() if "serving at" in line]
    deadline = time.monotonic() + 30
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(map(running, pids))
    # Each node's ClientApp processes were started ahead of their messages (fedmoe.fl.prestart):
    # the spare waiting before the run ran a message (a spare exits only then), and another
    # waits after it; all of them exit with their SuperNodes
    assert all(not running(before) and after != before
               for before, after in zip(spares_before, spares_after, strict=True))
    assert not any(map(running, spares_after))


def wait_for_spares(nodes: list[Service], timeout: float = 120.0) -> list[int]:
    """The pid of the one spare ClientApp process waiting under each prestarted SuperNode."""
    deadline = time.monotonic() + timeout
    while True:
        spares = [[c.pid for c in psutil.Process(node.pid).children(recursive=True)
                   if "--spare" in c.cmdline()] for node in nodes]
        if all(len(s) == 1 for s in spares):
            return [s[0] for s in spares]
        assert time.monotonic() < deadline, f"spares per node: {spares}"
        time.sleep(0.2)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_logs() -> list[Path]:
    """The warm workers' logs on this machine (fedmoe.fl.worker)."""
    import os
    import tempfile

    return sorted((Path(tempfile.gettempdir()) / f"fedmoe-{os.getuid()}").glob("w*.log"))
