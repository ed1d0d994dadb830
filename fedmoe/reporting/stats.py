"""Paired per-client statistics of two settings of a sweep, with bootstrap confidence intervals.

A *unit* is one client in one run, ``(seed, client id)``. Two settings that share seeds and
client ids are compared unit by unit (:func:`paired_differences`, :func:`win_rate`), and
:func:`bootstrap_ci` gives a mean with its percentile-bootstrap confidence interval.

Which resampling scheme
-----------------------
Units are not independent of each other. The clients of one run share the global model the
server aggregated from all of them, so a lucky or unlucky seed moves every client of that run
together; and client ``c`` holds the same domain under every seed, so a client that is hard
for a strategy is hard under every seed. Seeds and clients are two *crossed* random factors.
Resampling units as if they were independent ignores both and gives too narrow an interval;
resampling whole seeds only (clients nested in seeds) ignores the client factor, and with 3
seeds has 10 distinct resamples. With ``clusters=(seeds, clients)``, :func:`bootstrap_ci`
draws seeds and clients independently, with replacement, and keeps each unit whose seed and
client were both drawn, weighted by the product of their multiplicities: the pigeonhole
bootstrap (Owen 2007, Ann. Appl. Stat. 1(2)), whose variance of a mean is mildly conservative
under crossed random effects. One factor is the ordinary cluster bootstrap; none, the i.i.d.
bootstrap. Intervals are percentile intervals (not BCa: its jackknife acceleration has no
agreed form for crossed clusters); with few seeds and clients they are approximate.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Unit = tuple[str, str]  # (seed, client id): one client's result in one run
_CELLS = 4_000_000  # resamples x units drawn at once (32 MB of weights)


@dataclass(frozen=True)
class Estimate:
    """A sample mean and its bootstrap confidence interval ``[low, high]`` over ``n`` units."""

    mean: float
    low: float
    high: float
    n: int


class UnmatchedUnits(ValueError):
    """Units of one setting that the other setting lacks (``only_a``, ``only_b``)."""

    def __init__(self, only_a: list[Unit], only_b: list[Unit]):
        self.only_a, self.only_b = only_a, only_b
        super().__init__(f"unmatched (seed, client) units: only in the first {only_a}, "
                         f"only in the second {only_b}")


def bootstrap_ci(values: Sequence[float], *, clusters: Sequence[Sequence[Hashable]] = (),
                 confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> Estimate:
    """The mean of ``values`` and its percentile-bootstrap confidence interval.

    Parameters
    ----------
    values : sequence of float
        One value per unit.
    clusters : sequence of label sequences
        Zero, one or two factors, each a label per value (e.g. ``(seeds, clients)``); the
        factors are resampled independently (see the module docstring). Empty: i.i.d. units.
    confidence : float
        Coverage of the interval (0.95: the 2.5 % and 97.5 % quantiles of the resampled means).
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling: the same inputs and seed give the same interval.

    Returns
    -------
    Estimate
    """
    x = np.asarray(values, dtype=float)  # (N,)
    if x.ndim != 1 or not len(x) or not np.isfinite(x).all():
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D finite sample, got {values!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    factors = [_codes(labels, len(x)) for labels in clusters] or [np.arange(len(x))]
    # Deviations from the first value: a constant sample resamples to exactly 0, so its
    # interval has zero width whatever the rounding of a weighted mean.
    center = x[0]
    dev = x - center  # (N,)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    block = max(1, _CELLS // len(x))
    for start in range(0, n_resamples, block):
        b = min(block, n_resamples - start)
        weight = np.ones((b, len(x)))  # (B, N): how often each unit is in each resample
        for codes in factors:
            groups = codes.max() + 1
            counts = rng.multinomial(groups, np.full(groups, 1 / groups), size=b)  # (B, G)
            weight *= counts[:, codes]
        with np.errstate(invalid="ignore", divide="ignore"):  # no unit drawn: nan, skipped
            means[start:start + b] = weight @ dev / weight.sum(1)
    alpha = (1 - confidence) / 2
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return Estimate(float(center + dev.mean()), float(center + low), float(center + high),
                    len(x))


def _codes(labels: Sequence[Hashable], n: int) -> np.ndarray:
    """Labels as integer codes 0..G-1 in first-seen order."""
    if len(labels) != n:
        raise ValueError(f"a cluster factor has {len(labels)} labels for {n} values")
    index = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    return np.array([index[label] for label in labels])


def paired_differences(a: Mapping[Unit, float], b: Mapping[Unit, float], *,
                       relative: bool = False) -> dict[Unit, float]:
    """Per unit, ``a - b``, or with ``relative`` ``100 * (a - b) / b`` (percent of ``b``).

    Raises
    ------
    UnmatchedUnits
        When a unit is in only one of ``a`` and ``b`` (settings with other seeds or clients).
    """
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    if only_a or only_b:
        raise UnmatchedUnits(only_a, only_b)
    return {u: 100 * (a[u] - b[u]) / b[u] if relative else a[u] - b[u] for u in a}


def win_rate(a: Mapping[Unit, float], b: Mapping[Unit, float], **bootstrap) -> Estimate:
    """Share of units where ``a`` is lower (better, for a perplexity) than ``b``, a tie
    counting one half, with its crossed (seeds x clients) bootstrap interval.

    ``bootstrap`` is passed on to :func:`bootstrap_ci` (``confidence``, ``n_resamples``,
    ``seed``).
    """
    diff = paired_differences(a, b)
    wins = [1.0 if d < 0 else 0.5 if d == 0 else 0.0 for d in diff.values()]
    return bootstrap_ci(wins, clusters=crossed(diff), **bootstrap)


def crossed(units: Sequence[Unit] | Mapping[Unit, float]) -> tuple[list[str], list[str]]:
    """The two factors of ``units`` for :func:`bootstrap_ci`: their seeds and their clients."""
    return [s for s, _ in units], [c for _, c in units]
