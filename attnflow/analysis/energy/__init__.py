"""Energies, radial shadows, attention entropy and the monotonicity condition (docs/model.md section 7).

For one configuration X (n, d) and a :class:`~attnflow.model.SelfAttention` with score matrices
M_h = Q_h^T K_h (biases included in the scores when present):

- per-head energy  E_h(X) = 1/(2 beta n^2) sum_{i,j} exp(s^h_ij),  s^h_ij = beta x_i^T M_h x_j;  E = sum_h E_h;
- the exact rates dE_h/dt = <grad E_h, vf> along a flow, by autodiff, and their split into head-by-head
  terms T[h, g] = <grad E_h, P f^g> (the diagonal is head h's own gradient part, the rest are the cross-head
  terms), each split again into a flat part <grad_i E_h, f_i^g> and a radial part
  -<grad_i E_h, x_i><x_i, f_i^g>/|x_i|^2 built from the **radial shadows** r^g_i = <x_i, f^g_i>;
- attention entropies S^h_i = -sum_j a^h_ij log a^h_ij and their exact production rate (a jvp along vf);
- a diagnostic along saved trajectories (:func:`energy_trace`, with a :class:`Cause` per member) and the
  sufficient condition for monotonicity on the score matrices (:func:`monotonicity_condition`).

One concept per module: ``_energies`` (energies, gradients, radial shadows, exact rates and their per-head
decomposition), ``_entropy`` (attention entropy), ``_trace`` (the diagnostic along trajectories),
``_condition`` (the sufficient condition and a search for counter-examples). Everything is written for one
configuration and lifted with ``vmap`` at the public edges.
"""

from ._condition import (
    MonotonicityCondition as MonotonicityCondition,
    find_energy_decrease as find_energy_decrease,
    head_weight_ratio as head_weight_ratio,
    monotonicity_condition as monotonicity_condition,
)
from ._energies import (
    EnergyRates as EnergyRates,
    energy as energy,
    energy_gradients as energy_gradients,
    energy_rates as energy_rates,
    head_energies as head_energies,
    radial_shadows as radial_shadows,
)
from ._entropy import attention_entropy as attention_entropy, entropy_rate as entropy_rate
from ._trace import (
    CAUSES as CAUSES,
    Cause as Cause,
    EnergyTrace as EnergyTrace,
    cause_name as cause_name,
    diagnose as diagnose,
    energy_trace as energy_trace,
)

__all__ = [
    "head_energies",
    "energy",
    "energy_gradients",
    "radial_shadows",
    "EnergyRates",
    "energy_rates",
    "attention_entropy",
    "entropy_rate",
    "Cause",
    "CAUSES",
    "cause_name",
    "EnergyTrace",
    "energy_trace",
    "diagnose",
    "MonotonicityCondition",
    "monotonicity_condition",
    "head_weight_ratio",
    "find_energy_decrease",
]
