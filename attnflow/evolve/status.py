"""Per-member outcome of a simulation: an equinox Enumeration, stored as int32 codes in ``Solution.status``."""

from __future__ import annotations

import equinox as eqx
import numpy as np


class Status(eqx.Enumeration):
    """How a member's simulation ended (``Solution.status`` holds the int code, ``STATUS_NAMES[code]`` its name,
    :func:`status_message` its meaning).

    A member is classified only when it is ``converged``; every other status is reported as its own category.
    """

    max_steps = "ran to the end of its step budget without meeting tol (still moving)"
    converged = "its per-step change fell below tol"
    nonfinite = "a step produced a non-finite state (the last finite state is kept)"
    solver_failed = "the adaptive solver failed (e.g. it ran out of steps)"
    degenerate = "its state stayed finite but left the state space (e.g. a zero token after an overflow)"


STATUS_NAMES = tuple(Status._name_to_item)
"""Status names by code: ``STATUS_NAMES[code]``."""


def status_code(name: str) -> int:
    """The int code of a status name."""
    if name not in Status._name_to_item:
        raise ValueError(f"unknown status {name!r}; expected one of {', '.join(STATUS_NAMES)}")
    return int(Status._name_to_item[name]._value)


def status_message(code: int) -> str:
    """What a status code means."""
    return Status._index_to_message[int(code)]


MAX_STEPS, CONVERGED, NONFINITE, SOLVER_FAILED, DEGENERATE = (status_code(n) for n in STATUS_NAMES)

DEGENERATE_TOL = 1e-3
"""A member whose final state is farther than this from the model's state space (``state_residual``, e.g.
max | |x_i| - 1 | on the sphere) gets status ``degenerate`` instead of ``converged`` or ``max_steps``."""


def status_counts(status) -> dict[str, int]:
    """Number of members per status name."""
    s = np.asarray(status).ravel()
    return {name: int(np.sum(s == code)) for code, name in enumerate(STATUS_NAMES)}
