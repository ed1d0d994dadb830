"""Scale: many registered virtual clients, a few sampled per round (memory must not grow).

Runs `fedmoe simulate` with N registered clients (default 20 and 100), 10 sampled per round
for training and evaluation, 3 rounds, and samples the resident memory of the whole process
tree (the simulation process and its Ray workers) every 0.2 s. Personal state lives on disk,
so peak memory should not grow with N. Prints a table with ratios and saves JSON.

    python scripts/bench_scale.py                 # N = 20, 100 on the smoke model
    python scripts/bench_scale.py --clients 20 100 500 experiment=demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(n: int, sampled: int, rounds: int, overrides: list[str], out: Path) -> dict:
    run_dir = out / f"clients_{n}"
    frac = sampled / n
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", f"hydra.run.dir={run_dir}",
           f"data.num_clients={n}", f"fl.num_rounds={rounds}", f"fl.fraction_train={frac}",
           f"fl.fraction_evaluate={frac}", f"fl.min_train_nodes={sampled}",
           f"fl.min_evaluate_nodes={sampled}", f"fl.min_available_nodes={n}", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ)
    ps, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"simulate with {n} clients failed (exit {code})")
    res = json.loads((run_dir / "results.json").read_text())
    return {
        "clients": n, "sampled": sampled, "rounds": rounds,
        "peak_rss_mb": peak[0] / 2**20,
        "seconds_per_round": sum(r["wall_seconds"] for r in res["rounds"]) / rounds,
        "trained_per_round": [len(r["accepted"]) for r in res["rounds"]],
        "process_seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", default=["experiment=smoke"])
    parser.add_argument("--clients", nargs="+", type=int, default=[20, 100])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=f"outputs/bench_scale/{time.strftime('%Y%m%d_%H%M%S')}")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rows = [run(n, args.sampled, args.rounds, args.overrides, out) for n in args.clients]
    table = Table(title=f"{args.sampled} clients sampled per round, {args.rounds} rounds")
    for col in ("registered", "peak RSS (MB)", "vs first", "s/round", "vs first"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["clients"]), f"{r['peak_rss_mb']:.0f}",
                      f"{r['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}",
                      f"{r['seconds_per_round']:.1f}",
                      f"{r['seconds_per_round'] / rows[0]['seconds_per_round']:.2f}")
    Console().print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_scale.json").write_text(json.dumps(rows, indent=2))
    print(f"saved {out / 'bench_scale.json'}")


if __name__ == "__main__":
    main()
