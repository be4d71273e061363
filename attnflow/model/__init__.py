"""What the dynamics are: attention kernels, heads, norms, flows and maps (one configuration)."""

from .attention import Attention as Attention, allowed_set as allowed_set, parse_mask as parse_mask
from .dynamics import (
    AbstractDynamics as AbstractDynamics,
    AbstractFlow as AbstractFlow,
    AbstractMap as AbstractMap,
    FlatFlow as FlatFlow,
    LayerMap as LayerMap,
    LayerStack as LayerStack,
    SphereFlow as SphereFlow,
    tangent_project as tangent_project,
)
from .heads import Heads as Heads, SelfAttention as SelfAttention
from .norms import (
    AbstractNorm as AbstractNorm,
    L2Norm as L2Norm,
    LayerNorm as LayerNorm,
    NoNorm as NoNorm,
    make_norm as make_norm,
    normalize_rows as normalize_rows,
    safe_norm as safe_norm,
)
from .transformer import (
    FFN as FFN,
    InverseAffine as InverseAffine,
    TransformerBlock as TransformerBlock,
    build_stack as build_stack,
    layer_heads as layer_heads,
)
