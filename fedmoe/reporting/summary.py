"""The tables and headline printed at the end of ``fedmoe simulate`` (from ``results.json``)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from fedmoe.reporting.metrics import MB, run_metrics


def print_summary(results: dict) -> None:
    """The per-client table and per-round line a user reads at the end of a run."""
    console = Console(width=120)
    rounds = Table(title=f"rounds ({results['strategy']['name']})")
    for col in ("round", "train loss", "ppl (mean)", "ppl (worst)", "MB down", "MB up", "s"):
        rounds.add_column(col, justify="right")
    for r in results["rounds"]:
        rounds.add_row(str(r["round"]), _fmt(r["train_loss"]), _fmt(r["eval_ppl_mean"]),
                       _fmt(r["eval_ppl_worst"]), f"{r['bytes_down'] / MB:.2f}",
                       f"{r['bytes_up'] / MB:.2f}", f"{r['wall_seconds']:.1f}")
    console.print(rounds)
    clients = Table(title="clients (held-out perplexity of each personalized model)")
    for col in ("client", "base ppl", "ppl", "examples", "MB sent", "MB received"):
        clients.add_column(col, justify="right")
    for cid, c in results["clients"].items():
        clients.add_row(cid, _fmt(c.get("base_ppl")), _fmt(c["final_ppl"]),
                        str(c["examples"]), f"{c['bytes_sent'] / MB:.2f}",
                        f"{c['bytes_received'] / MB:.2f}")
    console.print(clients)
    for cid, c in results["clients"].items():
        if c.get("rounds_rejected"):
            console.print(f"client {cid}: {c['rounds_rejected']} round(s) rejected, last: "
                          f"{c.get('last_error')}")
    memory = results.get("memory") or {}
    if memory.get("peak_pss_bytes"):
        ratio = memory.get("peak_over_checkpoint")
        console.print(f"peak memory of the simulation (PSS, all processes): "
                      f"{memory['peak_pss_bytes'] / 2**30:.2f} GiB"
                      + (f" = {ratio:.2f}x the base checkpoint" if ratio else ""))
    for line in headline(results):
        console.print(line)


def headline(results: dict) -> list[str]:
    """The comparison that matters: what personalization gained, what communication cost."""
    lines = []
    m = run_metrics(results)
    if m.clients_compared:
        base, final = m.base_ppl_mean, m.ppl_mean
        lines.append(f"held-out perplexity, mean over {m.clients_compared} clients: shared "
                     f"start {base:.2f} -> personalized {final:.2f} ({final / base:.3f}x); "
                     f"{m.clients_improved}/{m.clients_compared} clients improved")
    full = results.get("trainable_bytes")
    if full:
        sent = results.get("payload_bytes", 0)
        lines.append(f"upload per client per round: {sent / MB:.2f} MB = "
                     f"{sent / full:.1%} of all trainable tensors ({full / MB:.2f} MB, what "
                     f"strategy=fedavg sends)")
    return lines


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
