"""The numbers a federated run is judged by, each defined once, from its ``results.json``.

The end-of-run headline (:mod:`fedmoe.reporting.summary`), W&B's run summary and the Optuna
objective (:mod:`fedmoe.reporting.tracking`), the columns of ``fedmoe report``
(:mod:`fedmoe.reporting.sweep`) and the benchmark scripts read them from :func:`run_metrics`, so
"mean perplexity" or "clients improved" cannot mean two things in two tables.

Definitions (a client counts when its final held-out perplexity was reported):

- ``ppl_mean`` / ``ppl_worst``: mean and maximum over clients of the final perplexity of each
  client's personalized model on its own held-out data;
- ``base_ppl_mean``, ``ppl_ratio``, ``clients_improved``: over the clients that also report the
  shared starting model's perplexity (``base_ppl``): its mean, the mean of the per-client
  ratios final / base, and how many clients ended below their start;
- ``train_loss``: the last round's mean training loss;
- bytes: totals over rounds, and per client and round = each round's bytes over the clients it
  accepted, averaged over rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MB = 2**20


def spread(values: Iterable[float]) -> dict[str, float]:
    """``mean``, ``worst`` (highest), ``best`` and ``std`` (population) of perplexities over
    clients; empty when there are none."""
    values = [float(v) for v in values]
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "worst": max(values), "best": min(values),
            "std": statistics.pstdev(values)}


def final_ppl_by_client(results: Mapping[str, Any]) -> dict[str, float]:
    """Client id -> final held-out perplexity, for every client that reported one."""
    return {cid: float(c["final_ppl"]) for cid, c in (results.get("clients") or {}).items()
            if is_number(c.get("final_ppl"))}


@dataclass(frozen=True)
class RunMetrics:
    """One run's headline numbers (see the module docstring for the definitions)."""

    ppl_by_client: dict[str, float]
    ppl_mean: float | None
    ppl_worst: float | None
    base_ppl_mean: float | None
    ppl_ratio: float | None
    clients_improved: int | None
    clients_compared: int
    train_loss: float | None
    rounds: int
    bytes_down: int
    bytes_up: int
    bytes_up_per_client_round: float | None
    bytes_per_client_round: float | None
    seconds_per_round: float | None
    wall_seconds: float | None

    @property
    def improved_share(self) -> float | None:
        """Share of the compared clients that improved on the shared start."""
        return (self.clients_improved / self.clients_compared if self.clients_compared
                else None)


def run_metrics(results: Mapping[str, Any]) -> RunMetrics:
    """The :class:`RunMetrics` of one ``results.json``."""
    ppl = final_ppl_by_client(results)
    clients = (results.get("clients") or {}).values()
    pairs = [(float(c["base_ppl"]), float(c["final_ppl"])) for c in clients
             if is_number(c.get("base_ppl")) and c["base_ppl"] > 0
             and is_number(c.get("final_ppl"))]
    rounds = results.get("rounds") or []
    accepted = [max(len(r.get("accepted") or []), 1) for r in rounds]
    seconds = [s for s in (_number(r.get("wall_seconds")) for r in rounds) if s is not None]
    return RunMetrics(
        ppl_by_client=ppl,
        ppl_mean=statistics.fmean(ppl.values()) if ppl else None,
        ppl_worst=max(ppl.values()) if ppl else None,
        base_ppl_mean=statistics.fmean(b for b, _ in pairs) if pairs else None,
        ppl_ratio=statistics.fmean(f / b for b, f in pairs) if pairs else None,
        clients_improved=sum(f < b for b, f in pairs) if pairs else None,
        clients_compared=len(pairs),
        train_loss=_number(rounds[-1].get("train_loss")) if rounds else None,
        rounds=len(rounds),
        bytes_down=sum(_bytes(r, "bytes_down") for r in rounds),
        bytes_up=sum(_bytes(r, "bytes_up") for r in rounds),
        bytes_up_per_client_round=(statistics.fmean(
            _bytes(r, "bytes_up") / n for r, n in zip(rounds, accepted, strict=True)) if rounds
            else None),
        bytes_per_client_round=(statistics.fmean(
            (_bytes(r, "bytes_up") + _bytes(r, "bytes_down")) / n
            for r, n in zip(rounds, accepted, strict=True))
            if rounds else None),
        seconds_per_round=statistics.fmean(seconds) if seconds else None,
        wall_seconds=_number(results.get("wall_seconds")),
    )


def cumulative_mb(results: Mapping[str, Any]) -> list[float]:
    """MB moved (down + up) by the end of each round."""
    total, series = 0.0, []
    for entry in results.get("rounds") or []:
        total += (_bytes(entry, "bytes_down") + _bytes(entry, "bytes_up")) / MB
        series.append(total)
    return series


def _bytes(entry: Mapping[str, Any], key: str) -> int:
    """A round's byte count (0 when the entry has none: a round that moved nothing that way)."""
    return int(entry.get(key) or 0)


def is_number(x: Any) -> bool:
    """A real number (bool is not one), as results.json holds them."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number(x: Any) -> float | None:
    return float(x) if is_number(x) else None
