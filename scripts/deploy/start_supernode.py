"""Start a Flower SuperNode on a device, with its node config.

    python scripts/deploy/start_supernode.py --superlink 192.168.1.10:9093 \\
        --ca deploy/certs/ca.crt --key deploy/keys/phone \\
        --partition-id 0 --data-path ~/notes.jsonl --state-dir ~/.fedmoe/state \\
        --base-model ~/.fedmoe/base --memory-budget-mb 64

Node config keys (what the ClientApp reads, see fedmoe/fl/client_app.py):
``partition-id`` names this client (its state directory and results entry; without
``data-path`` also its partition of the run's data); ``data-path`` is the device's own
json/jsonl/csv/parquet/txt file, read on the device only; ``state-dir`` keeps its personal
experts across rounds and restarts; ``base-model`` is its copy of the base checkpoint;
``memory-budget-mb`` prunes its routed experts to fit; ``send-roles`` is its privacy policy,
the parameter roles that may leave it (default: the router and the shared expert; a run
asking for more is refused); ``audit-dir`` logs what every message carried in and out;
``warm-worker`` (on unless ``--no-warm-worker``) keeps the model, data and imports in one
worker process between rounds (Flower starts a fresh ClientApp process per message,
fedmoe/fl/worker.py); ``--warm-worker-idle-s`` is how long it stays without a message.
``--prestart`` (on unless ``--no-prestart``) keeps the next ClientApp process started, its
imports done, before its message arrives (fedmoe/fl/prestart.py).

After a crash the SuperLink refuses the same key for up to 60 s (its previous session still
counts as online); ``--retry-activation`` keeps trying that long.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import flwr_home

from fedmoe.launch.commands import flwr_env, supernode_command
from fedmoe.launch.processes import stop_tree

# What flower-supernode prints (then exits) when the SuperLink refuses to activate it.
REFUSED = "Failed to activate SuperNode"


def node_config(args: argparse.Namespace) -> dict:
    config: dict = {}
    if args.partition_id is not None:
        config["partition-id"] = args.partition_id
    config["send-roles"] = args.send_roles
    for key in ("data_path", "state_dir", "base_model", "audit_dir"):
        value = getattr(args, key)
        if value is not None:
            config[key.replace("_", "-")] = str(Path(value).expanduser().resolve())
    if args.memory_budget_mb is not None:
        config["memory-budget-mb"] = args.memory_budget_mb
    config["warm-worker"] = args.warm_worker
    if args.warm_worker:
        config["warm-worker-idle-s"] = args.warm_worker_idle_s
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--superlink", required=True, help="SuperLink host:port")
    parser.add_argument("--ca", type=Path, help="CA certificate (TLS)")
    parser.add_argument("--key", type=Path, help="this node's private key (authentication)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    parser.add_argument("--port", type=int, default=9094,
                        help="this SuperNode's local API port (unique per SuperNode on a host)")
    parser.add_argument("--partition-id", type=int)
    parser.add_argument("--data-path", type=Path)
    parser.add_argument("--state-dir", type=Path, default=Path("~/.fedmoe/state"))
    parser.add_argument("--base-model", type=Path)
    parser.add_argument("--memory-budget-mb", type=float)
    parser.add_argument("--send-roles", default="router,shared_expert",
                        help="roles that may leave this device (comma-separated; 'none')")
    parser.add_argument("--audit-dir", type=Path,
                        help="log every message's tensor names, shapes and bytes here")
    parser.add_argument("--warm-worker", action=argparse.BooleanOptionalAction, default=True,
                        help="run rounds in a worker process that keeps the model between "
                             "rounds (default: on)")
    parser.add_argument("--warm-worker-idle-s", type=float, default=900.0, metavar="SECONDS",
                        help="the warm worker exits after this long without a message")
    parser.add_argument("--prestart", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the next ClientApp process started ahead of its message "
                             "(fedmoe/fl/prestart.py; default: on)")
    parser.add_argument("--retry-activation", type=float, default=90.0, metavar="SECONDS")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.insecure == (args.ca is not None):
        parser.error("give --ca (TLS) or --insecure, not both or neither")
    if args.partition_id is None and args.data_path is None:
        parser.error("give --partition-id and/or --data-path")
    if args.data_path is not None and not args.data_path.expanduser().exists():
        parser.error(f"--data-path {args.data_path} does not exist")
    cmd = supernode_command(args.superlink, args.port, node_config(args),
                            root_certificates=args.ca, private_key=args.key,
                            prestart=args.prestart)
    env = flwr_env(flwr_home())
    sys.exit(run_with_retry(cmd, env, args.retry_activation))


def run_with_retry(cmd: list[str], env: dict, retry_for: float) -> int:
    """Run the SuperNode (its output passed through); start it again while the SuperLink
    refuses its activation: a key not registered (yet), or its previous session still online."""
    deadline = time.monotonic() + retry_for
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _f, p=proc: _stop(p, s))
        refused = False
        for line in proc.stdout:
            sys.stdout.write(line)
            if REFUSED in line:
                # flower-supernode may linger after refusing (its SuperExec keeps retrying)
                refused = True
                stop_tree(proc.pid)
                break
        code = proc.wait()
        if not refused or time.monotonic() > deadline:
            return code
        print("SuperLink refused activation (key not registered, or the previous session of "
              "this key still online); retrying in 5 s", file=sys.stderr, flush=True)
        time.sleep(5)


def _stop(proc: subprocess.Popen, signum: int) -> None:
    """Stop the SuperNode and the processes it started (its SuperExec, ClientApps), then exit."""
    stop_tree(proc.pid)
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
