"""Intervals of basin fractions (docs/model.md section 9): the Wilson score interval, widened by the members whose
outcome is unknown, one at a time (95% each) or simultaneous (95% for all the outcomes of a study at once)."""

from __future__ import annotations

import math
from statistics import NormalDist

Z95 = 1.96
"""The two-sided 95% normal quantile, as the literature rounds it (1.959964...)."""


def wilson(k: int, N: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / N (95% by default); ``(0, 1)`` when N = 0."""
    if not 0 <= k <= N:
        raise ValueError(f"the Wilson interval needs 0 <= k <= N, got k = {k}, N = {N}")
    if not (z > 0 and math.isfinite(z)):
        raise ValueError(f"z must be a finite number > 0, got {z}")
    if N == 0:
        return (0.0, 1.0)
    p = k / N
    den = 1 + z * z / N
    c = (p + z * z / (2 * N)) / den
    h = z * math.sqrt(max(p * (1 - p), 0.0) / N + z * z / (4 * N * N)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def interval_with_unknown(k: int, u: int, N: int, z: float = Z95) -> tuple[float, float]:
    """``[wilson(k, N).lower, wilson(k + u, N).upper]``: sampling error plus the worst case of the u members whose
    attractor is unknown (not converged, failed, saddles) all joining, or none of them joining, these k."""
    return (wilson(k, N, z)[0], wilson(min(k + u, N), N, z)[1])


def simultaneous_z(K: int, level: float = 0.95) -> float:
    """The Bonferroni-adjusted normal quantile ``z = Phi^-1(1 - (1 - level) / (2 K))`` for K intervals that must
    hold together with probability at least `level` (K = 1 gives 1.95996 at 95%)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - level) / (2 * K))
