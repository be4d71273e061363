"""How models are evolved, for a batch: solvers, simulate, sampling."""

from . import backends as backends, sample as sample, stream as stream
from .backends import BACKENDS as BACKENDS, choose_backend as choose_backend
from .status import (
    CONVERGED as CONVERGED,
    DEGENERATE as DEGENERATE,
    MAX_STEPS as MAX_STEPS,
    NONFINITE as NONFINITE,
    SOLVER_FAILED as SOLVER_FAILED,
    STATUS_NAMES as STATUS_NAMES,
    Status as Status,
    status_message as status_message,
)
from .simulate import (
    Solution as Solution,
    chunk_backend as chunk_backend,
    simulate as simulate,
    simulate_chunks as simulate_chunks,
    sweep as sweep,
    trace_count as trace_count,
)
from .stream import Pool as Pool, advance_pool as advance_pool, empty_pool as empty_pool
from .solvers import (
    RK4 as RK4,
    AbstractSolver as AbstractSolver,
    Adaptive as Adaptive,
    Euler as Euler,
    Iterate as Iterate,
    make_solver as make_solver,
)
