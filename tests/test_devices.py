"""One pool per local device: every member's name, outcome and steps are identical for 1, 2 and 4 devices (forced
host devices, in a subprocess), whatever the pool size and group, on every mode of the engine; no hang.

The subprocess runs basin studies with ``Execution(devices=k)`` and compares the per-sample tables of their run
directories (:func:`attnflow.io.results.read_members`) with the one-device run. Tolerance: none (exact equality)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    dtype, modes = sys.argv[2], sys.argv[3].split(",")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import numpy as np
    import attnflow as af
    from attnflow.io.results import RunDirWriter, read_members

    assert jax.local_device_count() == 4
    V = np.diag([1.0, 0.5, -0.3]).astype(dtype)
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    cases = {"xla": (af.LayerMap(att, 0.1), dict(budget=af.Budget(max_steps=700)), "xla"),
             "lanes": (af.LayerMap(att, 0.1), dict(budget=af.Budget(max_steps=700)), "lanes"),
             "adaptive": (af.SphereFlow(att), dict(solver=af.Adaptive(), budget=af.Budget(max_steps=200)), "xla"),
             "rk4": (af.SphereFlow(att), dict(budget=af.Budget(t1=20.0, dt=0.1)), "xla")}
    out = {}
    for mode in modes:
        model, kw, backend = cases[mode]
        for devices, pool, group in ((1, 64, 8), (2, 5, 3), (4, 7, 8)):
            d = os.path.join(sys.argv[1], f"{mode}_{devices}")
            with RunDirWriter(d) as w:
                af.basin_fractions(model, jax.random.PRNGKey(0), 60, tokens=4, stop=af.Stop(1e-6), run_dir=w,
                                   execution=af.Execution(backend=backend, devices=devices, pool=pool, group=group, chunk=25),
                                   **kw)
            r = read_members(d)
            out[f"{mode} {devices}"] = [r["name"].tolist(), r["outcome"].tolist(), r["steps"].tolist()]
    json.dump(out, open(os.path.join(sys.argv[1], "out.json"), "w"))
""")


def _run(tmp_path, dtype, modes):
    script = tmp_path / "devices.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path), dtype, ",".join(modes)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for mode in modes:
        one = out[f"{mode} 1"]
        assert len(one[0]) == 60 and len(set(one[0])) >= 2  # several outcomes: the comparison has teeth
        for k in (2, 4):
            assert out[f"{mode} {k}"] == one, f"{mode}: {k} devices differ from one"
    return out


@pytest.mark.slow  # three subprocesses on 1, 2 and 4 devices (about 25 s): run by the second CI step
def test_members_identical_on_1_2_and_4_devices_float32(tmp_path):
    """float32, the map on the xla and lanes backends: 1, 2 and 4 host devices (different pool sizes and groups) give
    every member the same name, outcome and steps; the two backends agree member by member on this case too."""
    out = _run(tmp_path, "float32", ["xla", "lanes"])
    assert out["xla 1"] == out["lanes 1"]


@pytest.mark.slow  # about a minute: the flows in float64 (adaptive and RK4) on 1, 2 and 4 host devices
def test_members_identical_on_1_2_and_4_devices_flows_float64(tmp_path):
    _run(tmp_path, "float64", ["adaptive", "rk4", "lanes"])


@pytest.mark.slow  # about 30 s: the size at which concurrent pool calls on 4 forced CPU devices once deadlocked
def test_no_hang_on_4_cpu_devices_at_size(tmp_path):
    """20 000 samples in blocks of 5 000 on 4 forced host devices: running the four devices' pool calls at once
    deadlocked XLA's CPU thread pool (no CPU time, forever); on CPU devices the calls now run one after another."""
    script = tmp_path / "big.py"
    script.write_text(textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np, attnflow as af
        V = np.diag([1.0, 0.5, -0.3]).astype(np.float32)
        m = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha=0.1)
        r = af.basin_fractions(m, jax.random.PRNGKey(0), 20000, tokens=10, budget=af.Budget(steps=1000), stop=af.Stop(1e-6),
                               execution=af.Execution(chunk=5000, devices=4))
        print(r.samples)
    """))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip() == "20000", r.stderr[-2000:]
