"""Intervals of basin fractions (docs/model.md section 9): the Wilson score interval, widened by the members whose
outcome is unknown."""

from __future__ import annotations

import math

Z95 = 1.96
"""The two-sided 95% normal quantile, as the literature rounds it (1.959964...)."""


def wilson(k: int, N: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / N (95% by default); ``(0, 1)`` when N = 0."""
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
