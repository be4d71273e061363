"""Energies, radial shadows, attention entropy and the monotonicity condition (MODEL.md section 7).

For one configuration X (n, d) and a :class:`~attnflow.model.SelfAttention` with score matrices
M_h = Q_h^T K_h (biases included in the scores when present):

- per-head energy  E_h(X) = 1/(2 beta n^2) sum_{i,j} exp(s^h_ij),  s^h_ij = beta x_i^T M_h x_j;  E = sum_h E_h;
- the exact rates dE_h/dt = <grad E_h, vf> along a flow, by autodiff, and their split into head-by-head
  terms T[h, g] = <grad E_h, P f^g> (the diagonal is head h's own gradient part, the rest are the cross-head
  terms), each split again into a flat part <grad_i E_h, f_i^g> and a radial part
  -<grad_i E_h, x_i><x_i, f_i^g>/|x_i|^2 built from the **radial shadows** r^g_i = <x_i, f^g_i>;
- attention entropies S^h_i = -sum_j a^h_ij log a^h_ij and their exact production rate (a jvp along vf);
- a diagnostic along saved trajectories (:func:`energy_trace`) and the sufficient condition for
  monotonicity on the score matrices (:func:`monotonicity_condition`, derivation in its docstring).

Everything is written for one configuration and lifted with ``vmap`` at the public edges.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._types import Array, Float, Int, Tokens
from ..model.dynamics import AbstractDynamics, AbstractFlow, SphereFlow
from ..model.heads import SelfAttention

__all__ = [
    "head_energies",
    "energy",
    "energy_gradients",
    "radial_shadows",
    "EnergyRates",
    "energy_rates",
    "attention_entropy",
    "entropy_rate",
    "EnergyTrace",
    "energy_trace",
    "diagnose",
    "MonotonicityCondition",
    "monotonicity_condition",
    "head_weight_ratio",
    "find_energy_decrease",
]


def _attn_of(model) -> SelfAttention:
    if isinstance(model, SelfAttention):
        return model
    attn = getattr(model, "attn", None)
    if isinstance(attn, SelfAttention):
        return attn
    if hasattr(model, "groups"):
        raise ValueError("energies need one SelfAttention; for a LayerStack pass stack.layer(k)")
    raise TypeError(f"expected a SelfAttention or a model with .attn, got {type(model).__name__}")


# ----------------------------------------------------------------------------------------------
# energies, gradients, shadows (one configuration)


@eqx.filter_jit
def head_energies(model, X: Tokens) -> Float[Array, " h"]:
    """Per-head energies E_h = 1/(2 beta n^2) sum_{i,j} exp(s^h_ij) (all pairs; masks play no part).

    **Arguments:** `model` a :class:`SelfAttention` or a flow/map holding one (``.attn``); `X` ``(n, d)``.

    **Returns:** ``(H,)``.
    """
    attn = _attn_of(model)
    s = attn.scores(X)
    n = X.shape[0]
    beta = attn.beta.astype(X.dtype)
    # log-sum-exp keeps large beta finite as long as the energy itself is representable
    return jnp.exp(jax.nn.logsumexp(s, axis=(1, 2))) / (2 * beta * n * n)


@eqx.filter_jit
def energy(model, X: Tokens) -> Float[Array, ""]:
    """Total energy E = sum_h E_h of one configuration ``(n, d)``."""
    return jnp.sum(head_energies(model, X))


@eqx.filter_jit
def energy_gradients(model, X: Tokens) -> Float[Array, "h n d"]:
    """Euclidean gradients grad_X E_h of every per-head energy, by reverse-mode autodiff."""
    return jax.jacrev(lambda Y: head_energies(model, Y))(X)


@eqx.filter_jit
def radial_shadows(model, X: Tokens) -> Float[Array, "h n"]:
    """Radial shadows r^h_i = <x_i, f^h_i>: head h's output projected on token i's direction
    (times |x_i|; on the sphere |x_i| = 1). ``(H, n)``."""
    f = _attn_of(model).head_outputs(X)
    return jnp.einsum("nd,hnd->hn", X, f)


class EnergyRates(eqx.Module):
    """Exact energy rates of one state along a flow, and their decomposition.

    - `total`: dE/dt = <grad E, vf>.
    - `per_head`: ``(H,)`` dE_h/dt = <grad E_h, vf> (autodiff).
    - `terms`: ``(H, H)`` T[h, g] = sum_i <grad_i E_h, P_i f^g_i> with P_i the tangent projection on the sphere
      (identity for the flat flow). Row sums plus `bias` equal `per_head`. T[h, h] is head h's gradient part:
      when W_h = M_h = M_h^T it is sum_i c^h_i |P_i f^h_i|^2 >= 0 with c^h_i = Z^h_i/n^2 (softmax) or 1/n
      (unnormalized); off-diagonal entries are the cross-head terms.
    - `terms_flat`: ``(H, H)`` sum_i <grad_i E_h, f^g_i>.
    - `terms_radial`: ``(H, H)`` -sum_i <grad_i E_h, x_i><x_i, f^g_i>/|x_i|^2: the radial shadow terms
      (zero for the flat flow). `terms = terms_flat + terms_radial`.
    - `bias`: ``(H,)`` the part of dE_h/dt due to the output bias bo (zero without one).
    - `shadows`: ``(H, n)`` the radial shadows <x_i, f^h_i>.
    """

    total: Float[Array, ""]
    per_head: Float[Array, " h"]
    terms: Float[Array, "h h"]
    terms_flat: Float[Array, "h h"]
    terms_radial: Float[Array, "h h"]
    bias: Float[Array, " h"]
    shadows: Float[Array, "h n"]


@eqx.filter_jit
def energy_rates(flow: AbstractFlow, X: Tokens) -> EnergyRates:
    """dE/dt, dE_h/dt and their head-by-head decomposition at one state ``X (n, d)`` of a flow.

    **Arguments:** `flow` a :class:`SphereFlow` or :class:`FlatFlow`; `X` ``(n, d)``.

    **Returns:** an :class:`EnergyRates`.
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"energy rates need a flow (SphereFlow, FlatFlow), got {type(flow).__name__}")
    attn = flow.attn
    G = energy_gradients(attn, X)  # (H, n, d)
    v = flow.vf(0.0, X)
    per_head = jnp.einsum("hnd,nd->h", G, v)
    f = attn.head_outputs(X)  # (H, n, d)
    flat = jnp.einsum("hnd,gnd->hg", G, f)
    xx = jnp.sum(X * X, axis=-1)
    inv = jnp.where(xx > 0, 1.0 / jnp.where(xx > 0, xx, 1.0), 0.0)
    shadows = jnp.einsum("nd,gnd->gn", X, f)
    if isinstance(flow, SphereFlow):
        gx = jnp.einsum("hnd,nd->hn", G, X)
        radial = -jnp.einsum("hn,gn,n->hg", gx, shadows, inv)
    else:
        radial = jnp.zeros_like(flat)
    bo = attn.heads.bo
    if bo is None:
        bias = jnp.zeros_like(per_head)
    else:
        b = jnp.broadcast_to(bo.astype(X.dtype), X.shape)
        if isinstance(flow, SphereFlow):
            b = b - (jnp.sum(X * b, axis=-1) * inv)[:, None] * X
        bias = jnp.einsum("hnd,nd->h", G, b)
    return EnergyRates(
        total=jnp.sum(per_head),
        per_head=per_head,
        terms=flat + radial,
        terms_flat=flat,
        terms_radial=radial,
        bias=bias,
        shadows=shadows,
    )


# ----------------------------------------------------------------------------------------------
# attention entropy


@eqx.filter_jit
def attention_entropy(model, X: Tokens) -> Float[Array, "h n"]:
    """Attention entropies S^h_i = -sum_j a^h_ij log a^h_ij, per head and token ``(H, n)``.

    Zero weights contribute 0 (double ``where``, so derivatives stay finite). For kernels whose rows do
    not sum to one (unnormalized, relu) this is the same formula applied to the raw weights.
    """
    a = _attn_of(model).weights(X)
    pos = a > 0
    return -jnp.sum(jnp.where(pos, a * jnp.log(jnp.where(pos, a, 1.0)), 0.0), axis=-1)


@eqx.filter_jit
def entropy_rate(flow: AbstractFlow, X: Tokens) -> Float[Array, "h n"]:
    """Exact entropy production dS^h_i/dt = <grad S^h_i, vf> at one state: a forward-mode jvp along the
    vector field (not a finite difference). ``(H, n)``."""
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"entropy rates need a flow (SphereFlow, FlatFlow), got {type(flow).__name__}")
    v = flow.vf(0.0, X)
    _, dS = jax.jvp(lambda Y: attention_entropy(flow.attn, Y), (X,), (v,))
    return dS


# ----------------------------------------------------------------------------------------------
# along trajectories


class EnergyTrace(eqx.Module):
    """Energies and entropies along saved trajectories, and the monotonicity verdict.

    Shapes: s saved states, b members, H heads, n tokens.

    - `ts`: ``(s,)`` saved times (flows) or step indices (maps).
    - `energy`: ``(s, b)`` E; `head_energy`: ``(s, b, H)`` E_h.
    - `entropy`: ``(s, b)`` mean attention entropy over heads and tokens; `head_entropy`: ``(s, b, H, n)``.
    - `rate`, `head_rate`: ``(s, b)``, ``(s, b, H)`` exact dE/dt, dE_h/dt (flows; NaN for maps).
    - `terms_flat`, `terms_radial`: ``(s, b, H, H)`` the decomposition of :class:`EnergyRates` (flows; NaN for maps).
    - `entropy_rate`: ``(s, b)`` exact d(mean entropy)/dt (flows; NaN for maps).
    - `monotone`: ``(b,)`` E finite and non-decreasing along the saved states (to `tol` relative) and, for
      flows, no exact rate below -tol*|E|.
    - `first_violation`: ``(b,)`` index of the first saved state where E dropped (or the rate was
      negative); -1 when monotone.
    - `breaking_head`: ``(b,)`` the head whose energy decreased most at that point; -1 when monotone.
    - `cause`: ``(b,)`` 0 none, 1 the head's own gradient part, 2 cross-head flat terms, 3 radial shadow
      terms, 4 a discrete step (maps: no rates): whichever part of the breaking head's rate is most negative;
      5 the energy overflowed (e.g. the flat flow's finite-time blow-up), nothing is certified; 6 E dropped
      between two saved states although the exact rate is >= 0 at both: most likely the solver's step is too
      coarse (the drop is then a numerical artefact; re-run with a smaller dt).
    - `relative_drop`: ``(b,)`` max_k (max_{k' <= k} E_k' - E_k) / |E| over the saved states.
    - `head_monotone`: ``(b, H)`` each E_h non-decreasing along the saved states.
    """

    ts: Float[Array, " s"]
    energy: Float[Array, "s b"]
    head_energy: Float[Array, "s b h"]
    entropy: Float[Array, "s b"]
    head_entropy: Float[Array, "s b h n"]
    rate: Float[Array, "s b"]
    head_rate: Float[Array, "s b h"]
    terms_flat: Float[Array, "s b h h"]
    terms_radial: Float[Array, "s b h h"]
    entropy_rate: Float[Array, "s b"]
    monotone: Array
    first_violation: Int[Array, " b"]
    breaking_head: Int[Array, " b"]
    cause: Int[Array, " b"]
    relative_drop: Float[Array, " b"]
    head_monotone: Array

    CAUSES = (
        "none",
        "own gradient part",
        "cross-head terms",
        "radial shadow terms",
        "discrete step",
        "non-finite energy",
        "integration error (exact rates >= 0 at both saved states: reduce dt)",
    )

    def explain_head(self, member: int = 0, head: int = 0) -> str:
        """One line on head `head`'s own energy E_h: monotone or not, and (flows) which part of dE_h/dt is most
        negative at the saved state where dE_h/dt is smallest."""
        dEh = np.diff(self.head_energy[:, member, head])
        ok = bool(self.head_monotone[member, head])
        if np.all(np.isnan(self.head_rate[:, member, head])):
            return f"member {member}, head {head}: E_h {'non-decreasing' if ok else 'decreases'} (min step change {dEh.min():.3e})"
        k = int(np.nanargmin(self.head_rate[:, member, head]))
        own, cross, shadow = _parts(self.terms_flat[k, member], self.terms_radial[k, member], head)
        part = self.CAUSES[1 + int(np.argmin([own, cross, shadow]))]
        return (
            f"member {member}, head {head}: E_h {'non-decreasing' if ok else 'decreases'}; min dE_h/dt = "
            f"{self.head_rate[k, member, head]:.4g} at t = {self.ts[k]:.4g} = own gradient part {own:.4g} + cross-head "
            f"{cross:.4g} + radial shadow {shadow:.4g} (most negative: {part})"
        )

    def explain(self, member: int = 0) -> str:
        """One line saying whether member's energy is monotone and, if not, when and why not."""
        if bool(self.monotone[member]):
            return f"member {member}: E non-decreasing over {self.energy.shape[0]} saved states (drop {float(self.relative_drop[member]):.2e})"
        k = int(self.first_violation[member])
        h = int(self.breaking_head[member])
        c = self.CAUSES[int(self.cause[member])]
        if int(self.cause[member]) == 5:
            return f"member {member}: E is not finite from saved state {k} (t = {float(self.ts[k]):.4g}); nothing certified"
        if int(self.cause[member]) == 6:
            return (
                f"member {member}: E drops by {float(self.relative_drop[member]):.3e} (relative) before saved state {k} "
                f"(t = {float(self.ts[k]):.4g}) although the exact dE/dt is >= 0 at both ends: {c}"
            )
        return (
            f"member {member}: E decreases (relative drop {float(self.relative_drop[member]):.3e}); first at saved state {k} "
            f"(t = {float(self.ts[k]):.4g}); head {h} loses most energy there, driven by its {c}"
        )


def _parts(tflat, trad, h):
    """(own gradient part, cross-head flat terms, radial shadow cross terms) of dE_h/dt from (H, H) blocks."""
    own = tflat[h, h] + trad[h, h]
    cross = tflat[h].sum() - tflat[h, h]
    shadow = trad[h].sum() - trad[h, h]
    return own, cross, shadow


def _state_stats(dyn, X):
    attn = _attn_of(dyn)
    Eh = head_energies(attn, X)
    S = attention_entropy(attn, X)
    H = Eh.shape[0]
    if isinstance(dyn, AbstractFlow):
        r = energy_rates(dyn, X)
        dS = jnp.mean(entropy_rate(dyn, X))
        return Eh, S, r.total, r.per_head, r.terms_flat, r.terms_radial, dS
    nan = jnp.full((), jnp.nan, X.dtype)
    return Eh, S, nan, jnp.full((H,), jnp.nan, X.dtype), jnp.full((H, H), jnp.nan, X.dtype), jnp.full((H, H), jnp.nan, X.dtype), nan


@eqx.filter_jit
def _trace_stats(dyn, traj):
    return jax.vmap(jax.vmap(lambda X: _state_stats(dyn, X)))(traj)


def energy_trace(dynamics: AbstractDynamics, trajectory, ts=None, *, tol: float | None = None) -> EnergyTrace:
    """Energies, entropies, exact rates and the monotonicity verdict along saved trajectories.

    **Arguments:**

    - `dynamics`: the model that produced the trajectory (a flow or a single :class:`LayerMap`).
    - `trajectory`: ``(s, b, n, d)`` (a :class:`~attnflow.Solution`'s ``trajectory``) or ``(s, n, d)``.
    - `ts`: ``(s,)`` the saved times/steps (default 0..s-1).
    - `tol`: relative tolerance for "non-decreasing" (default 1e-10 in float64, 1e-5 in float32).

    **Returns:** an :class:`EnergyTrace` (NumPy arrays).
    """
    traj = jnp.asarray(trajectory)
    if traj.ndim == 3:
        traj = traj[:, None]
    if traj.ndim != 4:
        raise ValueError(f"trajectory must have shape (saves, batch, tokens, d) or (saves, tokens, d), got {traj.shape}")
    s = traj.shape[0]
    ts = np.arange(s, dtype=float) if ts is None else np.asarray(ts, dtype=float)
    if ts.shape != (s,):
        raise ValueError(f"ts must have shape ({s},), got {ts.shape}")
    if tol is None:
        tol = 1e-10 if traj.dtype == jnp.float64 else 1e-5
    Eh, S, rate, hrate, tflat, trad, dS = (np.asarray(a) for a in _trace_stats(dynamics, traj))
    E = Eh.sum(-1)
    scale = np.maximum(np.abs(E).max(axis=0), np.finfo(E.dtype).tiny)  # (b,)
    with np.errstate(invalid="ignore", divide="ignore"):
        dE = np.diff(E, axis=0) / scale  # (s-1, b)
        bad = np.concatenate([np.zeros((1, E.shape[1]), bool), dE < -tol], axis=0)  # flags the later state
        bad |= ~np.isfinite(E)  # a non-finite energy certifies nothing
        flow = isinstance(dynamics, AbstractFlow)
        if flow:
            bad |= rate / scale < -tol
    monotone = ~bad.any(axis=0)
    first = np.where(monotone, -1, np.argmax(bad, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        running = np.maximum.accumulate(E, axis=0)
        rel_drop = ((running - E) / scale).max(axis=0)
        hscale = np.maximum(np.abs(Eh).max(axis=0), np.finfo(E.dtype).tiny)  # (b, H)
        dEh = np.diff(Eh, axis=0) / hscale
        head_monotone = ~(dEh < -tol).any(axis=0) & np.all(np.isfinite(Eh), axis=0)
    b = E.shape[1]
    breaking = np.full(b, -1)
    cause = np.zeros(b, dtype=int)
    for m in range(b):  # host-side bookkeeping over a few members; the numerics are vmapped above
        k = first[m]
        if k < 0:
            continue
        if not np.isfinite(E[k, m]):
            cause[m] = 5
            continue
        if flow and rate[k, m] / scale[m] < -tol:
            h = int(np.argmin(hrate[k, m]))
            cause[m] = 1 + int(np.argmin(_parts(tflat[k, m], trad[k, m], h)))
        else:
            h = int(np.argmin(Eh[k, m] - Eh[k - 1, m])) if k > 0 else int(np.argmin(hrate[k, m]))
            if flow and k > 0 and rate[k - 1, m] / scale[m] >= -tol:
                cause[m] = 6
            elif flow:
                kk = k - 1 if k > 0 else k
                cause[m] = 1 + int(np.argmin(_parts(tflat[kk, m], trad[kk, m], h)))
            else:
                cause[m] = 4
        breaking[m] = h
    return EnergyTrace(
        ts=ts,
        energy=E,
        head_energy=Eh,
        entropy=S.mean(axis=(-1, -2)),
        head_entropy=S,
        rate=rate,
        head_rate=hrate,
        terms_flat=tflat,
        terms_radial=trad,
        entropy_rate=dS,
        monotone=monotone,
        first_violation=first,
        breaking_head=breaking,
        cause=cause,
        relative_drop=rel_drop,
        head_monotone=head_monotone,
    )


def diagnose(dynamics: AbstractDynamics, x0, *, tol: float | None = None, **simulate_kwargs) -> EnergyTrace:
    """Simulate (with :func:`attnflow.simulate`; ``saves=`` is required) and run :func:`energy_trace`.

    **Arguments:** `dynamics`, `x0` ``(b, n, d)`` and the keyword arguments of :func:`attnflow.simulate`.

    **Returns:** an :class:`EnergyTrace`; ``trace.explain(m)`` says when and which head breaks monotonicity.
    """
    from ..evolve.simulate import simulate

    if simulate_kwargs.get("saves") is None:
        raise ValueError("diagnose needs saves= (the number of saved states along the trajectory)")
    sol = simulate(dynamics, x0, **simulate_kwargs)
    return energy_trace(dynamics, sol.trajectory, sol.ts, tol=tol)


# ----------------------------------------------------------------------------------------------
# the sufficient condition on the score matrices


class MonotonicityCondition(eqx.Module):
    """The verdict of :func:`monotonicity_condition` (plain Python/NumPy values).

    - `symmetric_defect`: max_h |M_h - M_h^T| / |M_h| (spectral norms).
    - `gradient_defect`: max_h |W_h - M_h| / |M_h|: zero iff the drift of head h is grad E_h's direction.
    - `overlap`: ``(H, H)`` mu_hg = |P_h P_g| (cosine of the smallest principal angle between the ranges of
      M_h and M_g; 0 = orthogonal heads); `max_overlap` its largest off-diagonal entry.
    - `weight_ratio`: ``(H, H)`` kappa_hg, an upper bound of c^g_i / c^h_i for tokens of norm <= radius
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


def monotonicity_condition(model, *, tol: float = 1e-9, radius: float = 1.0, weight_ratio: float | None = None) -> MonotonicityCondition:
    r"""Check the sufficient condition for E (and each E_h) to be non-decreasing, from the weights alone.

    **Derivation.** Write s^h_ij = beta x_i^T M_h x_j and f^h_i = W_h sum_j a^h_ij x_j (head h's output).

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

    **Arguments:** `model` a :class:`SelfAttention` or a flow/map holding one; `tol` relative tolerance of
    the exact clauses; `radius` the token norm bound R used by the softmax margin (1 on the sphere);
    `weight_ratio` a measured bound on c^g_i/c^h_i (see :func:`head_weight_ratio`) replacing the worst case kappa.

    **Returns:** a :class:`MonotonicityCondition`.
    """
    attn = _attn_of(model)
    kind = attn.attention.kind
    if attn.attention.mask != "full":
        raise ValueError(f"the monotonicity condition is derived for the full mask, got mask={attn.attention.mask!r}")
    hd = attn.heads
    M = np.asarray(hd.score_matrices(), dtype=float)
    W = np.asarray(hd.head_matrices(), dtype=float)
    beta = float(np.asarray(attn.beta))
    H = M.shape[0]
    norms = np.array([max(np.linalg.norm(m, 2), 1e-300) for m in M])
    sym = max(np.linalg.norm(m - m.T, 2) / nm for m, nm in zip(M, norms))
    grad = max(np.linalg.norm(w - m, 2) / nm for w, m, nm in zip(W, M, norms))
    biased = any(getattr(hd, b) is not None for b in ("bq", "bk", "bv", "bo"))
    P = [_proj_range(m, 1e-12) for m in M]
    mu = np.zeros((H, H))
    for h in range(H):
        for g in range(H):
            if h != g and P[h].shape[1] and P[g].shape[1]:
                mu[h, g] = np.linalg.norm(P[h].T @ P[g], 2)
    max_mu = float(mu.max()) if H > 1 else 0.0
    if kind == "unnormalized":
        kappa = np.ones((H, H))
    elif weight_ratio is not None:
        kappa = np.full((H, H), float(weight_ratio))
    else:
        kappa = np.exp(beta * radius**2 * (norms[:, None] + norms[None, :]))
    margin = 1.0 - max((sum(mu[h, g] * (1 + kappa[g, h]) / 2 for g in range(H) if g != h) for h in range(H)), default=0.0)
    structured = sym <= tol and grad <= tol and not biased and kind in ("softmax", "unnormalized")
    if not structured:
        why = (
            "biases present" if biased else f"kernel {kind!r} has no gradient structure" if kind not in ("softmax", "unnormalized")
            else f"no gradient structure: |M_h - M_h^T|/|M_h| = {sym:.2e}, |W_h - M_h|/|M_h| = {grad:.2e}"
        )
        return MonotonicityCondition(sym, grad, mu, max_mu, kappa, margin, False, False, False, False, why)
    equal_weights = kind == "unnormalized" or H == 1
    total_flat = equal_weights or margin >= 0
    total_sphere = equal_weights
    per_head_flat = H == 1 or max_mu <= tol
    per_head_sphere = H == 1
    if equal_weights:
        reason = "W_h = M_h symmetric with equal per-token head weights: dE/dt = sum_i c_i |P u_i|^2 >= 0"
    elif total_flat:
        reason = f"softmax, flat flow certified by the orthogonality margin {margin:.3g} (max overlap {max_mu:.3g}); sphere: radial shadows not removed"
    else:
        reason = f"softmax with {H} heads: overlap {max_mu:.3g} exceeds the margin (flat_margin {margin:.3g}); radial shadows on the sphere"
    return MonotonicityCondition(sym, grad, mu, max_mu, kappa, margin, bool(total_flat), bool(total_sphere), bool(per_head_flat), bool(per_head_sphere), reason)


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
    from ..evolve.sample import sphere

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
