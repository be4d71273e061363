"""jaxtyping aliases shared across attnflow."""

import math

from jaxtyping import Array, Bool, Float, Int

Tokens = Float[Array, "n d"]
"""One configuration: n tokens in R^d, row i is token i."""
Batch = Float[Array, "b n d"]
"""A batch of configurations."""
Scores = Float[Array, "n n"]
AttnMatrix = Float[Array, "n n"]
Scalar = Float[Array, ""]

__all__ = ["Array", "Bool", "Float", "Int", "Tokens", "Batch", "Scores", "AttnMatrix", "Scalar"]


def check_tolerance(name: str, tol, *, allow_zero: bool = True) -> float:
    """`tol` as a float, refused in one line unless it is a finite number >= 0 (> 0 without `allow_zero`)."""
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {tol!r}") from None
    if not (math.isfinite(t) and (t >= 0 if allow_zero else t > 0)):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {tol!r}")
    return t
