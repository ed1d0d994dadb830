"""Expert specialization: who uses which experts, how different clients are, over rounds.

A *usage* is ``{layer: counts per expert}`` for one client (or domain): how many tokens
selected each expert. Per layer it becomes a distribution ``p_e = counts_e / sum``;
clients are compared by the Jensen-Shannon divergence (base 2, so in [0, 1]) of their
distributions, averaged over layers. Client usages are read from the personal state the
federated run keeps, ``<run_dir>/clients/client_XXXX/meta.json`` (key ``expert_counts``,
running totals over the rounds a client trained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np

from fedmoe.artifacts import CLIENTS_DIR, client_dir_name, expert_counts, expert_counts_by_round

Usage = Mapping[str, Sequence[float]]  # layer (as str) -> counts per expert


def distribution(counts: Sequence[float]) -> np.ndarray:
    """Counts ``(E,)`` as a probability distribution (uniform when all are zero)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else np.full(len(c), 1.0 / len(c))


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits: ``(KL(p||m) + KL(q||m)) / 2`` with ``m = (p+q)/2``."""
    p, q = distribution(p), distribution(q)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return (kl(p) + kl(q)) / 2


def entropy_bits(counts: Sequence[float]) -> float:
    """Shannon entropy of the usage distribution in bits (log2 E when uniform)."""
    p = distribution(counts)
    nz = p > 0
    return float(-(p[nz] * np.log2(p[nz])).sum())


def usage_from_routing(top_k_index: Mapping[int, np.ndarray],
                       num_experts: Mapping[int, int]) -> dict[str, list[int]]:
    """``{layer: counts}`` from routing ids ``(..., k)`` per layer."""
    return {str(layer): np.bincount(np.asarray(idx).ravel(), minlength=num_experts[layer]).tolist()
            for layer, idx in sorted(top_k_index.items())}


def pairwise_js(usages: Mapping[str, Usage]) -> dict:
    """Jensen-Shannon divergence between every pair of clients, per layer and on average.

    Parameters
    ----------
    usages : Mapping
        Client (or domain) name -> usage.

    Returns
    -------
    dict
        ``names`` (row order), ``layers``, ``matrix`` ``{layer: [[...]]}``, ``mean``
        (names x names, the mean over layers) and ``mean_pairwise`` (the mean over pairs of
        ``mean``; 0 when there is one client).
    """
    names = list(usages)
    layers = sorted({layer for u in usages.values() for layer in u}, key=int)
    matrix = {}
    for layer in layers:
        m = np.zeros((len(names), len(names)))
        for i, j in combinations(range(len(names)), 2):
            a, b = usages[names[i]].get(layer), usages[names[j]].get(layer)
            m[i, j] = m[j, i] = js_divergence(a, b) if a is not None and b is not None else np.nan
        matrix[layer] = m
    mean = np.nanmean(np.stack(list(matrix.values())), axis=0) if matrix else np.zeros((0, 0))
    pairs = [mean[i, j] for i, j in combinations(range(len(names)), 2)]
    return {"names": names, "layers": layers,
            "matrix": {k: v.tolist() for k, v in matrix.items()}, "mean": mean.tolist(),
            "mean_pairwise": float(np.mean(pairs)) if pairs else 0.0}


def load_client_usage(run_dir: str | Path) -> dict[str, dict[str, list[int]]]:
    """``{client: usage}`` from ``<run_dir>/clients/client_XXXX/meta.json`` (``expert_counts``),
    keyed by the client's folder name (``client_0003``).

    Clients without ``expert_counts`` (never trained) are left out.
    """
    clients_dir = Path(run_dir) / CLIENTS_DIR
    if not clients_dir.is_dir():
        raise FileNotFoundError(f"no {clients_dir}: run_dir must be a `fedmoe simulate` run dir")
    return {client_dir_name(cid): usage for cid, usage in expert_counts(clients_dir).items()}


def load_client_usage_by_round(run_dir: str | Path) -> list[dict[str, dict[str, list[int]]]]:
    """Per round, ``{client: that round's usage}`` from the ``expert_counts_by_round`` every
    client's ``meta.json`` keeps; feed it to :func:`specialization_over_rounds` with
    ``cumulative=False``."""
    by_round = expert_counts_by_round(Path(run_dir) / CLIENTS_DIR)
    return [{client_dir_name(cid): usage for cid, usage in clients.items()}
            for clients in by_round.values()]


def specialization_over_rounds(snapshots: Sequence[Mapping[str, Usage]],
                               cumulative: bool = True) -> list[dict]:
    """How specialization changes over rounds, from one usage snapshot per round.

    Parameters
    ----------
    snapshots : Sequence
        Per round, ``{client: usage}`` (e.g. :func:`load_client_usage` after each round).
    cumulative : bool
        Snapshots hold running totals (as ``meta.json`` does): each round's own usage is
        the difference to the previous snapshot. ``False``: snapshots are per round.

    Returns
    -------
    list of dict
        Per round: ``round`` (1-based), ``mean_pairwise_js`` (mean over client pairs and
        layers), ``js_by_layer`` ``{layer: mean over pairs}``, ``entropy`` ``{client: mean
        over layers, bits}`` and ``tokens`` ``{client: selections this round}``.
    """
    rounds, previous = [], {}
    for r, snap in enumerate(snapshots, start=1):
        current = {c: {layer: np.asarray(v, dtype=np.float64) for layer, v in u.items()}
                   for c, u in snap.items()}
        own = current
        if cumulative:
            own = {c: {layer: v - previous.get(c, {}).get(layer, 0) for layer, v in u.items()}
                   for c, u in current.items()}
        active = {c: u for c, u in own.items() if sum(v.sum() for v in u.values()) > 0}
        js = pairwise_js(active)
        by_layer = {layer: _mean_offdiag(np.asarray(m)) for layer, m in js["matrix"].items()}
        rounds.append({
            "round": r, "mean_pairwise_js": js["mean_pairwise"], "js_by_layer": by_layer,
            "entropy": {c: float(np.mean([entropy_bits(v) for v in u.values()]))
                        for c, u in active.items()},
            "tokens": {c: float(sum(v.sum() for v in u.values())) for c, u in own.items()},
        })
        previous = current
    return rounds


def _mean_offdiag(m: np.ndarray) -> float:
    n = m.shape[0]
    if n < 2:
        return 0.0
    return float(m[~np.eye(n, dtype=bool)].mean())
