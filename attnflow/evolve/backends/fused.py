"""The fused backend: one Pallas (Triton) launch for the whole simulation, its body the unrolled step
(:class:`~.unroll.LaneProgram`). Each program evolves ``block`` members, one per thread, with their ``d n``
coordinates in registers across all steps; the ``(d n, B)`` state is read once and written once (plus saves).

Not chosen by ``backend="auto"``: the kernel has not been timed on a GPU yet. Off a GPU it runs through the
Pallas interpreter (tests), and ``lower_for_cuda`` lowers it to Triton IR without a GPU.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from . import lane_program, machine


def _kernel(*refs, prog, nflat, D, plan, continuous, unroll, bools):
    """One program: ``block`` members, the whole run. ``refs``: the prepared weights (flat, one ref each), dt,
    the state ``(d n, block)``; outputs: final state, status ``(1, block)``, steps ``(1, block)``, saved
    ``(n_seg, d n, block)`` when the trajectory is saved."""
    flat_refs, dt_ref, x_ref = refs[:nflat], refs[nflat], refs[nflat + 1]
    o_ref, st_ref, ns_ref, *saved_ref = refs[nflat + 2:]

    def get(i, j):
        v = flat_refs[i][j]
        return v != 0 if bools[i] else v

    scal = prog.scalars(list(flat_refs), get=get)
    T = x_ref.shape[1]
    step = lambda X, k: prog.step(scal, k, X, T)
    scale = dt_ref[0] if continuous else None

    def seg(s, c):
        c = machine.segment(c, s, step, plan, scale, unroll)
        if saved_ref:
            for r in range(D):
                saved_ref[0][s, r, :] = c[0][r]
        return c

    X, _, st, ns = jax.lax.fori_loop(0, plan.n_seg, seg, machine.start(tuple(x_ref[r, :] for r in range(D))))
    for r in range(D):
        o_ref[r, :] = X[r]
    st_ref[0, :] = st
    ns_ref[0, :] = ns


def _gpu_params() -> dict:
    """Lower through Triton, whose one-thread-per-lane model this kernel is written for (recent JAX lowers
    ``pallas_call`` to Mosaic GPU by default, which rejects it: its copies are not multiples of a warpgroup)."""
    from jax.experimental.pallas import triton as pltriton

    return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}


def _local(x0, dt, *flats, prog, plan, block, interpret, unroll, continuous):
    from jax.experimental import pallas as pl

    B, n, d = x0.shape
    D, ft = d * n, x0.dtype
    bools = tuple(f.dtype == jnp.bool_ for f in flats)
    flats = [f.astype(jnp.int32) if b else f for f, b in zip(flats, bools)]
    xt = machine.to_lanes(x0, block)
    Bp = xt.shape[1]
    kern = functools.partial(_kernel, prog=prog, nflat=len(flats), D=D, plan=plan, continuous=continuous, unroll=int(unroll), bools=bools)
    lanes = pl.BlockSpec((D, block), lambda g: (0, g))
    row = pl.BlockSpec((1, block), lambda g: (0, g))
    out_shape = [jax.ShapeDtypeStruct((D, Bp), ft), jax.ShapeDtypeStruct((1, Bp), jnp.int32), jax.ShapeDtypeStruct((1, Bp), jnp.int32)]
    out_specs = [lanes, row, row]
    if plan.save:
        out_shape.append(jax.ShapeDtypeStruct((plan.n_seg, D, Bp), ft))
        out_specs.append(pl.BlockSpec((plan.n_seg, D, block), lambda g: (0, 0, g)))
    whole = lambda a: pl.BlockSpec(a.shape, lambda g: (0,))
    dtv = jnp.reshape(dt.astype(ft), (1,))
    outs = pl.pallas_call(
        kern,
        out_shape=tuple(out_shape),
        grid=(Bp // block,),
        in_specs=[whole(f) for f in flats] + [whole(dtv), lanes],
        out_specs=tuple(out_specs),
        interpret=interpret,
        **({} if interpret else _gpu_params()),
    )(*flats, dtv, xt)
    final, traj = machine.from_lanes(x0, outs[0], outs[3] if plan.save else None)
    return final, traj, outs[1][0, :B], outs[2][0, :B]


def fused_run(dyn, solver, x0, dt, plan, *, block: int = 128, interpret: bool | None = None):
    """``(final, trajectory, status, steps)`` of the vmapped path, member by member, from one launch of the fused
    kernel (``shard_map`` over ``plan.shards`` local devices). ``interpret``: run through the Pallas interpreter
    (default: off a GPU)."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    _, n, d = x0.shape
    prog = lane_program(dyn, solver, dt, n, d, x0.dtype)
    flats = prog.prepare((dyn, solver, jnp.asarray(dt, x0.dtype)))
    f = functools.partial(_local, prog=prog, plan=plan, block=block, interpret=interpret, unroll=plan.unroll, continuous=plan.continuous)
    return machine.shard(f, plan, plan.shards)(x0, jnp.asarray(dt), *flats)


def _group_kernel(*refs, prog, nflat, D, tol, group, continuous, bools, n, d, regions):
    """One program of the member pool's fused mode: ``block`` slots, `group` steps (each member's own step index,
    the cap, tol). ``refs``: the prepared weights, dt, the cap, the state ``(d n, block)``, outcome and steps
    ``(1, block)``; outputs: the same three."""
    flat_refs, dt_ref, cap_ref, ax_ref = refs[:nflat], refs[nflat], refs[nflat + 1], refs[nflat + 2]
    x_ref, st_ref, ns_ref, tg_ref = refs[nflat + 3], refs[nflat + 4], refs[nflat + 5], refs[nflat + 6]
    o_ref, sto_ref, nso_ref, tgo_ref = refs[nflat + 7:]
    cap = cap_ref[0]

    def get(i, j):
        v = flat_refs[i][j]
        return v != 0 if bools[i] else v

    scal = prog.scalars(list(flat_refs), get=get)
    T = x_ref.shape[1]
    step = lambda X, k: prog.step(scal, k, X, T)  # noqa: E731
    scale = dt_ref[0] if continuous else None

    check = None
    if regions is not None:
        from ..regions import test_rows

        A = len(regions.tags)  # ax_ref: the axes (A d), then the squared radii (A (n + 1))
        check = lambda Y: test_rows(regions, Y, n, d, get_axis=lambda a, b: ax_ref[a * d + b],  # noqa: E731
                                    get_radius=lambda a, m: ax_ref[A * d + a * (n + 1) + m])

    def one(_, c):
        X, st, ns, tg = c
        out = machine.advance((X, ns, st, ns, tg), step, tol, scale, cap, check)
        return out[0], out[2], out[3], (tg if check is None else out[4])

    init = (tuple(x_ref[r, :] for r in range(D)), st_ref[0, :], ns_ref[0, :], tg_ref[0, :])
    X, st, ns, tg = jax.lax.fori_loop(0, group, one, init)
    for r in range(D):
        o_ref[r, :] = X[r]
    sto_ref[0, :] = st
    nso_ref[0, :] = ns
    tgo_ref[0, :] = tg


def fused_group(dyn, solver, dt, cap, regions, spec, n, d, X, st, ns, t, h, tag, *, block: int = 128,
                interpret: bool | None = None):
    """`spec.group` steps of every running slot of a member pool ``(d n, P)`` in one launch of the fused kernel
    (members frozen once stopped, at the cap or in a certified region, as :func:`machine.advance`). Returns
    ``(X, outcome, steps, t, h, tag)``."""
    from jax.experimental import pallas as pl

    from ..outcome import CONVERGED

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    D, P = X.shape
    prog = lane_program(dyn, solver, dt, n, d, X.dtype)
    flats = prog.prepare((dyn, solver, jnp.asarray(dt, X.dtype)))
    bools = tuple(f.dtype == jnp.bool_ for f in flats)
    flats = [f.astype(jnp.int32) if b else f for f, b in zip(flats, bools)]
    Pp = -(-P // block) * block
    pad = Pp - P
    Xp = jnp.pad(X, ((0, 0), (0, pad)))
    stp = jnp.pad(st, (0, pad), constant_values=CONVERGED)[None]  # padding lanes never run
    nsp = jnp.pad(ns, (0, pad))[None]
    tgp = jnp.pad(tag, (0, pad), constant_values=-1)[None]
    axv = (jnp.zeros((1,), X.dtype) if regions is None
           else jnp.concatenate([jnp.ravel(regions.axes), jnp.ravel(regions.radius2)]).astype(X.dtype))
    static = None if regions is None else eqx.tree_at(lambda r: (r.axes, r.radius2), regions, (None, None))  # tags
    kern = functools.partial(_group_kernel, prog=prog, nflat=len(flats), D=D, tol=spec.tol, group=int(spec.group),
                             continuous=spec.continuous, bools=bools, n=n, d=d, regions=static)
    lanes = pl.BlockSpec((D, block), lambda g: (0, g))
    row = pl.BlockSpec((1, block), lambda g: (0, g))
    whole = lambda a: pl.BlockSpec(a.shape, lambda g: (0,))  # noqa: E731
    dtv = jnp.reshape(jnp.asarray(dt).astype(X.dtype), (1,))
    capv = jnp.reshape(jnp.asarray(cap, jnp.int32), (1,))
    Xo, sto, nso, tgo = pl.pallas_call(
        kern,
        out_shape=(jax.ShapeDtypeStruct((D, Pp), X.dtype), jax.ShapeDtypeStruct((1, Pp), st.dtype),
                   jax.ShapeDtypeStruct((1, Pp), ns.dtype), jax.ShapeDtypeStruct((1, Pp), tag.dtype)),
        grid=(Pp // block,),
        in_specs=[whole(f) for f in flats] + [whole(dtv), whole(capv), whole(axv), lanes, row, row, row],
        out_specs=(lanes, row, row, row),
        interpret=interpret,
        **({} if interpret else _gpu_params()),
    )(*flats, dtv, capv, axv, Xp, stp, nsp, tgp)
    return Xo[:, :P], sto[0, :P], nso[0, :P], t, h, tgo[0, :P]
