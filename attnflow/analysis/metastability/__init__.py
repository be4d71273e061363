"""Metastability: plateaus, dwell times and phase diagrams of the clustering dynamics (docs/model.md section 11)."""

from ._plateaus import (
    Episodes as Episodes,
    Plateaus as Plateaus,
    Series as Series,
    cluster_labels as cluster_labels,
    find_plateaus as find_plateaus,
)
