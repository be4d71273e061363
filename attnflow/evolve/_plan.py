"""The static description of one simulate call, shared by simulate and its backends."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static facts of a call (hashable: part of the compiled signature)."""

    n_seg: int  # saved segments
    seg_len: int  # steps per segment (fixed-step solvers)
    save: bool
    tol: float | None
    continuous: bool
    adaptive: bool
    unroll: int
    shards: int = 1  # local devices the batch axis is split over
    backend: str = "xla"  # "xla" (vmapped), "lanes" (tiled batch-as-lanes XLA), "fused" (Pallas)
