r"""The sufficient condition for monotone energies, from the weights alone, and a search for counter-examples.

**Derivation** (used by :func:`monotonicity_condition`). Write s^h_ij = beta x_i^T M_h x_j and
f^h_i = W_h sum_j a^h_ij x_j (head h's output).

1. *Gradient structure.* grad_i E_h = 1/(2n^2) sum_j (e^{s^h_ij} M_h + e^{s^h_ji} M_h^T) x_j. If
   M_h = M_h^T this is (1/n^2) sum_j e^{s^h_ij} M_h x_j, and if moreover W_h = M_h it equals
   c^h_i f^h_i with c^h_i = 1/n (unnormalized kernel, a = e^s/n) or c^h_i = Z^h_i/n^2 (softmax,
   Z^h_i = sum_j e^{s^h_ij}). Without W_h = M_h = M_h^T there is no sign information at all
   (``gradient_defect``/``symmetric_defect`` > tol: nothing is certified).
2. *Rates.* With v_i = P_i u_i, u_i = sum_g f^g_i (P_i = I on the flat flow, I - x_i x_i^T on the sphere):
   dE_h/dt = sum_i c^h_i <f^h_i, P_i u_i> = sum_i c^h_i ( |P_i f^h_i|^2 + sum_{g != h} [<f^h_i, f^g_i> - r^h_i r^g_i] )
   on the sphere, with the radial shadows r^h_i = <x_i, f^h_i> (flat: drop the r r terms).
   So dE_h/dt = own gradient part (>= 0) + cross-head terms <f^h, f^g> + radial shadow terms -r^h r^g.
3. *Total, equal weights.* If c^h_i does not depend on h (unnormalized kernel, or a single head) the sum
   over h collapses: dE/dt = sum_i c_i |P_i u_i|^2 >= 0 on both flows, for any number of heads.
   This is the clause that removes every cross/shadow term at once (they sum to |P u|^2 - sum |P f^h|^2).
4. *Orthogonal heads.* If M_h M_g = 0 (h != g; ranges orthogonal) then <f^h, f^g> = 0, so on the flat
   flow dE_h/dt = sum_i c^h_i |f^h_i|^2 >= 0: **every** E_h is non-decreasing, for softmax too.
   On the sphere the radial shadow terms -c^h_i r^h_i r^g_i survive orthogonality (x_i has components
   in both ranges), so per-head monotonicity is not certified there for H >= 2, and for softmax with
   unequal c^h_i even the total is not: with F_h = f^h, Y_h = P_h x, the total is
   sum_h c_h |F_h|^2 - (sum_g <Y_g, F_g>)(sum_h c_h <Y_h, F_h>), which is >= 0 for all F iff
   |C^{-1/2} Y| |C^{1/2} Y| <= 2 - |Y|^2, false at |Y| = 1 as soon as the c_h differ
   (:func:`find_energy_decrease` finds such states).
5. *Robustness (approximate orthogonality).* With mu_hg = |P_h P_g| (P_h the projector onto range M_h),
   |<f^h, f^g>| <= mu_hg |f^h||f^g|. On the flat flow dE/dt >= sum_h c_h|f^h|^2 - sum_{h!=g} mu_hg c_h|f^h||f^g|,
   a quadratic form in (|f^h|) that is >= 0 when diagonally dominant after symmetrisation:
   c_h >= sum_{g != h} mu_hg (c_h + c_g)/2 for all h. Dividing by c_h with c_g/c_h <= kappa_gh gives the
   weight-free margin  flat_margin = 1 - max_h sum_{g != h} mu_hg (1 + kappa_gh)/2 >= 0, with
   kappa = 1 (unnormalized) or kappa_gh = exp(beta R^2 (|M_h| + |M_g|)) (softmax, since |s^h_ij| <= beta R^2 |M_h|
   while every |x_i| <= R; the flat flow changes norms, so the softmax margin holds while the tokens stay
   in the ball of radius `radius` = R). So the total E stays monotone under a quantitative amount of non-orthogonality
   mu < 1/max_h sum_{g!=h}(1 + kappa_gh)/2. Per-head monotonicity is *not* robust: the bound on the
   cross term of head h is mu |f^h||f^g|, which beats |f^h|^2 wherever |f^h| << |f^g|.

Summary of the certificates returned (all need step 1):
``total_flat``: unnormalized, or H = 1, or flat_margin >= 0 (softmax);
``total_sphere``: unnormalized, or H = 1 (softmax);
``per_head_flat``: H = 1 or exact orthogonality (max_overlap <= tol), or unnormalized with H = 1;
``per_head_sphere``: H = 1 only (radial shadows).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..._types import Array, Float, Tokens, check_tolerance
from ...model.dynamics import AbstractFlow
from ._energies import _attn_of, energy_rates, head_energies


class MonotonicityCondition(eqx.Module):
    """The verdict of :func:`monotonicity_condition` (plain Python/NumPy values).

    - `symmetric_defect`: max_h |M_h - M_h^T| / |M_h| (spectral norms).
    - `gradient_defect`: max_h |W_h - M_h| / |M_h|: zero iff the drift of head h is grad E_h's direction.
    - `overlap`: ``(H, H)`` mu_hg = |P_h P_g| (cosine of the smallest principal angle between the ranges of
      M_h and M_g; 0 = orthogonal heads); `max_overlap` its largest off-diagonal entry.
    - `weight_ratio`: ``(H, H)``, entry ``[g, h]`` = kappa_gh, an upper bound of c^g_i / c^h_i for tokens of norm
      <= radius (symmetric here)
      (softmax: exp(beta radius^2 (|M_h| + |M_g|)), or the measured value passed in; unnormalized: 1).
    - `flat_margin`: 1 - max_h sum_{g != h} mu_hg (1 + kappa_gh) / 2 (>= 0 certifies the flat flow).
    - `total_flat`, `total_sphere`: E is certified non-decreasing along the flat / spherical flow.
    - `per_head_flat`, `per_head_sphere`: every E_h is certified non-decreasing.
    - `reason`: one line naming the clause that decided.
    """

    symmetric_defect: float
    gradient_defect: float
    overlap: np.ndarray
    max_overlap: float
    weight_ratio: np.ndarray
    flat_margin: float
    total_flat: bool
    total_sphere: bool
    per_head_flat: bool
    per_head_sphere: bool
    reason: str


def _proj_range(M, rtol):
    U, s, _ = np.linalg.svd(M)
    r = int(np.sum(s > rtol * max(s.max(initial=0.0), 1e-300)))
    return U[:, :r]


@eqx.filter_jit
def head_weight_ratio(model, X: Tokens) -> Float[Array, ""]:
    """max_i max_{h,g} c^g_i / c^h_i at one state: the measured per-token weight disparity between heads
    (Z^g_i / Z^h_i for softmax, 1 for the unnormalized kernel). Pass the maximum over visited states as
    ``weight_ratio=`` to :func:`monotonicity_condition` for a sharper margin than the worst case."""
    attn = _attn_of(model)
    if attn.attention.kind != "softmax":
        return jnp.ones((), X.dtype)
    logZ = jax.nn.logsumexp(attn.scores(X), axis=-1)  # (H, n)
    return jnp.exp(jnp.max(jnp.max(logZ, axis=0) - jnp.min(logZ, axis=0)))


def _overlaps(M) -> np.ndarray:
    """mu_hg = |P_h P_g| between the ranges of the score matrices (zero diagonal)."""
    H = M.shape[0]
    P = [_proj_range(m, 1e-12) for m in M]
    mu = np.zeros((H, H))
    for h in range(H):
        for g in range(H):
            if h != g and P[h].shape[1] and P[g].shape[1]:
                mu[h, g] = np.linalg.norm(P[h].T @ P[g], 2)
    return mu


def _weight_bound(kind, beta, norms, radius, weight_ratio) -> np.ndarray:
    """kappa, entry [g, h] = kappa_gh: an upper bound of c^g_i / c^h_i (derivation, step 5)."""
    H = len(norms)
    if kind == "unnormalized":
        return np.ones((H, H))
    if weight_ratio is not None:
        return np.full((H, H), float(weight_ratio))
    return np.exp(beta * radius**2 * (norms[:, None] + norms[None, :]))


def _no_structure_reason(kind, biased, sym, grad) -> str:
    if biased:
        return "biases present"
    if kind not in ("softmax", "unnormalized"):
        return f"kernel {kind!r} has no gradient structure"
    return f"no gradient structure: |M_h - M_h^T|/|M_h| = {sym:.2e}, |W_h - M_h|/|M_h| = {grad:.2e}"


def _certificates(kind, H, margin, max_mu, tol):
    """(total_flat, total_sphere, per_head_flat, per_head_sphere, reason) for a structured model."""
    equal_weights = kind == "unnormalized" or H == 1
    total_flat = equal_weights or margin >= 0
    if equal_weights:
        reason = "W_h = M_h symmetric with equal per-token head weights: dE/dt = sum_i c_i |P u_i|^2 >= 0"
    elif total_flat:
        reason = f"softmax, flat flow certified by the orthogonality margin {margin:.3g} (max overlap {max_mu:.3g}); sphere: radial shadows not removed"
    else:
        reason = f"softmax with {H} heads: overlap {max_mu:.3g} exceeds the margin (flat_margin {margin:.3g}); radial shadows on the sphere"
    return bool(total_flat), bool(equal_weights), bool(H == 1 or max_mu <= tol), bool(H == 1), reason


def monotonicity_condition(model, *, tol: float = 1e-9, radius: float = 1.0, weight_ratio: float | None = None) -> MonotonicityCondition:
    """Check the sufficient condition for E (and each E_h) to be non-decreasing, from the weights alone
    (derivation and the list of certificates in this module's docstring).

    **Arguments:** `model` a :class:`SelfAttention` or a flow/map holding one; `tol` relative tolerance of
    the exact clauses; `radius` the token norm bound R used by the softmax margin (1 on the sphere);
    `weight_ratio` a measured bound on c^g_i/c^h_i (see :func:`head_weight_ratio`) replacing the worst case kappa.

    **Returns:** a :class:`MonotonicityCondition`.
    """
    tol = check_tolerance("tol", tol)
    attn = _attn_of(model)
    kind = attn.attention.kind
    if attn.attention.mask != "full":
        raise ValueError(f"the monotonicity condition is derived for the full mask, got mask={attn.attention.mask!r}")
    hd = attn.heads
    M = np.asarray(hd.score_matrices(), dtype=float)
    W = np.asarray(hd.head_matrices(), dtype=float)
    H = M.shape[0]
    norms = np.array([max(np.linalg.norm(m, 2), 1e-300) for m in M])
    sym = max(np.linalg.norm(m - m.T, 2) / nm for m, nm in zip(M, norms))
    grad = max(np.linalg.norm(w - m, 2) / nm for w, m, nm in zip(W, M, norms))
    biased = any(getattr(hd, b) is not None for b in ("bq", "bk", "bv", "bo"))
    mu = _overlaps(M)
    max_mu = float(mu.max()) if H > 1 else 0.0
    kappa = _weight_bound(kind, float(np.asarray(attn.beta)), norms, radius, weight_ratio)
    margin = 1.0 - max((sum(mu[h, g] * (1 + kappa[g, h]) / 2 for g in range(H) if g != h) for h in range(H)), default=0.0)
    if not (sym <= tol and grad <= tol and not biased and kind in ("softmax", "unnormalized")):
        why = _no_structure_reason(kind, biased, sym, grad)
        return MonotonicityCondition(sym, grad, mu, max_mu, kappa, margin, False, False, False, False, why)
    return MonotonicityCondition(sym, grad, mu, max_mu, kappa, margin, *_certificates(kind, H, margin, max_mu, tol))


@eqx.filter_jit
def _rates_batch(flow, X):
    def one(x):
        r = energy_rates(flow, x)
        return r.total, r.per_head, head_energies(flow.attn, x)

    return jax.vmap(one)(X)


def find_energy_decrease(flow: AbstractFlow, key: Array, *, tokens: int, num: int = 256):
    """Search random states on the sphere for a negative exact energy rate.

    **Arguments:** `flow`; `key` a PRNG key; `tokens` n; `num` the number of random states tried.

    **Returns:** a dict with ``state`` (n, d) minimising dE/dt / E, its ``relative_rate``, and
    ``head_state``, ``head`` and ``head_relative_rate`` for the most negative per-head rate dE_h/dt / E_h.
    A negative ``relative_rate`` proves that E is not monotone along this flow.
    """
    from ...evolve.sample import sphere

    d = flow.attn.heads.dim
    X = sphere(key, (num, tokens, d), dtype=flow.attn.heads.Q.dtype)
    tot, ph, Eh = (np.asarray(a) for a in _rates_batch(flow, X))
    rel = tot / Eh.sum(-1)
    k = int(np.argmin(rel))
    hrel = ph / Eh
    kh, h = np.unravel_index(int(np.argmin(hrel)), hrel.shape)
    return {
        "state": np.asarray(X[k]),
        "relative_rate": float(rel[k]),
        "head_state": np.asarray(X[kh]),
        "head": int(h),
        "head_relative_rate": float(hrel[kh, h]),
    }
