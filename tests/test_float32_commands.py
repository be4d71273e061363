"""float32 never silently returns inf (or NaN) where float64 returns numbers: every command's float32 config against
the same config in float64, through the CLI (``attnflow <cmd> cfg.toml --json``).

The float32 runs execute with JAX's x64 mode off (as a user's process is: the test suite turns it on), so any
computation that silently falls back to the default dtype shows up. Tolerances, float32 against float64:
states 1e-4 (absolute; a few hundred steps of a contraction from identical starts), energies 1e-4 (relative),
stability measures 1e-5 (relative), T_eps 1e-8 (relative: computed in float64 on the host in both cases),
basin fractions: the two 95% intervals overlap (the samples differ: the sampler draws in the config's dtype).
"""

import json
import math

import jax
import numpy as np
import pytest

from attnflow.cli import main

MODEL = '[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.4, 0], [0, 0, -0.3]]\nbeta = 1.0\n'


def finite(obj, path="$"):
    """Every number in a JSON document is finite (NaN and inf are reported with their path)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            finite(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), f"{path} = {obj}"


def run(tmp_path, capsys, cmd, body, dtype, extra=()):
    cfg = tmp_path / f"{cmd}_{dtype}.toml"
    cfg.write_text(body.replace("DTYPE", dtype))
    if dtype == "float32":
        with jax.enable_x64(False):
            rc = main([cmd, str(cfg), "--json", *extra])
    else:
        rc = main([cmd, str(cfg), "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    finite(doc)
    return doc


def test_simulate_float32_matches_float64(tmp_path, capsys):
    x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (6, 5, 3)))
    np.save(tmp_path / "x0.npy", x0 / np.linalg.norm(x0, axis=-1, keepdims=True))
    body = MODEL + '[dynamics]\nalpha = 0.1\ntokens = 5\nsteps = 300\nbatch = 6\ninit = "x0.npy"\ndtype = "DTYPE"\n'
    s32 = run(tmp_path, capsys, "simulate", body, "float32", ["--out", str(tmp_path / "o32")])
    s64 = run(tmp_path, capsys, "simulate", body, "float64", ["--out", str(tmp_path / "o64")])
    f32 = np.load(tmp_path / "o32" / "trajectories.npz")["final"]
    f64 = np.load(tmp_path / "o64" / "trajectories.npz")["final"]
    assert f32.dtype == np.float32 and f64.dtype == np.float64
    np.testing.assert_allclose(f32, f64, atol=1e-4)
    assert s32["mean_min_cos"] == pytest.approx(s64["mean_min_cos"], abs=1e-4)


def test_stability_float32_matches_float64(tmp_path, capsys):
    body = MODEL + '[dynamics]\nalpha = 0.1\ntokens = 4\ndtype = "DTYPE"\n'
    s32 = run(tmp_path, capsys, "stability", body, "float32")["equilibria"]
    s64 = run(tmp_path, capsys, "stability", body, "float64")["equilibria"]
    assert [e["name"] for e in s32] == [e["name"] for e in s64]
    assert [e["verdict"] for e in s32] == [e["verdict"] for e in s64]
    np.testing.assert_allclose([e["spectral_radius"] for e in s32], [e["spectral_radius"] for e in s64], rtol=1e-5)
    assert max(e["residual"] for e in s32) < 1e-5


def test_energy_float32_matches_float64(tmp_path, capsys):
    """The float32 T_eps(beta) curve was inf for every beta (the reduced ODE's tolerances are out of float32's reach)."""
    x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (3, 5, 3)))
    np.save(tmp_path / "x0.npy", x0 / np.linalg.norm(x0, axis=-1, keepdims=True))
    body = (MODEL + '[dynamics]\nalpha = 0.1\ntokens = 5\nsteps = 40\nbatch = 3\ninit = "x0.npy"\ndtype = "DTYPE"\n'
            '[energy]\npoints = 6\n')
    e32 = run(tmp_path, capsys, "energy", body, "float32")
    e64 = run(tmp_path, capsys, "energy", body, "float64")
    c32, c64 = e32["clustering"], e64["clustering"]
    assert np.all(np.isfinite(c32["T_eps"])) and c32["beta_c"] == pytest.approx(c64["beta_c"], rel=1e-12)
    np.testing.assert_allclose(c32["T_eps"], c64["T_eps"], rtol=1e-8)
    np.testing.assert_allclose(e32["energy"], e64["energy"], rtol=1e-4)
    np.testing.assert_allclose(e32["entropy"], e64["entropy"], rtol=1e-4)


@pytest.mark.slow
def test_basins_float32_matches_float64(tmp_path, capsys):
    body = MODEL + '[dynamics]\nalpha = 0.1\ntokens = 4\nsteps = 300\ntol = 1e-6\ndtype = "DTYPE"\n[basins]\nsamples = 96\nseed = 2\n'
    b32 = run(tmp_path, capsys, "basins", body, "float32")
    b64 = run(tmp_path, capsys, "basins", body, "float64")
    a32 = {a.get("label", a.get("name")): a for a in b32["attractors"]}
    a64 = {a.get("label", a.get("name")): a for a in b64["attractors"]}
    for name in set(a32) | set(a64):
        lo32, hi32 = a32[name]["interval"] if name in a32 else (0.0, 3.7 / 96)
        lo64, hi64 = a64[name]["interval"] if name in a64 else (0.0, 3.7 / 96)
        assert lo32 <= hi64 and lo64 <= hi32, (name, a32.get(name), a64.get(name))


@pytest.mark.slow  # about 20 s: the second CI step
def test_demo_runs_in_float32_as_a_user_runs_it(tmp_path, capsys):
    """The main job, ``attnflow demo``, with x64 off (float32, as in a user's process) at a small size: exit 0 and
    finite numbers (every tolerance it uses fits float32's floor)."""
    with jax.enable_x64(False):
        rc = main(["demo", "--samples", "40", "--out", str(tmp_path / "demo"), "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    doc = json.loads(out.out)
    finite(doc)
    assert doc["samples"] == 40 and (tmp_path / "demo").is_dir()
