"""`results.json` of a federated run, built from the strategy's round log (no Flower import)."""

from __future__ import annotations

from fedmoe.reporting.metrics import spread


def round_entry(server_round: int, log, payload_bytes: int) -> dict:
    """One round of ``results.json`` from a ``RoundLog``."""
    ppl = {int(c): float(m["eval_ppl"]) for c, m in log.eval_by_client.items() if "eval_ppl" in m}
    stats = spread(ppl.values())
    return {
        "round": server_round,
        "train_loss": _num(log.train_metrics.get("train_loss")),
        # mean over the accepted clients of their local training time
        "train_seconds": _num(log.train_metrics.get("train_seconds")),
        "eval_ppl": _num(log.eval_metrics.get("eval_ppl")),  # weighted by held-out examples
        "eval_ppl_mean": stats.get("mean"),
        "eval_ppl_worst": stats.get("worst"),
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
