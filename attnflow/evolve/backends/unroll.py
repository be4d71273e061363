"""A model's own step, re-evaluated on a batch of members held on lanes: batch-last arrays, or unrolled scalars.

Two forms. :meth:`LaneProgram.step_array` (the lanes backend) applies each equation of the step once, to arrays
whose last axis runs over the members: ``(n, d, T)`` for a state, ``(n, n, T)`` for attention logits, weights
broadcast along that axis; contractions are sums of products over the contracted entries, in order (no matmul, so
the member axis stays the vector axis). XLA compiles a few dozen kernels for it (measured: 0.2 s against 2.7 s for
the unrolled form, toy n = 10, d = 3, at the same speed). :meth:`LaneProgram.step` (the fused Pallas kernel, which
works on scalars) unrolls every array axis, as described next.

The lanes and fused backends hold the batch as the lane (fastest) axis: the state of B members is d n
vectors of shape ``(B,)``, one per scalar of the ``(n, d)`` configuration. Rather than restating the model
on such vectors, :class:`LaneProgram` traces the model's per-configuration step (``solver.step(dyn, k, t,
X, dt)``) to a jaxpr and interprets it with every array axis unrolled. Each array value becomes a NumPy
object array of its shape whose elements are

- a ``(B,)`` vector when it depends on the state (or a traced scalar when it depends on the step index),
- a reference into the weights when it depends only on them (these parts are computed once, outside the
  time loop: M_h = Q_h^T K_h, W_h = O_h V_h, ...),
- a concrete number when it is a constant (masks, iotas), which is then folded away (a full mask costs
  nothing).

So an attention kind, a norm or a solver added in :mod:`attnflow.model` or :mod:`attnflow.evolve.solvers`
runs on these backends with no edit here, provided its step uses the primitives listed in
:data:`ELEMENTWISE`, :data:`STRUCTURAL` and the reductions and contractions below; anything else (data-
dependent control flow, sorting, ...) raises :class:`Unsupported`, and ``backend="auto"`` then takes the
vmapped XLA path.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

__all__ = ["LaneProgram", "Unsupported"]


class Unsupported(ValueError):
    """The step uses something the lanes interpretation does not cover (named in the message)."""


ELEMENTWISE = frozenset(
    """add sub mul div rem max min neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic
    sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh sqrt rsqrt cbrt pow integer_pow abs square
    select_n clamp eq ne lt le gt ge and or not xor convert_element_type erf erfc erf_inv lgamma digamma
    stop_gradient copy copy_p reduce_precision nextafter real imag""".split()
)
"""Primitives applied scalar by scalar."""

STRUCTURAL = frozenset("broadcast_in_dim reshape transpose squeeze rev slice concatenate pad split expand_dims".split())
"""Primitives that only rearrange scalars: free in the unrolled form."""

_REDUCE = {"reduce_sum": "add", "reduce_max": "max", "reduce_min": "min", "reduce_prod": "mul", "reduce_and": "and", "reduce_or": "or"}
_CUMULATIVE = {"cumsum": "add", "cummax": "max", "cummin": "min", "cumprod": "mul"}
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
_PRIMS = {p.name: p for p in (lax.add_p, lax.sub_p, lax.mul_p, lax.max_p, lax.min_p, lax.and_p, lax.or_p)}


class _Const:
    """A value known at trace time (a NumPy array)."""

    __slots__ = ("val",)

    def __init__(self, val):
        self.val = np.asarray(val)


class _Uniform:
    """A value that depends on the weights only. ``arr``: the traced array (None inside the time loop, where
    it is not recomputed); ``refs``: an object array of ``(root, flat index)`` pairs naming where each scalar
    comes from (a structural op rearranges refs, so a broadcast beta stays one scalar)."""

    __slots__ = ("arr", "refs")

    def __init__(self, arr, refs):
        self.arr, self.refs = arr, refs


class _Lanes:
    """A value that depends on the state or the step index: an object array of scalars (see module doc)."""

    __slots__ = ("els",)

    def __init__(self, els):
        self.els = els


def _obj(shape, fill=None):
    a = np.empty(shape, dtype=object)
    a.fill(fill)
    return a


def _refs(root: int, shape) -> np.ndarray:
    size = math.prod(shape)
    out = np.empty(size, dtype=object)
    for i in range(size):
        out[i] = (root, i)
    return out.reshape(shape)


def _structural(name, params, *vals: np.ndarray) -> np.ndarray:
    """Apply a structural primitive to NumPy arrays (object arrays of scalars or refs, or constants)."""
    x = vals[0]
    if name == "broadcast_in_dim":
        shape, dims = tuple(params["shape"]), tuple(int(d) for d in params["broadcast_dimensions"])
        tmp = [1] * len(shape)
        for i, dim in enumerate(dims):
            tmp[dim] = x.shape[i]
        return np.broadcast_to(x.reshape(tmp), shape).copy()
    if name == "reshape":
        if params.get("dimensions") is not None:
            raise Unsupported("reshape with dimensions")
        return x.reshape(tuple(params["new_sizes"]))
    if name == "transpose":
        return np.transpose(x, tuple(params["permutation"])).copy()
    if name == "squeeze":
        return np.squeeze(x, axis=tuple(int(d) for d in params["dimensions"]))
    if name == "expand_dims":
        return np.expand_dims(x, tuple(params["dimensions"]))
    if name == "rev":
        return np.flip(x, axis=tuple(params["dimensions"])).copy()
    if name == "slice":
        strides = params.get("strides") or (1,) * x.ndim
        idx = tuple(slice(a, b, s) for a, b, s in zip(params["start_indices"], params["limit_indices"], strides))
        return x[idx].copy()
    if name == "concatenate":
        return np.concatenate(vals, axis=int(params["dimension"]))
    if name == "pad":
        pv = vals[1].reshape(())
        out = x
        for axis, (lo, hi, interior) in enumerate(params["padding_config"]):
            if lo < 0 or hi < 0 or interior != 0:
                raise Unsupported("pad with negative or interior padding")
            width = [(0, 0)] * out.ndim
            width[axis] = (lo, hi)
            filler = np.empty(out.shape[:axis] + (lo + hi + out.shape[axis],) + out.shape[axis + 1:], dtype=out.dtype)
            filler[...] = pv
            sl = [slice(None)] * out.ndim
            sl[axis] = slice(lo, lo + out.shape[axis])
            filler[tuple(sl)] = out
            out = filler
        return out
    if name == "split":
        cuts = np.cumsum(params["sizes"])[:-1]
        return tuple(np.split(x, cuts, axis=int(params["axis"])))
    raise Unsupported(name)  # pragma: no cover - STRUCTURAL lists only the names above


def _fold(name: str, params: dict, vals: list) -> np.ndarray | None:
    """A constant equation evaluated with NumPy where that is exact (the index and shape arithmetic of attention
    masks: ``iota``, ``broadcast_in_dim``, and conversions from bool and integers or between floats), or None: then
    the primitive itself runs (each such eager operation is an XLA compile of its own in a new process)."""
    if name == "iota" and len(params.get("shape", ())) and not vals:
        shape, dim = tuple(params["shape"]), int(params["dimension"])
        line = np.arange(shape[dim], dtype=np.dtype(params["dtype"]))
        return np.array(np.broadcast_to(line.reshape([-1 if i == dim else 1 for i in range(len(shape))]), shape))
    if name == "broadcast_in_dim" and len(vals) == 1:
        x, shape = vals[0], tuple(params["shape"])
        dims = [1] * len(shape)
        for i, b in enumerate(params["broadcast_dimensions"]):
            dims[b] = x.shape[i]
        return np.array(np.broadcast_to(x.reshape(dims), shape))
    if name == "convert_element_type" and len(vals) == 1:
        x, to = vals[0], np.dtype(params["new_dtype"])
        if x.dtype.kind in "biu" and to.kind in "biuf" or x.dtype.kind == "f" and to.kind == "f":
            return x.astype(to)
    return None


def _is_traced(v) -> bool:
    return isinstance(v, jax.core.Tracer) or isinstance(v, jax.Array) and not isinstance(v, np.ndarray)


class _Emitter:
    """Scalar arithmetic on the elements of unrolled values, in one of two modes: ``emit=False`` (outside
    the loop: only shapes and costs are tracked, elements are None) or ``emit=True`` (inside the loop:
    lax primitives on ``(T,)`` vectors and scalars)."""

    def __init__(self, emit: bool):
        self.emit, self.cost = emit, 0

    def _lift(self, v, dtype, shape):
        if isinstance(v, (np.generic, np.ndarray, int, float, bool)):
            return jnp.full(shape, v, dtype=dtype) if shape else jnp.asarray(v, dtype=dtype)
        if v.shape != shape:
            return lax.broadcast_in_dim(v, shape, ())
        return v

    def apply(self, prim, params, els, avals_in):
        """One scalar application of ``prim`` (elements: concrete NumPy scalars or traced arrays)."""
        if all(isinstance(e, np.generic) for e in els):  # fold constants
            with jax.ensure_compile_time_eval():
                out = prim.bind(*(jnp.asarray(e) for e in els), **params)
            return np.asarray(out)[()]
        name = prim.name
        if name == "select_n" and isinstance(els[0], np.generic):
            return els[1 + int(els[0])]
        if name in ("stop_gradient", "copy", "copy_p") or (name == "convert_element_type" and avals_in[0].dtype == params["new_dtype"]):
            return els[0]
        self.cost += 1
        if not self.emit:
            return None
        shape = ()
        for e in els:
            if not isinstance(e, np.generic) and e.shape != ():
                shape = e.shape
        args = [self._lift(e, a.dtype, shape) for e, a in zip(els, avals_in)]
        return prim.bind(*args, **params)


class LaneProgram:
    """A per-configuration step ``f(args, k, X) -> X_next`` prepared for the lanes layout.

    **Arguments:**

    - `f`: the step of one configuration: ``args`` a pytree (arrays and static leaves), ``k`` the int32 step
      index, ``X`` the ``(n, d)`` state.
    - `args`: the pytree passed to `f` (its arrays are the weights: they never depend on the state).
    - `n`, `d`, `dtype`: the state's shape and dtype.

    :meth:`prepare` (outside the time loop) computes what depends on the weights only; :meth:`step` (inside
    it) maps a state held as ``d n`` rows of shape ``(T,)`` (row ``a n + i`` is coordinate a of token i) to
    the next. :attr:`cost` is the number of scalar operations per step on ``(T,)`` vectors (the unrolled
    size: compile time grows with it). Raises :class:`Unsupported` for steps it cannot unroll.
    """

    def __init__(self, f, args, n: int, d: int, dtype):
        arrays, static = eqx.partition(args, eqx.is_array)
        leaves, self._treedef = jax.tree.flatten(arrays)
        self._static = static
        self.n, self.d, self.dtype = n, d, jnp.dtype(dtype)

        def flat(leaves, k, X):
            return f(eqx.combine(jax.tree.unflatten(self._treedef, leaves), static), k, X)

        abstract = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
        closed = jax.make_jaxpr(flat)(abstract, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((n, d), dtype))
        self._closed = closed
        out = closed.jaxpr.outvars
        if len(out) != 1 or tuple(out[0].aval.shape) != (n, d):
            raise Unsupported(f"the step must return one ({n}, {d}) state, got {[getattr(v.aval, 'shape', None) for v in out]}")
        # a dry run: what the loop needs from the weights (the roots), and the cost
        self.num_weights = len(leaves)
        self._roots_used: set[int] = set()
        em = _Emitter(emit=False)
        self._run(em, self._inputs_abstract(len(leaves)), record=True)
        self.cost = em.cost

    # -- evaluation ---------------------------------------------------------------------------------------
    def _inputs_abstract(self, nleaves):
        ins = []
        for i, v in enumerate(self._closed.jaxpr.invars[:nleaves]):
            ins.append(_Uniform(None, _refs(i, v.aval.shape)))
        ins.append(_Lanes(_obj(())))
        ins.append(_Lanes(_obj((self.n, self.d))))
        return ins

    def _run(self, em: _Emitter, inputs, *, record: bool, roots=None, scalars=None, arrays=None):
        """Interpret the step. ``roots``: root index -> traced array (prepare); ``scalars``: root index -> object
        array of loop-ready scalars (step); ``arrays``: root index -> flat array (step_array). Root ids are assigned
        in evaluation order, identically in every run."""
        self._next_root = self.num_weights
        self._record, self._roots, self._scalars = record, roots, scalars
        self._arrays = arrays
        consts = [_Const(c) if not _is_traced(c) else _Uniform(c, None) for c in self._closed.consts]
        return self._eval(em, self._closed.jaxpr, consts, inputs)[0]

    def _new_root(self, arr, shape):
        r = self._next_root
        self._next_root += 1
        if self._roots is not None and arr is not None:
            self._roots[r] = arr
        return _Uniform(arr, _refs(r, shape))

    def _to_elements(self, v) -> np.ndarray:
        """Any value as an object array of scalar elements (for a lanes operation)."""
        if isinstance(v, _Lanes):
            return v.els
        if isinstance(v, _Const):
            out = np.empty(v.val.shape, dtype=object)
            for idx in np.ndindex(v.val.shape):
                out[idx] = v.val[idx]
            return out
        if v.refs is None:
            raise Unsupported("a traced constant captured by the step")
        out = np.empty(v.refs.shape, dtype=object)
        for idx in np.ndindex(v.refs.shape):
            root, flat = v.refs[idx]
            if self._record:
                self._roots_used.add(root)
            out[idx] = None if self._scalars is None else self._scalars[root][flat]
        return out

    def _eval(self, em, jaxpr, consts, args):
        env = {}

        def read(a):
            if isinstance(a, jcore.Literal):
                return _Const(np.asarray(a.val, dtype=a.aval.dtype))
            return env[a]

        for var, val in zip(jaxpr.constvars, consts):
            env[var] = val
        for var, val in zip(jaxpr.invars, args):
            env[var] = val
        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            outs = self._eqn(em, eqn, ins)
            for var, val in zip(eqn.outvars, outs):
                env[var] = val
        return [read(a) for a in jaxpr.outvars]

    def _eqn(self, em, eqn, ins):
        name, params = eqn.primitive.name, dict(eqn.params)
        if name in _CALLS:
            sub = params[_CALLS[name]]
            if isinstance(sub, jcore.ClosedJaxpr):
                sub_jaxpr, sub_consts = sub.jaxpr, [_Const(c) if not _is_traced(c) else _Uniform(c, None) for c in sub.consts]
            else:
                sub_jaxpr, sub_consts = sub, []
            nargs = len(sub_jaxpr.invars)
            return self._eval(em, sub_jaxpr, sub_consts, ins[len(ins) - nargs:])
        if all(isinstance(v, _Const) for v in ins):
            folded = _fold(name, params, [v.val for v in ins])
            if folded is not None:
                return [_Const(folded)]
            with jax.ensure_compile_time_eval():
                outs = eqn.primitive.bind(*(jnp.asarray(v.val) for v in ins), **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            return [_Const(np.asarray(o)) for o in outs]
        shapes_out = [tuple(v.aval.shape) for v in eqn.outvars]
        if not any(isinstance(v, _Lanes) for v in ins):
            return self._uniform(eqn, ins, params, shapes_out)
        if self._arrays is not None:
            return self._lanes_array(eqn, ins, params, shapes_out)
        return self._lanes(em, eqn, ins, params, shapes_out)

    def _uniform(self, eqn, ins, params, shapes_out):
        """An operation on the weights only: rearrange refs (structural) or start a new root."""
        name = eqn.primitive.name
        arrs = None
        if self._roots is not None:  # prepare: compute for real
            arrs = [v.val if isinstance(v, _Const) else v.arr for v in ins]
            if any(a is None for a in arrs):
                raise Unsupported("a weight-only value without its array")
            outs = eqn.primitive.bind(*arrs, **params)
            arrs = outs if eqn.primitive.multiple_results else [outs]
        if name in STRUCTURAL and name != "pad" and all(isinstance(v, _Uniform) and v.refs is not None for v in ins):
            refs = _structural(name, params, *[v.refs for v in ins])
            refs = refs if isinstance(refs, tuple) else (refs,)
            return [_Uniform(None if arrs is None else a, r) for a, r in zip(arrs or [None] * len(refs), refs)]
        return [self._new_root(None if arrs is None else a, s) for a, s in zip(arrs or [None] * len(shapes_out), shapes_out)]

    def _lanes(self, em, eqn, ins, params, shapes_out):
        name, prim = eqn.primitive.name, eqn.primitive
        els = [self._to_elements(v) for v in ins]
        avals = [v.aval for v in eqn.invars]
        if name in ELEMENTWISE:
            shape = shapes_out[0]
            b = [np.broadcast_to(e, shape) for e in els]
            out = np.empty(shape, dtype=object)
            for idx in np.ndindex(shape):
                out[idx] = em.apply(prim, params, [x[idx] for x in b], avals)
            return [_Lanes(out)]
        if name in STRUCTURAL:
            if name in ("pad",):
                els = [els[0], els[1]]
            outs = _structural(name, params, *els)
            outs = outs if isinstance(outs, tuple) else (outs,)
            return [_Lanes(o) for o in outs]
        if name in _REDUCE:
            return [_Lanes(self._reduce(em, els[0], tuple(int(a) for a in params["axes"]), _PRIMS[_REDUCE[name]], avals[0]))]
        if name in _CUMULATIVE:
            return [_Lanes(self._cumulative(em, els[0], int(params["axis"]), bool(params.get("reverse", False)), _PRIMS[_CUMULATIVE[name]], avals[0]))]
        if name == "dot_general":
            return [_Lanes(self._dot(em, els[0], els[1], params, avals, eqn.outvars[0].aval))]
        raise Unsupported(f"primitive {name!r}")

    def _reduce(self, em, x, axes, prim, aval):
        keep = [a for a in range(x.ndim) if a not in axes]
        xt = np.transpose(x, keep + list(axes))
        kshape = tuple(x.shape[a] for a in keep)
        xt = xt.reshape(kshape + (-1,))
        out = np.empty(kshape, dtype=object)
        sc = jax.core.ShapedArray((), aval.dtype)
        for idx in np.ndindex(kshape):
            row = list(xt[idx])
            out[idx] = functools.reduce(lambda a, b: em.apply(prim, {}, [a, b], [sc, sc]), row)
        return out

    def _cumulative(self, em, x, axis, reverse, prim, aval):
        xt = np.moveaxis(x, axis, -1)
        out = np.empty(xt.shape, dtype=object)
        sc = jax.core.ShapedArray((), aval.dtype)
        m = xt.shape[-1]
        order = range(m - 1, -1, -1) if reverse else range(m)
        for idx in np.ndindex(xt.shape[:-1]):
            acc = None
            for j in order:
                acc = xt[idx + (j,)] if acc is None else em.apply(prim, {}, [acc, xt[idx + (j,)]], [sc, sc])
                out[idx + (j,)] = acc
        return np.moveaxis(out, -1, axis)

    def _dot(self, em, lhs, rhs, params, avals, out_aval):
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
        lf = [a for a in range(lhs.ndim) if a not in lc + lb]
        rf = [a for a in range(rhs.ndim) if a not in rc + rb]
        L = np.transpose(lhs, lb + tuple(lf) + lc)
        R = np.transpose(rhs, rb + tuple(rf) + rc)
        nb = len(lb)
        bshape, lfs, rfs = L.shape[:nb], L.shape[nb:nb + len(lf)], R.shape[nb:nb + len(rf)]
        csize = math.prod(L.shape[nb + len(lf):])
        L = L.reshape(bshape + lfs + (csize,))
        R = R.reshape(bshape + rfs + (csize,))
        out = np.empty(bshape + lfs + rfs, dtype=object)
        dt = out_aval.dtype
        sl, sr, so = (jax.core.ShapedArray((), a.dtype) for a in (avals[0], avals[1], out_aval))
        conv = lambda e, a: e if a.dtype == dt else em.apply(lax.convert_element_type_p, {"new_dtype": dt, "weak_type": False, "sharding": None}, [e], [a])
        for b in np.ndindex(bshape):
            for i in np.ndindex(lfs):
                for j in np.ndindex(rfs):
                    acc = None
                    for c in range(csize):
                        p = em.apply(lax.mul_p, {}, [conv(L[b + i + (c,)], sl), conv(R[b + j + (c,)], sr)], [so, so])
                        acc = p if acc is None else em.apply(lax.add_p, {}, [acc, p], [so, so])
                    out[b + i + j] = acc
        return out

    # -- the batch-last form: every state-dependent value one array, the members on its last axis ----------------
    def _array(self, v):
        """A value as an array whose last axis runs over the members (extent T, or 1 where it does not depend on
        the state)."""
        if isinstance(v, _Lanes):
            return v.els
        if isinstance(v, _Const):
            return v.val[..., None]
        if v.refs is None:
            raise Unsupported("a traced constant captured by the step")
        refs = v.refs.reshape(-1)
        roots = {r for r, _ in refs}
        if len(roots) == 1:
            (r,) = roots
            flat = self._arrays[r]
            idx = np.fromiter((f for _, f in refs), dtype=np.int64, count=len(refs))
            out = flat if len(idx) == flat.shape[0] and np.array_equal(idx, np.arange(len(idx))) else flat[idx]
        else:
            out = jnp.stack([self._arrays[r][f] for r, f in refs])
        return out.reshape(v.refs.shape + (1,))

    @staticmethod
    def _widen(x, shape, extent):
        """``x`` (its member axis of extent 1 or `extent`, its other axes the trailing ones of `shape`, as an operand
        of an elementwise primitive may be) broadcast to ``shape + (extent,)``."""
        x = jnp.asarray(x)
        target = tuple(shape) + (extent,)
        return x if x.shape == target else lax.broadcast_in_dim(x, target, tuple(range(len(target) - x.ndim, len(target))))

    def _operands(self, ins, avals):
        """The inputs of an equation as batch-last arrays, in their jaxpr dtypes."""
        return [jnp.asarray(x, a.dtype) if isinstance(x, np.ndarray) else x for x, a in zip(map(self._array, ins), avals)]

    def _lanes_array(self, eqn, ins, params, shapes_out):
        name, prim = eqn.primitive.name, eqn.primitive
        avals = [v.aval for v in eqn.invars]
        if name in ELEMENTWISE:
            if name in ("stop_gradient", "copy", "copy_p") or (name == "convert_element_type" and avals[0].dtype == params["new_dtype"]):
                return [_Lanes(self._array(ins[0]))]
            if name == "select_n" and isinstance(ins[0], _Const) and np.all(ins[0].val == ins[0].val.reshape(-1)[0]):
                return [_Lanes(self._array(ins[1 + int(ins[0].val.reshape(-1)[0])]))]  # a constant choice
            xs = self._operands(ins, avals)
            extent = max(x.shape[-1] for x in xs)
            return [_Lanes(prim.bind(*[self._widen(x, shapes_out[0], extent) for x in xs], **params))]
        if name in STRUCTURAL or name in _REDUCE or name in _CUMULATIVE:
            xs = self._operands(ins, avals)
            x = xs[0]
            L = x.shape[-1]
            if name == "broadcast_in_dim":
                shape = tuple(params["shape"])
                out = lax.broadcast_in_dim(x, shape + (L,), tuple(int(d) for d in params["broadcast_dimensions"]) + (len(shape),))
            elif name == "reshape":
                if params.get("dimensions") is not None:
                    raise Unsupported("reshape with dimensions")
                out = lax.reshape(x, tuple(params["new_sizes"]) + (L,))
            elif name == "transpose":
                out = lax.transpose(x, tuple(params["permutation"]) + (x.ndim - 1,))
            elif name == "squeeze":
                out = lax.squeeze(x, tuple(int(d) for d in params["dimensions"]))
            elif name == "expand_dims":
                out = lax.expand_dims(x, tuple(params["dimensions"]))
            elif name == "rev":
                out = lax.rev(x, tuple(params["dimensions"]))
            elif name == "slice":
                strides = params.get("strides") or (1,) * (x.ndim - 1)
                out = lax.slice(x, tuple(params["start_indices"]) + (0,), tuple(params["limit_indices"]) + (L,), tuple(strides) + (1,))
            elif name == "concatenate":
                E = max(v.shape[-1] for v in xs)
                out = lax.concatenate([self._widen(v, v.shape[:-1], E) for v in xs], int(params["dimension"]))
            elif name == "pad":
                if xs[1].shape[-1] != 1 or isinstance(ins[1], _Lanes):
                    raise Unsupported("pad with a state-dependent padding value")
                out = lax.pad(x, xs[1].reshape(()), tuple(tuple(c) for c in params["padding_config"]) + ((0, 0, 0),))
            elif name == "split":
                return [_Lanes(o) for o in lax.split(x, tuple(params["sizes"]), int(params["axis"]))]
            else:  # reductions over the array axes, cumulative ones along one: the member axis is not among them
                out = prim.bind(x, **params)
            return [_Lanes(out)]
        if name == "dot_general":
            return [_Lanes(self._dot_array(*[self._array(v) for v in ins[:2]], params, avals, eqn.outvars[0].aval))]
        raise Unsupported(f"primitive {name!r}")

    @staticmethod
    def _dot_array(lhs, rhs, params, avals, out_aval):
        """dot_general on batch-last arrays: products of the contracted entries summed in order (no matmul: the
        contractions of a step are small and the member axis stays the vector axis)."""
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lc, rc, lb, rb = (tuple(int(a) for a in t) for t in (lc, rc, lb, rb))
        dt = out_aval.dtype
        lhs, rhs = jnp.asarray(lhs, avals[0].dtype).astype(dt), jnp.asarray(rhs, avals[1].dtype).astype(dt)
        lf = tuple(a for a in range(lhs.ndim - 1) if a not in lc + lb)
        rf = tuple(a for a in range(rhs.ndim - 1) if a not in rc + rb)
        bshape = tuple(lhs.shape[a] for a in lb)
        lfs, rfs = tuple(lhs.shape[a] for a in lf), tuple(rhs.shape[a] for a in rf)
        C = math.prod(lhs.shape[a] for a in lc)
        B, I, J = math.prod(bshape), math.prod(lfs), math.prod(rfs)
        Lt = jnp.transpose(lhs, lb + lf + lc + (lhs.ndim - 1,)).reshape(B, I, 1, C, lhs.shape[-1])
        Rt = jnp.transpose(rhs, rb + rf + rc + (rhs.ndim - 1,)).reshape(B, 1, J, C, rhs.shape[-1])
        acc = Lt[:, :, :, 0] * Rt[:, :, :, 0]
        for c in range(1, C):  # C <= n d <= MAX_STATE: a chain XLA fuses into one kernel
            acc = acc + Lt[:, :, :, c] * Rt[:, :, :, c]
        return acc.reshape(bshape + lfs + rfs + (acc.shape[-1],))

    # -- the two entry points -------------------------------------------------------------------------------
    def prepare(self, args) -> list:
        """The weight-only values the loop reads, as a list of flat arrays (computed once, outside the loop)."""
        arrays, _ = eqx.partition(args, eqx.is_array)
        leaves = jax.tree.leaves(arrays)
        roots: dict[int, jax.Array] = {i: jnp.asarray(x) for i, x in enumerate(leaves)}
        ins = [_Uniform(roots[i], _refs(i, jnp.shape(x))) for i, x in enumerate(leaves)]
        ins += [_Lanes(_obj(())), _Lanes(_obj((self.n, self.d)))]
        self._run(_Emitter(emit=False), ins, record=False, roots=roots)
        return [jnp.ravel(roots[r]) for r in sorted(self._roots_used)]

    @property
    def roots(self) -> list[int]:
        """The root ids :meth:`prepare` returns, in order."""
        return sorted(self._roots_used)

    def scalars(self, flats, get=None) -> dict:
        """Loop-ready scalars of the prepared values: ``get(i, j)`` reads scalar j of prepared value i
        (default: static indexing of the arrays in `flats`)."""
        get = get or (lambda i, j: flats[i][j])
        out = {}
        for i, (r, a) in enumerate(zip(self.roots, flats)):
            out[r] = [get(i, j) for j in range(a.shape[0])]
        return out

    def step(self, scalars: dict, k, rows, lanes: int):
        """The next state from ``rows`` (``d n`` vectors of shape ``(lanes,)``, row ``a n + i`` = coordinate a of
        token i) at step index ``k``; returns a tuple of ``d n`` rows."""
        n, d = self.n, self.d
        X = np.empty((n, d), dtype=object)
        for i in range(n):
            for a in range(d):
                X[i, a] = rows[a * n + i]
        kk = _obj(())
        kk[()] = k
        ins = [_Uniform(None, _refs(i, v.aval.shape)) for i, v in enumerate(self._closed.jaxpr.invars[: self.num_weights])]
        ins += [_Lanes(kk), _Lanes(X)]
        em = _Emitter(emit=True)
        out = self._run(em, ins, record=False, scalars=scalars)
        els = self._to_elements(out)
        res = []
        for a in range(d):
            for i in range(n):
                e = els[i, a]
                res.append(em._lift(e, self.dtype, (lanes,)) if isinstance(e, np.generic) or e.shape != (lanes,) else e)
        return tuple(res)

    def step_array(self, flats, k, rows):
        """:meth:`step` in the batch-last form: ``rows`` ``(d n, T)`` (row ``a n + i`` = coordinate a of token i) to
        the next ``(d n, T)``, every operation of the step applied once to the array of all its entries (so XLA
        compiles a few dozen kernels rather than one per scalar; same arithmetic, sums in the same order). `flats`:
        :meth:`prepare`'s arrays."""
        n, d = self.n, self.d
        T = rows.shape[-1]
        X = jnp.transpose(rows.reshape(d, n, T), (1, 0, 2))
        ins = [_Uniform(None, _refs(i, v.aval.shape)) for i, v in enumerate(self._closed.jaxpr.invars[: self.num_weights])]
        k = jnp.asarray(k, jnp.int32)
        ins += [_Lanes(jnp.reshape(k, (1,)) if k.ndim == 0 else k), _Lanes(X)]  # k: one step index, or one per member
        out = self._run(_Emitter(emit=True), ins, record=False, arrays=dict(zip(self.roots, flats)))
        Y = self._widen(jnp.asarray(self._array(out), self.dtype), (n, d), T)
        return jnp.transpose(Y, (1, 0, 2)).reshape(d * n, T)
