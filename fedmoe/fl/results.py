"""`results.json` of a federated run, built from the strategy's round log (no Flower import)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def round_entry(server_round: int, log, payload_bytes: int) -> dict:
    """One round of ``results.json`` from a ``RoundLog``."""
    ppl = {int(c): float(m["eval_ppl"]) for c, m in log.eval_by_client.items() if "eval_ppl" in m}
    return {
        "round": server_round,
        "train_loss": _num(log.train_metrics.get("train_loss")),
        # mean over the accepted clients of their local training time
        "train_seconds": _num(log.train_metrics.get("train_seconds")),
        "eval_ppl": _num(log.eval_metrics.get("eval_ppl")),  # weighted by held-out examples
        "eval_ppl_mean": _mean(ppl.values()),
        "eval_ppl_worst": max(ppl.values()) if ppl else None,
        "eval_ppl_by_client": {str(c): v for c, v in sorted(ppl.items())},
        "bytes_down": int(log.bytes_down),
        "bytes_up": int(log.bytes_up),
        "payload_bytes": int(payload_bytes),
        "wall_seconds": float(log.wall_s),
        # where a round's time went on the clients (means over the accepted replies): process
        # start to handler (imports), model assembly, local training, held-out evaluation
        # (in the train message, or the evaluate message's own), and on the server
        "client_seconds": {
            "start": _num(log.train_metrics.get("start_seconds")),
            "assemble": _num(log.train_metrics.get("assemble_seconds")),
            "train": _num(log.train_metrics.get("train_seconds")),
            "evaluate": _num(log.eval_metrics.get("eval_seconds")),
            "evaluate_start": (None if getattr(log, "in_train_eval", None)
                               else _num(log.eval_metrics.get("start_seconds"))),
        },
        "aggregate_seconds": float(getattr(log, "aggregate_s", 0.0)),
        "evaluated_in_train": bool(getattr(log, "in_train_eval", None)),
        "sampled": int(getattr(log, "sampled", 0)),
        "accepted": sorted(int(c) for c in log.accepted),
        "rejected": {str(c): r for c, r in log.rejected.items()},
    }


def client_entries(history: dict, payload_bytes: int) -> dict[str, dict]:
    """Per client: final held-out perplexity, examples, bytes sent and received in total."""
    clients: dict[str, dict] = {}
    for _, log in sorted(history.items()):
        for c in set(log.accepted) | set(log.rejected):
            entry = clients.setdefault(str(c), _empty_client())
            entry["bytes_sent"] += int(log.bytes_up_by_client.get(c, 0))
            entry["bytes_received"] += payload_bytes
            if c in log.accepted:  # a rejected reply trained nothing the run kept
                entry["rounds_trained"] += 1
            else:
                entry["rounds_rejected"] += 1
                entry["last_error"] = one_line(log.rejected[c])
        for c, m in log.eval_by_client.items():
            entry = clients.setdefault(str(c), _empty_client())
            entry["bytes_received"] += payload_bytes
            entry["final_ppl"] = float(m["eval_ppl"])
            entry["base_ppl"] = _num(m.get("base_ppl"))
            entry["routed_expert_mb"] = {"before": _num(m.get("routed_mb_before")),
                                         "after": _num(m.get("routed_mb"))}
            entry["experts_kept"] = {k.split(".", 1)[1]: int(v) for k, v in sorted(m.items())
                                     if k.startswith("experts_kept.")}
            entry["examples"] = int(m.get("num-examples", 0))
            entry["personal_mb"] = _num(m.get("personal_mb"))
    return dict(sorted(clients.items(), key=lambda kv: int(kv[0])))


def _empty_client() -> dict:
    return {"final_ppl": None, "base_ppl": None, "examples": 0, "bytes_sent": 0,
            "bytes_received": 0, "rounds_trained": 0, "rounds_rejected": 0}


def one_line(reason: str, width: int = 160) -> str:
    """The first meaningful line of a (possibly multi-line) failure reason, cut to ``width``."""
    lines = [x.strip() for x in str(reason).splitlines() if x.strip()]
    # Tracebacks end with the exception line; plain reasons are one line already.
    line = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[0] if lines
                else "unknown failure")
    return line if len(line) <= width else line[: width - 3] + "..."


_HINTS = (("memory", "lower fl.max_concurrent_clients or use train=lora"),
          ("killed", "lower fl.max_concurrent_clients or use train=lora"),
          ("timeout", "raise fl.round_timeout"))


def run_failure(results: dict) -> str | None:
    """Why a finished run must not count as a success, in one line; ``None`` if it may.

    A round in which no train reply was accepted trained nothing (the global tensors stayed
    as they were), and a run in which no client ever trained is no result at all.
    """
    for r in results.get("rounds", []):
        if r.get("accepted"):
            continue
        reasons = [one_line(x) for x in r.get("rejected", {}).values()]
        why = reasons[0] if reasons else "no reply within fl.round_timeout"
        hint = next((h for word, h in _HINTS if word in why.lower()), None)
        sampled = r.get("sampled") or len(r.get("rejected", {}))
        return (f"round {r['round']}: 0 of {sampled} clients trained: {why}"
                + (f" -- {hint}" if hint else ""))
    if not results.get("rounds"):
        return "no round ran: no client ever trained"
    return None


def _num(x) -> float | None:
    return None if x is None else float(x)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def print_summary(results: dict) -> None:
    """The per-client table and per-round line a user reads at the end of a run."""
    console = Console(width=120)
    rounds = Table(title=f"rounds ({results['strategy']['name']})")
    for col in ("round", "train loss", "ppl (mean)", "ppl (worst)", "MB down", "MB up", "s"):
        rounds.add_column(col, justify="right")
    for r in results["rounds"]:
        rounds.add_row(str(r["round"]), _fmt(r["train_loss"]), _fmt(r["eval_ppl_mean"]),
                       _fmt(r["eval_ppl_worst"]), f"{r['bytes_down'] / 2**20:.2f}",
                       f"{r['bytes_up'] / 2**20:.2f}", f"{r['wall_seconds']:.1f}")
    console.print(rounds)
    clients = Table(title="clients (held-out perplexity of each personalized model)")
    for col in ("client", "base ppl", "ppl", "examples", "MB sent", "MB received"):
        clients.add_column(col, justify="right")
    for cid, c in results["clients"].items():
        clients.add_row(cid, _fmt(c.get("base_ppl")), _fmt(c["final_ppl"]),
                        str(c["examples"]), f"{c['bytes_sent'] / 2**20:.2f}",
                        f"{c['bytes_received'] / 2**20:.2f}")
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
    pairs = [(c["base_ppl"], c["final_ppl"]) for c in results["clients"].values()
             if c.get("base_ppl") and c.get("final_ppl")]
    if pairs:
        base = sum(b for b, _ in pairs) / len(pairs)
        final = sum(f for _, f in pairs) / len(pairs)
        better = sum(f < b for b, f in pairs)
        lines.append(f"held-out perplexity, mean over {len(pairs)} clients: shared start "
                     f"{base:.2f} -> personalized {final:.2f} ({final / base:.3f}x); "
                     f"{better}/{len(pairs)} clients improved")
    full = results.get("trainable_bytes")
    if full:
        sent = results.get("payload_bytes", 0)
        lines.append(f"upload per client per round: {sent / 2**20:.2f} MB = "
                     f"{sent / full:.1%} of all trainable tensors ({full / 2**20:.2f} MB, what "
                     f"strategy=fedavg sends)")
    return lines


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
