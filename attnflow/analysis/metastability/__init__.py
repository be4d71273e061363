"""Metastability: plateaus, dwell times and phase diagrams of the clustering dynamics (docs/model.md section 11)."""

from ._plateaus import (
    Episodes as Episodes,
    Plateaus as Plateaus,
    Series as Series,
    check_span as check_span,
    cluster_labels as cluster_labels,
    find_plateaus as find_plateaus,
)
from ._modes import bessel_ratios as bessel_ratios, fastest_mode as fastest_mode, mode_rates as mode_rates
from ._study import (
    Cell as Cell,
    Median as Median,
    MetastabilityResult as MetastabilityResult,
    Rate as Rate,
    km_median as km_median,
    metastability as metastability,
)
from ._phase import PhaseDiagram as PhaseDiagram, phase_at_time as phase_at_time, phase_t_beta as phase_t_beta
