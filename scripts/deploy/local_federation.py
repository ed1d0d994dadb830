"""A whole federation on this machine: SuperLink + N SuperNodes on 127.0.0.1, one run.

    python scripts/deploy/local_federation.py --nodes 2 experiment=smoke fl.num_rounds=2

TLS and SuperNode authentication are on (``--insecure``/``--no-auth`` to compare), and each
node keeps its model between rounds in a warm worker (``--no-warm-worker`` to compare) and its
next ClientApp process started ahead of the message (``--no-prestart`` to compare); the
certificates, keys, Flower config and logs go to ``--root``. The base model is pretrained
once (cached) when ``fl.base_model`` is not given. Every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from fedmoe.config import validate
from fedmoe.fl.bridge import compose
from fedmoe.launch.control import stage_app
from fedmoe.launch.federation import LocalFederation

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--no-auth", action="store_true")
    parser.add_argument("--warm-worker", action=argparse.BooleanOptionalAction, default=True,
                        help="each node runs its rounds in a warm worker process "
                             "(fedmoe/fl/worker.py; default: on)")
    parser.add_argument("--prestart", action=argparse.BooleanOptionalAction, default=True,
                        help="each node starts its next ClientApp process ahead of the "
                             "message (fedmoe/fl/prestart.py; default: on)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = list(args.overrides)
    cfg = compose(overrides)
    validate(cfg, deployment=True)  # before anything is created
    root = (args.root or Path(tempfile.mkdtemp(prefix="fedmoe_federation_"))).resolve()
    base = cfg.fl.base_model or cfg.model.path
    if not base:
        from fedmoe.train.pretrain import ensure_base_model

        base = ensure_base_model(cfg)
        overrides.append(f"fl.base_model={base}")
    if not cfg.run_dir:
        overrides.append(f"run_dir={root / 'run'}")
    # Every node waits to be sampled; partition-ids 0..N-1 split the data N ways.
    overrides += [f"fl.min_available_nodes={args.nodes}", f"data.num_clients={args.nodes}"]
    env = {"FEDMOE_CACHE": os.environ.get("FEDMOE_CACHE", str(REPO / ".cache" / "fedmoe"))}
    with LocalFederation(root, tls=not args.insecure, auth=not args.no_auth, env=env) as fed:
        fed.start_superlink()
        for i in range(args.nodes):
            # A device takes its paths from its node config, never from the run config
            fed.start_node(f"node{i}", {"partition-id": i, "base-model": str(base),
                                        "state-dir": str(root / "state" / f"node{i}"),
                                        "warm-worker": args.warm_worker},
                           prestart=args.prestart)
        fed.wait_for_nodes(args.nodes)
        start = time.perf_counter()
        run_id = fed.run(stage_app(REPO, root / "app"), overrides)
        print(f"run {run_id} started; logs in {root / 'logs'}")
        status, details = fed.wait(run_id, args.timeout)
        print(f"run {run_id}: {status} {details} in {time.perf_counter() - start:.0f} s")
    results = Path(compose(overrides).run_dir) / "results.json"
    if results.exists():
        rounds = json.loads(results.read_text())["rounds"]
        for r in rounds:
            print(f"round {r['round']}: accepted {r['accepted']}, rejected {r['rejected']}, "
                  f"train loss {r['train_loss']}")
    sys.exit(0 if status == "finished:completed" else 1)


if __name__ == "__main__":
    main()
