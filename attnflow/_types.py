"""jaxtyping aliases shared across attnflow."""

from jaxtyping import Array, Bool, Float, Int

Tokens = Float[Array, "n d"]
"""One configuration: n tokens in R^d, row i is token i."""
Batch = Float[Array, "b n d"]
"""A batch of configurations."""
Scores = Float[Array, "n n"]
AttnMatrix = Float[Array, "n n"]
Scalar = Float[Array, ""]

__all__ = ["Array", "Bool", "Float", "Int", "Tokens", "Batch", "Scores", "AttnMatrix", "Scalar"]
