"""`attnflow energy`: JSON contents against the library, figures, and one-line errors (exit 2)."""

import json

import jax
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import energy as en
from attnflow.analysis import equiangular as eq
from attnflow.cli import main

CONT = """
[model]
d = 3
heads = 2
weights = "w.npz"
beta = 1.5
attention = "softmax"
[dynamics]
time = "continuous"
norm = "sphere"
tokens = 6
t1 = 3.0
dt = 0.01
saves = 30
batch = 3
dtype = "float64"
seed = 1
"""

DISC = """
[model]
d = 4
heads = 1
V = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
beta = 1.0
[dynamics]
time = "discrete"
alpha = 0.2
tokens = 4
steps = 30
batch = 2
dtype = "float64"
[energy]
rho0 = 0.1
points = 12
"""


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def two_heads(tmp_path):
    rng = np.random.default_rng(0)
    Ms = []
    for _ in range(2):
        A = rng.normal(size=(3, 3))
        Ms.append((A + A.T) / 2)
    eye = np.eye(3)
    np.savez(tmp_path / "w.npz", Q=np.stack([eye, eye]), K=np.stack(Ms), V=np.stack(Ms), O=np.stack([eye, eye]))
    return Ms


def test_energy_json_continuous_matches_library(tmp_path, capsys):
    Ms = two_heads(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONT)
    rc, out, err = run_cli(["energy", str(cfg), "--json", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    s = json.loads(out)
    for key in ("times", "energy", "entropy", "monotone", "head_energy", "rate", "explanation"):
        assert key in s
    assert len(s["times"]) == len(s["energy"]) == len(s["entropy"]) == 31
    # the same run through the public API
    eye = np.eye(3)
    heads = af.Heads(Q=np.stack([eye, eye]), K=np.stack(Ms), V=np.stack(Ms), O=np.stack([eye, eye]))
    flow = af.SphereFlow(af.SelfAttention(heads, af.Attention("softmax"), 1.5))
    x0 = af.sample.sphere(jax.random.PRNGKey(1), (3, 6, 3), dtype="float64")
    sol = af.simulate(flow, x0, t1=3.0, dt=0.01, saves=30)
    tr = en.energy_trace(flow, sol.trajectory, sol.ts)
    np.testing.assert_allclose(s["energy"], tr.energy[:, 0], rtol=1e-10)
    np.testing.assert_allclose(s["entropy"], tr.entropy[:, 0], rtol=1e-10)
    assert s["monotone"] == bool(tr.monotone[0])
    assert s["condition"]["total_sphere"] is False
    for f in ("energy_entropy.png", "head_contributions.png"):
        assert (tmp_path / "o" / f).stat().st_size > 10_000


def test_energy_discrete_scalar_heads_clustering_figure(tmp_path, capsys):
    cfg = tmp_path / "d.toml"
    cfg.write_text(DISC)
    rc, out, err = run_cli(["energy", str(cfg), "--json", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0, err
    s = json.loads(out)
    assert s["rate"] is None and len(s["energy"]) == 31  # saves default: every step (30 divides 30)
    c = s["clustering"]
    assert c["exact_scalar_heads"] and c["beta_c"] == pytest.approx(eq.critical_beta(n=4, rho0=0.1, m=[1.0]))
    assert len(c["T_eps"]) == 12 and np.all(np.diff(c["T_eps"]) > 0)
    assert (tmp_path / "o" / "clustering_time.png").stat().st_size > 10_000
    # human-readable output
    rc, out, err = run_cli(["energy", str(cfg)], capsys)
    assert rc == 0 and "beta_c" in out and "member 0" in out


@pytest.mark.parametrize(
    "extra, msg",
    [("bogus = 1", "unknown key"), ("eps = 2.0", "eps must lie"), ("w = [1.0]", "both w and m"), ("members = 0", "members")],
)
def test_energy_bad_input_is_one_line(tmp_path, capsys, extra, msg):
    cfg = tmp_path / "d.toml"
    cfg.write_text(DISC + extra + "\n")
    rc, out, err = run_cli(["energy", str(cfg)], capsys)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_energy_missing_config(tmp_path, capsys):
    rc, out, err = run_cli(["energy", str(tmp_path / "nope.toml")], capsys)
    assert rc == 2 and "not found" in err
