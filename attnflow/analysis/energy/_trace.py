"""Energies and entropies along saved trajectories, and the monotonicity diagnostic (:func:`energy_trace`)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..._types import Array, Float, Int, check_tolerance
from ...model.dynamics import AbstractDynamics, AbstractFlow
from .. import _results
from ._energies import _attn_of, energy_rates, head_energies
from ._entropy import attention_entropy, entropy_rate


class Cause(eqx.Enumeration):
    """Why a member's energy is not monotone (:attr:`EnergyTrace.cause` holds these codes, 0-6 in this order):

    - `none`: E is non-decreasing.
    - `own_gradient`, `cross_head`, `radial_shadow`: the part of the breaking head's exact rate dE_h/dt that is
      most negative (flows): its own gradient part, the cross-head flat terms, the radial shadow terms.
    - `discrete_step`: E dropped over a step of a map (maps have no rates to decompose).
    - `nonfinite`: E overflowed (e.g. the flat flow's finite-time blow-up): nothing is certified.
    - `integration_error`: E dropped between two saved states although the exact dE/dt >= 0 at both: most
      likely the solver's step is too coarse (re-run with a smaller dt).
    """

    none = "E is non-decreasing"
    own_gradient = "own gradient part"
    cross_head = "cross-head terms"
    radial_shadow = "radial shadow terms"
    discrete_step = "discrete step"
    nonfinite = "non-finite energy"
    integration_error = "integration error (exact rates >= 0 at both saved states: reduce dt)"


CAUSES = ("none",) + tuple(_results.message(Cause, k) for k in range(1, len(Cause)))
"""The messages of the :class:`Cause` codes, by code (code 0 reads ``"none"``)."""


def cause_name(code) -> str:
    """The :class:`Cause` name of a code (int) or item."""
    return _results.name(Cause, code)


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
    - `cause`: ``(b,)`` :class:`Cause` codes (0 `none` ... 6 `integration_error`); names: :attr:`cause_names`.
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

    CAUSES = CAUSES

    @property
    def cause_names(self) -> np.ndarray:
        """``(b,)`` the :class:`Cause` name of every member (``"none"`` when monotone)."""
        return _results.name_array(Cause, self.cause)

    @property
    def result(self):
        """The causes as one batch-shaped :class:`Cause` item (``trace.result == Cause.radial_shadow``)."""
        return _results.item(Cause, self.cause)

    def failures(self) -> list[dict]:
        """One record per member whose energy is not monotone: ``member``, ``saved_state`` (index of the first
        saved state where E dropped or its rate was negative), ``time`` (its time or step), ``head`` and ``cause``."""
        out = []
        for m in np.flatnonzero(~np.asarray(self.monotone)):
            k = int(self.first_violation[m])
            out.append({"member": int(m), "saved_state": k, "time": float(self.ts[k]),
                        "head": int(self.breaking_head[m]), "cause": cause_name(int(self.cause[m]))})
        return out

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
        code = int(self.cause[member])
        c = self.CAUSES[code]
        if code == 5:
            return f"member {member}: E is not finite from saved state {k} (t = {float(self.ts[k]):.4g}); nothing certified [nonfinite]"
        if code == 6:
            return (
                f"member {member}: E drops by {float(self.relative_drop[member]):.3e} (relative) before saved state {k} "
                f"(t = {float(self.ts[k]):.4g}) although the exact dE/dt is >= 0 at both ends: {c} [integration_error]"
            )
        return (
            f"member {member}: E decreases (relative drop {float(self.relative_drop[member]):.3e}); first at saved state {k} "
            f"(t = {float(self.ts[k]):.4g}); head {h} loses most energy there, driven by its {c} [{cause_name(code)}]"
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
    nanH, nanHH = jnp.full((H,), jnp.nan, X.dtype), jnp.full((H, H), jnp.nan, X.dtype)
    return Eh, S, nan, nanH, nanHH, nanHH, nan


@eqx.filter_jit
def _trace_stats(dyn, traj):
    return jax.vmap(jax.vmap(lambda X: _state_stats(dyn, X)))(traj)


def _trace_inputs(trajectory, ts, tol):
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
    return traj, ts, check_tolerance("tol", tol)


def _violations(E, rate, scale, tol, flow):
    """(monotone (b,), first violation (b,)): a saved state is bad if E dropped into it, is not finite, or
    (flows) its exact rate is below -tol |E|."""
    with np.errstate(invalid="ignore", divide="ignore"):
        dE = np.diff(E, axis=0) / scale  # (s-1, b)
        bad = np.concatenate([np.zeros((1, E.shape[1]), bool), dE < -tol], axis=0)  # flags the later state
        bad |= ~np.isfinite(E)  # a non-finite energy certifies nothing
        if flow:
            bad |= rate / scale < -tol
    monotone = ~bad.any(axis=0)
    return monotone, np.where(monotone, -1, np.argmax(bad, axis=0))


def _drops(E, Eh, scale, tol):
    """(relative drop (b,), per-head monotone (b, H))."""
    with np.errstate(invalid="ignore", divide="ignore"):
        running = np.maximum.accumulate(E, axis=0)
        rel_drop = ((running - E) / scale).max(axis=0)
        hscale = np.maximum(np.abs(Eh).max(axis=0), np.finfo(E.dtype).tiny)  # (b, H)
        dEh = np.diff(Eh, axis=0) / hscale
        head_monotone = ~(dEh < -tol).any(axis=0) & np.all(np.isfinite(Eh), axis=0)
    return rel_drop, head_monotone


def _cause_one(k, m, E, Eh, rate, hrate, tflat, trad, scale, tol, flow):
    """(breaking head, :class:`Cause` code) of member m whose first violation is saved state k."""
    if not np.isfinite(E[k, m]):
        return -1, 5
    if flow and rate[k, m] / scale[m] < -tol:
        h = int(np.argmin(hrate[k, m]))
        return h, 1 + int(np.argmin(_parts(tflat[k, m], trad[k, m], h)))
    h = int(np.argmin(Eh[k, m] - Eh[k - 1, m])) if k > 0 else int(np.argmin(hrate[k, m]))
    if not flow:
        return h, 4
    if k > 0 and rate[k - 1, m] / scale[m] >= -tol:
        return h, 6
    kk = k - 1 if k > 0 else k
    return h, 1 + int(np.argmin(_parts(tflat[kk, m], trad[kk, m], h)))


def energy_trace(dynamics: AbstractDynamics, trajectory, ts=None, *, tol: float | None = None) -> EnergyTrace:
    """Energies, entropies, exact rates and the monotonicity verdict along saved trajectories.

    **Arguments:**

    - `dynamics`: the model that produced the trajectory (a flow or a single :class:`LayerMap`).
    - `trajectory`: ``(s, b, n, d)`` (a :class:`~attnflow.Solution`'s ``trajectory``) or ``(s, n, d)``.
    - `ts`: ``(s,)`` the saved times/steps (default 0..s-1).
    - `tol`: relative tolerance for "non-decreasing" (default 1e-10 in float64, 1e-5 in float32).

    **Returns:** an :class:`EnergyTrace` (NumPy arrays).
    """
    traj, ts, tol = _trace_inputs(trajectory, ts, tol)
    Eh, S, rate, hrate, tflat, trad, dS = (np.asarray(a) for a in _trace_stats(dynamics, traj))
    flow = isinstance(dynamics, AbstractFlow)
    E = Eh.sum(-1)
    scale = np.maximum(np.abs(E).max(axis=0), np.finfo(E.dtype).tiny)  # (b,)
    monotone, first = _violations(E, rate, scale, tol, flow)
    rel_drop, head_monotone = _drops(E, Eh, scale, tol)
    breaking = np.full(E.shape[1], -1)
    cause = np.zeros(E.shape[1], dtype=int)
    for m in np.flatnonzero(first >= 0):  # host-side bookkeeping over the failing members only
        breaking[m], cause[m] = _cause_one(int(first[m]), m, E, Eh, rate, hrate, tflat, trad, scale, tol, flow)
    return EnergyTrace(
        ts=ts, energy=E, head_energy=Eh, entropy=S.mean(axis=(-1, -2)), head_entropy=S, rate=rate, head_rate=hrate,
        terms_flat=tflat, terms_radial=trad, entropy_rate=dS, monotone=monotone, first_violation=first,
        breaking_head=breaking, cause=cause, relative_drop=rel_drop, head_monotone=head_monotone,
    )


def diagnose(dynamics: AbstractDynamics, x0, *, tol: float | None = None, **simulate_kwargs) -> EnergyTrace:
    """Simulate (with :func:`attnflow.simulate`; ``saves=`` is required) and run :func:`energy_trace`.

    **Arguments:** `dynamics`, `x0` ``(b, n, d)`` and the keyword arguments of :func:`attnflow.simulate`.

    **Returns:** an :class:`EnergyTrace`; ``trace.explain(m)`` says when and which head breaks monotonicity.
    """
    from ...evolve.simulate import simulate

    if simulate_kwargs.get("saves") is None:
        raise ValueError("diagnose needs saves= (the number of saved states along the trajectory)")
    sol = simulate(dynamics, x0, **simulate_kwargs)
    return energy_trace(dynamics, sol.trajectory, sol.ts, tol=tol)
