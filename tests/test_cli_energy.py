"""`attnflow energy`: JSON contents against the library, figures, and one-line errors (exit 2)."""

import json
import re

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
    [("bogus = 1", "unknown key"), ("eps = 2.0", "eps must be a finite number in (0, 1)"), ("w = [1.0]", "both w and m"), ("members = 0", "members")],
)
def test_energy_bad_input_is_one_line(tmp_path, capsys, extra, msg):
    cfg = tmp_path / "d.toml"
    cfg.write_text(DISC + extra + "\n")
    rc, out, err = run_cli(["energy", str(cfg)], capsys)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_energy_missing_config(tmp_path, capsys):
    rc, out, err = run_cli(["energy", str(tmp_path / "nope.toml")], capsys)
    assert rc == 2 and "not found" in err


def test_energy_names_every_failing_member_and_help_defines_keys(tmp_path, capsys):
    """V = diag(1, 0.4, -0.3) with M = I has no gradient structure: some members' E drops along the map. The text
    lists each failing member with the first saved state where E dropped, against a NumPy evaluation of
    E = 1/(2 beta n^2) sum_ij exp(beta <x_i, x_j>) along the same trajectories (relative tolerance 1e-10)."""
    x0 = np.array(jax.random.normal(jax.random.PRNGKey(0), (8, 6, 3)))
    x0 /= np.linalg.norm(x0, axis=-1, keepdims=True)
    np.save(tmp_path / "x0.npy", x0)
    cfg = tmp_path / "f.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.4, 0], [0, 0, -0.3]]\n[dynamics]\nalpha = 0.1\ntokens = 6\n'
                   'steps = 60\nbatch = 8\ninit = "x0.npy"\ndtype = "float64"\n[energy]\nmembers = 8\npoints = 4\n')
    rc, out, err = run_cli(["energy", str(cfg), "--json"], capsys)
    assert rc == 0, err
    s = json.loads(out)
    model = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.3])), af.Attention("softmax"), 1.0), 0.1)
    traj = np.asarray(af.simulate(model, x0, steps=60, saves=60).trajectory)  # (61, 8, 6, 3)
    G = np.einsum("sbid,sbjd->sbij", traj, traj)
    E = np.exp(G).sum(axis=(-1, -2)) / (2 * 6**2)
    drop = np.diff(E, axis=0) / np.abs(E).max(axis=0) < -1e-10
    failing = [int(b) for b in np.flatnonzero(drop.any(axis=0))]
    assert failing, "the case must have failing members"
    assert [f["member"] for f in s["failures"]] == failing
    for f in s["failures"]:
        assert f["saved_state"] == 1 + int(np.argmax(drop[:, f["member"]])) and f["cause"] == "discrete_step"
    assert s["members_monotone"] == 8 - len(failing) and s["cause"] in ("none", "discrete_step")
    rc, text, err = run_cli(["energy", str(cfg)], capsys)
    lines = text.splitlines()
    assert f"{8 - len(failing)} of 8 traced members monotone" in lines
    h = next(i for i, line in enumerate(lines) if line.split()[:3] == ["member", "saved", "state"])
    assert lines[h].split() == ["member", "saved", "state", "step", "head", "cause"]
    assert [int(line.split()[0]) for line in lines[h + 1 : h + 1 + len(failing)]] == failing
    # --help: every [energy] key with its meaning, the abbreviations, no literal %%
    try:
        rc = main(["energy", "--help"])
    except SystemExit as e:
        rc = e.code
    assert rc in (0, None)
    helptext = " ".join(capsys.readouterr().out.split())
    assert "%%" not in helptext
    keys = helptext[helptext.index("[energy] keys: tol:"):]
    for key in ("tol", "members", "eps", "rho0", "points", "beta_max", "w", "m"):
        meaning = re.search(rf"(?:keys: |; ){key}(?: \(default [^)]*\))?: ([^;]+)", keys)
        assert meaning and len(meaning.group(1).split()) >= 3, key
    for word in ("radial_shadow", "integration_error", "beta_c", "T_eps", "E_h"):
        assert word in helptext
