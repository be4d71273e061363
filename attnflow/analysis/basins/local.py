"""Local measures of a basin: the local basin radius, the critical shock, and continuation of fractions along a
parameter. Each returns a frozen record with ``to_json``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..._json import plain
from ..._types import Array, Tokens
from ...evolve import sample
from ...evolve.options import Budget, Stop, check_tol
from ...evolve.simulate import simulate
from ...evolve.solvers import Adaptive
from ..classify import classify, label_rows
from .results import BasinResult

DISTANCE = ("Frobenius norm of the tangent perturbation of all n tokens together (before renormalising each token "
            "onto the sphere)")
"""The distance measure of :func:`local_basin_radius` and :func:`critical_shock`."""


def state_name(dyn, X: Tokens, cluster_tol: float = 1e-3) -> str:
    """The :func:`~attnflow.analysis.classify.equilibrium_name` of one state."""
    return classify(dyn, jnp.asarray(X)[None], tol=cluster_tol).names()[0]


@dataclasses.dataclass(frozen=True)
class LocalRadius:
    """The local basin radius of an equilibrium (:func:`local_basin_radius`).

    - `equilibrium`: its name; `distance`: :data:`DISTANCE`; `q`: the recovery probability asked for.
    - `radius`: the largest radius found with recovery >= q (the bisection's lower end), or None when only a lower
      bound is known; `lower_bound`: True when recovery at `r_max` is still >= q, so the radius is at least
      `at_least` (= r_max), not measured; `at_least`: the bound reported; `bracket`: ``(lo, hi)`` of the
      bisection (hi None for a lower bound); `probabilities`: recovery per radius tried.
    """

    equilibrium: str
    distance: str
    q: float
    radius: float | None
    lower_bound: bool
    at_least: float
    bracket: tuple
    probabilities: dict

    def to_json(self) -> dict:
        """The JSON form (radii and probabilities as lists of pairs)."""
        return plain({"equilibrium": self.equilibrium, "distance": self.distance, "q": self.q, "radius": self.radius,
                      "lower_bound": self.lower_bound, "at_least": self.at_least, "bracket": list(self.bracket),
                      "probabilities": [[r, p] for r, p in sorted(self.probabilities.items())]})

    def line(self, what: str = "local basin radius") -> str:
        """One text line: the value, or "≥ r_max (a lower bound)", with the equilibrium it refers to."""
        val = f"≥ {self.at_least:.4g} (the largest radius tried; a lower bound)" if self.lower_bound else f"{self.radius:.4g}"
        return f"{what} of {self.equilibrium}, q = {self.q}: {val} (tangent distance)"


@dataclasses.dataclass(frozen=True)
class CriticalShock:
    """The smallest perturbation found that leaves the basin of an equilibrium (:func:`critical_shock`).

    - `equilibrium`, `distance`: as :class:`LocalRadius`.
    - `radius`: |delta| of the smallest escaping perturbation found: an upper bound of the critical shock (None
      when none escaped); `lower_bound`: True when no candidate up to `r_max` escaped, so the shock is at least
      `at_least` for the candidates tried; `delta`: the perturbation ``(n, d)`` (or None);
      `monte_carlo_radius`: the first escaping candidate's |delta| before optimisation; `message`: why there is
      no radius, or None.
    """

    equilibrium: str
    distance: str
    radius: float | None
    lower_bound: bool
    at_least: float | None
    delta: np.ndarray | None = dataclasses.field(default=None, compare=False)
    monte_carlo_radius: float | None = None
    message: str | None = None

    def to_json(self) -> dict:
        """The JSON form (without the perturbation itself)."""
        return plain({"equilibrium": self.equilibrium, "distance": self.distance, "radius": self.radius,
                      "lower_bound": self.lower_bound, "at_least": self.at_least,
                      "monte_carlo_radius": self.monte_carlo_radius, "message": self.message})

    def line(self, what: str = "critical shock") -> str:
        """One text line: the bound found, with the equilibrium it refers to."""
        if self.lower_bound:
            val = f"≥ {self.at_least:.4g} (no escape found up to this radius; a lower bound)"
        else:
            val = f"≤ {self.radius:.4g} (the smallest escape found; an upper bound)"
        return f"{what} of {self.equilibrium}: {val} (tangent distance)"


def _on_spheres(dyn, what: str) -> None:
    """Refuse a model whose states are not on the unit spheres: these measures perturb along the tangent spaces and
    renormalise each token onto its sphere, which a flat flow or a layernorm map would not stay on."""
    if not getattr(dyn, "on_spheres", False):
        raise ValueError(f"{what} perturbs tokens on the unit spheres; {type(dyn).__name__} does not keep its tokens "
                         "there (a flat flow, or a map normalised by layernorm or none)")


def recovery_probability(dyn, X_eq: Tokens, radius: float, key: Array, *, budget: Budget, solver=None,
                         stop: Stop | None = None, samples: int = 256, cluster_tol: float = 1e-3) -> float:
    """Fraction of perturbations at tangent distance `radius` whose final state has the attractor label of X_eq
    (default stop: a study's tol, ``max(1e-7, 8 x floor)`` of :func:`attnflow.evolve.options.tol_floor`).

    Recovery is judged by label (the classifier, tolerance `cluster_tol`), not by a raw distance: near a
    marginally stable point the per-step tolerance stops members at a distance of about tol / (1 - rho),
    which a fixed distance threshold would misread as escape.
    """
    _on_spheres(dyn, "recovery_probability")
    X_eq = jnp.asarray(X_eq)
    x0 = sample.perturb_ball(key, X_eq, radius, samples)
    if stop is None:  # a study's default tol: max(1e-7, 8 x the floor of the dtype)
        dt = None if isinstance(solver, Adaptive) else budget.dt
        stop = Stop(check_tol(None, dyn, solver, dt, X_eq.dtype, study=True))
    sol = simulate(dyn, x0, budget, solver=solver, stop=stop)
    target = label_rows(classify(dyn, X_eq[None], tol=cluster_tol))[0]
    rows = label_rows(classify(dyn, sol.final, sol.outcome, tol=cluster_tol))
    return float(np.mean(np.all(rows == target[None], axis=1)))


def local_basin_radius(dyn, X_eq: Tokens, key: Array, *, budget: Budget, solver=None, stop: Stop | None = None,
                       q: float = 0.9, r_max: float = 3.0, iters: int = 12, samples: int = 256,
                       cluster_tol: float = 1e-3) -> LocalRadius:
    """Largest radius r (bisection in [0, r_max], `iters` halvings) at which perturbations of X_eq recover with
    probability >= q; each radius draws `samples` perturbations (:func:`recovery_probability`).

    **Returns:** a :class:`LocalRadius`; a lower bound (recovery still >= q at `r_max`) is reported as one.
    """
    if not 0 < q < 1:
        raise ValueError(f"q must lie in (0, 1), got {q}")
    _on_spheres(dyn, "local_basin_radius")
    kw = dict(budget=budget, solver=solver, stop=stop, samples=samples, cluster_tol=cluster_tol)
    lo, hi = 0.0, float(r_max)
    probs = {}
    name = state_name(dyn, X_eq, cluster_tol)
    p_hi = recovery_probability(dyn, X_eq, hi, jax.random.fold_in(key, 0), **kw)
    probs[hi] = p_hi
    if p_hi >= q:
        return LocalRadius(name, DISTANCE, q, None, True, hi, (hi, None), probs)
    for it in range(1, iters + 1):
        mid = 0.5 * (lo + hi)
        p = recovery_probability(dyn, X_eq, mid, jax.random.fold_in(key, it), **kw)
        probs[mid] = p
        lo, hi = (mid, hi) if p >= q else (lo, mid)
    return LocalRadius(name, DISTANCE, q, lo, False, lo, (lo, hi), dict(sorted(probs.items())))


def critical_shock(dyn, X_eq: Tokens, key: Array, *, steps: int = 200, candidates: int = 256, r_max: float = 3.0,
                   iters: int = 200, learning_rate: float = 0.02, escape: float = 0.5) -> CriticalShock:
    """Smallest perturbation that leaves the basin of X_eq (a discrete map), by optimisation with optax.

    Monte Carlo candidates at growing radii give a first escaping perturbation; then Adam minimises
    ``|delta|^2 + 10 relu(escape - dist(F^steps(X_eq + delta), X_eq))`` over the tangent perturbation delta,
    differentiating through ``steps`` iterations of the map. Every accepted iterate is checked to still escape
    (final distance >= `escape`) by simulation; the smallest such |delta| is returned.

    **Returns:** a :class:`CriticalShock`: an upper bound found by search, or a lower bound when no candidate up
    to `r_max` escaped.
    """
    import optax

    from ...model.dynamics import AbstractMap, tangent_project
    from ...model.norms import normalize_rows

    if not isinstance(dyn, AbstractMap) or dyn.num_layers is not None:
        # a stack's layer index would be clamped to its last layer past L steps: the basin of a fixed point is
        # that of one autonomous map iterated
        raise TypeError(f"critical_shock needs an autonomous map (a LayerMap or a TransformerBlock), got "
                        f"{type(dyn).__name__}" + (f" of {dyn.num_layers} layers" if getattr(dyn, "num_layers", None) else ""))
    _on_spheres(dyn, "critical_shock")
    X = jnp.asarray(X_eq)

    def final_dist(delta):
        Y = normalize_rows(X + delta)
        Y = jax.lax.fori_loop(0, steps, lambda k, Z: dyn.step(k, Z), Y)
        return jnp.sqrt(jnp.sum((Y - X) ** 2))

    dist_one = jax.jit(final_dist)  # compiled once: every candidate and every iterate below reuses it
    dist_many = jax.jit(jax.vmap(lambda Y: final_dist(Y - X)))
    best = None
    for j, r in enumerate(np.linspace(r_max / 16, r_max, 16)):
        x0 = sample.perturb_ball(jax.random.fold_in(key, j), X, float(r), candidates)
        dists = dist_many(x0)
        esc = np.flatnonzero(np.asarray(dists) >= escape)
        if len(esc):
            best = x0[esc[0]] - X
            break
    name = state_name(dyn, X)
    if best is None:
        return CriticalShock(name, DISTANCE, None, True, float(r_max), message=f"no escape found up to radius {r_max}")
    delta = tangent_project(X, best)
    opt = optax.adam(learning_rate)
    state = opt.init(delta)
    loss = lambda dl: jnp.sum(dl * dl) + 10.0 * jax.nn.relu(escape - final_dist(dl))  # noqa: E731
    step = jax.jit(lambda dl, s: _opt_step(loss, opt, dl, s, X))
    best_norm = float(jnp.linalg.norm(delta))
    best_delta = delta
    for _ in range(iters):
        delta, state = step(delta, state)
        if float(dist_one(delta)) >= escape and float(jnp.linalg.norm(delta)) < best_norm:
            best_norm, best_delta = float(jnp.linalg.norm(delta)), delta
    return CriticalShock(name, DISTANCE, best_norm, False, None, np.asarray(best_delta),
                         float(jnp.linalg.norm(tangent_project(X, best))))


def _opt_step(loss, opt, delta, state, X):
    from ...model.dynamics import tangent_project

    g = jax.grad(loss)(delta)
    upd, state = opt.update(g, state)
    return tangent_project(X, delta + upd), state


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Basin fractions along a parameter (:func:`continuation`): `param`, its `values`, `fractions` (attractor name ->
    fraction at each value; 0 where absent) and the :class:`BasinResult` at each value."""

    param: str
    values: tuple[float, ...]
    fractions: dict
    results: tuple[BasinResult, ...] = dataclasses.field(compare=False, repr=False)

    def to_json(self) -> dict:
        """The JSON form: param, values, fractions, and each value's result."""
        return plain({"param": self.param, "values": list(self.values), "fractions": self.fractions,
                      "results": [r.to_json() for r in self.results]})


def continuation(dyn, key: Array, samples: int, *, param: str, values, **study) -> Continuation:
    """Basin fractions over a grid of beta or alpha values (``**study``: the arguments of
    :func:`~attnflow.analysis.basins.basin_fractions`); attractors are matched across values by name."""
    from .study import basin_fractions

    if param not in ("beta", "alpha"):
        raise ValueError(f"param must be 'beta' or 'alpha', got {param!r}")
    values = tuple(float(v) for v in values)
    results = tuple(basin_fractions(dyn.with_params(**{param: v}), key, samples, **study) for v in values)
    names = list(dict.fromkeys(a.name for r in results for a in r.attractors))
    table = {nm: [next((a.fraction for a in r.attractors if a.name == nm), 0.0) for r in results] for nm in names}
    return Continuation(param, values, table, results)
