"""Local routing consistency of a MoE model: SRP, SCH and expert-cache hit-rate curves.

Implements the two measures of "Not All Models Suit Expert Offloading: On Local Routing
Consistency of Mixture-of-Expert Models" (arXiv 2505.16056, code ljcleo/moe-lrc) with the
conventions of its reference code, plus the classic cache policies to compare against.

Inputs are routing decisions of one MoE layer for ``N`` samples of ``T`` tokens:

- ``top_k_index`` ``(N, T, k)``: the k expert ids token t of sample n selected, in the order
  the router ranked them (all k ids of a token are distinct);
- ``mask`` ``(N, T, E)``: the routing mask ``a[t, e]`` in {0, 1} built from it.

**SRP** (segment routing best performance), segment length m. For every window of m tokens
starting at any token of a sample (windows never cross samples), ``c_e(p) = sum a[t, e]``
over the window. A segment router with threshold tau selects every expert with
``c_e(p) >= tau`` for the whole window: predicted ``P = m * |selected|``, matched
``M = sum of c_e over selected``, actual ``A = m * k``. All three are pooled over windows,
samples and experts; ``F1(tau) = 2M / (P + A)`` and ``SRP = max over tau in 0..m``. The
model figure pools M, P, A over layers too, with one threshold for all layers.

**SCH** (segment cache best hit rate), lookahead L: a cache of C experts per layer that
evicts the cached expert used least often in the next L tokens, counting the current token
(ties: the least recently used goes). SCH with L=1 is LRU.

Cache curves (SCH, and LRU, LFU, Belady, static to compare against) come from the stack
algorithm of :mod:`fedmoe.expert_cache`, every C at once, under its lookup rules (moe-lrc's:
lookups at the start of the token, then insertion in router order; a first use into a free
slot is a hit, so every curve reaches 1.0 at C = E). Hit rate = hits / (T * k) per sample,
then the mean over samples; ``hit_rate_strict`` counts every first use as a miss, and
``cold_miss_rate`` is the share of accesses that were first uses finding no free slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedmoe.expert_cache import capacity_hits

SEGMENT_LENGTHS: tuple[int, ...] = (4, 16, 64, 256)


# --- routing masks ------------------------------------------------------------------------


def routing_mask(top_k_index: np.ndarray, num_experts: int) -> np.ndarray:
    """Routing mask ``a[n, t, e]`` ``(N, T, E)`` bool from expert ids ``(N, T, k)``."""
    idx = np.asarray(top_k_index)
    mask = np.zeros((*idx.shape[:-1], num_experts), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


# --- bootstrap ----------------------------------------------------------------------------


def bootstrap_weights(num_samples: int, num_bootstrap: int, seed: int = 0) -> np.ndarray:
    """How often each sample is drawn in each bootstrap replicate ``(B, N)``."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_samples, size=(num_bootstrap, num_samples))
    weights = np.zeros((num_bootstrap, num_samples), dtype=np.int64)
    np.add.at(weights, (np.arange(num_bootstrap)[:, None], draws), 1)
    return weights


def basic_interval(estimate: np.ndarray, replicates: np.ndarray,
                   confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Basic (pivotal) bootstrap interval, as moe-lrc reports it.

    ``[2 * estimate - q_hi, 2 * estimate - q_lo]`` with ``q`` the replicate quantiles at
    ``(1 +- confidence) / 2``; ``replicates`` has the replicate axis first.
    """
    q_lo, q_hi = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return 2 * estimate - q_hi, 2 * estimate - q_lo


# --- SRP ----------------------------------------------------------------------------------


def window_count_histogram(mask: np.ndarray, segment_length: int) -> np.ndarray:
    """Per sample, how many (window, expert) pairs have each count ``c_e(p)`` ``(N, m+1)``.

    Windows of ``m = segment_length`` tokens start at every token of a sample (overlapping,
    ``T - m + 1`` of them); a sample shorter than m contributes none.
    """
    n, t, e = mask.shape
    m = segment_length
    hist = np.zeros((n, m + 1), dtype=np.int64)
    if t < m:
        return hist
    cs = np.zeros((n, t + 1, e), dtype=np.int32)
    np.cumsum(mask, axis=1, out=cs[:, 1:])  # (N, T+1, E) prefix sums over tokens
    counts = cs[:, m:] - cs[:, :-m]  # (N, T-m+1, E) window sums c_e(p)
    offsets = (np.arange(n) * (m + 1))[:, None, None]
    flat = np.bincount((counts + offsets).ravel(), minlength=n * (m + 1))
    return flat.reshape(n, m + 1)


def segment_counts(hist: np.ndarray, segment_length: int) -> tuple[np.ndarray, ...]:
    """Matched ``M(tau)``, predicted ``P(tau)`` for tau = 0..m, and actual ``A``.

    ``hist`` ``(..., m+1)`` counts (window, expert) pairs per count c; the leading axes are
    kept (e.g. bootstrap replicates).
    """
    c = np.arange(segment_length + 1)
    # Reverse cumulative sums: selecting experts with c >= tau.
    matched = np.flip(np.cumsum(np.flip(hist * c, -1), -1), -1)  # (..., m+1)
    selected = np.flip(np.cumsum(np.flip(hist, -1), -1), -1)  # (..., m+1)
    predicted = segment_length * selected
    actual = matched[..., :1]  # every activation is matched at tau = 0
    return matched, predicted, actual


def f1_curve(matched: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``F1(tau) = 2 M / (P + A)`` (NaN where there is no window at all)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * matched / (predicted + actual)


@dataclass
class SRPResult:
    """SRP of one layer (or of the model) for one segment length."""

    segment_length: int
    srp: float
    tau: int  # the best threshold
    ci_low: float
    ci_high: float
    f1: list[float]  # F1(tau), tau = 0..m
    windows: int  # windows of one layer, all samples


def _best(f1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max over tau (last axis), ignoring NaN rows."""
    filled = np.where(np.isnan(f1), -np.inf, f1)
    tau = filled.argmax(-1)
    return np.take_along_axis(f1, tau[..., None], -1)[..., 0], tau


def srp(layer_masks: Mapping[int, np.ndarray], segment_length: int, *, num_bootstrap: int = 200,
        confidence: float = 0.95, seed: int = 0) -> dict[str, SRPResult]:
    """SRP per layer and for the model (one threshold for all layers), with bootstrap CIs.

    Parameters
    ----------
    layer_masks : Mapping
        Layer index -> routing mask ``(N, T, E)``; every layer has the same N samples.
    segment_length : int
        Window length m.
    num_bootstrap : int
        Resamples of the samples (the same resamples for every layer and the model).

    Returns
    -------
    dict
        ``{"<layer>": SRPResult, ..., "model": SRPResult}``.
    """
    m = segment_length
    hists = {layer: window_count_histogram(mask, m) for layer, mask in layer_masks.items()}
    n = next(iter(hists.values())).shape[0]
    weights = bootstrap_weights(n, num_bootstrap, seed)  # (B, N)
    results, totals, boot_totals = {}, None, None
    for layer, hist in hists.items():
        full = segment_counts(hist.sum(0), m)  # each (m+1,) or (1,)
        boot = segment_counts(weights @ hist, m)  # each (B, m+1)
        windows = int(hist.sum()) // layer_masks[layer].shape[-1]
        results[str(layer)] = _srp_result(full, boot, m, confidence, windows)
        totals = full if totals is None else tuple(a + b for a, b in zip(totals, full, strict=True))
        boot_totals = boot if boot_totals is None else tuple(
            a + b for a, b in zip(boot_totals, boot, strict=True))
    results["model"] = _srp_result(totals, boot_totals, m, confidence, windows)
    return results


def _srp_result(full: tuple, boot: tuple, m: int, confidence: float,
                windows: int) -> SRPResult:
    f1 = f1_curve(*full)  # (m+1,)
    best, tau = _best(f1)
    boot_best, _ = _best(f1_curve(*boot))  # (B,)
    low, high = basic_interval(best, boot_best, confidence) if windows else (np.nan, np.nan)
    return SRPResult(segment_length=m, srp=float(best), tau=int(tau), ci_low=float(low),
                     ci_high=float(high), f1=[float(x) for x in f1], windows=windows)


# --- cache curves --------------------------------------------------------------------------


@dataclass
class CacheCurve:
    """Hit rate against cache size for one policy, mean over samples with a bootstrap CI."""

    policy: str
    lookahead: int | None
    capacity: list[int]  # C = 1..E
    hit_rate: list[float]
    ci_low: list[float]
    ci_high: list[float]
    hit_rate_strict: list[float]  # every first use a miss
    cold_miss_rate: list[float]  # first uses that found no free slot

    def at(self, capacity: int) -> float:
        return self.hit_rate[capacity - 1]

    def to_dict(self) -> dict:
        return asdict(self)


def per_sample_hit_rates(top_k_index: np.ndarray, num_experts: int, policy: str,
                         lookahead: int | None = None,
                         frequency: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per sample and capacity: hit rate, strict hit rate, cold-miss rate, each ``(N, E)``.

    From the stack algorithm (:func:`fedmoe.expert_cache.capacity_hits`). ``static`` keeps
    the ``C`` experts most frequent in ``frequency`` ``(E,)`` (all samples' counts when
    ``None``), preloaded.
    """
    accesses = top_k_index.shape[1] * top_k_index.shape[2]  # T * k
    if policy == "static" and frequency is None:
        frequency = np.bincount(top_k_index.ravel(), minlength=num_experts)
    per_sample = [capacity_hits(sample, num_experts, policy, lookahead, frequency=frequency)
                  for sample in top_k_index]
    hit, strict, cold = (np.array(counts) / accesses for counts in zip(*per_sample, strict=True))
    return hit, strict, cold


def cache_curve(top_k_index: np.ndarray, num_experts: int, policy: str,
                lookahead: int | None = None, *, num_bootstrap: int = 200,
                confidence: float = 0.95, seed: int = 0,
                frequency: np.ndarray | None = None) -> CacheCurve:
    """Hit rate for C = 1..E of one policy over samples ``(N, T, k)``, with a bootstrap CI."""
    hit, strict, cold = per_sample_hit_rates(top_k_index, num_experts, policy, lookahead,
                                             frequency)
    mean = hit.mean(0)  # (E,)
    weights = bootstrap_weights(hit.shape[0], num_bootstrap, seed)  # (B, N)
    low, high = basic_interval(mean, weights @ hit / hit.shape[0], confidence)
    return CacheCurve(policy=policy, lookahead=lookahead if policy == "sch" else None,
                      capacity=list(range(1, num_experts + 1)), hit_rate=mean.tolist(),
                      ci_low=low.tolist(), ci_high=high.tolist(),
                      hit_rate_strict=strict.mean(0).tolist(), cold_miss_rate=cold.mean(0).tolist())


def model_trace(layer_index: Mapping[int, np.ndarray],
                num_experts: Mapping[int, int]) -> tuple[np.ndarray, int]:
    """All layers as one trace for a model-wide cache, as moe-lrc builds its model figure.

    Layer l's expert ids are offset by the experts of the layers before it; a token's
    accesses are layer 0's k ids, then layer 1's, and so on.

    Returns
    -------
    tuple
        ``(N, T, k * layers)`` ids and the total number of experts.
    """
    offset, parts = 0, []
    for layer in sorted(layer_index):
        parts.append(np.asarray(layer_index[layer]) + offset)
        offset += num_experts[layer]
    return np.concatenate(parts, axis=-1), offset


def sch_table(layer_index: Mapping[int, np.ndarray], num_experts: Mapping[int, int],
              lookaheads: Sequence[int] = SEGMENT_LENGTHS, *, num_bootstrap: int = 200,
              confidence: float = 0.95, seed: int = 0) -> dict[str, dict[int, CacheCurve]]:
    """SCH curves per layer and for the model, for each lookahead L.

    Returns
    -------
    dict
        ``{"<layer>" | "model": {L: CacheCurve}}``.
    """
    out: dict[str, dict[int, CacheCurve]] = {}
    for name, idx, e in _units(layer_index, num_experts):
        out[name] = {lookahead: cache_curve(idx, e, "sch", lookahead,
                                            num_bootstrap=num_bootstrap,
                                            confidence=confidence, seed=seed)
                     for lookahead in lookaheads}
    return out


def policy_curves(layer_index: Mapping[int, np.ndarray], num_experts: Mapping[int, int],
                  policies: Sequence[str] = ("lru", "lfu", "static", "belady"), *,
                  num_bootstrap: int = 200, confidence: float = 0.95,
                  seed: int = 0) -> dict[str, dict[str, CacheCurve]]:
    """Hit-rate curves of the baseline policies per layer and for the model.

    Returns
    -------
    dict
        ``{"<layer>" | "model": {policy: CacheCurve}}``.
    """
    out: dict[str, dict[str, CacheCurve]] = {}
    for name, idx, e in _units(layer_index, num_experts):
        out[name] = {p: cache_curve(idx, e, p, num_bootstrap=num_bootstrap,
                                    confidence=confidence, seed=seed) for p in policies}
    return out


def _units(layer_index: Mapping[int, np.ndarray], num_experts: Mapping[int, int]):
    """(name, ids (N, T, k), E) per layer, then the model-wide trace."""
    for layer in sorted(layer_index):
        yield str(layer), np.asarray(layer_index[layer]), num_experts[layer]
    idx, total = model_trace(layer_index, num_experts)
    yield "model", idx, total
