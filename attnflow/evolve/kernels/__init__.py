"""Fused kernels behind :func:`attnflow.simulate`; the XLA path is the fallback.

- :mod:`.lanes`: small-d softmax models (l2 layer maps; sphere flows by Euler or RK4; full mask, no biases)
  in a batch-as-lanes layout, two ways, both with the full per-member semantics of :func:`attnflow.simulate`
  (status, ``tol``, saves, step counts): :func:`fused_run`, a Pallas (Triton) kernel that runs the whole
  simulation in one launch with each member's state in registers (the default on GPU), and
  :func:`lanes_run`, the same arithmetic in plain XLA over cache-sized tiles (the default on CPU for calls
  large enough to repay its compile).
"""

from .lanes import fused_applies as fused_applies
from .lanes import fused_layer_map as fused_layer_map
from .lanes import fused_run as fused_run
from .lanes import lane_layer_map as lane_layer_map
from .lanes import lanes_applies as lanes_applies
from .lanes import lanes_run as lanes_run
