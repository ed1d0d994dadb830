"""What a round costs on Flower's Deployment Engine, per device, side by side.

Starts a SuperLink and N SuperNodes on 127.0.0.1 (TLS and SuperNode authentication on, as
the launchers default) for each variant and runs ``experiment=smoke`` for a few rounds with
`flwr run`:

    flower       this code, every message in a ClientApp process that Flower's SuperExec
                 starts when the message arrives (``--no-prestart --no-warm-worker``: what
                 ``flower-supernode`` started by hand gets)
    cold         the same, with the next ClientApp process started ahead of its message
                 (``fedmoe.fl.prestart``)
    warm_flower  the node's warm worker (``warm-worker = true``), Flower's SuperExec
    warm         warm worker and prestarted ClientApp processes (the launchers' default)
    before       another checkout of fedmoe (``--before DIR``, e.g. a ``git worktree`` of an
                 older commit), run with that checkout's app, Flower's SuperExec and its
                 default poll interval (1 s)

For every round it splits the wall time into what the clients report (process start to
handler, or from a prestarted process's task token to handler; model assembly; training;
evaluation) and the server's aggregation;
the rest is Flower moving and polling for messages. It samples the PSS of each SuperNode's
process tree with its ClientApp processes and its warm worker, and measures the size on disk
of this interpreter's environment. Prints tables and ratios and saves JSON.

    python scripts/bench_deploy.py --before /tmp/fedmoe_before      # every variant
    python scripts/bench_deploy.py --variants warm --rounds 5

On one machine the N ClientApps share its cores: a round here measures this machine as much
as Flower. Ratios between variants of one run are what to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from fedmoe.fl.bridge import compose
from fedmoe.launch.control import stage_app
from fedmoe.launch.federation import LocalFederation

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "fl.export=false"]
# variant -> (warm worker, prestarted ClientApp processes)
VARIANTS = {"flower": (False, False), "cold": (False, True), "warm_flower": (True, False),
            "warm": (True, True), "before": (False, False)}


class NodeMemory(threading.Thread):
    """Peak PSS (MB) of each SuperNode's process tree plus the warm workers it started."""

    def __init__(self, pids: dict[str, int], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak = {name: 0.0 for name in pids}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            workers = _workers()
            for name, pid in self.pids.items():
                try:
                    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
                except psutil.Error:
                    continue
                tree += [w for w, parent in workers if parent in {p.pid for p in tree}]
                self.peak[name] = max(self.peak[name], sum(_pss(p) for p in tree) / 2**20)
            time.sleep(self.interval)

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.join(timeout=5)
        return self.peak


def _workers() -> list[tuple[psutil.Process, int]]:
    """Running warm workers and the pid they watch (their SuperNode's SuperExec)."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "fedmoe.fl.worker" in cmd and "--parent-pid" in cmd:
            out.append((proc, int(cmd[cmd.index("--parent-pid") + 1])))
    return out


def _pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except psutil.Error:
        return 0


def run_variant(name: str, repo: Path, nodes: int, rounds: int, root: Path, base: Path,
                env: dict) -> dict:
    """One federation, one run; per-round figures from its results.json."""
    run_dir = root / "run"
    overrides = [*SMOKE, f"fl.base_model={base}", f"run_dir={run_dir}", f"fl.num_rounds={rounds}",
                 f"data.num_clients={nodes}", f"fl.min_available_nodes={nodes}"]
    with LocalFederation(root, env=env) as fed:
        fed.start_superlink()
        pids = {}
        for i in range(nodes):
            warm, prestart = VARIANTS[name]
            config = {"partition-id": i, "state-dir": str(root / f"state{i}"),
                      "base-model": str(base), "warm-worker": warm}
            pids[f"node{i}"] = fed.start_node(f"node{i}", config, prestart=prestart).pid
        fed.wait_for_nodes(nodes, timeout=600)
        memory = NodeMemory(pids)
        memory.start()
        start = time.perf_counter()
        run_id = fed.run(stage_app(repo, root / "app"), overrides)
        status, details = fed.wait(run_id, timeout=3600)
        total = time.perf_counter() - start
        peak = memory.stop()
    if status != "finished:completed":
        raise RuntimeError(f"{name}: run {status} {details}; logs in {root / 'logs'}")
    results = json.loads((run_dir / "results.json").read_text())
    return {"variant": name, "nodes": nodes, "rounds": rounds, "run_s": total,
            "per_round": [_split(r) for r in results["rounds"]],
            "node_pss_peak_mb": peak, "train_loss": [r["train_loss"] for r in results["rounds"]]}


def _split(entry: dict) -> dict:
    """A round's wall time and its parts (None where the clients did not report one)."""
    client = entry.get("client_seconds") or {}
    parts = {"start": client.get("start"), "assemble": client.get("assemble"),
             "train": client.get("train") or entry.get("train_seconds"),
             "evaluate": client.get("evaluate"), "evaluate_start": client.get("evaluate_start"),
             "aggregate": entry.get("aggregate_seconds")}
    known = sum(v for v in parts.values() if v)
    compute = (parts["train"] or 0) + (parts["evaluate"] or 0)
    return {"round": entry["round"], "wall": entry["wall_seconds"], **parts,
            "rest": entry["wall_seconds"] - known,
            "wall_per_compute": entry["wall_seconds"] / compute if parts["evaluate"] else None,
            "wall_per_train": entry["wall_seconds"] / parts["train"] if parts["train"] else None,
            "evaluated_in_train": entry.get("evaluated_in_train", False)}


def venv_mb(prefix: str = sys.prefix) -> float:
    """Size on disk of an environment's files (MB)."""
    total = 0
    for dirpath, _, files in os.walk(prefix):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total / 2**20


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(rows: list[dict]) -> None:
    console = Console(width=160)
    table = Table(title="Deployment round, per round (seconds; client figures are means over "
                        "the nodes)")
    for col in ("variant", "round", "wall", "client start", "assemble", "train", "evaluate",
                "eval msg start", "aggregate", "rest (Flower)", "wall/(train+eval)",
                "wall/train"):
        table.add_column(col, justify="right")
    for row in rows:
        for r in row["per_round"]:
            table.add_row(row["variant"], str(r["round"]), _fmt(r["wall"], ".1f"),
                          _fmt(r["start"]), _fmt(r["assemble"]), _fmt(r["train"]),
                          _fmt(r["evaluate"]), _fmt(r["evaluate_start"]), _fmt(r["aggregate"]),
                          _fmt(r["rest"], ".1f"), _fmt(r["wall_per_compute"], ".1f"),
                          _fmt(r["wall_per_train"], ".1f"))
    console.print(table)
    summary = Table(title="Per variant: rounds 2.. (round 1 starts processes and workers)")
    for col in ("variant", "round wall s (median)", "wall/(train+eval)", "wall/train",
                "client start s", "node PSS peak MB (max)"):
        summary.add_column(col, justify="right")
    for row in rows:
        later = row["per_round"][1:] or row["per_round"]

        def med(key, later=later):
            return _median([r[key] for r in later])

        summary.add_row(row["variant"], _fmt(med("wall"), ".1f"),
                        _fmt(med("wall_per_compute"), ".1f"), _fmt(med("wall_per_train"), ".1f"),
                        _fmt(med("start")), f"{max(row['node_pss_peak_mb'].values()):.0f}")
        row["summary"] = {k: med(k) for k in ("wall", "wall_per_compute", "wall_per_train",
                                              "start")}
    console.print(summary)
    by = {row["variant"]: row["summary"] for row in rows}
    for a, b in (("before", "warm"), ("flower", "warm"), ("cold", "warm"),
                 ("warm_flower", "warm"), ("before", "cold")):
        if a in by and b in by and by[b]["wall"]:
            print(f"round wall time {a} / {b}: {by[a]['wall'] / by[b]['wall']:.2f}x")
    for a, b in (("flower", "cold"), ("warm_flower", "warm")):
        if a in by and b in by and by[b]["start"]:
            print(f"client start {a} / {b}: {by[a]['start'] / by[b]['start']:.2f}x")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["flower", "cold", "warm_flower", "warm"],
                        choices=["flower", "cold", "warm_flower", "warm"])
    parser.add_argument("--before", type=Path, help="an older fedmoe checkout to compare")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_deploy.json")
    args = parser.parse_args()
    os.environ.setdefault("FEDMOE_CACHE", str(REPO / ".cache" / "fedmoe"))
    env = {"FEDMOE_CACHE": os.environ["FEDMOE_CACHE"]}
    from fedmoe.train.pretrain import ensure_base_model

    base = ensure_base_model(compose(["experiment=smoke"]), progress=False)
    variants = [(v, REPO, env) for v in args.variants]
    if args.before:
        # That checkout's SuperExec polled at Flower's default interval.
        variants.insert(0, ("before", args.before.resolve(),
                            env | {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0"}))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_deploy_") as tmp:
        for name, repo, variant_env in variants:
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(run_variant(name, repo, args.nodes, args.rounds, Path(tmp) / name,
                                    base, variant_env))
    report(rows)
    size = venv_mb()
    print(f"this environment ({sys.prefix}): {size:.0f} MB on disk")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"nodes": args.nodes, "rounds": args.rounds,
                                    "cpus": os.cpu_count(), "env_mb": size, "runs": rows},
                                   indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
