"""How models are evolved, for a batch: solvers, simulate, sampling."""

from . import sample as sample
from .simulate import (
    CONVERGED as CONVERGED,
    MAX_STEPS as MAX_STEPS,
    NONFINITE as NONFINITE,
    SOLVER_FAILED as SOLVER_FAILED,
    STATUS_NAMES as STATUS_NAMES,
    Solution as Solution,
    simulate as simulate,
    simulate_chunks as simulate_chunks,
    sweep as sweep,
    trace_count as trace_count,
)
from .solvers import (
    RK4 as RK4,
    AbstractSolver as AbstractSolver,
    Adaptive as Adaptive,
    Euler as Euler,
    Iterate as Iterate,
    make_solver as make_solver,
)
