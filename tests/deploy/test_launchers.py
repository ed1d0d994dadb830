"""Launcher helpers: certificates, SuperNode keys, Flower config, commands, the app bundle.

Each artifact is checked by the Flower 1.42 code that consumes it (its config reader, its key
loader, its FAB builder), so a format drift in Flower shows here first.
"""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.config import parse_config_args

from fedmoe.fl.bridge import overrides_from_run_config
from fedmoe.launch import processes
from fedmoe.launch.certs import TlsFiles, generate_supernode_keys, generate_tls_certificates
from fedmoe.launch.commands import node_config_arg, superlink_command, supernode_command
from fedmoe.launch.control import Control, stage_app
from fedmoe.launch.flower_config import write_run_config, write_superlink_connection
from fedmoe.launch.processes import Service, free_port, wait_for_port
from tests.helpers.runs import REPO, child_env

SCRIPTS = REPO / "scripts" / "deploy"


def test_server_certificate_is_signed_by_the_ca_for_localhost(tmp_path):
    # Execute
    tls = generate_tls_certificates(tmp_path, hosts=("127.0.0.1", "localhost"))
    # Assert
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(os.stat(tls.server_key).st_mode) == 0o600


@pytest.mark.parametrize("ephemeral", [None, (1024, 60999), (1024, 65000)])
def test_free_ports_lie_outside_the_range_outgoing_connections_take_source_ports_from(
        ephemeral, monkeypatch):
    # A port in the ephemeral range can be taken, between the check and the server's bind,
    # by any outgoing connection's source port (a SuperNode failed so in CI). None: this
    # machine's range; then ranges that leave no room below, and no room on either side.
    if ephemeral is not None:
        monkeypatch.setattr(processes, "ephemeral_range", lambda: ephemeral)
    low, high = processes.ephemeral_range()
    # Execute
    ports = [free_port() for _ in range(20)]
    # Assert
    if high - low > 60000:  # no room outside: the kernel's choice, still a free port
        assert all(1024 <= port <= 65535 for port in ports)
    else:
        assert all(1024 <= port < low or high < port <= 65535 for port in ports), ports
    if high - low <= 60000:
        assert len(set(ports)) == len(ports)  # never the same port twice in a process
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free now


def test_supernode_keys_load_as_flower_expects(tmp_path):
    # Execute
    keys = generate_supernode_keys(tmp_path, "node0")
    # Assert: the public key passes `flwr supernode register`'s loader, the private key
    # `flower-supernode --auth-supernode-private-key`'s (OpenSSH, NIST EC curve)
    assert try_load_public_key(keys.public_key)
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert stat.S_IMODE(os.stat(keys.private_key).st_mode) == 0o600


def test_connections_are_what_flwr_reads(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    ca = tmp_path / "ca.crt"
    ca.write_text("-")
    # Execute
    write_superlink_connection(tmp_path, "local", ":local:", default=False)
    write_superlink_connection(tmp_path, "edge", "127.0.0.1:9093", root_certificates=ca)
    # Assert
    edge = read_superlink_connection("edge")
    assert edge.address == "127.0.0.1:9093"
    assert edge.root_certificates == str(ca.resolve()) and not edge.insecure
    assert read_superlink_connection(None).name == "edge"  # the default
    assert read_superlink_connection("local").address == ":local:"


def test_a_tls_connection_needs_the_ca(tmp_path):
    with pytest.raises(ValueError, match="root_certificates"):
        write_superlink_connection(tmp_path, "edge", "127.0.0.1:9093")


def test_node_config_parses_back_with_flowers_parser():
    # Prepare
    config = {"partition-id": 3, "data-path": "/data/my notes.jsonl", "memory-budget-mb": 64.5,
              "debug": False}
    # Execute
    parsed = parse_config_args([node_config_arg(config)])
    # Assert
    assert parsed == config
    with pytest.raises(ValueError, match="data-path"):
        node_config_arg({"data-path": 'a"b'})


def test_hydra_overrides_travel_in_a_run_config_file(tmp_path):
    # Prepare: values with spaces and quotes, as a shell would mangle them
    overrides = ["experiment=smoke", "run_dir='/tmp/a dir'", 'fl.audit_dir="/x y"']
    # Execute: the file `flwr run --run-config` reads, parsed by Flower's own parser
    parsed = parse_config_args([str(write_run_config(tmp_path / "rc.toml", overrides))])
    # Assert
    assert overrides_from_run_config(parsed) == overrides


def test_tls_and_authentication_are_the_default():
    # Execute
    tls = TlsFiles(Path("ca.crt"), Path("server.pem"), Path("server.key"))
    default = superlink_command(9093, tls=tls, auth=True)
    insecure = superlink_command(9093, tls=None, auth=False)
    node = supernode_command("127.0.0.1:9093", 9094, {"partition-id": 0},
                             root_certificates="ca.crt", private_key="node0")
    # Assert
    assert "--enable-supernode-auth" in default and "--insecure" not in default
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"} <= set(default)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert "--disable-runtime-dependency-installation" in default
    assert node[:3] == [sys.executable, "-m", "fedmoe.fl.prestart"]  # prestarted ClientApps
    assert Path(supernode_command("127.0.0.1:9093", 9094, {}, root_certificates=None,
                                  prestart=False)[0]).name == "flower-supernode"
    assert node[node.index("--root-certificates") + 1] == "ca.crt"
    assert node[node.index("--auth-supernode-private-key") + 1] == "node0"
    assert "--insecure" not in node


def test_app_bundle_holds_the_package_and_configs_only(tmp_path):
    # Prepare: the app, plus what must never be shipped: a user's data, keys, a cache
    from flwr.cli.build import build_fab_from_disk

    app = stage_app(REPO, tmp_path / "fedmoe_app")
    (app / "clients.jsonl").write_text('{"text": "private"}\n')
    (app / "deploy" / "keys").mkdir(parents=True)
    (app / "deploy" / "keys" / "node0").write_text("secret")
    (app / "deploy" / "run.json").write_text("{}")
    (app / ".cache" / "fedmoe").mkdir(parents=True)
    (app / ".cache" / "fedmoe" / "x.json").write_text("{}")
    # Execute
    fab = build_fab_from_disk(app)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    # Assert
    assert len(fab) < 10 * 2**20  # Flower's FAB limit
    assert {"fedmoe/fl/client_app.py", "fedmoe/fl/server_app.py", "conf/simulate.yaml",
            "pyproject.toml"} <= set(names)
    assert {n.split("/")[0] for n in names} <= {"fedmoe", "conf", "pyproject.toml",
                                                "README.md", ".info"}
    assert not [n for n in names if n.startswith("fedmoe/launch/")]  # launchers only


@pytest.mark.slow
def test_flwr_packs_the_repository_under_its_limit():
    # `flwr run .` from the repository: .venv and .cache (GBs) must stay out
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < 2 * 2**20
    assert not [n for n in names if n.startswith((".venv", ".cache", "outputs", "tests",
                                                  "fedmoe/launch/"))]


def test_make_certs_script_writes_certs_and_keys(tmp_path):
    # Execute
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "deploy" / "make_certs.py"),
                          "--out", str(tmp_path), "--nodes", "phone", "tablet"],
                         capture_output=True, text=True, timeout=120)
    # Assert
    assert out.returncode == 0, out.stderr
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {"certs/ca.crt", "certs/server.pem", "certs/server.key", "keys/phone",
                     "keys/phone.pub", "keys/tablet", "keys/tablet.pub"}


def launcher(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``scripts/deploy/<name>.py <args>`` as a user runs it."""
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("name", "args", "message"), [
    ("start_superlink", ["--certs", "{tmp}/none"], "run scripts/deploy/make_certs.py"),
    ("start_supernode", ["--superlink", "127.0.0.1:1", "--insecure", "--ca", "ca.crt",
                         "--partition-id", "0"], "give --ca (TLS) or --insecure"),
    ("start_supernode", ["--superlink", "127.0.0.1:1", "--insecure"],
     "give --partition-id and/or --data-path"),
    ("start_supernode", ["--superlink", "127.0.0.1:1", "--insecure", "--data-path",
                         "{tmp}/notes.jsonl"], "notes.jsonl does not exist"),
    ("add_connection", ["--address", "127.0.0.1:1"], "give --ca (TLS) or --insecure"),
    ("run", ["--connection", "x", "fl.num_rounds=0"], "fl.num_rounds=0"),
    ("local_federation", ["--nodes", "2", "fl.num_rounds=0"], "fl.num_rounds=0"),
])
def test_a_launcher_refuses_bad_arguments_before_it_starts_anything(name, args, message,
                                                                     tmp_path):
    env = child_env(tmp_path / "cache", FLWR_HOME=str(tmp_path / "flwr"))
    proc = launcher(name, *(a.format(tmp=tmp_path) for a in args), env=env)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "flwr").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_the_launchers_bring_up_an_authenticated_federation(tmp_path, smoke_base, monkeypatch):
    """README steps 1-4 with the scripts themselves: certificates, a TLS SuperLink with
    SuperNode authentication, the connection, registered keys, and a device's SuperNode
    with its node config (base model included) that the SuperLink then counts online."""
    # Prepare
    flwr_home, deploy, port = tmp_path / "flwr", tmp_path / "deploy", free_port()
    env = child_env(tmp_path / "cache", FLWR_HOME=str(flwr_home))
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))  # where read_superlink_connection looks
    ca = deploy / "certs" / "ca.crt"
    assert launcher("make_certs", "--out", deploy, "--hosts", "127.0.0.1", "--nodes", "phone",
                    "tablet", env=env).returncode == 0
    superlink = Service("superlink", [sys.executable, str(SCRIPTS / "start_superlink.py"),
                                      "--certs", str(deploy / "certs"), "--port", str(port)],
                        tmp_path / "superlink.log", env)
    node = Service("phone", [sys.executable, str(SCRIPTS / "start_supernode.py"),
                             "--superlink", f"127.0.0.1:{port}", "--ca", str(ca),
                             "--key", str(deploy / "keys" / "phone"), "--partition-id", "3",
                             "--state-dir", str(tmp_path / "state"), "--base-model",
                             str(smoke_base), "--port", str(free_port())],
                   tmp_path / "phone.log", env)
    try:
        superlink.start()
        wait_for_port("127.0.0.1", port, 60)
        superlink.wait_for(r"Uvicorn running|Starting the SuperLink Fleet", 60)
        # Execute: steps 3 and 4 of the README
        added = launcher("add_connection", "--name", "edge", "--address", f"127.0.0.1:{port}",
                         "--ca", ca, env=env)
        registered = launcher("register_supernodes", "--connection", "edge",
                              deploy / "keys" / "phone.pub", deploy / "keys" / "tablet.pub",
                              env=env)
        node.start()
        control = Control(f"127.0.0.1:{port}", ca)
        ids = [int(i) for i in re.findall(r"node id (\d+)", registered.stdout)]
        deadline = time.monotonic() + 120
        while control.nodes().get(ids[0] if ids else -1) != "online":
            assert node.alive() and time.monotonic() < deadline, node.log()[-3000:]
            time.sleep(0.5)
        supernode = next(p for p in psutil.Process(node.pid).children(recursive=True)
                         if "flower-supernode" in " ".join(p.cmdline()))
        node_config = supernode.cmdline()[supernode.cmdline().index("--node-config") + 1]
        statuses = control.nodes()
    finally:
        node.stop()
        superlink.stop()
    # Assert
    assert added.returncode == 0, added.stderr
    connection = read_superlink_connection("edge")
    assert connection.address == f"127.0.0.1:{port}" and not connection.insecure
    assert connection.root_certificates == str(ca.resolve())
    assert registered.returncode == 0 and len(ids) == 2, registered.stdout + registered.stderr
    assert statuses[ids[0]] == "online" and statuses[ids[1]] == "registered"
    assert parse_config_args([node_config]) == {
        "partition-id": 3, "state-dir": str((tmp_path / "state").resolve()),
        "base-model": str(smoke_base.resolve()),
        "send-roles": "router,shared_expert",  # the strict privacy policy by default
        "warm-worker": True, "warm-worker-idle-s": 900.0}  # rounds keep the model warm
