"""The config loader and `attnflow simulate`: bad input is one line on stderr and exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from attnflow.cli import main
from attnflow.io.config import ConfigError, load_config

GOOD = """
[model]
d = 3
heads = 1
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
beta = 1.0
attention = "softmax"
mask = "full"
[dynamics]
time = "discrete"
alpha = 0.1
norm = "l2"
tokens = 5
steps = 40
saves = 4
batch = 6
dtype = "float64"
seed = 0
"""


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_simulate_json_and_files(tmp_path, capsys):
    cfg = write(tmp_path, GOOD)
    rc, out, err = run_cli(["simulate", str(cfg), "--out", str(tmp_path / "o"), "--json"], capsys)
    assert rc == 0, err
    s = json.loads(out)
    assert s["outcomes"]["not_converged"] == 6 and s["batch"] == 6
    z = np.load(tmp_path / "o" / "trajectories.npz")
    assert z["final"].shape == (6, 5, 3) and z["trajectory"].shape == (5, 6, 5, 3)
    np.testing.assert_array_equal(z["ts"], [0, 10, 20, 30, 40])
    assert (tmp_path / "o" / "sphere.png").stat().st_size > 10_000
    assert (tmp_path / "o" / "cosines.png").stat().st_size > 10_000


def test_continuous_multihead_npz_weights_and_init_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", Q=rng.normal(size=(2, 2, 4)), K=rng.normal(size=(2, 2, 4)), V=rng.normal(size=(2, 2, 4)), O=rng.normal(size=(2, 4, 2)))
    x0 = rng.normal(size=(3, 5, 4))
    np.save(tmp_path / "x0.npy", x0 / np.linalg.norm(x0, axis=-1, keepdims=True))
    text = """
[model]
d = 4
heads = 2
weights = "w.npz"
mask = "causal"
[dynamics]
time = "continuous"
t1 = 1.0
dt = 0.1
tokens = 5
batch = 3
init = "x0.npy"
dtype = "float64"
"""
    cfg = write(tmp_path, text)
    rc, out, err = run_cli(["simulate", str(cfg), "--json"], capsys)
    assert rc == 0, err
    c = load_config(cfg)
    assert c.build().attn.heads.num_heads == 2 and c.mask == "causal"
    np.testing.assert_allclose(c.initial(), np.load(tmp_path / "x0.npy"))


BAD = [
    ("missing file", None, "not found"),
    ("malformed", "[model\nd = 3", "malformed TOML"),
    ("beta", GOOD.replace("beta = 1.0", "beta = -1.0"), "beta must be a finite number > 0"),
    ("beta zero", GOOD.replace("beta = 1.0", "beta = 0"), "beta must be a finite number > 0"),
    ("kind", GOOD.replace('"softmax"', '"cosine"'), "unknown attention kind 'cosine'"),
    ("shape", GOOD.replace("[0.0, 0.0, -0.3]]", "[0.0, 0.0, -0.3], [1.0, 1.0, 1.0]]"), "V must have shape (3, 3)"),
    ("nonfinite", GOOD.replace("-0.3]", "nan]"), "non-finite"),
    ("mask", GOOD.replace('mask = "full"', 'mask = "window:x"'), "window"),
    ("saves", GOOD.replace("saves = 4", "saves = 7"), "must divide"),
    ("unknown key", GOOD.replace("seed = 0", "sead = 0"), "unknown key"),
    ("weights missing", GOOD.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", 'weights = "nope.npz"'), "not found"),
]


@pytest.mark.parametrize("name,text,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_exit_2(tmp_path, capsys, name, text, msg):
    cfg = tmp_path / "missing.toml" if text is None else write(tmp_path, text)
    rc, out, err = run_cli(["simulate", str(cfg)], capsys)
    assert rc == 2
    assert msg in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_weight_array_shapes_are_checked(tmp_path, capsys):
    np.savez(tmp_path / "w.npz", Q=np.ones((2, 2, 3)), K=np.ones((2, 2, 3)), V=np.ones((2, 3, 3)), O=np.ones((2, 3, 2)))
    cfg = write(tmp_path, GOOD.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", 'weights = "w.npz"').replace("heads = 1", "heads = 2"))
    rc, _, err = run_cli(["simulate", str(cfg)], capsys)
    assert rc == 2 and "V must have shape (2, 2, 3)" in err
    np.savez(tmp_path / "w.npz", Q=np.ones((2, 2, 3)), K=np.ones((2, 2, 3)), V=np.full((2, 2, 3), np.inf), O=np.ones((2, 3, 2)))
    rc, _, err = run_cli(["simulate", str(cfg)], capsys)
    assert rc == 2 and "non-finite" in err
    with pytest.raises(ConfigError, match="init file"):
        load_config(write(tmp_path, GOOD.replace('seed = 0', 'seed = 0\ninit = "x.npy"'))).initial()


def test_console_script_help_and_error():
    r = subprocess.run([sys.executable, "-m", "attnflow", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "simulate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "attnflow", "simulate", "--help"], capture_output=True, text=True)
    assert "--json" in r.stdout and "--out" in r.stdout
    r = subprocess.run([sys.executable, "-m", "attnflow", "simulate", "/nonexistent.toml"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize("backend", ["xla", "lanes"])
def test_backend_from_config_reaches_simulate(tmp_path, capsys, backend):
    cfg = write(tmp_path, GOOD.replace("seed = 0", f'seed = 0\nbackend = "{backend}"'))
    rc, out, err = run_cli(["simulate", str(cfg), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["backend"] == backend


def test_compile_cache_is_used_and_can_be_turned_off(tmp_path):
    """The command keeps compiled programs in $XDG_CACHE_HOME/attnflow/jax; --no-compile-cache leaves it empty."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.4, 0], [0, 0, -0.3]]\n[dynamics]\ntokens = 5\nsteps = 50\nbatch = 8\n')
    for flag, cache in ((["--no-compile-cache"], tmp_path / "off"), ([], tmp_path / "on")):
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        r = subprocess.run([sys.executable, "-m", "attnflow", *flag, "simulate", str(cfg), "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        stored = list((cache / "attnflow" / "jax").glob("*")) if (cache / "attnflow" / "jax").exists() else []
        assert bool(stored) == (not flag), (flag, stored)


def test_init_file_off_the_sphere_is_refused_for_the_sphere_flow(tmp_path, capsys):
    """A sphere flow's tangent projection holds on the sphere only: an init file with a token of norm != 1 is one
    line naming the state and token (it simulated silently, then raised a traceback); the l2 map normalises its
    first step and takes it."""
    x = np.random.default_rng(0).normal(size=(6, 5, 3))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    x[2, 3] *= 1.5
    np.save(tmp_path / "x.npy", x)
    flow = GOOD.replace('time = "discrete"', 'time = "continuous"\nt1 = 0.4\ndt = 0.1').replace('norm = "l2"', 'norm = "sphere"')
    flow = flow.replace('seed = 0', 'seed = 0\ninit = "x.npy"')
    rc, _, err = run_cli(["simulate", str(write(tmp_path, flow)), "--out", str(tmp_path / "o1")], capsys)
    assert rc == 2 and "state 2 token 3 has norm 1.5" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["simulate", str(write(tmp_path, GOOD.replace('seed = 0', 'seed = 0\ninit = "x.npy"'))),
                          "--out", str(tmp_path / "o2")], capsys)
    assert rc == 0, err
