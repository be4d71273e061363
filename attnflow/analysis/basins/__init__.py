"""Basins of attraction: Monte Carlo fractions with intervals that include what is unknown, label verification,
local basin radius, critical shocks, continuation in beta/alpha.

A package by concept: :mod:`~.intervals` (Wilson intervals, widened by the unknown; simultaneous ones), :mod:`~.results` (frozen
result records, one JSON form), :mod:`~.tally` (streaming per-label counts), :mod:`~.sampling` (sample i from
``fold_in(key, i)``), :mod:`~.study` (:func:`basin_fractions` on the member pool of :mod:`attnflow.evolve.pool`),
:mod:`~.verify` (saddles), :mod:`~.local` (radius, shock, continuation).
"""

from .intervals import interval_with_unknown as interval_with_unknown, simultaneous_z as simultaneous_z, wilson as wilson
from .local import (
    DISTANCE as DISTANCE,
    Continuation as Continuation,
    CriticalShock as CriticalShock,
    LocalRadius as LocalRadius,
    continuation as continuation,
    critical_shock as critical_shock,
    local_basin_radius as local_basin_radius,
    recovery_probability as recovery_probability,
    state_name as state_name,
)
from .results import Attractor as Attractor, BasinResult as BasinResult, MemberSample as MemberSample, summarize as summarize
from .sampling import (
    Around as Around,
    Sphere as Sphere,
    around_sampler as around_sampler,
    draw_samples as draw_samples,
    sample_stream as sample_stream,
    uniform_sampler as uniform_sampler,
)
from .study import StudyWriter as StudyWriter, basin_fractions as basin_fractions, fingerprint as fingerprint, study_identity as study_identity
from .tally import Tally as Tally, gather_tally as gather_tally, unique_rows as unique_rows
from .verify import Verifier as Verifier, verify_labels as verify_labels, verify_state as verify_state
