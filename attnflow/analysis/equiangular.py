r"""Equiangular theory for scalar heads (docs/model.md section 7).

Setting: H heads with W_h = w_h I and M_h = m_h I, full mask, d >= n, and a start where every
<x_i, x_j> = rho (i != j). The configuration stays equiangular and, with p(rho) = (1 - rho)(1 + (n-1) rho),

    d rho/dt = F(rho) = 2 p(rho) sum_h w_h a^h_o(rho),

where a^h_o is the weight a token gives each *other* token:

- softmax:       a_o = e^{beta m rho} / (e^{beta m} + (n-1) e^{beta m rho}) = (1 - a_self)/(n - 1),
                 a_self(rho) = 1 / (1 + (n-1) e^{-beta m (1 - rho)})  (the weight on itself);
- relu (/n):     a_o = max(beta m rho, 0) / n.

(Derivation: P(x_1) u_1 = sum_h w_h sum_j a^h_1j (x_j - rho_1j x_1); pairing with x_2 gives
w a_o [(1 - rho^2) + (n - 2)(rho - rho^2)] = w a_o p(rho) per head, and rho_12 gets this twice.)

Closed forms derived here (each is checked against full simulations in the tests):

- **rate near consensus** (delta = 1 - rho -> 0): d delta/dt = -lambda_1 delta with lambda_1 = 2 sum_h w_h
  (softmax: a_o -> 1/n and p ~ n delta; independent of beta and m) and lambda_1 = 2 beta sum_h w_h m_h (relu).
- **rate at the simplex** rho_* = -1/(n-1) (the repelling equiangular equilibrium): softmax
  lambda_0 = 2n sum_h w_h / (e^{beta m_h n/(n-1)} + n - 1); relu: 2 beta sum_h w_h max(-m_h, 0)/(n - 1), 0 when
  every m_h >= 0 (rho <= 0 never moves). (The relu rate near consensus is likewise 2 beta sum_h w_h max(m_h, 0).)
- **clustering time** T_eps = int_{rho0}^{1-eps} d rho / F(rho) (solved as an ODE in rho with diffrax).
  For softmax 1/F = (e^{beta m (1-rho)} + n - 1)/(2 w p) (one head), so T_eps = (n-1) A + B(beta) splits exactly
  into a beta-free part (attention on the other tokens) and a part that grows like e^{beta m (1-rho0)}
  (attention wasted on the token itself, which P(x_i) annihilates).
- **critical inverse temperature**: the beta at which a token starts giving as much attention to itself as to
  all others together, a_self(rho0) = 1/2, i.e. the initial clustering speed F(rho0) is half the speed
  V = 2 p(rho0) sum_h w_h / (n-1) it would have if all attention went to the other tokens:

      beta_c = log(n - 1) / (m (1 - rho0))     (one head, or all m_h = m).

  For beta < beta_c the (n-1) A term dominates T_eps (fast, mean-field clustering); for beta > beta_c the
  self-attention delay B(beta) ~ e^{beta m (1 - rho0)} dominates (slow, metastable). With beta = gamma log n and
  n -> infinity the switch is sharp at gamma = 1/(m (1 - rho0)). Checkable: the measured initial speed of a full
  simulation, divided by its beta -> 0 value, crosses n / (2(n - 1)) at beta_c. For heterogeneous m_h,
  beta_c solves sum_h w_h (a^h_self - 1/2) = 0 (bisection; a_self increases with beta when m_h > 0).
- **super-additivity**: the effective clustering rate R = 1 / T_eps is the harmonic functional
  (int d rho / F)^{-1}, concave and 1-homogeneous in F, hence R(F_1 + F_2) >= R(F_1) + R(F_2), with equality
  iff F_1 is proportional to F_2, i.e. iff the heads share beta m_h (for softmax) -- heterogeneous heads
  cluster strictly super-additively; :func:`superadditivity_gain` measures R_12 / (R_1 + R_2) - 1.
- **ReLU vs softmax, linearised**: near rho = 0 softmax has F(0) = 2 sum w_h / (e^{beta m_h} + n - 1) > 0
  (it leaves any rho0 >= 0 in finite time), while relu is F ~ (2 beta sum w_h m_h / n) rho, so escaping from
  rho0 takes log(delta/rho0) n / (2 beta sum w_h m_h) -> infinity as rho0 -> 0 (and never for rho0 <= 0). Near
  consensus the relu rate is beta m times the softmax rate (2 beta sum w m vs 2 sum w).
"""

from __future__ import annotations

import contextlib
import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float
from ..model.heads import check_positive

__all__ = [
    "reduced_rhs",
    "solve_reduced",
    "clustering_time",
    "self_attention_weight",
    "rate_near_consensus",
    "rate_near_simplex",
    "critical_beta",
    "critical_speed_ratio",
    "superadditivity_gain",
    "linearised_times",
    "scalar_heads",
    "equiangular_rho",
    "initial_speed",
]

KINDS = ("softmax", "relu")


@contextlib.contextmanager
def _host64():
    """Run a tiny host-side computation in float64 on the CPU, whatever the process's default dtype: the
    reduced ODE needs tolerances (1e-11) that float32 cannot meet, and would report inf (failure) instead.
    Scoped (``jax.enable_x64`` as a context), so nothing outside changes; results leave as NumPy float64."""
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        yield


def _float64(fn):
    """Run `fn` in float64 on the host (:func:`_host64`), its array results leaving as NumPy float64, after refusing a
    beta that is not finite and > 0 (section 1). The closed forms are tiny: float32 rounded them (1e-8) and
    underflowed e^{-beta m (1 - rho)} to 0 (an initial speed of 1.5e-52 reported as 0). Called with traced
    arguments (inside a user's jit), it runs as it is."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return fn(*args, **kwargs)
        if kwargs.get("beta") is not None:
            check_positive("beta", kwargs["beta"])
        with _host64():
            out = fn(*args, **kwargs)
            return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, out)

    return call


def _check(n, w, m, kind):
    if kind not in KINDS:
        raise ValueError(f"the equiangular reduction is derived for kind 'softmax' or 'relu', got {kind!r}")
    if n < 2:
        raise ValueError(f"the equiangular reduction needs n >= 2 tokens, got {n}")
    w = jnp.atleast_1d(jnp.asarray(w, dtype=float))
    m = jnp.atleast_1d(jnp.asarray(m, dtype=float))
    if w.shape != m.shape or w.ndim != 1:
        raise ValueError(f"w and m must be 1-d arrays of the same length (one per head), got {w.shape} and {m.shape}")
    return w, m


def _rhs(rho, n, beta, w, m, kind):
    p = (1 - rho) * (1 + (n - 1) * rho)
    if kind == "softmax":
        # a_o = 1 / (e^{beta m (1 - rho)} + n - 1), stable for large beta m
        ao = 1.0 / (jnp.exp(beta * m * (1 - rho)) + (n - 1))
    else:
        ao = jnp.maximum(beta * m * rho, 0.0) / n
    return 2 * p * jnp.sum(w * ao)


@_float64
def reduced_rhs(rho, *, n: int, beta, w, m, kind: str = "softmax") -> Float[Array, ""]:
    """F(rho) = d rho/dt of the equiangular reduction (module docstring).

    **Arguments:** `rho` the common inner product; `n` tokens; `beta`; `w`, `m` ``(H,)`` the head scalars;
    `kind` ``softmax`` or ``relu`` (relu weights divided by n).
    """
    w, m = _check(n, w, m, kind)
    return _rhs(jnp.asarray(rho), n, jnp.asarray(beta), w, m, kind)


@_float64
def solve_reduced(rho0, ts, *, n: int, beta, w, m, kind: str = "softmax", rtol: float = 1e-12, atol: float = 1e-14) -> Float[Array, " s"]:
    """rho(t) at the times `ts` (increasing, ts[0] the start) from rho(ts[0]) = rho0 (diffrax, Dopri8; in float64
    on the host, whatever the default dtype). **Returns:** a NumPy float64 array ``(s,)``."""
    with _host64():
        w, m = _check(n, w, m, kind)
        ts = jnp.asarray(np.asarray(ts, dtype=np.float64))
        return np.asarray(_solve(jnp.asarray(rho0, float), ts, jnp.asarray(beta, float), w, m, n, kind, rtol, atol))


@eqx.filter_jit
def _solve(rho0, ts, beta, w, m, n, kind, rtol, atol):
    term = diffrax.ODETerm(lambda t, r, args: _rhs(r, n, beta, w, m, kind))
    sol = diffrax.diffeqsolve(
        term, diffrax.Dopri8(), t0=ts[0], t1=ts[-1], dt0=None, y0=rho0,
        saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=100_000,
    )
    return sol.ys


@eqx.filter_jit
def _time_one(rho0, rho1, beta, w, m, n, kind):
    # T = int_{rho0}^{rho1} d rho / F(rho): an ODE in the variable rho.
    term = diffrax.ODETerm(lambda r, T, args: 1.0 / _rhs(r, n, beta, w, m, kind))
    sol = diffrax.diffeqsolve(
        term, diffrax.Dopri8(), t0=rho0, t1=rho1, dt0=None, y0=jnp.zeros((), rho0.dtype),
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-13), max_steps=100_000, throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    return jnp.where(ok, sol.ys[-1], jnp.inf)


@_float64
def clustering_time(eps, rho0, *, n: int, beta, w, m, kind: str = "softmax") -> Float[Array, "..."]:
    """T_eps: the time until rho >= 1 - eps, from rho(0) = rho0 (vectorised over an array of `beta`).

    Computed in float64 on the host whatever the default dtype (a float32 solve cannot meet the quadrature's
    tolerances). **Returns:** a NumPy float64 array shaped like `beta`; +inf where the reduced flow cannot get
    there (relu from rho0 <= 0; a head sum w_h <= 0).
    """
    if not (0 < eps < 1):
        raise ValueError(f"eps must lie in (0, 1), got {eps}")
    if n < 2:
        raise ValueError(f"the equiangular reduction needs n >= 2 tokens, got {n}")
    lo = -1.0 / (n - 1)
    if not (lo < rho0 < 1 - eps):
        raise ValueError(f"rho0 must lie in ({lo:.4g}, 1 - eps), got {rho0}")
    with _host64():
        w, m = _check(n, w, m, kind)
        beta = jnp.asarray(np.asarray(beta, dtype=np.float64))
        f = lambda b: _time_one(jnp.asarray(rho0, float), jnp.asarray(1 - eps, float), b, w, m, n, kind)  # noqa: E731
        T = np.asarray(jax.vmap(f)(beta.ravel()).reshape(beta.shape))
        F0 = np.asarray(jax.vmap(lambda b: _rhs(jnp.asarray(rho0, float), n, b, w, m, kind))(beta.ravel()))
    # F <= 0 at the start (e.g. sum_h w_h < 0): rho never rises to 1 - eps; the quadrature of 1/F would return a
    # finite negative "time" when F < 0 throughout
    T = np.where((F0.reshape(beta.shape) > 0) & (T > 0), T, np.inf)
    if kind == "relu" and rho0 <= 0:
        T = np.full_like(T, np.inf)
    return T


@_float64
def self_attention_weight(rho, *, n: int, beta, m) -> Float[Array, "..."]:
    """Softmax weight a_self = 1/(1 + (n-1) e^{-beta m (1 - rho)}) a token gives itself (per head)."""
    m = jnp.asarray(m, float)
    return 1.0 / (1.0 + (n - 1) * jnp.exp(-jnp.asarray(beta, float) * m * (1 - jnp.asarray(rho, float))))


@_float64
def rate_near_consensus(*, beta, w, m, kind: str = "softmax") -> float:
    """lambda_1: d(1 - rho)/dt = -lambda_1 (1 - rho) near rho = 1: 2 sum w_h (softmax), 2 beta sum w_h max(m_h, 0)
    (relu)."""
    w, m = _check(2, w, m, kind)
    # relu: a_o -> max(beta m_h, 0)/n at rho = 1, so a head with m_h <= 0 contributes nothing
    return float(2 * jnp.sum(w)) if kind == "softmax" else float(2 * beta * jnp.sum(w * jnp.maximum(m, 0.0)))


@_float64
def rate_near_simplex(*, n: int, beta, w, m, kind: str = "softmax") -> float:
    """lambda_0 = F'(rho_*) at the simplex rho_* = -1/(n-1): 2n sum_h w_h/(e^{beta m_h n/(n-1)} + n - 1) (softmax),
    2 beta sum_h w_h max(-m_h, 0)/(n - 1) for relu (0 when every m_h >= 0)."""
    w, m = _check(n, w, m, kind)
    if kind == "relu":
        # F'(rho_*) = p'(rho_*) 2 sum_h w_h a_o(rho_*), p'(rho_*) = n, a_o(rho_*) = max(-beta m_h, 0)/(n (n-1)):
        # zero for attracting heads (m_h >= 0), not for m_h < 0
        return float(2 * beta * jnp.sum(w * jnp.maximum(-m, 0.0)) / (n - 1))
    return float(2 * n * jnp.sum(w / (jnp.exp(beta * m * n / (n - 1)) + n - 1)))


@_float64
def initial_speed(rho0, *, n: int, beta, w, m, kind: str = "softmax"):
    """F(rho0), the initial clustering speed d rho/dt at t = 0 (vectorised over `beta`)."""
    w, m = _check(n, w, m, kind)
    beta = jnp.asarray(beta, float)
    return jax.vmap(lambda b: _rhs(jnp.asarray(rho0, float), n, b, w, m, kind))(beta.ravel()).reshape(beta.shape)


def critical_speed_ratio(n: int) -> float:
    """F(rho0; beta_c) / F(rho0; beta -> 0) = n / (2 (n - 1)): the measurable signature of beta_c."""
    return n / (2.0 * (n - 1))


@_float64
def critical_beta(*, n: int, rho0: float, m, w=None) -> float:
    """The critical inverse temperature of the softmax equiangular reduction (module docstring).

    Closed form log(n - 1) / (m (1 - rho0)) when all m_h are equal; otherwise the root of
    sum_h w_h (a^h_self(rho0) - 1/2) = 0 by bisection. Needs n >= 3, rho0 < 1 and m_h > 0.
    """
    m = np.atleast_1d(np.asarray(m, float))
    w = np.ones_like(m) if w is None else np.atleast_1d(np.asarray(w, float))
    if n < 3:
        raise ValueError(f"beta_c needs n >= 3 (for n = 2, a_self >= 1/2 at every beta >= 0), got n = {n}")
    if not (rho0 < 1):
        raise ValueError(f"rho0 must be < 1, got {rho0}")
    if w.shape != m.shape or m.ndim != 1:
        raise ValueError(f"w and m must be 1-d arrays of the same length (one per head), got {w.shape} and {m.shape}")
    if np.any(m <= 0) or np.any(w <= 0):
        raise ValueError("beta_c is derived for attracting heads, m_h > 0 and w_h > 0")
    if np.all(m == m[0]):  # exactly equal (allclose's absolute tolerance would merge e.g. m = 1e-9, 2e-9)
        return float(np.log(n - 1) / (m[0] * (1 - rho0)))
    g = lambda b: float(np.sum(w * (1 / (1 + (n - 1) * np.exp(-b * m * (1 - rho0))) - 0.5)))  # noqa: E731
    lo, hi = 0.0, 1.0
    while g(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


@_float64
def superadditivity_gain(eps, rho0, *, n: int, beta, heads_a, heads_b, kind: str = "softmax") -> float:
    """R_ab / (R_a + R_b) - 1 with R = 1 / T_eps: >= 0 always (harmonic functional), > 0 iff the heads'
    F_a and F_b are not proportional (heterogeneous beta m_h).

    **Arguments:** `heads_a`, `heads_b` pairs ``(w, m)`` of head scalars (arrays); the rest as in
    :func:`clustering_time`.
    """
    wa, ma = (np.atleast_1d(np.asarray(v, float)) for v in heads_a)
    wb, mb = (np.atleast_1d(np.asarray(v, float)) for v in heads_b)
    Ta = float(clustering_time(eps, rho0, n=n, beta=beta, w=wa, m=ma, kind=kind))
    Tb = float(clustering_time(eps, rho0, n=n, beta=beta, w=wb, m=mb, kind=kind))
    Tab = float(clustering_time(eps, rho0, n=n, beta=beta, w=np.concatenate([wa, wb]), m=np.concatenate([ma, mb]), kind=kind))
    return (1 / Tab) / (1 / Ta + 1 / Tb) - 1


@_float64
def linearised_times(eps, rho0, *, n: int, beta, w, m, delta: float = 0.1) -> dict:
    """Clustering times of the linearised softmax and relu reductions.

    - ``escape_softmax`` = (delta - rho0) / F_softmax(0) and ``escape_relu`` = n log(delta / rho0) / (2 beta sum w m):
      time to go from rho = rho0 to rho = delta (linearised at rho = 0; relu diverges as rho0 -> 0+).
    - ``approach_softmax`` / ``approach_relu`` = log(delta_1 / eps) / lambda_1 with delta_1 = 1 - delta: time from
      rho = delta to 1 - eps in the dynamics linearised at consensus.
    - ``total_*`` their sums, and ``ratio`` = total_relu / total_softmax.
    """
    w, m = _check(n, w, m, "softmax")
    if not (0 < rho0 < delta < 1 - eps):
        raise ValueError(f"need 0 < rho0 < delta < 1 - eps, got rho0={rho0}, delta={delta}, eps={eps}")
    F0 = float(_rhs(jnp.asarray(0.0), n, jnp.asarray(beta, float), w, m, "softmax"))
    g = float(2 * beta * jnp.sum(w * m))
    esc_s = (delta - rho0) / F0
    esc_r = n * np.log(delta / rho0) / g
    app_s = np.log((1 - delta) / eps) / rate_near_consensus(beta=beta, w=w, m=m, kind="softmax")
    app_r = np.log((1 - delta) / eps) / rate_near_consensus(beta=beta, w=w, m=m, kind="relu")
    return {
        "escape_softmax": esc_s,
        "escape_relu": esc_r,
        "approach_softmax": app_s,
        "approach_relu": app_r,
        "total_softmax": esc_s + app_s,
        "total_relu": esc_r + app_r,
        "ratio": (esc_r + app_r) / (esc_s + app_s),
    }


def scalar_heads(w, m, d: int, dtype=None):
    """:class:`~attnflow.Heads` with Q_h = I, K_h = m_h I, V_h = w_h I, O_h = I (so W_h = w_h I, M_h = m_h I)."""
    from ..model.heads import Heads

    w = np.atleast_1d(np.asarray(w, float))
    m = np.atleast_1d(np.asarray(m, float))
    if w.shape != m.shape:
        raise ValueError(f"w and m must have the same length, got {w.shape} and {m.shape}")
    eye = np.eye(d)
    H = len(w)
    dtype = dtype or jnp.result_type(float)
    return Heads(
        Q=np.stack([eye] * H), K=np.stack([mh * eye for mh in m]), V=np.stack([wh * eye for wh in w]), O=np.stack([eye] * H)
    ).astype(dtype)


def equiangular_rho(trajectory) -> np.ndarray:
    """Mean off-diagonal Gram entry <x_i, x_j> of each state: ``(..., n, d) -> (...)``."""
    X = np.asarray(trajectory)
    G = np.einsum("...id,...jd->...ij", X, X)
    n = X.shape[-2]
    iu = np.triu_indices(n, 1)
    return G[..., iu[0], iu[1]].mean(axis=-1)
