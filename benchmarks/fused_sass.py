"""Static profile of the fused GPU kernel, without a GPU: compile it to H100 machine code and count what one
step costs.

    pip install triton          # ships ptxas and cuobjdump; not an attnflow dependency
    PYTHONPATH=. python benchmarks/fused_sass.py [--workloads toy,toy_mh,continuous] [--arch 90]

For each workload the script lowers attnflow's fused kernel (the same ``backends.fused._local`` that ``simulate`` calls on a
GPU) for the "cuda" platform on the CPU, which runs Pallas' Triton lowering in full, compiles the Triton IR with the
installed ``triton`` to PTX and a cubin for sm_<arch>a, and reads back with ``cuobjdump``:

- registers per thread, local-memory spills, shared memory;
- the SASS of the step loop (the innermost loop with the most instructions): instructions per step, per class.

One thread owns one ensemble member, so an SM issues at most 4 warp-instructions per clock for 4 x 32 members;
the issue bound is ``SMs x clock x 4 x 32 / instructions-per-step`` member-steps/s (times n for token-steps),
and the MUFU (exp, rcp, rsqrt) bound is ``SMs x clock x 16 / MUFU-per-step``. These are upper bounds from the
compiled code, not measurements: the timed numbers need the GPU (``python -m benchmarks.run``). Results go to
``benchmarks/results/fused_sass.json``.

Pallas and Triton evolve quickly: the Triton IR text from the installed JAX must parse in the installed Triton
(measured: JAX 0.10.2 with Triton 3.9.0). The capture of the Triton module uses a private JAX hook.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # contract a*b+c to FMA, as XLA does

# H100 variants: SMs and boost clock (NVIDIA datasheets). The machine lent to sessions is "one NVIDIA H100 (about
# 78 GiB)", which fits either 80 GB part.
GPUS = {"H100 SXM5": (132, 1.98e9), "H100 PCIe": (114, 1.755e9)}
ISSUE_LIMIT = (1e11, 2e11)  # the issue's physical limit for toy (token-steps/s)
PLAIN_JAX_H100 = {"toy": 2.1e9, "toy_mh": 6.2e8}  # the issue's reference plain-JAX throughputs on one H100


def triton_module(name: str, block: int = 128, tol=None, saves=None) -> tuple[str, int]:
    """The Triton IR (text) of the fused kernel for workload ``name``, lowered for "cuda" on this machine."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as reg

    import attnflow as af
    from attnflow.evolve.backends import lane_program
    from attnflow.evolve.backends.fused import _local as fused_local
    from attnflow.evolve.simulate import _make_plan
    from attnflow.evolve.solvers import RK4

    from benchmarks.run import WORKLOADS

    H, dh, d, n, beta, alpha, kind = WORKLOADS[name]
    rng = np.random.default_rng(0)
    ft = np.float32
    hd = af.Heads(*(rng.standard_normal(sh).astype(ft) / np.sqrt(d) for sh in [(H, dh, d)] * 3 + [(H, d, dh)]))
    att = af.SelfAttention(hd, af.Attention("softmax"), np.asarray(beta, ft))
    x0 = jnp.ones((4 * block, n, d), ft)
    if kind == "map":
        dyn, solver, kw, k = af.LayerMap(att, np.asarray(alpha, ft)), None, dict(steps=1000), "map"
    else:
        dyn, solver, kw, k = af.SphereFlow(att), RK4(), dict(t1=1000 * alpha, dt=alpha), "rk4"
    plan, solver, dt = _make_plan(dyn, x0, kw.get("steps"), kw.get("t1"), kw.get("dt"), solver, saves, tol, 1)
    dt = jnp.asarray(dt, ft)
    prog = lane_program(dyn, solver, dt, n, d, ft)
    flats = prog.prepare((dyn, solver, dt))
    captured = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def grab(*a, **kw):
        r = orig(*a, **kw)
        captured.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    reg.lowering.lower_jaxpr_to_triton_module = grab
    try:
        f = functools.partial(fused_local, prog=prog, plan=plan, block=block, interpret=False, unroll=1, continuous=k != "map")
        jax.jit(f).trace(x0, dt, *flats).lower(lowering_platforms=("cuda",))
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    return captured[-1], n


def _tool(name):
    import triton

    hits = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    if not hits:
        raise FileNotFoundError(f"{name} not found in the triton package")
    return hits[0]


def compile_ttir(ttir: str, arch: int, num_warps: int = 4) -> dict:
    """Compile Triton IR text to a cubin for sm_<arch>; returns the asm dict and compile seconds."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as fh:
            fh.write(ttir)
        t = time.perf_counter()
        k = triton.compile(path, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
        return {"asm": k.asm, "compile_s": time.perf_counter() - t, "shared": int(k.metadata.shared)}


def _cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        return subprocess.run([_tool("cuobjdump"), *flags, fh.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread, from ``cuobjdump -res-usage``."""
    out = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("registers", "stack_bytes", "shared_bytes", "local_bytes"), map(int, m.groups())))


def step_loop(sass: str) -> dict:
    """The innermost loop with the most instructions in a ``cuobjdump -sass`` listing (the step loop): its
    instruction count, in all and by opcode (predicates and modifiers dropped)."""
    lines = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    addr = [a for a, _ in lines]
    loops = []
    for i, (a, ins) in enumerate(lines):
        m = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", ins)
        if m and m.group(1):
            target = int(m.group(1), 16)
            if target < a:
                loops.append((addr.index(target) if target in addr else 0, i))
    inner = [(s, e) for s, e in loops if not any(s < s2 and e2 < e for s2, e2 in loops if (s2, e2) != (s, e))]
    s, e = max(inner, key=lambda se: se[1] - se[0])
    ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for _, ins in lines[s:e + 1])
    return {"instructions": e - s + 1, "by_opcode": dict(ops.most_common())}


def predict(instr: int, mufu: int, n: int) -> dict:
    out = {}
    for gpu, (sms, clock) in GPUS.items():
        issue = sms * clock * 4 * 32 / instr  # member-steps/s, one warp-instruction per scheduler per clock
        sfu = sms * clock * 16 / max(mufu, 1)
        out[gpu] = {"issue_bound_token_steps_per_s": issue * n, "mufu_bound_token_steps_per_s": sfu * n}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="toy,toy_mh,continuous")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    ap.add_argument("--variants", default="plain,tol_saves", help="plain: fixed steps; tol_saves: tol=1e-6, 5 saves")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fused_sass.json"))
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        sys.exit("needs the triton package (pip install triton): it compiles the kernel and ships ptxas/cuobjdump")
    import jax

    records = []
    for name in args.workloads.split(","):
        for variant in args.variants.split(","):
            tol, saves = (1e-6, 5) if variant == "tol_saves" else (None, None)
            ttir, n = triton_module(name, tol=tol, saves=saves)
            c = compile_ttir(ttir, args.arch)
            res = resources(c["asm"]["cubin"])
            loop = step_loop(_cuobjdump(c["asm"]["cubin"], "-sass"))
            mufu = loop["by_opcode"].get("MUFU", 0)
            warps = 4 * min(65536 // (res["registers"] * 128), 16)  # blocks of 4 warps per SM: register limit, 64 warps max
            rec = {
                "workload": name,
                "variant": variant,
                "arch": f"sm_{args.arch}a",
                "compile_s": round(c["compile_s"], 1),  # ~1 s: answered from Triton's cache (~/.triton/cache)
                **res,
                "warps_per_sm": warps,
                "step_loop": loop,
                "prediction": predict(loop["instructions"], mufu, n),
            }
            records.append(rec)
            p = rec["prediction"]["H100 SXM5"]
            print(
                f"{name:11s} {variant:9s} regs {res['registers']:3d}  spill {res['local_bytes']:4d} B  warps/SM {warps:2d}  "
                f"step loop {loop['instructions']:5d} instr ({mufu} MUFU)  issue bound {p['issue_bound_token_steps_per_s']:.2e} "
                f"token-steps/s (SXM5)  compile {c['compile_s']:.0f} s",
                flush=True,
            )
            if name in PLAIN_JAX_H100:
                print(f"{'':21s} = {p['issue_bound_token_steps_per_s'] / PLAIN_JAX_H100[name]:.0f}x the issue's plain-JAX H100 figure at perfect issue")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "versions": {"jax": jax.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "gpus": {k: {"sms": v[0], "boost_clock_hz": v[1]} for k, v in GPUS.items()},
        "note": "static: compiled without a GPU; bounds, not measurements",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if os.path.exists(args.out):  # keep the other workloads' records of an earlier run
        with open(args.out) as fh:
            old = json.load(fh)["records"]
        done = {(r["workload"], r["variant"]) for r in records}
        records = [r for r in old if (r["workload"], r["variant"]) not in done] + records
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
