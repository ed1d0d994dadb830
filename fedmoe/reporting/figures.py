"""Every PNG figure fedmoe draws (matplotlib, headless Agg backend), in one place.

- **One run** (:func:`write_run_plots`, called by the ServerApp after the last round, into
  ``<run_dir>/plots/``): training loss and held-out perplexity per round, per-client
  perplexity (shared start vs personalized), communication per round, and expert usage per
  client and layer.
- **A sweep** (``fedmoe report``): :func:`plot_perplexity_by_setting`,
  :func:`plot_communication_by_setting`, :func:`plot_gains_by_setting`.
- **The analyses** (``fedmoe analyze`` and the notebooks): routing consistency
  (:func:`plot_srp`, :func:`plot_cache_curves`), specialization (:func:`plot_expert_usage`,
  :func:`plot_js_matrix`, :func:`plot_specialization_rounds`), shared-vs-routed attribution
  (:func:`plot_shares`, :func:`plot_blocking`), edge vs cloud (:func:`plot_edge_cloud`).

Every function takes plain results (``results.json``, ``meta.json``, the dicts and
dataclasses the analyses return), writes ``path`` and returns it; every figure uses
constrained layout, so titles, legends and colorbars never overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedmoe.artifacts import expert_counts  # noqa: E402

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
    counts = {str(cid): c for cid, c in
              expert_counts(state_dir or Path(run_dir) / "clients").items()}
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


def plot_expert_usage(counts: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                      title: str = "expert usage per client (routing during local training)",
                      ylabel: str = "client") -> Path:
    """One heatmap per MoE layer: rows clients (or domains), columns experts, colour = share of
    the row's routing choices in that layer (each row sums to 1).

    ``counts`` maps row name -> {layer: selections per expert}; counts are indexed by original
    expert id, and a pruned client's list may be shorter (zero-padded)."""
    rows = list(counts)
    layers = sorted({layer for c in counts.values() for layer in c}, key=int)
    fig, axes = _figure(len(layers), squeeze=False,
                        figsize=(2.6 * len(layers) + 1.4, 0.35 * len(rows) + 2.2))
    image = None
    for ax, layer in zip(axes[0], layers, strict=True):
        width = max(len(counts[r].get(layer) or []) for r in rows)
        usage = np.array([_share(counts[r].get(layer), width) for r in rows])  # (rows, E)
        image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [], fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), aspect=30, label="share of selections")
    fig.suptitle(title, fontsize=10)
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


# --- the analyses (fedmoe analyze, notebooks) -------------------------------------------------


def plot_srp(srp_by_length: Mapping[int, Mapping[str, object]], path: str | Path) -> Path:
    """SRP against segment length, one line per layer and a bold model line (95% CI)."""
    lengths = sorted(srp_by_length)
    units = list(next(iter(srp_by_length.values())))
    fig, ax = _figure(figsize=(6, 4))
    for unit in units:
        vals = [_get(srp_by_length[m][unit], "srp") for m in lengths]
        lo = [_get(srp_by_length[m][unit], "ci_low") for m in lengths]
        hi = [_get(srp_by_length[m][unit], "ci_high") for m in lengths]
        is_model = unit == "model"
        ax.plot(lengths, vals, marker="o", lw=2.5 if is_model else 1,
                color="k" if is_model else None, label=unit if is_model else f"layer {unit}")
        ax.fill_between(lengths, lo, hi, alpha=0.15, color="k" if is_model else None)
    ax.set(xscale="log", xlabel="segment length m", ylabel="SRP (best F1)",
           title="segment routing best performance")
    ax.set_xticks(lengths, [str(m) for m in lengths])
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_cache_curves(curves: Mapping[str, object], path: str | Path, title: str = "",
                      active: int | None = None) -> Path:
    """Hit rate against cache size for several policies (name -> CacheCurve or dict)."""
    fig, ax = _figure(figsize=(6, 4))
    for name, curve in curves.items():
        cap = _get(curve, "capacity")
        ax.plot(cap, _get(curve, "hit_rate"), label=name, lw=1.5)
        ax.fill_between(cap, _get(curve, "ci_low"), _get(curve, "ci_high"), alpha=0.15)
    if active:
        ax.axvline(2 * active, color="grey", ls=":", lw=1, label="2 x active")
    ax.set(xlabel="cache size C (experts)", ylabel="hit rate", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_js_matrix(js: Mapping, path: str | Path, title: str = "Jensen-Shannon divergence"
                   ) -> Path:
    """The layer-mean JS divergence between every pair (the ``pairwise_js`` result)."""
    names, mean = js["names"], np.asarray(js["mean"])
    fig, ax = _figure(figsize=(1.1 * len(names) + 2.5, 0.9 * len(names) + 1.5))
    vmax = max(float(np.nanmax(mean)), 1e-9)
    image = ax.imshow(mean, cmap="magma", vmin=0, vmax=vmax)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            # white on the dark cells, black on the bright ones (magma turns pale near vmax)
            color = "k" if mean[i, j] > 0.6 * vmax else "w"
            ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="bits")
    ax.set_title(title)
    return _save(fig, path)


def plot_specialization_rounds(rounds: Sequence[Mapping], path: str | Path) -> Path:
    """Mean pairwise JS divergence and mean usage entropy per round."""
    r = [x["round"] for x in rounds]
    fig, (a1, a2) = _figure(2, figsize=(9, 3.5))
    a1.plot(r, [x["mean_pairwise_js"] for x in rounds], marker="o")
    a1.set(xlabel="round", ylabel="mean pairwise JS (bits)", title="client divergence")
    for client in sorted({c for x in rounds for c in x["entropy"]}):
        a2.plot(r, [x["entropy"].get(client, np.nan) for x in rounds], marker=".", label=client)
    a2.set(xlabel="round", ylabel="usage entropy (bits)", title="per-client entropy")
    a2.legend(fontsize=7)
    return _save(fig, path)


def plot_shares(shares: Mapping[str, Mapping[int, Mapping[str, float]]], path: str | Path
                ) -> Path:
    """Shared-expert share of the MoE output norm, per layer, one bar group per domain."""
    domains = list(shares)
    layers = sorted({int(k) for d in shares.values() for k in d})
    width = 0.8 / max(len(domains), 1)
    fig, ax = _figure(figsize=(6.5, 4))
    for i, d in enumerate(domains):
        vals = [shares[d].get(layer, shares[d].get(str(layer), {})).get("shared", np.nan)
                for layer in layers]
        ax.bar(np.arange(len(layers)) + i * width, vals, width, label=d)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [f"layer {x}" for x in layers])
    ax.set(ylabel="shared share of output norm", ylim=(0, 1),
           title="shared (basic) vs routed (refinement)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_blocking(blocking: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Loss increase per domain when blocking the shared vs the top routed experts."""
    domains = list(blocking)
    x = np.arange(len(domains))
    fig, ax = _figure(figsize=(6.5, 4))
    ax.bar(x - 0.2, [blocking[d]["delta_shared"] for d in domains], 0.4, label="block shared")
    ax.bar(x + 0.2, [blocking[d]["delta_routed"] for d in domains], 0.4,
           label="block top routed")
    ax.set_xticks(x, domains, rotation=20)
    ax.set(ylabel="loss increase (nats/token)", title="expert-blocking ablation")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_edge_cloud(grid: Mapping, path: str | Path) -> Path:
    """Where edge wins: log10 of edge over cloud utility per cost, over alpha x bandwidth."""
    ratio = np.asarray(grid["log_ratio"], dtype=float)
    finite = ratio[np.isfinite(ratio)]
    bound = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-3)
    fig, ax = _figure(figsize=(6.5, 4))
    image = ax.imshow(np.nan_to_num(ratio, neginf=-bound, posinf=bound), origin="lower",
                      aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound)
    bws, alphas = grid["bandwidths_mbps"], grid["alphas"]
    ax.set_xticks(range(len(bws)), [f"{b:g}" for b in bws])
    ticks = np.linspace(0, len(alphas) - 1, min(len(alphas), 6)).round().astype(int)
    ax.set_yticks(ticks, [f"{alphas[i]:.1f}" for i in ticks])
    if finite.size and finite.min() < 0 < finite.max():
        ax.contour(ratio, levels=[0.0], colors="k", linewidths=1)
    fig.colorbar(image, ax=ax, label="log10(edge / cloud utility per cost)")
    ax.set(xlabel="link bandwidth (Mbit/s)", ylabel="alpha (weight of quality)",
           title="edge wins where blue")
    return _save(fig, path)


def _get(obj: object, key: str):
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)
