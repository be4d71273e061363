"""What became of a member: one equinox Enumeration, from the engine to the JSON.

``Solution.outcome`` and every basin study hold these as int32 codes (cheap to vmap and store); the enumeration
gives each code its name and meaning, like ``optimistix.RESULTS``. A simulation produces the first five; a basin
study adds ``saddle`` after checking the equilibrium a converged member reached, and ``certified`` for members it
decided early, inside a certified region (:mod:`attnflow.evolve.regions`).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np


class Outcome(eqx.Enumeration):
    """What became of a member (``Solution.outcome`` holds the int code, :data:`OUTCOMES` ``[code]`` its name,
    :func:`outcome_message` its meaning). Only ``converged`` and ``certified`` members are named by the attractor
    they reached (the outcome says which rule decided it); every other outcome is reported as a category of its
    own."""

    not_converged = "still moving when it reached its step cap (max_steps) without meeting tol"
    converged = "its per-step change fell below tol: it reached an attractor (a verified stable or neutral equilibrium)"
    nonfinite = "a step produced a non-finite state (the last finite state is kept)"
    solver_failed = "the adaptive solver failed (its step size collapsed)"
    degenerate = "its state stayed finite but left the state space (e.g. a zero token after an overflow)"
    saddle = "it stopped (per-step change below tol) at an equilibrium verified to be unstable: a slow passage, not an attractor"
    certified = "it entered a certified ball around a verified stable equilibrium, in which the dynamics contract: its attractor is decided before it converges"


OUTCOMES: tuple[str, ...] = tuple(sorted(Outcome._name_to_item, key=lambda k: int(Outcome._name_to_item[k]._value)))
"""Outcome names by code: ``OUTCOMES[code]``."""


def outcome_code(name: str) -> int:
    """The int code of an outcome name (ValueError naming the valid ones otherwise)."""
    if name not in Outcome._name_to_item:
        raise ValueError(f"unknown outcome {name!r}; expected one of {', '.join(OUTCOMES)}")
    return int(Outcome._name_to_item[name]._value)


def outcome_message(code: int) -> str:
    """What an outcome code means."""
    return Outcome._index_to_message[int(code)]


# The codes, for code that works on int32 arrays inside jit. These are the only outcome integers in attnflow.
NOT_CONVERGED, CONVERGED, NONFINITE, SOLVER_FAILED, DEGENERATE, SADDLE, CERTIFIED = (outcome_code(n) for n in OUTCOMES)

DEGENERATE_TOL = 1e-3
"""A member whose final state is farther than this from the model's state space (``state_residual``, e.g.
max | |x_i| - 1 | on the sphere) gets outcome ``degenerate`` instead of ``converged`` or ``not_converged``."""


def outcome_counts(codes) -> dict[str, int]:
    """Number of members per outcome name (every outcome listed, zeros included)."""
    s = np.asarray(codes).ravel()
    return {name: int(np.sum(s == code)) for code, name in enumerate(OUTCOMES)}


def outcome_names(codes) -> np.ndarray:
    """The outcome name of every code (a NumPy str array shaped like `codes`)."""
    return np.asarray(OUTCOMES)[np.asarray(codes, dtype=np.int64)]


def mark_degenerate(dyn, final, outcome):
    """Outcome ``degenerate`` for members whose final state ``(..., n, d)`` is finite but off the model's state space
    (its ``state_residual`` above :data:`DEGENERATE_TOL`); other outcomes are kept. Used by every engine."""
    resid = jnp.vectorize(dyn.state_residual, signature="(n,d)->()")(final)
    off = (resid > DEGENERATE_TOL) & ((outcome == CONVERGED) | (outcome == NOT_CONVERGED))
    return jnp.where(off, DEGENERATE, outcome).astype(outcome.dtype)
