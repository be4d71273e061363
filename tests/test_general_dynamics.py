"""Basins of any dynamics (docs/model.md section 12) against published values and independent computations:
the damped driven pendulum (bSTAB / pyBasin), the Grebogi map's basin entropy and uncertainty exponent
(Attractors.jl's tests), Newton's method for z^3 - 1 (minimal fatal shock), a bistable normal form (tipping, closed
form), NumPy loops for the entropies. float64."""

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnflow.analysis import general as g


class Pendulum(eqx.Module):
    alpha: float = 0.1
    T: float = 0.5
    K: float = 1.0

    def __call__(self, t, y):
        return jnp.stack([y[1], -self.alpha * y[1] + self.T - self.K * jnp.sin(y[0])])


class Grebogi(eqx.Module):
    a: float = 1.32
    b: float = 0.9
    J0: float = 0.3

    def __call__(self, k, y):
        th, x = y[0], y[1]
        return jnp.stack([th + self.a * jnp.sin(2 * th) - self.b * jnp.sin(4 * th) - x * jnp.sin(th),
                          -self.J0 * jnp.cos(th)])


class Newton(eqx.Module):
    def __call__(self, k, y):
        z = y[0] + 1j * y[1]
        z = z - (z ** 3 - 1) / (3 * z ** 2)
        return jnp.stack([z.real, z.imag])


class Bistable(eqx.Module):
    p: float

    def __call__(self, t, y):
        return y - y ** 3 + self.p


@pytest.mark.slow  # 10^4 members to t = 400 (about 10 s): run by the second CI step
def test_damped_driven_pendulum_fractions_cover_the_published_ones():
    """bSTAB / pyBasin: 0.152 (fixed point) and 0.848 (limit cycle), N = 10^4, standard error 0.0036."""
    low = -np.pi + np.arcsin(0.5)
    system = g.Flow(Pendulum(), g.Space.periodic([2 * np.pi, 0.0], low=[low, 0.0]))
    rng = np.random.default_rng(0)
    N = 10_000
    y0 = np.stack([rng.uniform(low, low + 2 * np.pi, N), rng.uniform(-10, 10, N)], 1)
    fr = g.basin_fractions(system, y0, g.Run(t1=400.0, dt=0.05, tail=400, tol=1e-2, match_tol=0.1))
    kinds = {a.kind: a for a in fr.attractors}
    assert set(kinds) == {"fixed point", "periodic orbit"} and fr.unknown == 0
    fp, lc = kinds["fixed point"], kinds["periodic orbit"]
    assert fp.stable and fp.state == pytest.approx([np.arcsin(0.5), 0.0], abs=1e-6)
    assert 1.1 < lc.period < 1.4 and fp.name.startswith("fixed point")
    for a, published in ((fp, 0.152), (lc, 0.848)):
        lo, hi = fr.intervals[a.label]
        assert lo <= published <= hi, (a.kind, fr.fraction(a.label), lo, hi)
        slo, shi = fr.simultaneous[a.label]
        assert slo <= lo and hi <= shi


@pytest.fixture(scope="module")
def grebogi_300():
    system = g.Map(Grebogi(), g.Space.periodic([2 * np.pi, 0.0]))
    sl = g.Slice.coordinates(0, 1, np.linspace(0, 2 * np.pi, 300), np.linspace(-0.5, 0.5, 300), [0.0, 0.0])
    return g.basin_map(system, sl, g.Run(steps=2000, tail=16, tol=1e-6, match_tol=1e-3), rows_per_chunk=70)


def test_grebogi_basin_entropy_matches_attractors_jl(grebogi_300):
    """Attractors.jl's test: 300 x 300 grid, boxes of 6: S_b in [0.40, 0.42], S_bb in [0.60, 0.61]; the two
    attractors are the fixed points (0, -J0) and (pi, J0)."""
    bm = grebogi_300
    states = sorted(tuple(np.round(a.state, 6)) for a in bm.attractors)
    assert states == [(0.0, -0.3), (round(np.pi, 6), 0.3)]
    Sb, Sbb = g.basin_entropy(bm.image.T, 6)  # image rows are x; Attractors.jl's array is (theta, x)
    assert 0.40 <= Sb < 0.42 and 0.60 < Sbb < 0.61
    assert Sbb < math.log(2)  # the S_bb > ln 2 test does not fire here (it is sufficient, not necessary)


def test_basin_map_labels_do_not_depend_on_the_block_size():
    system = g.Map(Grebogi(), g.Space.periodic([2 * np.pi, 0.0]))
    sl = g.Slice.coordinates(0, 1, np.linspace(0, 2 * np.pi, 60), np.linspace(-0.5, 0.5, 40), [0.0, 0.0])
    run = g.Run(steps=500, tail=8, tol=1e-6, match_tol=1e-3)
    one = g.basin_map(system, sl, run, rows_per_chunk=40)
    other = g.basin_map(system, sl, run, rows_per_chunk=7)
    np.testing.assert_array_equal(other.image, one.image)
    assert one.image.shape == (40, 60) and [a.label for a in one.attractors] == [a.label for a in other.attractors]


def test_grebogi_uncertainty_exponent():
    """Attractors.jl's test: a 251 x 251 grid, boxes of 3..15 pixels: alpha in [0.2, 0.3] (about 0.2 in Grebogi
    et al. 1983)."""
    system = g.Map(Grebogi(), g.Space.periodic([2 * np.pi, 0.0]))
    sl = g.Slice.coordinates(0, 1, np.linspace(0, 2 * np.pi, 251), np.linspace(-0.5, 0.5, 251), [0.0, 0.0])
    bm = g.basin_map(system, sl, g.Run(steps=2000, tail=16, tol=1e-6, match_tol=1e-3))
    ex = g.uncertainty_exponent(bm.image.T, eps=range(3, 16))
    assert 0.2 <= ex.alpha <= 0.3 and ex.lo < ex.alpha < ex.hi


def test_uncertainty_exponent_of_a_smooth_boundary_is_one():
    """A straight boundary (between columns 120 and 121, which no box size below divides): the boxes that straddle
    it are one column of boxes, f(eps) = 1 / floor(240 / eps) exactly, so alpha is 1 up to the floors."""
    img = np.zeros((240, 240), int)
    img[:, 121:] = 1
    eps = [3, 4, 5, 6, 8, 10, 12, 15]
    ex = g.uncertainty_exponent(img, eps=eps)
    np.testing.assert_allclose(ex.f, [1 / (240 // e) for e in eps])
    assert ex.alpha == pytest.approx(1.0, abs=0.02)


def _np_entropy(img, box):
    """Attractors.jl's basin_entropy, transcribed as a loop."""
    n0, n1 = img.shape
    Sb, Nb, N = 0.0, 0, 0
    for x in range(0, n0 - n0 % box, box):
        for y in range(0, n1 - n1 % box, box):
            vals = img[x:x + box, y:y + box].ravel()
            N += 1
            u, c = np.unique(vals, return_counts=True)
            p = c / len(vals)
            h = float(-np.sum(p * np.log(p)))
            Nb += len(u) > 1
            Sb += h
    return Sb / N, (Sb / Nb if Nb else math.nan)


@given(st.integers(2, 5), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_basin_entropy_equals_a_numpy_loop(k, box, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(-1, k, size=(37, 29))
    img[:, :10] = 0  # a region of one label: boxes with zero entropy
    got = g.basin_entropy(img, box)
    want = _np_entropy(img, box)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert (math.isnan(got[1]) and math.isnan(want[1])) or got[1] == pytest.approx(want[1], rel=1e-12)


def test_newton_minimal_fatal_shock_at_a_root():
    """Attractors.jl's minimal fatal shock test: about 0.622 at the roots of z^3 - 1 (here z = 1)."""
    fs = g.minimal_fatal_shock(g.Map(Newton()), [1.0, 0.0], g.Run(steps=100, tail=4, tol=1e-6, match_tol=1e-3),
                               directions=720, radii=100, r_max=1.5)
    assert 0.615 <= fs.lower <= fs.upper <= 0.63
    assert np.linalg.norm(fs.shock) == pytest.approx(fs.upper)
    # the shock found leaves the basin of z = 1: check it with a plain NumPy iteration
    z = complex(1 + fs.shock[0], fs.shock[1])
    for _ in range(200):
        z = z - (z ** 3 - 1) / (3 * z ** 2)
    assert abs(z - 1) > 0.5 and abs(z ** 3 - 1) < 1e-9


def test_tipping_and_continuation_of_a_bistable_normal_form():
    """dy/dt = y - y^3 + p: stable equilibria at y = -1 and 1 for p = 0; the lower one vanishes at the fold
    p = 2 / (3 sqrt 3) = 0.385. From p = 0 to 0.2 nothing tips (P = identity); to 0.5 the lower one tips to the upper
    with probability 1. Along p the attractors are matched to their predecessors (the upper keeps its label)."""
    y0 = np.linspace(-2, 2, 41)[:, None]
    run = g.Run(t1=40.0, dt=0.05, tail=16, tol=1e-6)
    before, mid, after = (g.Flow(Bistable(p)) for p in (0.0, 0.2, 0.5))
    tp = g.tipping(before, mid, y0, run)
    lower = next(a.label for a in tp.before if a.stable and a.state[0] < 0)
    upper = next(a.label for a in tp.before if a.stable and a.state[0] > 0)
    assert tp.matrix[lower, lower] == 1 and tp.matrix[upper, upper] == 1
    assert {a.label for a in tp.after} == {lower, upper}
    tp = g.tipping(before, after, y0, run)
    assert tp.matrix[lower, upper] == 1 and tp.matrix[upper, upper] == 1
    assert tp.lo[lower, upper] > 0.8  # Wilson interval of 20 / 20
    assert tp.unknown == 1  # the member that starts on the unstable y = 0
    c = g.continuation(lambda p: g.Flow(Bistable(p)), [0.0, 0.2, 0.35, 0.5], y0, run)
    ups = [next(a.label for a in f.attractors if a.stable and a.state[0] > 0) for f in c.fractions]
    assert len(set(ups)) == 1
    assert c.fractions[-1].counts == {ups[0]: 41}
    assert c.fractions[0].saddle == 1 and c.fractions[0].unknown == 1


def test_user_labelling_function_and_a_product_of_spheres():
    """Any labelling of the final segment, and a flow on two circles (the state (4,), two blocks of 2)."""

    class Align(eqx.Module):
        def __call__(self, t, y):  # each unit vector relaxes towards +e1: dx/dt = P(x) e1
            out = []
            for i in (0, 2):
                x = y[i:i + 2]
                e = jnp.array([1.0, 0.0])
                out.append(e - jnp.dot(x, e) * x)
            return jnp.concatenate(out)

    space = g.Space.product_of_spheres(2, 2)
    system = g.Flow(Align(), space)
    rng = np.random.default_rng(1)
    y0 = rng.normal(size=(50, 4))
    y0 = np.concatenate([y0, [[-1.0, 0.0, -1.0, 0.0], [1.0, 0.0, -1.0, 0.0]]])  # two saddles, exactly
    fr = g.basin_fractions(system, y0, g.Run(t1=30.0, dt=0.05, tail=8, tol=1e-6))
    stable = [a for a in fr.attractors if a.stable]
    assert len(stable) == 1 and fr.counts[stable[0].label] == 50  # every random start reaches (e1, e1)
    np.testing.assert_allclose(stable[0].state, [1, 0, 1, 0], atol=1e-6)
    # (-e1, -e1) and (e1, -e1) are fixed but unstable on the circles (tangent Jacobian): in no basin
    assert fr.saddle == 2 and fr.unknown == 2
    assert {a.kind for a in fr.attractors if not a.stable} == {"unstable fixed point"}
    fr = g.basin_fractions(system, y0, g.Run(t1=30.0, dt=0.05, tail=8), label=lambda seg: int(seg[-1, 1] > 0))
    assert set(fr.counts) <= {0, 1} and sum(fr.counts.values()) == 52


@given(st.lists(st.floats(-50, 50), min_size=2, max_size=2), st.lists(st.floats(-50, 50), min_size=2, max_size=2))
def test_periodic_space_wraps_and_measures_the_short_way(a, b):
    space = g.Space.periodic([2 * np.pi, 0.0], low=[-1.0, 0.0])
    pa = np.asarray(space.project(jnp.asarray(a)))
    assert -1.0 - 1e-12 <= pa[0] < -1.0 + 2 * np.pi + 1e-12 and pa[1] == a[1]
    d = float(space.distance(jnp.asarray(a), jnp.asarray(b)))
    dth = abs((a[0] - b[0] + np.pi) % (2 * np.pi) - np.pi)
    assert d == pytest.approx(math.hypot(dth, a[1] - b[1]), abs=1e-9)
    assert float(space.distance(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(float(space.distance(jnp.asarray(b), jnp.asarray(a))))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="periods"):
        g.Space.periodic([-1.0])
    with pytest.raises(ValueError, match="t1"):
        g.basin_fractions(g.Flow(Bistable(0.0)), np.zeros((2, 1)), g.Run(steps=10))
    with pytest.raises(ValueError, match="steps"):
        g.basin_fractions(g.Map(Newton()), np.zeros((2, 2)), g.Run(t1=1.0))
    with pytest.raises(ValueError, match="batch, m"):
        g.basin_fractions(g.Map(Newton()), np.zeros(2), g.Run(steps=10, tail=2))
    with pytest.raises(ValueError, match="box"):
        g.basin_entropy(np.zeros((4, 4), int), 5)


def test_an_attention_model_through_attention_system_partitions_members_like_simulate():
    """The layer map of docs/model.md section 3 as a general Map on (n d,): the members it puts on one attractor are
    exactly those whose final states under attnflow.simulate coincide."""
    import jax

    import attnflow as af

    model = af.LayerMap(af.SelfAttention(af.Heads.single(np.diag([1.0, 0.4, -0.3])), beta=1.0), alpha=0.5)
    n, d = 3, 3
    x0 = np.asarray(af.evolve.sample.sphere(jax.random.PRNGKey(0), (60, n, d)))
    system = g.attention_system(model, n)
    assert system.space.spheres == ((0, 1, 2), (3, 4, 5), (6, 7, 8))
    fr = g.basin_fractions(system, x0.reshape(60, -1), g.Run(steps=3000, tail=4, tol=1e-9, match_tol=1e-4))
    assert fr.unknown == 0 and len(fr.attractors) >= 2
    final = np.asarray(af.simulate(model, x0, steps=3000).final).reshape(60, -1)
    for i in range(60):
        same_g = fr.labels == fr.labels[i]
        same_s = np.max(np.abs(final - final[i]), axis=1) < 1e-6
        np.testing.assert_array_equal(same_g, same_s)


@pytest.mark.slow  # three subprocesses that compile (about 30 s): run by the second CI step
def test_cli_geometry_names_attractors_resumes_and_refuses(tmp_path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "g.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\n'
                   'time = "discrete"\nalpha = 0.5\ntokens = 3\nsteps = 1500\ndtype = "float64"\n'
                   "[geometry]\nresolution = 24\nrows_per_block = 8\nshock = true\ndirections = 8\nradii = 8\n"
                   "r_max = 2.0\ntipping_beta = 3.0\n")
    out = tmp_path / "out"
    run = lambda *a: subprocess.run([sys.executable, "-m", "attnflow", "--no-compile-cache", "geometry", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    names = {b["attractor"]["name"] for b in first["fractions"]["basins"]}
    assert "consensus +v1" in names  # the attention model's own names
    assert sum(b["count"] for b in first["fractions"]["basins"]) + first["fractions"]["unknown"] == 24 * 24
    for name in ("geometry.json", "basin_map.npz", "basin_map.png", "map_partial.npz"):
        assert (out / name).exists(), name
    assert first["tipping"]["matrix"] and len(first["fatal_shocks"]) >= 1
    # as if interrupted after the first block: the rerun computes the rest and gives the same answer
    z = dict(np.load(out / "map_partial.npz"))
    z["rows_done"] = np.asarray(8)
    z["image"][8:] = -2
    np.savez(out / "map_partial.npz", **z)
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0 and "resuming after row 8" in r.stderr
    assert json.loads(r.stdout) == first
    # a truncated partial map is computed again (it raised BadZipFile, a traceback)
    (out / "map_partial.npz").write_bytes((out / "map_partial.npz").read_bytes()[:500])
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr
    assert json.loads(r.stdout) == first
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nd = 4\nV = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], '
                   '[0.0, 0.0, 0.0, 1.0]]\n[geometry]\nresolution = 4\nbox = 2\n')
    r = run(str(bad))
    assert r.returncode == 2 and "d must be 2 or 3" in r.stderr and len(r.stderr.strip().splitlines()) == 1


class Pitchfork(eqx.Module):
    p: float

    def __call__(self, t, y):
        return self.p * y - y ** 3


def test_relabelled_attractors_are_renamed_and_saddles_after_a_change_are_unknown():
    run = g.Run(t1=40.0, dt=0.05, tail=16, tol=1e-6)
    c = g.continuation(lambda p: g.Flow(Bistable(p)), [0.0, 0.5], np.linspace(-2, 2, 41)[:, None], run)
    for f in c.fractions:
        for a in f.attractors:
            assert a.name.startswith(f"{a.kind} {a.label}"), a.name
    # y = 0 is stable for p = -1 and a saddle for p = 1: a member left on it after the change is in no basin
    tp = g.tipping(g.Flow(Pitchfork(-1.0)), g.Flow(Pitchfork(1.0)), np.array([[0.0], [0.5], [-0.5]]), run)
    assert tp.unknown == 3 and np.all(np.isnan(tp.matrix) | (tp.matrix == 0))
    user = g.continuation(lambda p: g.Flow(Bistable(p)), [0.0, 0.5], np.linspace(-2, 2, 41)[:, None], run,
                          label=lambda seg: int(seg[-1, 0] > 0))
    assert user.fractions[1].counts == {1: 41}


def test_t_quantiles_and_too_few_box_sizes():
    from scipy import stats

    from attnflow.analysis.general._basins import t975

    for df in (1, 2, 3, 5, 11, 30, 31, 60, 200):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3)
    img = np.zeros((40, 40), int)
    img[:, 21:] = 1
    ex = g.uncertainty_exponent(img, eps=[3, 4, 5])  # three box sizes: too few to fit with an interval
    assert math.isnan(ex.alpha) and math.isnan(ex.lo)
