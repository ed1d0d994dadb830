"""Run fedmoe, fedavg and local side by side on the same seeds, data and compute.

Each strategy is one `fedmoe simulate` run (same experiment, same seed, same clients, same
local steps); the script prints per-client held-out perplexity (mean, worst client, and each
client against the same client trained alone), bytes uploaded per round and wall time, and
saves everything as JSON.

    python scripts/compare_strategies.py                       # experiment=demo
    python scripts/compare_strategies.py experiment=smoke      # any Hydra overrides
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedmoe.reporting.metrics import run_metrics

STRATEGIES = ("fedmoe", "fedavg", "local")


def run(strategy: str, overrides: list[str], out: Path) -> dict:
    """One `fedmoe simulate` run in its own process; its results.json."""
    run_dir = out / strategy
    cmd = [sys.executable, "-m", "fedmoe.cli", "simulate", f"strategy={strategy}",
           f"hydra.run.dir={run_dir}", f"fl.audit_dir={run_dir / 'audit'}", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=os.environ | {"WANDB_MODE": "offline"})
    results = json.loads((run_dir / "results.json").read_text())
    results["process_seconds"] = time.perf_counter() - t0
    results["serialized_reply_bytes"] = reply_bytes(run_dir / "audit")
    return results


def reply_bytes(audit_dir: Path) -> list[int]:
    """Serialized size of every train reply (all records: arrays, metrics, expert ids), as
    the client mod measured it on the real messages."""
    sizes = []
    for path in sorted(audit_dir.glob("client_*.jsonl")):
        for line in path.read_text().splitlines():
            m = json.loads(line)
            if m["direction"] == "out" and m["type"] == "train":
                sizes.append(sum(r["bytes"] for r in m["records"].values()))
    return sizes


def summarize(results: dict) -> dict:
    """The numbers the comparison quotes for one strategy (:mod:`fedmoe.reporting.metrics`)."""
    m = run_metrics(results)
    sizes = results["serialized_reply_bytes"]
    payload = results.get("payload_bytes", 0)
    return {
        "payload_bytes": payload,
        "serialized_reply_bytes_mean": sum(sizes) / len(sizes) if sizes else 0,
        "serialization_overhead": (sum(sizes) / len(sizes) / payload - 1) if sizes and payload
        else None,
        "ppl_mean": m.ppl_mean,
        "ppl_worst": m.ppl_worst,
        "ppl_by_client": m.ppl_by_client,
        "base_ppl_mean": m.base_ppl_mean,
        "bytes_up_per_client_round": m.bytes_up_per_client_round,
        "bytes_up_total": m.bytes_up,
        "bytes_down_total": m.bytes_down,
        "seconds_per_round": m.seconds_per_round,
        "wall_seconds": m.wall_seconds,
    }


def print_tables(summary: dict[str, dict]) -> None:
    console = Console(width=140)
    table = Table(title="strategies side by side (held-out perplexity of each client's model)")
    for col in ("strategy", "ppl mean", "ppl worst", "vs local (mean)", "MB up/client/round",
                "s/round"):
        table.add_column(col, justify="right")
    local = summary.get("local")
    for name, s in summary.items():
        ratio = f"{s['ppl_mean'] / local['ppl_mean']:.3f}" if local else "-"
        table.add_row(name, f"{s['ppl_mean']:.2f}", f"{s['ppl_worst']:.2f}", ratio,
                      f"{s['bytes_up_per_client_round'] / 2**20:.3f}",
                      f"{s['seconds_per_round']:.1f}")
    console.print(table)
    clients = Table(title="per client")
    clients.add_column("client", justify="right")
    for name in summary:
        clients.add_column(name, justify="right")
    first = next(iter(summary.values()))
    for c in first["ppl_by_client"]:
        clients.add_row(c, *[f"{summary[n]['ppl_by_client'][c]:.2f}" for n in summary])
    console.print(clients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    parser.add_argument("--out", default=f"outputs/compare/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    names = args.strategies.split(",")
    results = {name: run(name, args.overrides, out) for name in names}
    summary = {name: summarize(r) for name, r in results.items()}
    print_tables(summary)
    if "fedmoe" in summary and "fedavg" in summary:
        up = summary["fedavg"]["bytes_up_per_client_round"]
        print(f"upload per client per round: fedmoe/fedavg = "
              f"{summary['fedmoe']['bytes_up_per_client_round'] / up:.3f}")
    for name, s in summary.items():
        if s["serialization_overhead"] is not None:
            mb = s["serialized_reply_bytes_mean"] / 2**20
            print(f"{name}: serialized train reply {mb:.3f} MB"
                  f" vs raw aggregated tensors {s['payload_bytes'] / 2**20:.3f} MB: overhead "
                  f"{s['serialization_overhead']:.3%}")
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    print(f"saved {out / 'compare.json'}")


if __name__ == "__main__":
    main()
