"""Transformer layers as attnflow maps: the FFN, the full block with its LayerNorms, and the stack of a checkpoint.

Formulas: docs/model.md section 8; [PM] section 3 and appendix B.

The reduced layer of [PM] (attention + skip, then l2) is a :class:`attnflow.LayerMap`. A :class:`TransformerBlock`
keeps the FFN and/or the original LayerNorms. :func:`build_stack` turns a loaded checkpoint (an
:class:`attnflow.io.hf.HFModel`, or anything with the same attributes) into a :class:`attnflow.LayerStack`;
nothing here reads files.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

from .._types import Array, Float, Tokens
from .dynamics import AbstractMap, LayerMap, LayerStack, set_attn_params
from .heads import Heads, SelfAttention, _as_float_array, check_positive, check_scalar
from .norms import AbstractNorm, L2Norm, LayerNorm, NoNorm


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_python": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,  # the same tanh formula, its constant rounded to 0.7978845608
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_10": lambda x: jnp.clip(_gelu(x), -10.0, 10.0),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "relu6": jax.nn.relu6,
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "hardswish": jax.nn.hard_swish,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
    "laplace": lambda x: 0.5 * (1.0 + jax.lax.erf((x - 0.707107) / (0.282095 * 2.0**0.5))),
    "sqrtsoftplus": lambda x: jnp.sqrt(jax.nn.softplus(x)),
}
"""FFN activations by their Hugging Face config name (``hidden_act`` / ``activation_function`` / DistilBERT's
``activation``), each as ``transformers.activations.ACT2FN`` computes it (tests/test_audit_hf.py). Others (e.g.
``prelu``, ``xielu``: learned parameters) are refused by :func:`build_stack` with ``ffn=True``."""

_ACTS = ACTIVATIONS  # the old private name


class FFN(eqx.Module):
    """y = W_out act(W_in x + b_in) + b_out, token by token."""

    W_in: Float[Array, "m d"]
    b_in: Float[Array, " m"]
    W_out: Float[Array, "d m"]
    b_out: Float[Array, " d"]
    act: str = eqx.field(static=True, default="gelu")

    def __call__(self, X: Tokens) -> Tokens:
        h = ACTIVATIONS[self.act](X @ self.W_in.T + self.b_in)
        return h @ self.W_out.T + self.b_out


class InverseAffine(AbstractNorm):
    """x -> (x - b) / g per coordinate (0 where g = 0): undoes a LayerNorm's gain g and bias b.

    Heads with that LayerNorm folded in (Q' = Q diag(g), bq' = bq + Q b, the same for K and V) act on
    ``InverseAffine(g, b)(x)`` exactly as the raw heads act on x; where g = 0 the folded columns are zero,
    so the value fed there does not matter.
    """

    gain: Float[Array, " d"]
    bias: Float[Array, " d"]

    def __call__(self, y: Tokens) -> Tokens:
        g = self.gain.astype(y.dtype)
        ok = g != 0
        return jnp.where(ok, (y - self.bias.astype(y.dtype)) / jnp.where(ok, g, 1.0), 0.0)


class TransformerBlock(AbstractMap):
    """A full layer: h = N_attn(x + alpha Attn(N_in(x))); out = N_out(h + FFN(N_ffn(h))) (FFN optional).

    Post-norm (BERT/ALBERT): N_in = none, N_attn = LayerNorm (or l2), N_ffn = none, N_out = LayerNorm (or l2).
    Pre-norm (GPT-2/Neo) with the original LayerNorm: N_in = ln_1, N_attn = none, N_ffn = ln_2, N_out = none.
    Pre-norm with l2: N_in = none, N_attn = l2, N_ffn = none, N_out = l2 ([PM] appendix B's reduction).
    With folded heads N_in undoes the folded LayerNorm's affine part (see :func:`build_stack`).
    """

    attn: SelfAttention
    norm_in: AbstractNorm
    norm_attn: AbstractNorm
    norm_ffn: AbstractNorm
    norm_out: AbstractNorm
    ffn: FFN | None
    alpha: Float[Array, ""] = eqx.field(default=1.0, converter=_as_float_array)

    @property
    def on_spheres(self) -> bool:
        """Whether the block's output norm is :class:`L2Norm` (its states then lie on the unit spheres)."""
        return isinstance(self.norm_out, L2Norm)

    def __check_init__(self):
        check_positive("alpha", self.alpha)

    def step(self, k, X: Tokens) -> Tokens:
        """One block: attention (and FFN, LayerNorm as configured) applied to X ``(n, d)``."""
        alpha = check_scalar("alpha", self.alpha)  # an alpha (d,) or (n, 1) would scale coordinates or tokens
        h = self.norm_attn(X + alpha.astype(X.dtype) * self.attn(self.norm_in(X)))
        if self.ffn is not None:
            h = self.norm_out(h + self.ffn(self.norm_ffn(h)))
        return h.astype(X.dtype)

    def with_params(self, *, beta=None, alpha=None):
        """The same block with new beta and/or alpha."""
        return set_attn_params(self, beta=beta, alpha=alpha)


def _ln(pair, eps):
    return LayerNorm(gain=jnp.asarray(pair[0]), bias=jnp.asarray(pair[1]), eps=eps)


def layer_heads(model, *, biases: bool = False, fold_layernorm: bool = False, extra_layers: int = 0,
                dtype=None, layernorm: bool = False) -> list[Heads]:
    """The heads of every layer used by :func:`build_stack` (after the optional extension).

    **Arguments:** `model`: an :class:`attnflow.io.hf.HFModel`; the flags as in :func:`build_stack`; `dtype` that
    of folded heads (:meth:`~attnflow.io.hf.HFModel.heads`; default float32). With `layernorm` and
    `fold_layernorm`, the fold's bias terms are kept even without `biases` (they are the LayerNorm's bias). An
    extra layer is folded with the LayerNorm that feeds it: the last layer's output LayerNorm.

    **Returns:** one :class:`attnflow.Heads` per layer (the last layer repeated `extra_layers` times).
    """
    L = model.num_layers
    idx = list(range(L)) + [L - 1] * extra_layers
    return [model.heads(l, fold_layernorm=fold_layernorm, biases=biases, dtype=dtype, extra=i >= L,
                        fold_bias=layernorm) for i, l in enumerate(idx)]


def _input_norm(lay, *, fold: bool, pre_norm: bool, layernorm: bool, eps: float) -> AbstractNorm:
    """N_in of a block with the original LayerNorms (``layernorm=True``).

    Pre-norm: the block's ln_1, or only its standardisation when ln_1's affine part is folded into the heads.
    Post-norm: none; the state entering the layer is already the previous LayerNorm's output (gain and bias
    applied), so folded heads get that affine part undone first instead of applied a second time.
    """
    if not layernorm:
        return NoNorm()
    if pre_norm:
        return LayerNorm(eps=eps) if fold and lay.ln_in is not None else _ln(lay.ln_in, eps)
    if fold and lay.ln_in is not None:
        return InverseAffine(gain=jnp.asarray(lay.ln_in[0]), bias=jnp.asarray(lay.ln_in[1]))
    return NoNorm()


def build_stack(model, *, biases: bool = False, fold_layernorm: bool = False, ffn: bool = False,
                layernorm: bool = False, extra_layers: int = 0, alpha: float = 1.0, heads=None) -> LayerStack:
    """The layer dynamics of a loaded checkpoint as a :class:`attnflow.LayerStack`.

    **Arguments:**

    - `model`: an :class:`attnflow.io.hf.HFModel`.
    - `biases`: keep bq, bk, bv, bo (the [PM] model (3) has none; default False).
    - `fold_layernorm`: fold the LayerNorm that feeds each attention into its Q, K, V. With the l2 reduction this
      changes the model (the attention sees unit tokens through W diag(g)); with ``layernorm=True`` it is a change
      of parametrisation only, and the layer outputs equal the unfolded ones.
    - `ffn`: keep the FFN and its residual branch.
    - `layernorm`: use the original (affine) LayerNorms instead of l2 normalisation.
    - `extra_layers`: append this many copies of the last layer (shared-weight models only).
    - `alpha`: skip-connection step size (1 for real transformers).
    - `heads`: optional list of :class:`Heads` replacing the loaded ones (e.g. a steered last layer); they must be
      built with the same `fold_layernorm` (as :func:`layer_heads` does).

    **Returns:** a ``LayerStack`` of ``LayerMap`` (reduced: attention + skip + l2) or of ``TransformerBlock``.
    """
    if extra_layers < 0:
        raise ValueError(f"extra_layers must be >= 0, got {extra_layers}")
    if extra_layers and not model.shared:
        raise ValueError(f"extra identical layers need a shared-weight model (ALBERT); {model.family} has layer-varying weights")
    L = model.num_layers
    idx = list(range(L)) + [L - 1] * extra_layers
    if heads is None:
        heads = layer_heads(model, biases=biases, fold_layernorm=fold_layernorm, extra_layers=extra_layers,
                            layernorm=layernorm)
    if len(heads) != len(idx):
        raise ValueError(f"heads must list {len(idx)} layers, got {len(heads)}")
    maps = []
    for i, (l, h) in enumerate(zip(idx, heads)):
        lay = model.layers[l]
        if i >= L:  # an extra copy of the last layer is fed by that layer's output LayerNorm
            lay = dataclasses.replace(lay, ln_in=model.feeding_norm(l, extra=True))
        attn = SelfAttention(h, lay.attention, model.beta)
        if not ffn and not layernorm:
            maps.append(LayerMap(attn, alpha=alpha, norm=L2Norm()))
            continue
        if ffn and lay.act not in ACTIVATIONS:
            raise ValueError(f"unsupported FFN activation {lay.act!r} (supported: {', '.join(ACTIVATIONS)})")
        f = FFN(*(jnp.asarray(a) for a in lay.ffn), act=lay.act) if ffn else None
        none = NoNorm()
        n_in = _input_norm(lay, fold=fold_layernorm, pre_norm=model.pre_norm, layernorm=layernorm, eps=model.eps)
        if not layernorm:
            maps.append(TransformerBlock(attn, none, L2Norm(), none, L2Norm(), f, alpha=alpha))
        elif model.pre_norm:
            maps.append(TransformerBlock(attn, n_in, none, _ln(lay.ln_attn, model.eps), none, f, alpha=alpha))
        else:
            maps.append(TransformerBlock(attn, n_in, _ln(lay.ln_attn, model.eps), none,
                                         _ln(lay.ln_out, model.eps) if ffn else none, f, alpha=alpha))
    return LayerStack.from_layers(maps)
