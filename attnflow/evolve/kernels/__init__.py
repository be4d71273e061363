"""Fused kernels behind :func:`attnflow.simulate`; the XLA path is the fallback.

- :mod:`.lanes`: the small-d discrete layer map (softmax, full mask, l2 norm, no biases) in a
  batch-as-lanes layout, as a Pallas kernel (many steps per launch, state kept on chip) and as the
  same arithmetic in plain XLA; :func:`lanes_run` runs that XLA arithmetic over cache-sized tiles with the
  full per-member semantics of :func:`attnflow.simulate` (the default path on CPU for these models).
"""

from .lanes import fused_applies as fused_applies
from .lanes import fused_layer_map as fused_layer_map
from .lanes import fused_run as fused_run
from .lanes import lane_layer_map as lane_layer_map
from .lanes import lanes_applies as lanes_applies
from .lanes import lanes_run as lanes_run
