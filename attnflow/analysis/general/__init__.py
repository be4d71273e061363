"""Basins of any dynamics: a user's vector field or map on R^m, periodic coordinates or a product of spheres;
fractions with intervals, basin maps, basin entropy, the uncertainty exponent, minimal fatal shocks and tipping
(docs/model.md section 12)."""

from ._basins import (
    BasinMap as BasinMap,
    Exponent as Exponent,
    FatalShock as FatalShock,
    Fractions as Fractions,
    Run as Run,
    Slice as Slice,
    Tipping as Tipping,
    Continuation as Continuation,
    continuation as continuation,
    match_across as match_across,
    basin_entropy as basin_entropy,
    basin_fractions as basin_fractions,
    basin_map as basin_map,
    fractions_of as fractions_of,
    label_members as label_members,
    minimal_fatal_shock as minimal_fatal_shock,
    tipping as tipping,
    uncertainty_exponent as uncertainty_exponent,
)
from ._label import Attractor as Attractor, Matcher as Matcher, recurrence as recurrence
from ._run import final_segments as final_segments
from ._system import Flow as Flow, Map as Map, Space as Space, attention_system as attention_system
