"""What a federated run's pruning did, for the console: per client, the experts kept per MoE
layer, routed-expert MB before -> after, and where its pruned model was exported.

Reads the run's ``results.json`` (``clients.<id>.experts_kept`` and ``routed_expert_mb``,
filled from the clients' evaluate replies) and the clients' state directories; ``fedmoe
prune`` prints its own table (``fedmoe.prune.cli``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedmoe.artifacts import MODEL_DIR, client_dir


def pruned_clients(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The clients whose routed experts shrank (MB after < before), by client id."""
    out = {}
    for cid, entry in results.get("clients", {}).items():
        mb = entry.get("routed_expert_mb") or {}
        if mb.get("before") is not None and mb.get("after") is not None \
                and mb["after"] < mb["before"]:
            out[cid] = entry
    return out


def pruning_table(results: Mapping[str, Any], state_dir: str | Path) -> Table | None:
    """The table of :func:`print_pruning_summary`, or ``None`` when no client pruned."""
    clients = pruned_clients(results)
    if not clients:
        return None
    prune = results.get("config", {}).get("prune", {})
    budget = ", ".join(f"{k}={prune[k]}" for k in ("keep", "keep_per_layer", "max_mb", "schedule")
                       if prune.get(k) is not None)
    table = Table(title=f"pruning: score={prune.get('score', '?')}, {budget or 'budget ?'}")
    for column in ("client", "experts kept per MoE layer", "routed MB before -> after", "export"):
        table.add_column(column, justify="left" if column == "export" else "right")
    for cid, entry in clients.items():
        kept = entry.get("experts_kept") or {}
        layers = " ".join(f"{layer}:{n}" for layer, n in sorted(kept.items(), key=_layer))
        mb = entry["routed_expert_mb"]
        export = client_dir(state_dir, int(cid)) / MODEL_DIR
        table.add_row(cid, layers, f"{mb['before']:.3f} -> {mb['after']:.3f}",
                      str(export) if (export / "config.json").is_file() else "(not exported)")
    return table


def print_pruning_summary(results: Mapping[str, Any], state_dir: str | Path) -> None:
    """Print the pruning table and the total MB line; nothing when no client pruned."""
    table = pruning_table(results, state_dir)
    if table is None:
        return
    console = Console(width=160)
    console.print(table)
    clients = pruned_clients(results).values()
    before = sum(c["routed_expert_mb"]["before"] for c in clients)
    after = sum(c["routed_expert_mb"]["after"] for c in clients)
    console.print(f"routed experts over {len(clients)} pruned clients: {before:.2f} -> "
                  f"{after:.2f} MB ({after / before:.0%} kept)")


def _layer(item: tuple[str, Any]) -> int:
    return int(item[0])
