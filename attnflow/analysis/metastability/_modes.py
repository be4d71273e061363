"""Growth rates of the Fourier modes of the mean-field self-attention flow on the circle, linearised around the
uniform density.

Model: d = 2, one head, Q = K = V = I (``SphereFlow`` with ``SelfAttention(Heads.single(np.eye(2)), beta=beta)``).
With rho = (1 + eps cos(k theta)) / (2 pi), the amplitude eps grows at rate

    lambda_k = k^2 I_k(beta) / (beta I_0(beta))      (softmax)
    lambda_k = k^2 I_k(beta) / beta                  (unnormalized, a_ij = exp(beta <x_i, x_j>) / n)

(I_k the modified Bessel function of the first kind), so both kernels share the fastest mode
k* = argmax_{k >= 1} k^2 I_k(beta). The Bessel functions are computed in plain NumPy (scipy is not a dependency of
attnflow): the ratios r_k = I_k / I_{k-1} by backward recurrence (Miller's algorithm), I_0 by Miller's
normalisation I_0 + 2 sum_{k >= 1} I_k = e^beta.
"""

from __future__ import annotations

import math
import operator

import numpy as np

KINDS = ("softmax", "unnormalized")

_LOG_TOL = -80.0  # a start error is damped by at least exp(_LOG_TOL) ~ 2e-35 before it reaches the indices used
_NORM_TOL = 1e-18  # Miller's normalisation sum is truncated once a term is below this (relative)


def _check_beta(beta) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}") from None
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    return b


def _check_kmax(kmax) -> int:
    if isinstance(kmax, bool):
        raise ValueError(f"kmax must be an integer >= 1, got {kmax!r}")
    try:
        k = operator.index(kmax)
    except TypeError:
        raise ValueError(f"kmax must be an integer >= 1, got {kmax!r}") from None
    if k < 1:
        raise ValueError(f"kmax must be an integer >= 1, got {kmax!r}")
    return int(k)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; the mode rates are known for {', '.join(map(repr, KINDS))}")
    return kind


def _ratio_guess(nu: float, beta: float) -> float:
    """A close estimate of I_nu(beta) / I_{nu-1}(beta): beta / (nu + sqrt(nu^2 + beta^2)) (between the
    Amos-type bounds with nu - 1/2 and nu + 1/2)."""
    return beta / (nu + math.hypot(nu, beta))


def _start_index(kmax: int, beta: float) -> int:
    """Where to start the backward recurrence so that its start error is negligible at index kmax.

    An error e in r_{m+1} becomes about r_m^2 e in r_m (d r_m / d r_{m+1} = -r_m^2), so the start error is damped by
    prod_{m=kmax}^{N-1} r_m^2; go up until that product is below exp(_LOG_TOL)."""
    m, acc = kmax, 0.0
    while acc > _LOG_TOL:
        acc += 2.0 * math.log(max(_ratio_guess(m, beta), 1e-300))
        m += 1
    return m + 1


def _ratios(beta: float, kmax: int) -> np.ndarray:
    """r_k = I_k(beta) / I_{k-1}(beta) for k = 1..kmax (entry 0 unused, set to 1), by the backward recurrence
    r_k = 1 / (2 k / beta + r_{k+1}) (from I_{k-1} - I_{k+1} = (2 k / beta) I_k), started from the estimate
    :func:`_ratio_guess` far enough above kmax. Every step divides positive numbers: no cancellation."""
    top = _start_index(kmax, beta)
    r_next = _ratio_guess(top + 1, beta)
    out = np.ones(kmax + 1)
    for m in range(top, 0, -1):
        r_next = 1.0 / (2.0 * m / beta + r_next)
        if m <= kmax:
            out[m] = r_next
    return out


def bessel_ratios(beta: float, kmax: int) -> np.ndarray:
    """I_k(beta) / I_0(beta) for k = 0..kmax, in float64, without overflow for any beta.

    **Arguments:**

    - `beta`: a finite number > 0.
    - `kmax`: an integer >= 1.

    **Returns:** a ``(kmax + 1,)`` array; entry 0 is 1. Entries below the float64 range underflow to 0.
    """
    beta, kmax = _check_beta(beta), _check_kmax(kmax)
    r = _ratios(beta, kmax)
    r[0] = 1.0
    return np.cumprod(r)


def log_i0(beta: float) -> float:
    """log I_0(beta), by Miller's normalisation e^beta = I_0 + 2 sum_{k >= 1} I_k (the generating function
    e^{(beta/2)(t + 1/t)} = sum_k I_k t^k at t = 1): log I_0 = beta - log(1 + 2 sum_{k >= 1} I_k / I_0).

    **Arguments:**

    - `beta`: a finite number > 0.

    **Returns:** a float, finite for every finite beta > 0 (I_0 itself overflows float64 above beta ~ 713).
    """
    beta = _check_beta(beta)
    k = max(8, int(math.ceil(beta)))
    while True:  # enough terms that the tail is below _NORM_TOL (the ratios then fall like beta / 2k)
        q = bessel_ratios(beta, k)
        if q[-1] < _NORM_TOL and _ratio_guess(k + 1, beta) < 0.5:
            break
        k *= 2
    return beta - math.log1p(2.0 * float(np.sum(q[1:])))


def mode_rates(beta: float, kmax: int = 32, *, kind: str = "softmax") -> np.ndarray:
    """Growth rates lambda_k of the modes cos(k theta) of the mean-field flow on the circle, linearised around the
    uniform density: lambda_k = k^2 I_k(beta) / (beta I_0(beta)) for softmax attention, k^2 I_k(beta) / beta for
    unnormalized attention (docs/model.md section 11 gives the derivation).

    **Arguments:**

    - `beta`: the inverse temperature, a finite number > 0.
    - `kmax`: the largest mode, an integer >= 1.
    - `kind`: ``"softmax"`` or ``"unnormalized"``.

    **Returns:** a float64 array ``(kmax + 1,)`` whose entry k is lambda_k (entry 0, the mass, is 0). All entries
    are > 0 except those that underflow; for ``"unnormalized"`` they overflow to inf above beta ~ 700.
    """
    beta, kmax, kind = _check_beta(beta), _check_kmax(kmax), _check_kind(kind)
    r = _ratios(beta, max(kmax, 2))
    # lambda_k = k^2 (r_1 / beta) r_2 ... r_k with r_1 / beta = 1 / (2 + beta r_2): finite and accurate as beta -> 0
    # (also for kmax = 1: r_1 / beta itself is 0 / beta once 2 / beta overflows, beta below ~ 1e-308)
    s1 = 1.0 / (2.0 + beta * r[2])
    r = r[: kmax + 1]
    prod = np.ones(kmax + 1)
    prod[1] = s1
    prod[2:] = s1 * np.cumprod(r[2:])
    k = np.arange(kmax + 1, dtype=np.float64)
    rates = k * k * prod
    rates[0] = 0.0
    if kind == "unnormalized":
        log_scale = log_i0(beta)
        if log_scale < 700.0:  # I_0(beta) is a finite float64
            rates = rates * math.exp(log_scale)
        else:  # beta ~ 700 and above: through logs, entries beyond the float64 range become inf
            with np.errstate(divide="ignore", over="ignore"):
                rates = np.exp(np.log(rates) + log_scale)
        rates[0] = 0.0
    return rates


def circle_scale(dynamics) -> float | None:
    """The factor c for which `dynamics` is the setting of these rates at inverse temperature c beta, or None when
    it is not that setting (docs/model.md section 11.5).

    The setting: tokens on the unit circle (d = 2) moved by a :class:`~attnflow.SphereFlow`, or by a
    :class:`~attnflow.LayerMap` with the l2 normalisation (its mode k is multiplied per step by
    1 + alpha lambda_k / (1 + alpha C_0), C_0 > 0, which increases with lambda_k: the same k*); ``softmax`` or
    ``unnormalized`` attention with the full mask; no biases; every head's score matrix M_h = Q_h^T K_h equal to the
    same c I with c > 0 (the scores are then c beta cos(theta_j - theta_i), and every head has the same weights a_ij);
    the layer matrix W = sum_h O_h V_h equal to w I with w > 0 (w only rescales time). Any other model (another
    mask or kernel, a rotation or reflection in V, anisotropic scores, biases, a flat flow, a layer norm) has other
    linear modes, and the rates and k* of this module do not describe it.
    """
    from ...model.dynamics import LayerMap, SphereFlow
    from ...model.norms import L2Norm

    attn = getattr(dynamics, "attn", None)
    if attn is None or not (isinstance(dynamics, SphereFlow)
                            or (isinstance(dynamics, LayerMap) and isinstance(dynamics.norm, L2Norm))):
        return None
    if attn.attention.kind not in KINDS or attn.attention.mask != "full":
        return None
    H = attn.heads
    if H.dim != 2:
        return None
    for b in (H.bq, H.bk, H.bv, H.bo):
        if b is not None and np.any(np.asarray(b) != 0):
            return None
    eye = np.eye(2)
    M = np.asarray(H.score_matrices(), dtype=np.float64)
    W = np.asarray(H.layer_matrix(), dtype=np.float64)
    c, w = float(np.trace(M[0])) / 2.0, float(np.trace(W)) / 2.0
    if not (c > 0 and w > 0):
        return None
    tol = 1e-6  # relative: float32 weights of the identity are exact; anything further off is another model
    if np.max(np.abs(M - c * eye)) > tol * c or np.max(np.abs(W - w * eye)) > tol * w:
        return None
    return c


def fastest_mode(beta: float, *, kind: str = "softmax") -> int:
    """k* = argmax_{k >= 1} lambda_k, the Fourier mode that grows fastest out of the uniform density (the number of
    clusters of the metastable state that forms first). The same for both kinds: their rates differ by a factor
    I_0(beta) that does not depend on k. Ties (never seen in practice) go to the smaller k.

    **Arguments:**

    - `beta`: the inverse temperature, a finite number > 0.
    - `kind`: ``"softmax"`` or ``"unnormalized"``.

    **Returns:** k* as a Python int >= 1.
    """
    beta, kind = _check_beta(beta), _check_kind(kind)
    # k^2 I_k(beta) is unimodal in k: lambda_{k+1} / lambda_k = (1 + 1/k)^2 I_{k+1} / I_k is a product of positive
    # factors that decrease in k (I_{k+1} / I_k decreases in k), so it crosses 1 once. k* = 1 below beta ~ 1.04 and
    # k* ~ sqrt(2 beta) for large beta. Grow the range until the maximum is interior, 8 modes below kmax.
    kmax = max(16, 2 * int(math.sqrt(2.0 * beta)) + 8)
    while True:
        rates = mode_rates(beta, kmax)  # softmax: finite for every beta; the kind only rescales
        k = int(np.argmax(rates[1:])) + 1
        if k + 8 <= kmax:
            return k
        kmax *= 2
