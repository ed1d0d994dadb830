"""Matplotlib figures of the analyses, each saved as a PNG (headless, Agg backend).

Every function takes the plain results the analysis modules return (dicts and dataclasses),
writes ``path`` and returns it, so scripts, the CLI and notebooks draw the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_srp(srp_by_length: Mapping[int, Mapping[str, object]], path: str | Path) -> Path:
    """SRP against segment length, one line per layer and a bold model line (95% CI)."""
    lengths = sorted(srp_by_length)
    units = list(next(iter(srp_by_length.values())))
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        cap = _get(curve, "capacity")
        ax.plot(cap, _get(curve, "hit_rate"), label=name, lw=1.5)
        ax.fill_between(cap, _get(curve, "ci_low"), _get(curve, "ci_high"), alpha=0.15)
    if active:
        ax.axvline(2 * active, color="grey", ls=":", lw=1, label="2 x active")
    ax.set(xlabel="cache size C (experts)", ylabel="hit rate", ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_usage_heatmap(usages: Mapping[str, Mapping[str, Sequence[float]]],
                       path: str | Path, title: str = "expert usage") -> Path:
    """One heatmap per layer: rows are clients (or domains), columns experts, p(expert)."""
    names = list(usages)
    layers = sorted({layer for u in usages.values() for layer in u}, key=int)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 0.45 * len(names)
                                                      + 1.6), squeeze=False)
    image = None
    for ax, layer in zip(axes[0], layers, strict=True):
        rows = []
        for n in names:
            c = np.asarray(usages[n].get(layer, []), dtype=float)
            rows.append(c / c.sum() if c.sum() > 0 else c)
        image = ax.imshow(np.array(rows), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names),
                      fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of selections")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_js_matrix(js: Mapping, path: str | Path, title: str = "Jensen-Shannon divergence"
                   ) -> Path:
    """The layer-mean JS divergence between every pair (the ``pairwise_js`` result)."""
    names, mean = js["names"], np.asarray(js["mean"])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2.5, 0.9 * len(names) + 1.5))
    image = ax.imshow(mean, cmap="magma", vmin=0, vmax=max(float(np.nanmax(mean)), 1e-9))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="bits")
    ax.set_title(title)
    return _save(fig, path)


def plot_specialization_rounds(rounds: Sequence[Mapping], path: str | Path) -> Path:
    """Mean pairwise JS divergence and mean usage entropy per round."""
    r = [x["round"] for x in rounds]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
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
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    fig, ax = plt.subplots(figsize=(6.5, 4))
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


def plot_rounds(results: Mapping, path: str | Path) -> Path:
    """Per round of a federated run: held-out perplexity (mean, worst) and MB moved."""
    rounds = results["rounds"]
    r = [x["round"] for x in rounds]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(r, [x["eval_ppl_mean"] for x in rounds], marker="o", label="mean")
    a1.plot(r, [x["eval_ppl_worst"] for x in rounds], marker="x", label="worst client")
    a1.set(xlabel="round", ylabel="held-out perplexity", title="personalized models")
    a1.legend(fontsize=8)
    a2.bar(np.asarray(r) - 0.2, [x["bytes_down"] / 2**20 for x in rounds], 0.4, label="down")
    a2.bar(np.asarray(r) + 0.2, [x["bytes_up"] / 2**20 for x in rounds], 0.4, label="up")
    a2.set(xlabel="round", ylabel="MB", title="communication")
    a2.legend(fontsize=8)
    return _save(fig, path)


def _get(obj: object, key: str):
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)
