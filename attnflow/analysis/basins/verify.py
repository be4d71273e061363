"""Label verification: is the equilibrium behind a label stable? A member's per-step change can drop below tol while
it passes slowly near an unstable equilibrium; such members are ``saddle``, never in an attractor's basin.

Once per label, its representative final state is refined to an equilibrium
(:func:`attnflow.analysis.equilibria.refine`) and the intrinsic spectrum there gives its
:class:`~attnflow.Verdict` (:func:`attnflow.analysis.stability.analyse`, tolerance per dtype from
:mod:`attnflow.analysis.eigen`). The verdict is ``unknown`` when the model has no fixed points to refine (a finite
:class:`~attnflow.LayerStack`), when the refinement fails or lands farther than :data:`MAX_SHIFT` from the
representative (then it is not the equilibrium the member reached), or when the spectrum is not finite.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ...evolve.outcome import CONVERGED
from ...model.dynamics import AbstractFlow, LayerMap
from ..eigen import VERDICTS
from .tally import Tally

MAX_SHIFT = 1e-2
"""The largest max-abs distance between a representative and its refined equilibrium for the verdict to count."""


def verify_state(dyn, X, axis: np.ndarray | None = None) -> str:
    """The :class:`~attnflow.Verdict` name of the equilibrium nearest to the final state X ``(n, d)``. With `axis`
    (the eigenvector a consensus or bipartite label is on), the arrangement of +-axis nearest to X is tried first: when
    it is an equilibrium itself (residual within 1e4 machine epsilons), it is the one analysed, without a refinement.
    Otherwise X is refined, and the verdict is ``unknown`` when the refinement or one Newton step from X
    (:func:`newton_distance`) goes farther than :data:`MAX_SHIFT`: X is then not near the equilibrium it seems to be.
    """
    from ..equilibria import refine, residual
    from ..stability import analyse

    if not isinstance(dyn, (LayerMap, AbstractFlow)):
        return "unknown"
    X = jnp.asarray(X)
    if not np.all(np.isfinite(np.asarray(X))):
        return "unknown"
    Xr = None
    if axis is not None:
        v = np.asarray(axis, np.float64) / np.linalg.norm(axis)
        arr = np.where((np.asarray(X, np.float64) @ v)[:, None] > 0, v[None], -v[None])
        cand = jnp.asarray(arr, X.dtype)
        eps = float(np.finfo(np.asarray(X).dtype).eps)
        # the row's name already places X at this arrangement (the classifier's on-axis test, |cos| within its tol of
        # 1: up to 0.045 rad at the default 1e-3, farther than MAX_SHIFT); when the arrangement is an equilibrium, its
        # verdict is the row's (a row "consensus +v1" used to get "unknown" from a representative 0.03 rad off)
        if float(np.max(np.abs(np.asarray(residual(dyn, cand))))) <= 1e4 * eps:
            Xr = np.asarray(cand)
    if Xr is None:
        ref = refine(dyn, X)
        Xr = np.asarray(ref.state)
        if not np.all(np.isfinite(Xr)) or float(np.max(np.abs(Xr - np.asarray(X)))) > MAX_SHIFT:
            return "unknown"
        if newton_distance(dyn, X) > MAX_SHIFT:  # a refinement may stop where its tolerance lets it: on a slow
            return "unknown"  # manifold, the residual is below it while the equilibrium is still far
    try:
        st = analyse(dyn, jnp.asarray(Xr)[None])
    except np.linalg.LinAlgError:  # LAPACK's eigenvalue iteration did not converge
        return "unknown"
    return VERDICTS[int(np.asarray(st.verdict).ravel()[0])]


def newton_distance(dyn, X) -> float:
    """The max-abs length of one Newton step from X ``(n, d)`` towards an equilibrium: J^+ r, with r the residual, J
    its Jacobian (on spheres both in the tangent spaces; a map's J less the identity) and J^+ its pseudo-inverse over
    the singular values above the eigenvalue tolerance of the dtype (a direction of a continuum of equilibria, whose
    singular value is 0 up to rounding, is no distance). To first order the distance from X to the equilibrium it
    approaches: r / (a slow rate) when a near-degenerate spectrum leaves a slow direction, where r alone is below any
    stop tolerance while the equilibrium is still far (W = diag(1, 0.99985, -0.3): r = 8e-6, distance 0.054)."""
    from ...model.dynamics import AbstractMap
    from ..eigen import tolerance
    from ..equilibria import residual
    from ..stability import jacobians, tangent_basis

    X = jnp.asarray(X)
    Jint, Jext, _ = jacobians(dyn, X[None])
    r = np.asarray(residual(dyn, X), np.float64)
    if dyn.on_spheres:
        B = np.asarray(tangent_basis(X), np.float64)
        rt, J = np.einsum("iak,ia->ik", B, r).ravel(), np.asarray(Jint[0], np.float64)
    else:
        rt, J = r.ravel(), np.asarray(Jext[0], np.float64)
    if isinstance(dyn, AbstractMap):
        J = J - np.eye(J.shape[0])
    if not (np.all(np.isfinite(J)) and np.all(np.isfinite(rt))):
        return float("inf")
    U, sv, Vt = np.linalg.svd(J)
    keep = sv > tolerance(np.asarray(X).dtype) * max(1.0, float(sv[0]) if sv.size else 1.0)
    step = Vt[keep].T @ ((U[:, keep].T @ rt) / sv[keep])
    if dyn.on_spheres:
        step = np.einsum("iak,ik->ia", B, step.reshape(B.shape[0], -1))
    return float(np.max(np.abs(step))) if step.size else 0.0


class Verifier:
    """Verdicts of label rows, each computed once (a cache by row): ``verifier(row, X) -> verdict name`` with X the
    representative final state ``(n, d)`` of that label."""

    def __init__(self, dyn, dtype, enabled: bool = True):
        self.dyn, self.dtype, self.enabled = dyn, dtype, enabled
        self.verdicts: dict[tuple, str] = {}
        self._vecs = None

    def __call__(self, row: tuple, X) -> str:
        if row not in self.verdicts:
            self.verdicts[row] = verify_state(self.dyn, jnp.asarray(X, self.dtype), self._axis(row)) if self.enabled else "unknown"
        return self.verdicts[row]

    def _axis(self, row: tuple):
        """The eigenvector of a consensus or bipartite row (its label's fields: kind, eigenvector), or None."""
        from ..classify import BIPARTITE, CONSENSUS
        from ..equilibria import eigenpairs

        if len(row) < 3 or row[1] not in (CONSENSUS, BIPARTITE) or row[2] < 0:
            return None
        if self._vecs is None:
            self._vecs = np.real(np.asarray(eigenpairs(self.dyn).vectors))
        return self._vecs[:, row[2]]

    def complete(self, tally: Tally) -> dict:
        """The verdict of every converged row of `tally` (rows not yet seen are verified from the tally's
        representative, of the lowest sample index)."""
        for r, e in tally.table.items():
            if r[0] == CONVERGED and r not in self.verdicts:
                self.verdicts[r] = "unknown" if e.rep is None or tally.n is None else self(r, e.rep[1].reshape(tally.n, -1))
        return {r: v for r, v in self.verdicts.items() if r in tally.table}


def verify_labels(dyn, tally: Tally, dtype=None) -> dict:
    """Once per converged label of `tally`: the :class:`~attnflow.Verdict` name of its equilibrium (from the
    representative of the lowest sample index)."""
    return Verifier(dyn, dtype).complete(tally)
