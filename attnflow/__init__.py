"""attnflow: self-attention dynamics of transformers at scale, in JAX.

Public API; see the README for an overview. Models (what the dynamics are) live in
:mod:`attnflow.model`, integration (how they are evolved) in :mod:`attnflow.evolve`.
"""

__version__ = "0.1.0"

import sys as _sys

if (getattr(_sys, "argv", None) or [""])[0].rsplit("/", 1)[-1] in ("-m", "attnflow", "attnflow.exe"):  # maybe the command
    from .cli._interrupt import guard_startup as _guard_startup  # the standard library only

    _guard_startup()  # in the attnflow command's own process: Ctrl-C / SIGTERM while JAX loads exit 130 / 143 in one line
del _sys

from . import evolve as evolve, model as model
from .evolve import (
    BACKENDS as BACKENDS,
    OUTCOMES as OUTCOMES,
    RK4 as RK4,
    Adaptive as Adaptive,
    Budget as Budget,
    Euler as Euler,
    Execution as Execution,
    Iterate as Iterate,
    Outcome as Outcome,
    Solution as Solution,
    Stop as Stop,
    chunk_backend as chunk_backend,
    sample as sample,
    simulate as simulate,
    simulate_chunks as simulate_chunks,
    sweep as sweep,
)
from .model import (
    Attention as Attention,
    FlatFlow as FlatFlow,
    Heads as Heads,
    L2Norm as L2Norm,
    LayerMap as LayerMap,
    LayerNorm as LayerNorm,
    LayerStack as LayerStack,
    NoNorm as NoNorm,
    SelfAttention as SelfAttention,
    SphereFlow as SphereFlow,
)
from .analysis import energy as energy, equiangular as equiangular
from .analysis.energy import (
    Cause as Cause,
    EnergyRates as EnergyRates,
    EnergyTrace as EnergyTrace,
    MonotonicityCondition as MonotonicityCondition,
    attention_entropy as attention_entropy,
    diagnose as diagnose,
    energy_rates as energy_rates,
    energy_trace as energy_trace,
    entropy_rate as entropy_rate,
    find_energy_decrease as find_energy_decrease,
    head_energies as head_energies,
    monotonicity_condition as monotonicity_condition,
    radial_shadows as radial_shadows,
)
from .analysis import (
    basins as basins,
    classify as classify,
    continuation as continuation,
    equilibria as equilibria,
    spectral as spectral,
    stability as stability,
    transformer as transformer,
)
from .analysis.basins import (
    Attractor as Attractor,
    BasinResult as BasinResult,
    Continuation as Continuation,
    CriticalShock as CriticalShock,
    LocalRadius as LocalRadius,
    critical_shock as critical_shock,
    local_basin_radius as local_basin_radius,
    wilson as wilson,
)
from .analysis.classify import Labels as Labels
from .analysis.eigen import Verdict as Verdict
from .analysis.continuation import continue_equilibrium as continue_equilibrium
from .analysis.equilibria import (
    bipartite as bipartite,
    consensus as consensus,
    find_clusterings as find_clusterings,
    polygonal as polygonal,
    refine as refine,
)
from .analysis.stability import (
    Stability as Stability,
    analyse as analyse,
    consensus_closed_form as consensus_closed_form,
    intrinsic_jacobian as intrinsic_jacobian,
    jacobians as jacobians,
)
from .model.transformer import TransformerBlock as TransformerBlock, build_stack as build_stack
from .analysis.transformer import (
    find_steering_gain as find_steering_gain,
    power_method_experiment as power_method_experiment,
    steer_heads as steer_heads,
)
from .io.hf import CheckpointError as CheckpointError, HFModel as HFModel, load_hf as load_hf
from .io.results import basin_fractions as basin_fractions  # the analysis function, plus run_dir= / resume=
