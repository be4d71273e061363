"""How models are evolved, for a batch: options, solvers, simulate, the member pool, sampling."""

from . import backends as backends, pool as pool, sample as sample
from .backends import choose_backend as choose_backend
from .options import (
    BACKENDS as BACKENDS,
    Budget as Budget,
    Execution as Execution,
    Span as Span,
    Stop as Stop,
)
from .outcome import (
    OUTCOMES as OUTCOMES,
    Outcome as Outcome,
    outcome_code as outcome_code,
    outcome_counts as outcome_counts,
    outcome_message as outcome_message,
    outcome_names as outcome_names,
)
from .simulate import (
    Solution as Solution,
    chunk_backend as chunk_backend,
    compiled_programs as compiled_programs,
    simulate as simulate,
    simulate_chunks as simulate_chunks,
    sweep as sweep,
)
from .pool import Pool as Pool, advance_pool as advance_pool, empty_pool as empty_pool, stream_members as stream_members
from .solvers import (
    RK4 as RK4,
    AbstractSolver as AbstractSolver,
    Adaptive as Adaptive,
    Euler as Euler,
    Iterate as Iterate,
    make_solver as make_solver,
)
