"""PNG figures of federated runs (matplotlib, headless Agg backend).

A run's figures (:func:`write_run_plots`, called by the ServerApp after the last round) go to
``<run_dir>/plots/``: per-client perplexity (shared start vs personalized), communication per
round, and expert usage per client and layer. ``fedmoe report`` draws the sweep figures
(:func:`plot_perplexity_by_setting`, :func:`plot_communication_by_setting`). Every function
takes plain dicts (``results.json``, ``meta.json``), writes ``path`` and returns it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MB = 2**20
log = logging.getLogger(__name__)


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    else:  # tight_layout cannot place a colorbar shared by several axes
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# --- one run ----------------------------------------------------------------------------------


def write_run_plots(results: Mapping, run_dir: str | Path,
                    state_dir: str | Path | None = None) -> dict[str, Path]:
    """Every figure of one run, under ``<run_dir>/plots/``.

    Parameters
    ----------
    results : Mapping
        The run's ``results.json``.
    run_dir : str or Path
        The run directory.
    state_dir : str or Path, optional
        Root of the clients' personal state (``client_*/meta.json``); default
        ``<run_dir>/clients``. The expert-usage heatmap is drawn when it holds routing counts.

    Returns
    -------
    dict[str, Path]
        Figure name (``client_perplexity``, ``communication``, ``expert_usage``) -> PNG path.
    """
    out = Path(run_dir) / "plots"
    name = results.get("strategy", {}).get("name", "")
    counts = load_expert_counts(state_dir or Path(run_dir) / "clients")
    figures = {
        "client_perplexity": (plot_client_perplexity, results.get("clients"),
                              {"title": f"held-out perplexity per client ({name})"}),
        "communication": (plot_communication, results.get("rounds"), {}),
        "expert_usage": (plot_expert_usage, counts, {}),
    }
    plots = {}
    for key, (plot, data, kwargs) in figures.items():
        if not data:
            continue
        try:
            plots[key] = plot(data, out / f"{key}.png", **kwargs)
        except Exception as error:  # a figure must not fail a finished run
            log.warning("could not draw %s: %s", out / f"{key}.png", error)
    return plots


def plot_client_perplexity(clients: Mapping[str, Mapping], path: str | Path,
                           title: str = "held-out perplexity per client") -> Path:
    """Per client, the shared starting model (``base_ppl``, grey) and the personalized one
    (blue), joined by a line: its length is what personalization gained (or lost)."""
    ids = list(clients)
    x = np.arange(len(ids))
    base = np.array([_nan(clients[c].get("base_ppl")) for c in ids])
    final = np.array([_nan(clients[c].get("final_ppl")) for c in ids])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(ids) + 2), 3.5))
    ax.vlines(x, base, final, color="0.6", lw=1.5)
    ax.plot(x, base, "o", color="0.6", label="shared start")
    ax.plot(x, final, "o", color="C0", label="personalized")
    ax.set(xlabel="client", ylabel="held-out perplexity", title=title)
    ax.set_xticks(x, ids)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_communication(rounds: Sequence[Mapping], path: str | Path) -> Path:
    """MB sent down and up per round (bars) and cumulative MB both ways (line)."""
    r = [e["round"] for e in rounds]
    down = np.array([e["bytes_down"] for e in rounds]) / MB
    up = np.array([e["bytes_up"] for e in rounds]) / MB
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(np.array(r) - 0.2, down, width=0.4, label="down (server -> clients)", color="C1")
    ax.bar(np.array(r) + 0.2, up, width=0.4, label="up (clients -> server)", color="C0")
    ax.set(xlabel="round", ylabel="MB per round", title="communication")
    ax.set_xticks(r)
    cum = ax.twinx()
    cum.plot(r, np.cumsum(down + up), color="k", marker="o", lw=1.5, label="cumulative")
    cum.set(ylabel="cumulative MB", ylim=(0, None))
    handles = ax.get_legend_handles_labels()[0] + cum.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    return _save(fig, path)


def load_expert_counts(state_dir: str | Path) -> dict[str, dict[str, list[int]]]:
    """Client id -> ``expert_counts`` ({layer: selections per expert}) of every
    ``<state_dir>/client_*/meta.json`` that has them (empty when there are none)."""
    counts = {}
    for meta_path in sorted(Path(state_dir).glob("client_*/meta.json")):
        meta = json.loads(meta_path.read_text())
        if meta.get("expert_counts"):
            counts[str(int(meta_path.parent.name.split("_")[-1]))] = meta["expert_counts"]
    return counts


def plot_expert_usage(counts: Mapping[str, Mapping[str, Sequence[int]]],
                      path: str | Path) -> Path:
    """One heatmap per MoE layer: rows clients, columns experts, colour = share of the
    client's routing choices in that layer (each row sums to 1)."""
    clients = list(counts)
    layers = sorted({layer for c in counts.values() for layer in c}, key=int)
    fig, axes = plt.subplots(1, len(layers), squeeze=False,
                             figsize=(2.6 * len(layers) + 1.2, 0.35 * len(clients) + 1.8))
    image = None
    for ax, layer in zip(axes[0], layers, strict=True):
        # Counts are indexed by original expert id; a pruned client's list may be shorter.
        width = max(len(counts[c].get(layer) or []) for c in clients)
        usage = np.array([_share(counts[c].get(layer), width) for c in clients])  # (C, E)
        image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(clients)), clients if ax is axes[0][0] else [], fontsize=8)
    axes[0][0].set_ylabel("client")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="share of selections")
    fig.suptitle("expert usage per client (routing during local training)", fontsize=10)
    return _save(fig, path, tight=False)


def _share(c: Sequence[int] | None, width: int) -> np.ndarray:
    """Counts as shares of their sum, zero-padded to ``width`` experts."""
    share = np.zeros(width)
    c = np.asarray(c if c is not None else [], dtype=float)
    share[:len(c)] = c / c.sum() if c.sum() > 0 else c
    return share


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


# --- a sweep (fedmoe report) ---------------------------------------------------------------------


def plot_perplexity_by_setting(per_client: Mapping[str, Mapping[str, Sequence[float]]],
                               path: str | Path) -> Path:
    """Per client, one marker per setting side by side (mean over seeds, std as error bar).

    ``per_client`` maps setting label -> client id -> final perplexities (one per seed).
    """
    labels = list(per_client)
    clients = sorted({c for v in per_client.values() for c in v}, key=int)
    x = np.arange(len(clients))
    width = 0.6 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(clients) * len(labels) + 2), 3.8))
    for i, label in enumerate(labels):
        values = [per_client[label].get(c, []) for c in clients]
        mean = [np.mean(v) if len(v) else np.nan for v in values]
        std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(x + (i - (len(labels) - 1) / 2) * width, mean, yerr=std, fmt="o",
                    capsize=3, label=label)
    ax.set(xlabel="client", ylabel="final held-out perplexity",
           title="per-client perplexity by setting (mean ± std over seeds)")
    ax.set_xticks(x, clients)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_communication_by_setting(cumulative_mb: Mapping[str, Sequence[Sequence[float]]],
                                  path: str | Path) -> Path:
    """Cumulative MB (down + up) against round, one line per setting (mean over seeds, band
    = min..max). ``cumulative_mb`` maps setting label -> one cumulative series per seed."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    n = 0
    for label, series in cumulative_mb.items():
        n = min(len(s) for s in series)
        stack = np.array([[0.0, *s[:n]] for s in series])  # (seeds, 1 + rounds): 0 MB at start
        rounds = np.arange(n + 1)
        ax.plot(rounds, stack.mean(0), marker="o", label=label)
        ax.fill_between(rounds, stack.min(0), stack.max(0), alpha=0.15)
    ax.set(xlabel="round", ylabel="cumulative MB (down + up)",
           title="communication per round by setting")
    ax.set_xticks(range(n + 1))
    ax.legend(fontsize=8)
    return _save(fig, path)
