"""Masked aggregation of router and shared-expert tensors (pure numpy, no Flower).

Clients may hold different subsets of the routed experts after pruning. A tensor whose
first dimension indexes the routed experts of a layer (router weight, router bias) is
therefore aggregated row by row, each row only over the clients that hold that expert
(FedMoE modular aggregation, arXiv 2408.11304, applied to the router). Rows that no
client holds keep their current global value. Every other tensor is aggregated over all
clients.

Shapes used below: ``n`` clients, ``E`` routed experts of a layer, ``E_k`` experts held
by client ``k``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedmoe.config import RULES

Held = dict[int, list[int]]
MetricValue = int | float | list[int] | list[float]


def held_rows(held: Held | None, layer: int, num_experts: int) -> np.ndarray:
    """Return the original expert ids a client holds in ``layer``, in row order.

    Parameters
    ----------
    held : dict[int, list[int]] | None
        Layer index -> sorted original expert ids. ``None``, or a layer missing from
        the dict, means the client holds all experts of that layer.
    layer : int
        Decoder-layer index.
    num_experts : int
        Number of routed experts ``E`` of the layer in the unpruned model.

    Returns
    -------
    np.ndarray
        Integer ids, shape ``(E_k,)``.
    """
    if held is None or layer not in held:
        return np.arange(num_experts)
    return np.asarray(held[layer], dtype=np.int64)


def check_held(held: Held, num_experts: Mapping[int, int]) -> str | None:
    """Check a client's expert lists; return why they are malformed, or ``None``.

    Parameters
    ----------
    held : dict[int, list[int]]
        Layer index -> original expert ids held.
    num_experts : Mapping[int, int]
        Layer index -> ``E`` for the layers whose tensors are expert-indexed.

    Returns
    -------
    str | None
        The reason the lists are malformed, or ``None`` when they are fine.
    """
    for layer, ids in held.items():
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            return f"experts of layer {layer} must be integers, got {ids!r}"
        if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
            return f"experts of layer {layer} must be sorted and unique, got {ids}"
        high = num_experts.get(layer)
        if ids and (ids[0] < 0 or (high is not None and ids[-1] >= high)):
            bound = "" if high is None else f" < {high}"
            return f"experts of layer {layer} must lie in [0{bound}), got {ids}"
    return None


def check_update(
    update: Mapping[str, np.ndarray],
    held: Held | None,
    current: Mapping[str, np.ndarray],
    expert_rows: Mapping[str, int],
) -> str | None:
    """Check one client's update against the global state; return why it is bad.

    Parameters
    ----------
    update : Mapping[str, np.ndarray]
        The client's arrays, keyed by parameter name.
    held : dict[int, list[int]] | None
        The client's expert lists (see :func:`held_rows`); assumed checked by
        :func:`check_held`.
    current : Mapping[str, np.ndarray]
        The current global arrays at full, unpruned shapes.
    expert_rows : Mapping[str, int]
        Key -> layer index for keys whose first dim indexes the routed experts.

    Returns
    -------
    str | None
        The rejection reason, or ``None`` when the update can be aggregated.
    """
    missing, unknown = sorted(set(current) - set(update)), sorted(set(update) - set(current))
    if missing or unknown:
        return f"array keys differ from the global ones: missing {missing}, unknown {unknown}"
    for key, value in update.items():
        expected = expected_shape(key, held, current, expert_rows)
        if value.dtype not in (np.float32, current[key].dtype):
            return f"'{key}' has dtype {value.dtype}, expected {current[key].dtype}"
        if value.shape != expected:
            return f"'{key}' has shape {value.shape}, expected {expected}"
        if not np.isfinite(value).all():
            return f"'{key}' has non-finite values (NaN or Inf)"
    return None


def expected_shape(
    key: str,
    held: Held | None,
    current: Mapping[str, np.ndarray],
    expert_rows: Mapping[str, int],
) -> tuple[int, ...]:
    """Shape a client must send for ``key``: the global one, rows cut to held experts."""
    shape = current[key].shape
    if key not in expert_rows:
        return shape
    return (len(held_rows(held, expert_rows[key], shape[0])), *shape[1:])


def update_norm(
    update: Mapping[str, np.ndarray],
    held: Held | None,
    current: Mapping[str, np.ndarray],
    expert_rows: Mapping[str, int],
) -> float:
    """L2 norm of ``update - current`` over all keys, expert-indexed keys on held rows."""
    total = 0.0
    for key, value in update.items():
        reference = current[key]
        if key in expert_rows:
            reference = reference[held_rows(held, expert_rows[key], reference.shape[0])]
        total += float(np.sum((value.astype(np.float64) - reference) ** 2))
    return math.sqrt(total)


def reference_norm(norms: Sequence[float]) -> float:
    """The round's reference update norm: the lower median (the smaller one of 2 norms).

    With 2 replies the plain median is their mean, which one huge update drags up as far as
    it likes; the lower median is one honest client's norm as long as fewer than half of the
    replies are attacks.
    """
    return float(np.sort(np.asarray(norms, dtype=np.float64))[(len(norms) - 1) // 2])


def norm_outliers(norms: Sequence[float], factor: float) -> list[bool]:
    """Flag norms above ``factor`` times the round's :func:`reference_norm` (2 or more norms;
    a single reply has nothing to be compared with)."""
    if len(norms) < 2:
        return [False] * len(norms)
    limit = factor * reference_norm(norms)
    return [not norm <= limit for norm in norms]  # NaN counts as an outlier


def cap_weights(weights: Sequence[float], max_share: float | None = 0.5,
                median_factor: float | None = 3.0) -> np.ndarray:
    """Cap each client's weight so that none owns the aggregate.

    A weight above ``C = max(C_share, median_factor * m)`` is cut to ``C``, where ``m`` is the
    lower median weight (see :func:`reference_norm`: one huge claim cannot drag it up) and
    ``C_share`` the largest cap under which no client holds more than ``max_share`` of the
    capped total. So no client exceeds the larger of ``max_share`` and ``median_factor``
    times the median weight; honest imbalance within that stays as it is. ``None`` turns a
    part off (both ``None``: no cap).

    Parameters
    ----------
    weights : Sequence[float]
        Positive finite weights, shape ``(n,)``.

    Returns
    -------
    np.ndarray
        The capped weights, shape ``(n,)``, divided by the largest one (the mean is
        scale-free; this keeps sums of huge claimed weights from overflowing).
    """
    w = np.asarray(weights, dtype=np.float64)  # (n,)
    if w.size == 0:
        return w
    w = w / w.max()
    caps = []
    if max_share is not None and max_share * w.size >= 1:
        caps.append(_share_cap(w, max_share))
    if median_factor is not None:
        caps.append(median_factor * reference_norm(w))
    return np.minimum(w, max(caps)) if caps else w


def _share_cap(w: np.ndarray, share: float) -> float:
    """Largest ``C`` with ``C <= share * sum(min(w, C))``: water-filling from the top."""
    ordered = np.sort(w)[::-1]  # (n,) descending
    tail = np.append(np.cumsum(ordered[::-1])[::-1], 0.0)  # tail[k] = sum of ordered[k:]
    if ordered[0] <= share * tail[0]:
        return float(ordered[0])  # nobody above the share: nothing to cut
    for k in range(w.size):  # the k + 1 largest weights capped at C
        if share * (k + 1) >= 1:
            break
        cap = share * tail[k + 1] / (1 - share * (k + 1))
        below = ordered[k + 1] if k + 1 < w.size else 0.0
        if below <= cap * (1 + 1e-9) and cap <= ordered[k]:
            return float(cap)
    return float(ordered[0])  # no consistent cap: nothing to cut


def check_aggregate(arrays: Mapping[str, np.ndarray], max_abs: float | None) -> str | None:
    """Why an aggregate must not become the global model (non-finite, or a value beyond
    ``max_abs`` in magnitude), or ``None``."""
    for key, value in arrays.items():
        if not np.isfinite(value).all():
            return f"aggregate '{key}' has non-finite values"
        if max_abs is not None and value.size and float(np.abs(value).max()) > max_abs:
            return f"aggregate '{key}' exceeds |x| <= {max_abs:g}"
    return None


def reduce_rows(stack: np.ndarray, weights: np.ndarray, rule: str, trim_beta: float) -> np.ndarray:
    """Reduce ``stack`` of shape ``(m, ...)`` over its first axis with ``rule``.

    ``"mean"`` is weighted by ``weights``; ``"median"`` and ``"trimmed_mean"`` are
    coordinate-wise and unweighted, as Flower's FedMedian and FedTrimmedAvg (Yin et al.,
    arXiv 1803.01498): the trimmed mean drops ``int(trim_beta * m)`` values at each end.
    """
    values = stack.astype(np.float64)  # (m, ...)
    if rule == "mean":
        return np.average(values, axis=0, weights=weights)
    if rule == "median":
        return np.median(values, axis=0)
    if rule == "trimmed_mean":
        cut = int(trim_beta * values.shape[0])
        ordered = np.sort(values, axis=0)
        return ordered[cut : values.shape[0] - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation rule '{rule}', expected one of {RULES}")


def masked_aggregate(
    updates: Sequence[Mapping[str, np.ndarray]],
    held: Sequence[Held | None],
    weights: Sequence[float],
    current: Mapping[str, np.ndarray],
    expert_rows: Mapping[str, int],
    rule: str = "mean",
    trim_beta: float = 0.2,
) -> dict[str, np.ndarray]:
    """Aggregate client updates, expert-indexed rows only over the clients holding them.

    Parameters
    ----------
    updates : Sequence[Mapping[str, np.ndarray]]
        One dict per client with exactly the keys of ``current``; expert-indexed
        tensors have ``E_k`` rows in the order of the client's held ids.
    held : Sequence[dict[int, list[int]] | None]
        Per client, layer -> held original expert ids (``None``: all experts).
    weights : Sequence[float]
        Per-client weights (number of examples), used by ``"mean"``.
    current : Mapping[str, np.ndarray]
        Current global arrays at full shapes; rows nobody holds keep these values.
    expert_rows : Mapping[str, int]
        Key -> layer index for keys whose first dim indexes the routed experts.
    rule : str
        ``"mean"``, ``"median"`` or ``"trimmed_mean"``.
    trim_beta : float
        Fraction cut at each end by ``"trimmed_mean"``, in ``[0, 0.5)``.

    Returns
    -------
    dict[str, np.ndarray]
        The aggregated arrays, at the shapes and dtypes of ``current``.
    """
    w = np.asarray(weights, dtype=np.float64)  # (n,)
    out: dict[str, np.ndarray] = {}
    for key, reference in current.items():
        if key in expert_rows:
            full, mask = scatter_rows([u[key] for u in updates], held, expert_rows[key], reference)
            merged = reference.astype(np.float64)  # (E, ...)
            for row in range(reference.shape[0]):
                holders = np.flatnonzero(mask[:, row])
                if holders.size:
                    merged[row] = reduce_rows(full[holders, row], w[holders], rule, trim_beta)
        else:
            merged = reduce_rows(np.stack([u[key] for u in updates]), w, rule, trim_beta)
        out[key] = np.asarray(merged, dtype=reference.dtype)
    return out


def scatter_rows(
    values: Sequence[np.ndarray],
    held: Sequence[Held | None],
    layer: int,
    reference: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Place each client's held rows at their original expert ids.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``full`` of shape ``(n, E, ...)`` (zeros where not held) and the boolean
        holder ``mask`` of shape ``(n, E)``.
    """
    num_experts = reference.shape[0]
    full = np.zeros((len(values), *reference.shape), dtype=np.float64)  # (n, E, ...)
    mask = np.zeros((len(values), num_experts), dtype=bool)  # (n, E)
    for k, (value, held_k) in enumerate(zip(values, held, strict=True)):
        ids = held_rows(held_k, layer, num_experts)  # (E_k,)
        full[k, ids] = value  # value: (E_k, ...)
        mask[k, ids] = True
    return full, mask


def weighted_mean_metrics(
    metrics: Sequence[Mapping[str, MetricValue]],
    weights: Sequence[float],
    exclude: Sequence[str] = (),
) -> dict[str, MetricValue]:
    """Weighted mean of each metric over the clients that report it.

    Used when clients report different metric keys: each key is averaged over its own
    reporters, with their weights renormalised. List-valued metrics are averaged
    element-wise when all reporters agree on the length, and dropped otherwise.
    """
    out: dict[str, MetricValue] = {}
    keys = sorted({key for record in metrics for key in record} - set(exclude))
    for key in keys:
        pairs = [
            (record[key], w) for record, w in zip(metrics, weights, strict=True) if key in record
        ]
        values = [np.atleast_1d(np.asarray(v, dtype=np.float64)) for v, _ in pairs]
        if len({v.shape for v in values}) != 1:
            continue
        mean = np.average(np.stack(values), axis=0, weights=[w for _, w in pairs])
        out[key] = mean.tolist() if isinstance(pairs[0][0], list) else float(mean[0])
    return out
