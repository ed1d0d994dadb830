"""Deployment scale: round time and SuperLink memory as SuperNodes grow (real processes).

For each N (default 2, 4, 8) starts a SuperLink and N SuperNodes on 127.0.0.1 (TLS and
SuperNode authentication on, as the launchers default), runs fedmoe for a few tiny rounds
with `flwr run`, and samples every 0.2 s the resident memory (psutil RSS) of the SuperLink
process alone and of the SuperLink with its ServerApp. Prints a table and saves JSON.

    python scripts/bench_deploy.py                       # N = 2, 4, 8; 2 rounds
    python scripts/bench_deploy.py --nodes 2 4 --rounds 3 --insecure

On one machine the N ClientApps share its cores: round time then measures this machine as
much as Flower; the SuperLink's memory is what a real deployment would see.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from fedmoe.fl.bridge import compose
from fedmoe.fl.deploy import LocalFederation, stage_app

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=smoke", "train.local_steps=1", "data.max_train_blocks_per_client=8",
        "data.max_eval_blocks_per_client=2", "fl.export=false", "fl.fraction_evaluate=0"]


class RssSampler(threading.Thread):
    """Peak and mean RSS (MB) of a process, alone and with its descendants."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.proc, self.interval = psutil.Process(pid), interval
        self.alone: list[float] = []
        self.tree: list[float] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                alone = self.proc.memory_info().rss
                tree = alone
                for child in self.proc.children(recursive=True):
                    try:
                        tree += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.alone.append(alone / 2**20)
            self.tree.append(tree / 2**20)
            time.sleep(self.interval)

    def stop(self) -> dict:
        self.stopped.set()
        self.join(timeout=5)
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {"superlink_rss_peak_mb": max(self.alone, default=None),
                "superlink_rss_mean_mb": mean(self.alone),
                "superlink_serverapp_rss_peak_mb": max(self.tree, default=None)}


def bench(n: int, rounds: int, root: Path, base: Path, app: Path, tls: bool,
          env: dict) -> dict:
    run_dir = root / "run"
    overrides = [*TINY, f"fl.base_model={base}", f"run_dir={run_dir}", f"fl.num_rounds={rounds}",
                 f"data.num_clients={n}", f"fl.min_available_nodes={n}", "fl.round_timeout=1800"]
    with LocalFederation(root, tls=tls, auth=tls, env=env) as fed:
        start = time.perf_counter()
        fed.start_superlink()
        sampler = RssSampler(fed.superlink.pid)
        sampler.start()
        for i in range(n):
            fed.start_node(f"node{i}", {"partition-id": i, "state-dir": str(root / f"s{i}"),
                                        "base-model": str(base)})
        fed.wait_for_nodes(n, timeout=600)
        online = time.perf_counter() - start
        run_id = fed.run(app, overrides)
        status, details = fed.wait(run_id, timeout=3600)
        total = time.perf_counter() - start - online
        memory = sampler.stop()
    if status != "finished:completed":
        raise RuntimeError(f"N={n}: run {status} {details}; logs in {root / 'logs'}")
    results = json.loads((run_dir / "results.json").read_text())
    walls = [r["wall_seconds"] for r in results["rounds"]]
    return {"nodes": n, "rounds": rounds, "startup_s": online, "run_s": total,
            "round_s_mean": sum(walls) / len(walls), "round_s": walls,
            "accepted": [len(r["accepted"]) for r in results["rounds"]],
            "mb_up_per_round": results["rounds"][-1]["bytes_up"] / 2**20, **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node auth")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_deploy.json")
    args = parser.parse_args()
    os.environ.setdefault("FEDMOE_CACHE", str(REPO / ".cache" / "fedmoe"))
    env = {"FEDMOE_CACHE": os.environ["FEDMOE_CACHE"]}
    from fedmoe.task.pretrain import ensure_base_model

    base = ensure_base_model(compose(["experiment=smoke"]), progress=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        app = stage_app(REPO, Path(tmp) / "app")
        for n in args.nodes:
            print(f"N={n} ...", file=sys.stderr, flush=True)
            rows.append(bench(n, args.rounds, Path(tmp) / f"n{n}", base, app,
                              not args.insecure, env))
    table = Table(title=f"fedmoe on Flower deployment, {args.rounds} rounds "
                        f"({'insecure' if args.insecure else 'TLS + node auth'})")
    for col in ("SuperNodes", "startup s", "round s (mean)", "accepted/round",
                "SuperLink RSS peak MB", "mean MB", "+ServerApp peak MB", "MB up/round"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["nodes"]), f"{r['startup_s']:.1f}", f"{r['round_s_mean']:.1f}",
                      "/".join(map(str, r["accepted"])), f"{r['superlink_rss_peak_mb']:.0f}",
                      f"{r['superlink_rss_mean_mb']:.0f}",
                      f"{r['superlink_serverapp_rss_peak_mb']:.0f}", f"{r['mb_up_per_round']:.2f}")
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": args.rounds, "tls": not args.insecure,
                                    "cpus": os.cpu_count(), "runs": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
