"""PNG figures of federated runs (matplotlib, headless Agg backend).

A run's figures (:func:`write_run_plots`, called by the ServerApp after the last round) go to
``<run_dir>/plots/``: training loss and held-out perplexity per round, per-client perplexity
(shared start vs personalized), communication per round, and expert usage per client and
layer. ``fedmoe report`` draws the sweep figures
(:func:`plot_perplexity_by_setting`, :func:`plot_communication_by_setting`,
:func:`plot_gains_by_setting`). Every function
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


def _figure(ncols: int = 1, *, figsize: tuple[float, float], **kwargs):
    """A figure whose layout engine places titles, a suptitle, legends outside the axes and
    a colorbar shared by several axes without overlaps (constrained layout)."""
    fig, axes = plt.subplots(1, ncols, figsize=figsize, layout="constrained", **kwargs)
    fig.get_layout_engine().set(w_pad=0.08, wspace=0.06)  # room for the y labels between axes
    return fig, axes


def _legend_below(ax, ncol: int = 3) -> None:
    """The legend under the axes: inside, it would hide the last rounds' bars or markers."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=ncol,
              frameon=False)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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
        Figure name (``rounds``, ``client_perplexity``, ``communication``, ``expert_usage``)
        -> PNG path.
    """
    out = Path(run_dir) / "plots"
    name = results.get("strategy", {}).get("name", "")
    counts = load_expert_counts(state_dir or Path(run_dir) / "clients")
    figures = {
        "rounds": (plot_rounds, results.get("rounds"), {"title": name}),
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


def plot_rounds(rounds: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Per round, the mean training loss (left) and the clients' held-out perplexity (right:
    mean and worst over clients, each client a thin line), so a run's progress reads at once."""
    r = np.array([e["round"] for e in rounds])
    loss = np.array([_nan(e.get("train_loss")) for e in rounds])
    fig, (ax_loss, ax_ppl) = _figure(2, figsize=(9, 3.8))
    ax_loss.plot(r, loss, marker="o", color="C3")
    ax_loss.set(xlabel="round", ylabel="mean training loss", title="training loss")
    clients = sorted({c for e in rounds for c in e.get("eval_ppl_by_client", {})}, key=int)
    for i, c in enumerate(clients):
        ppl = [_nan(e.get("eval_ppl_by_client", {}).get(c)) for e in rounds]
        ax_ppl.plot(r, ppl, color="0.75", lw=0.8, label="one client" if i == 0 else None)
    ax_ppl.plot(r, [_nan(e.get("eval_ppl_mean")) for e in rounds], marker="o", color="C0",
                label="mean over clients")
    ax_ppl.plot(r, [_nan(e.get("eval_ppl_worst")) for e in rounds], marker="s", color="C1",
                ls="--", label="worst client")
    ax_ppl.set(xlabel="round", ylabel="held-out perplexity", title="held-out perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.set_xticks(r)
    _legend_below(ax_ppl)
    if title:
        fig.suptitle(f"per round ({title})", fontsize=10)
    return _save(fig, path)


def plot_client_perplexity(clients: Mapping[str, Mapping], path: str | Path,
                           title: str = "held-out perplexity per client") -> Path:
    """Per client, the shared starting model (``base_ppl``, grey) and the personalized one
    (blue), joined by a line: its length is what personalization gained (or lost)."""
    ids = list(clients)
    x = np.arange(len(ids))
    base = np.array([_nan(clients[c].get("base_ppl")) for c in ids])
    final = np.array([_nan(clients[c].get("final_ppl")) for c in ids])
    fig, ax = _figure(figsize=(max(4.5, 0.5 * len(ids) + 2), 3.8))
    ax.vlines(x, base, final, color="0.6", lw=1.5)
    ax.plot(x, base, "o", color="0.6", label="shared start")
    ax.plot(x, final, "o", color="C0", label="personalized")
    ax.set(xlabel="client", ylabel="held-out perplexity", title=title)
    ax.set_xticks(x, ids)
    _legend_below(ax, ncol=2)
    return _save(fig, path)


def plot_communication(rounds: Sequence[Mapping], path: str | Path) -> Path:
    """MB sent down and up per round (bars) and cumulative MB both ways (line)."""
    r = [e["round"] for e in rounds]
    down = np.array([e["bytes_down"] for e in rounds]) / MB
    up = np.array([e["bytes_up"] for e in rounds]) / MB
    fig, ax = _figure(figsize=(5.5, 4.0))
    ax.bar(np.array(r) - 0.2, down, width=0.4, label="down (server -> clients)", color="C1")
    ax.bar(np.array(r) + 0.2, up, width=0.4, label="up (clients -> server)", color="C0")
    ax.set(xlabel="round", ylabel="MB per round", title="communication")
    ax.set_xticks(r)
    cum = ax.twinx()
    cum.plot(r, np.cumsum(down + up), color="k", marker="o", lw=1.5, label="cumulative")
    cum.set(ylabel="cumulative MB", ylim=(0, None))
    handles = ax.get_legend_handles_labels()[0] + cum.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              ncol=2, frameon=False)
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
    fig, axes = _figure(len(layers), squeeze=False,
                        figsize=(2.6 * len(layers) + 1.4, 0.35 * len(clients) + 2.2))
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
    fig.colorbar(image, ax=axes[0].tolist(), aspect=30, label="share of selections")
    fig.suptitle("expert usage per client (routing during local training)", fontsize=10)
    return _save(fig, path)


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
    width_in = max(6.0, 0.3 * len(clients) * len(labels) + 2)
    fig, ax = _figure(figsize=(width_in, 3.6 + 0.25 * len(labels)))
    for i, label in enumerate(labels):
        values = [per_client[label].get(c, []) for c in clients]
        mean = [np.mean(v) if len(v) else np.nan for v in values]
        std = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        ax.errorbar(x + (i - (len(labels) - 1) / 2) * width, mean, yerr=std, fmt="o",
                    capsize=3, label=label)
    ax.set(xlabel="client", ylabel="final held-out perplexity")
    ax.set_title("per-client perplexity by setting\n(mean ± std over seeds)", fontsize=10)
    ax.set_xticks(x, clients)
    _legend_below(ax, ncol=1)  # one setting per line: labels list several overrides
    return _save(fig, path)


def plot_communication_by_setting(cumulative_mb: Mapping[str, Sequence[Sequence[float]]],
                                  path: str | Path) -> Path:
    """Cumulative MB (down + up) against round, one line per setting (mean over seeds, band
    = min..max). ``cumulative_mb`` maps setting label -> one cumulative series per seed."""
    fig, ax = _figure(figsize=(6.0, 3.6 + 0.25 * len(cumulative_mb)))
    n = 0
    for label, series in cumulative_mb.items():
        n = min(len(s) for s in series)
        stack = np.array([[0.0, *s[:n]] for s in series])  # (seeds, 1 + rounds): 0 MB at start
        rounds = np.arange(n + 1)
        ax.plot(rounds, stack.mean(0), marker="o", label=label)
        ax.fill_between(rounds, stack.min(0), stack.max(0), alpha=0.15)
    ax.set(xlabel="round", ylabel="cumulative MB (down + up)")
    ax.set_title("communication per round by setting", fontsize=10)
    ax.set_xticks(range(n + 1))
    _legend_below(ax, ncol=1)
    return _save(fig, path)


def plot_gains_by_setting(gains: Mapping[str, Mapping[tuple[str, str], float]],
                          intervals: Mapping[str, tuple[float, float, float]],
                          path: str | Path, baseline: str = "the baseline") -> Path:
    """Per setting, the perplexity gain (%) over the baseline of each client in each seed (one
    point, coloured by seed) and their mean with its confidence interval (black bar).

    ``gains`` maps setting label -> (seed, client id) -> gain %; ``intervals`` maps setting
    label -> (mean, low, high).
    """
    labels = list(gains)
    seeds = sorted({s for g in gains.values() for s, _ in g}, key=str)
    fig, ax = _figure(figsize=(max(4.5, 1.4 * len(labels) + 2), 4.0 + 0.2 * len(labels)))
    jitter = np.random.default_rng(0)  # spreads the points sideways, the same on every call
    for i, label in enumerate(labels):
        for j, seed in enumerate(seeds):
            y = [g for (s, _), g in gains[label].items() if s == seed]
            x = i - 0.25 + jitter.uniform(-0.08, 0.08, len(y))
            ax.plot(x, y, "o", ms=4, alpha=0.6, color=f"C{j % 10}",
                    label=f"seed {seed}" if i == 0 else None)
        mean, low, high = intervals[label]
        ax.errorbar([i + 0.1], [mean], yerr=[[mean - low], [high - mean]], fmt="D", color="k",
                    capsize=4, label="mean, CI" if i == 0 else None)
    ax.axhline(0, color="0.5", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 3 else 0)
    ax.set(ylabel=f"perplexity gain over {baseline} (%)")
    ax.set_title(f"per-client gain vs {baseline}\n(one point per client and seed; above 0: "
                 "better)", fontsize=10)
    _legend_below(ax, ncol=min(4, len(seeds) + 1))
    return _save(fig, path)
