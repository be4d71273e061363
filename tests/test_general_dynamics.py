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
    assert tp.matrix.shape[1] > lower and tp.matrix[lower, lower] == 0  # the vanished attractor's column: zeros
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


# ------------------------------------------------------------------ recurrence: cycles, maps, phantoms (section 12.1)
class Hopf(eqx.Module):
    """r' = r (-mu + 2 r^2 - r^4), theta' = w: stable origin, unstable cycle r_u^2 = 1 - sqrt(1 - mu), stable cycle
    r_s^2 = 1 + sqrt(1 - mu) of period 2 pi / w."""

    mu: float = 0.5
    w: float = 1.0

    def __call__(self, t, y):
        r2 = y[0] ** 2 + y[1] ** 2
        gr = -self.mu + 2 * r2 - r2 ** 2
        return jnp.stack([y[0] * gr - self.w * y[1], y[1] * gr + self.w * y[0]])


@pytest.mark.parametrize("tail", [400, 512, 700])
def test_one_limit_cycle_is_one_attractor_whatever_the_sampling_phase(tail):
    """The Hopf normal form (mu = 0.5): two attractors for any segment length (the second half spanning a fractional
    number of periods split the cycle into 25 attractors at tail = 400, 11 at 700). Closed forms: the period 2 pi,
    the cycle's per-coordinate mean 0 and spread r_s / sqrt 2, the origin's basin the disk r < r_u. float64:
    period to 1e-5, features to 1e-4."""
    rs, ru = math.sqrt(1 + math.sqrt(0.5)), math.sqrt(1 - math.sqrt(0.5))
    y0 = np.random.default_rng(2).uniform(-1, 1, (120, 2))
    fr = g.basin_fractions(g.Flow(Hopf()), y0, g.Run(t1=60.0, dt=0.05, tail=tail))
    assert len(fr.attractors) == 2 and fr.unknown == 0
    cyc = next(a for a in fr.attractors if a.kind == "periodic orbit")
    fp = next(a for a in fr.attractors if a.kind == "fixed point")
    assert cyc.period == pytest.approx(2 * np.pi, abs=1e-5)
    np.testing.assert_allclose(cyc.features, [0, 0, rs / math.sqrt(2), rs / math.sqrt(2)], atol=1e-4)
    assert np.linalg.norm(cyc.state) == pytest.approx(rs, abs=1e-4)
    inside = np.sum(y0 ** 2, 1) < ru ** 2
    np.testing.assert_array_equal(fr.labels == fp.label, inside)


def _vdp_period_scipy():
    """The van der Pol (mu = 1) period from SciPy: upward zero crossings of x after the transient."""
    from scipy.integrate import solve_ivp

    ev = lambda t, y: y[0]  # noqa: E731
    ev.direction = 1
    sol = solve_ivp(lambda t, y: [y[1], (1 - y[0] ** 2) * y[1] - y[0]], (0, 120), [2.0, 0.0], method="DOP853",
                    rtol=1e-11, atol=1e-12, events=ev)
    return float(np.diff(sol.t_events[0][-6:]).mean())


def test_van_der_pol_cycle_is_one_attractor_with_no_unknown_member():
    """x'' - (1 - x^2) x' + x = 0: every member (but the unstable origin) on one cycle. The lag used to be the first
    sample within tol + h of the last, several samples early on the slow part, and half the members were unknown
    (144 / 300); the cycle split into 7-19 attractors. Period against SciPy (DOP853) to 1e-4 (RK4, dt = 0.05)."""
    vdp = g.Flow(lambda t, y: jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]]))
    y0 = np.random.default_rng(3).uniform(-3, 3, (60, 2))
    fr = g.basin_fractions(vdp, y0, g.Run(t1=100.0, dt=0.05, tail=400))
    assert fr.unknown == 0 and len(fr.attractors) == 1 and fr.counts == {0: 60}
    assert fr.attractors[0].period == pytest.approx(_vdp_period_scipy(), abs=1e-4)


def test_a_rotating_cycle_on_a_periodic_coordinate_is_one_attractor():
    """theta' = 1 + 0.5 sin theta on the circle: one rotating orbit of period 2 pi / sqrt(1 - 0.25) (5 attractors
    and 28 unknown of 64 before)."""
    fr = g.basin_fractions(g.Flow(lambda t, y: 1.0 + 0.5 * jnp.sin(y), g.Space.periodic([2 * np.pi])),
                           np.linspace(0, 2 * np.pi, 32, endpoint=False)[:, None], g.Run(t1=40.0, dt=0.05, tail=600))
    assert len(fr.attractors) == 1 and fr.unknown == 0
    assert fr.attractors[0].period == pytest.approx(2 * np.pi / math.sqrt(0.75), abs=1e-5)


@pytest.mark.parametrize("p", [2, 3, 5, 8])
def test_exact_periodic_segments_are_orbits_of_their_period(p):
    """A segment that repeats every p samples (a map's cycle): periodic with lag p (it was unknown: h, the largest
    step, is the orbit's diameter, so the segment never went 'farther than 2 (tol + h)')."""
    rng = np.random.default_rng(p)
    seg = np.tile(rng.uniform(-1, 1, (p, 3)), (64 // p + 1, 1))[None, :64]
    for flow in (True, False):
        kind, lag = g.recurrence(g.Space(), seg, 1e-3, flow=flow)
        assert kind[0] == 2 and lag[0] == p
    kind, _ = g.recurrence(g.Space(), seg + 0.01 * np.arange(64)[None, :, None], 1e-3, flow=False)
    assert kind[0] == 0  # drifting by 0.01 a sample: not an orbit


@pytest.mark.parametrize("r, p", [(3.2, 2), (3.5, 4), (3.83, 3)])
def test_logistic_map_cycles(r, p):
    """x <- r x (1 - x) in its periodic windows: one cycle of period p attracts (0, 1) (200 / 200 unknown before).
    The cycle's mean over one period against a NumPy iteration (and for p = 2 the closed form (r + 1) / (2 r))."""
    y0 = np.random.default_rng(0).uniform(0.01, 0.99, (50, 1))
    fr = g.basin_fractions(g.Map(lambda k, y: r * y * (1 - y)), y0, g.Run(steps=3000, tail=64, tol=1e-6))
    assert fr.unknown == 0 and len(fr.attractors) == 1
    a = fr.attractors[0]
    assert a.kind == "periodic orbit" and a.lag == p and a.period == p
    x = 0.3
    for _ in range(5000):
        x = r * x * (1 - x)
    orb = [x]
    for _ in range(p - 1):
        orb.append(r * orb[-1] * (1 - orb[-1]))
    assert a.features[0] == pytest.approx(np.mean(orb), abs=1e-6)
    assert a.features[1] == pytest.approx(np.std(orb), abs=1e-6)
    if p == 2:
        assert a.features[0] == pytest.approx((r + 1) / (2 * r), abs=1e-6)


def test_henon_period_two_attractor():
    """Henon map a = 0.9, b = 0.3: a period-2 attractor (all unknown before); its points against a NumPy loop."""
    henon = g.Map(lambda k, y: jnp.stack([1 - 0.9 * y[0] ** 2 + y[1], 0.3 * y[0]]))
    y0 = np.random.default_rng(4).uniform(-0.3, 0.3, (30, 2))
    fr = g.basin_fractions(henon, y0, g.Run(steps=2000, tail=32, tol=1e-6))
    assert fr.unknown == 0 and len(fr.attractors) == 1 and fr.attractors[0].lag == 2
    x, y = 0.1, 0.1
    for _ in range(3000):
        x, y = 1 - 0.9 * x * x + y, 0.3 * x
    assert min(np.linalg.norm(fr.attractors[0].state - [x, y]),
               np.linalg.norm(fr.attractors[0].state - [1 - 0.9 * x * x + y, 0.3 * x])) < 1e-6


def test_converging_spirals_and_chaos_are_not_orbits():
    """A spiral that loses less than tol + h per turn, and chaos, are unknown (docs 12.1): the whole segment must
    recur. Synthetic: y = A e^{-lam t} (cos t, sin t) sampled at dt = 0.05, losing 0.5 tol per turn (each turn
    passes a one-period test, the segment does not); the same with lam = 0 is an orbit of period 2 pi. Systems: the
    unforced Duffing oscillator (delta = 0.02, only two stable foci: 27 phantom orbits holding 48 of 150 members
    before; 2 with 14 members at t = 400 without the trend test) and Lorenz (7 phantom orbits before)."""
    t = np.arange(512) * 0.05
    A, tol = 0.1, 1e-3
    lam = -math.log(1 - 0.5 * tol / A) / (2 * np.pi)
    spiral = A * np.exp(-lam * t)[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    circle = A * np.stack([np.cos(t), np.sin(t)], 1)
    # and a spiral whose whole-segment drift is below tol (A = 0.007, losing 4.4% a turn, as Duffing's members at
    # t = 400): the mismatch two periods back is more than twice that one period back, a trend towards a limit
    # A (its distance) > tol away
    small = 0.007 * np.exp(-0.01 * t)[:, None] * np.stack([np.cos(t), np.sin(t)], 1)
    assert np.max(np.abs(small[:-126] - small[126:])) < tol  # (it passes every test on the drift alone)
    kind, lag = g.recurrence(g.Space(), np.stack([spiral, circle]), tol)
    assert list(kind) == [0, 2] and lag[1] * 0.05 == pytest.approx(2 * np.pi, abs=1e-6)
    assert g.recurrence(g.Space(), small[None, :256], tol)[0][0] == 0
    duffing = g.Flow(lambda t, y: jnp.stack([y[1], -0.02 * y[1] + y[0] - y[0] ** 3]))
    fr = g.basin_fractions(duffing, np.random.default_rng(1).uniform(-2, 2, (60, 2)), g.Run(t1=100.0, dt=0.05, tail=256))
    assert not any(a.kind == "periodic orbit" for a in fr.attractors)
    lorenz = g.Flow(lambda t, y: jnp.stack([10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - 8 / 3 * y[2]]))
    y0 = np.random.default_rng(6).uniform(-15, 15, (40, 3)) + [0, 0, 25]
    for tail in (256, 1000):
        fr = g.basin_fractions(lorenz, y0, g.Run(t1=40.0, dt=0.01, tail=tail))
        assert fr.unknown == 40 and not fr.attractors


class Pair(eqx.Module):
    """Two unit vectors on circles attracting each other: x_i' = P(x_i) x_j. Every consensus x_1 = x_2 is a fixed
    point (a circle of them: a zero tangent eigenvalue), attracting almost every start."""

    def __call__(self, t, y):
        a, b = y[:2], y[2:]
        return jnp.concatenate([b - jnp.dot(a, b) * a, a - jnp.dot(a, b) * b])


@pytest.mark.filterwarnings("ignore:members up to")  # a continuum merges in patches of match_tol (docs 12.1)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_continuum_of_fixed_points_is_neutral_not_unstable(dtype):
    """The tangent Jacobian at consensus has eigenvalues 0 (the symmetry) and -2 (closed form): verdict neutral
    (within eigen.tolerance of the dtype: 1e-4 float32, 1e-8 float64), and every member counts in a basin. Before,
    max Re < -1e-9 was required: float32 15 of 40 members were on 'saddles', float64 all 40."""
    from attnflow.analysis.eigen import tolerance

    y0 = np.random.default_rng(0).normal(size=(20, 4)).astype(dtype)
    fr = g.basin_fractions(g.Flow(Pair(), g.Space.product_of_spheres(2, 2)), y0, g.Run(t1=40.0, dt=0.05, tail=16))
    assert fr.saddle == 0 and fr.unknown == 0 and sum(fr.counts.values()) == 20
    assert {a.verdict for a in fr.attractors} == {"neutral"} and {a.stable for a in fr.attractors} == {None}
    assert all(a.kind == "fixed point" and a.name.endswith("(neutral)") for a in fr.attractors)
    for a in fr.attractors:  # consensus: the two blocks agree (to the dtype's tolerance)
        np.testing.assert_allclose(a.state[:2], a.state[2:], atol=10 * tolerance(dtype))


class CircleFourfold(eqx.Module):
    """theta' = -sin(4 theta) on the unit circle (Cartesian (2,)): stable at theta = 0, unstable at +-pi / 4."""

    def __call__(self, t, y):
        th = jnp.arctan2(y[1], y[0])
        return -jnp.sin(4 * th) * jnp.stack([-y[1], y[0]])


def test_minimal_fatal_shock_on_a_circle_is_tangent():
    """On S^1 (state (2,)) the shock is tangent: from e1 a shock r (0, +-1) projects to the angle atan r, so the
    boundary pi / 4 is reached at r = tan(pi / 4) = 1 (closed form). Before, the 2-D branch used all directions of
    R^2 (the radial one included): 1 / sqrt 2."""
    system = g.Flow(CircleFourfold(), g.Space.product_of_spheres(1, 2))
    fs = g.minimal_fatal_shock(system, [1.0, 0.0], g.Run(t1=30.0, dt=0.05, tail=8, tol=1e-6), radii=20, r_max=2.0,
                               refine=16)
    assert fs.upper == pytest.approx(1.0, abs=1e-3) and fs.lower <= fs.upper
    assert abs(fs.shock[0]) < 1e-12 and fs.tested == 2 * 20 + 2 * 16


def test_minimal_fatal_shock_from_a_limit_cycle():
    """From (r_s, 0) on the Hopf cycle the nearest boundary is the unstable cycle: r_s - r_u = 0.7654 radially inward
    (closed form), whatever the segment length (it depended on the sampling phase before)."""
    rs, ru = math.sqrt(1 + math.sqrt(0.5)), math.sqrt(1 - math.sqrt(0.5))
    for tail in (400, 512):
        fs = g.minimal_fatal_shock(g.Flow(Hopf()), [rs, 0.0], g.Run(t1=60.0, dt=0.05, tail=tail), directions=8,
                                   radii=8, r_max=1.0, refine=12)
        assert fs.upper == pytest.approx(rs - ru, abs=1e-3)
        np.testing.assert_allclose(fs.shock, [-fs.upper, 0.0], atol=1e-9)


def test_attractors_closer_than_match_tol_merge_with_a_warning():
    """Stable points 0 and 0.04 (x' = -k x (x - 0.02)(x - 0.04)) merge at match_tol = 0.05: a warning says so;
    match_tol = 0.01 separates them with fractions 1/2 each (exact for the symmetric start grid)."""
    f = g.Flow(lambda t, y: -1e4 * y * (y - 0.02) * (y - 0.04))
    y0 = np.linspace(-0.02, 0.06, 41)[:, None] + 1e-6
    with pytest.warns(UserWarning, match="match_tol"):
        fr = g.basin_fractions(f, y0, g.Run(t1=5.0, dt=0.005, tail=64, match_tol=0.05))
    assert len(fr.attractors) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fr = g.basin_fractions(f, y0, g.Run(t1=5.0, dt=0.005, tail=64, match_tol=0.01))
    assert sorted(round(float(a.state[0]), 6) for a in fr.attractors if a.stable) == [0.0, 0.04]


def test_bad_runs_and_states_are_refused_before_any_work():
    """One ValueError each, not a traceback from inside JAX."""
    f = g.Flow(lambda t, y: y - y ** 3)
    R = g.Run(t1=2.0, dt=0.05, tail=8)
    bad = [
        lambda: g.basin_fractions(f, np.array([[2], [-2]]), R),  # integer states
        lambda: g.basin_fractions(f, np.array([[2.0 + 0j]]), R),  # complex states
        lambda: g.basin_fractions(f, np.zeros((0, 1)), R),  # no member
        lambda: g.Run(t1=2.0, dt=0.0),
        lambda: g.Run(t1=2.0, dt=-0.05),
        lambda: g.Run(t1=2.0, tail=0),
        lambda: g.Run(t1=2.0, tail=1),
        lambda: g.Run(t1=2.0, chunk=0),
        lambda: g.basin_fractions(g.Flow(lambda t, y: y, g.Space(spheres=((0, 5),))), np.ones((2, 2)), R),
        lambda: g.basin_fractions(g.Flow(lambda t, y: jnp.concatenate([y, y])), np.ones((2, 1)), R),
        lambda: g.basin_fractions(g.Flow(lambda t, y: jnp.sum(y - y ** 3)), np.ones((2, 2)), R),
        lambda: list(g.final_segments(f, np.ones((2, 1)), steps=10, dt=0.0)),
        lambda: list(g.final_segments(f, np.ones((2, 1)), steps=10, chunk=0)),
    ]
    for fn in bad:
        with pytest.raises(ValueError):
            fn()


# ---- recurrence: an orbit must move, a flow's period is its real one (not a multiple), a settled cycle is an orbit


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_member_still_creeping_to_a_fixed_point_is_no_periodic_orbit(dtype):
    # y' = -0.2 y: one attractor, the node 0 (a 1-D flow has no periodic orbit). Members whose segment drifts just
    # over tol failed the fixed-point test and used to pass the lag-2..4 test (each sample within tol of an earlier
    # one), counted as "periodic orbits" of spread 4e-7; now they are unknown
    fr = g.basin_fractions(g.Flow(lambda t, y: -0.2 * y), np.linspace(0.0, 0.5, 2001, dtype=dtype)[:, None],
                           g.Run(t1=40.0, dt=0.05))
    assert [a.kind for a in fr.attractors] == ["fixed point"]
    assert fr.counts[0] + fr.unknown == 2001 and fr.unknown > 0
    # the same in a map: y <- 0.995 y
    fm = g.basin_fractions(g.Map(lambda k, y: 0.995 * y), np.linspace(0.0, 1.0, 801, dtype=dtype)[:, None],
                           g.Run(steps=1000, tail=64))
    assert [a.kind for a in fm.attractors] == ["fixed point"]


def _hopf(t, y):
    r2 = y[0] ** 2 + y[1] ** 2
    return jnp.stack([y[0] * (1 - r2) - y[1], y[1] * (1 - r2) + y[0]])


def test_a_flows_orbit_has_its_real_period_not_a_whole_sample_multiple():
    # the cycle r = 1 of period 2 pi sampled at dt = 0.05: 377 samples (18.85 = 6 pi to 4e-4) return within tol,
    # 126 do not (126 x 0.05 misses 2 pi by 0.017): the interpolated period comes first
    y0 = np.random.default_rng(0).uniform(-2, 2, (40, 2))
    fr = g.basin_fractions(g.Flow(_hopf), y0, g.Run(t1=70.0, dt=0.05, tail=1000, tol=1e-3))
    assert [a.kind for a in fr.attractors] == ["periodic orbit"]
    assert abs(fr.attractors[0].period - 2 * np.pi) < 1e-5 and fr.counts[0] == 40


def test_a_settled_cycle_sampled_finely_is_an_orbit():
    # dt = 0.01: the mismatch one and two periods back (4e-8, 9e-8) is what tau's resolution leaves, growing with the
    # periods (r_2 = 2 r_1); it used to be read as a spiral converging to a limit 0.01 away, and every member unknown
    y0 = np.random.default_rng(0).uniform(-2, 2, (20, 2))
    fr = g.basin_fractions(g.Flow(_hopf), y0, g.Run(t1=60.0, dt=0.01, tail=1600, tol=1e-3))
    assert fr.unknown == 0 and fr.counts[0] == 20
    assert abs(fr.attractors[0].period - 2 * np.pi) < 1e-5


# ---- continuation never reuses a label, an unknown member is no fatal shock, bad arguments are refused


def test_continuation_never_gives_a_vanished_attractors_label_to_a_new_one():
    def make(v):  # value 0: stable points 0, 2, 4; value 1: 4 has vanished; value 2: a new one at 10
        if v == 0:
            return g.Flow(lambda t, y: -jnp.sin(jnp.pi * y))
        if v == 1:
            return g.Flow(lambda t, y: jnp.where(y < 3, -jnp.sin(jnp.pi * y), -1.0))
        return g.Flow(lambda t, y: jnp.where(y < 3, -jnp.sin(jnp.pi * y), -(y - 10.0)))

    c = g.continuation(make, [0, 1, 2], np.linspace(-0.9, 4.9, 30)[:, None], g.Run(t1=40.0, dt=0.05, tail=32))
    where = {}  # label -> the positions it named, over the whole continuation
    for f in c.fractions:
        for a in f.attractors:
            where.setdefault(a.label, set()).add(round(float(a.state[0]), 3) + 0.0)
    assert where == {0: {0.0}, 1: {2.0}, 2: {4.0}, 3: {10.0}}


def test_a_member_that_settles_nowhere_is_no_fatal_shock():
    # x' = x - x^3, y' = -y from (1, 0): the minimal fatal shock is exactly 1 (along -x). A run too short for the
    # members near the boundary to settle labels them unknown: they used to count as fatal (upper 0.95)
    s = g.Flow(lambda t, y: jnp.stack([y[0] - y[0] ** 3, -y[1]]))

    def label(seg):
        if np.max(np.abs(seg - seg[-1])) > 1e-3:
            return -1
        return 0 if seg[-1, 0] > 0 else 1

    fs = g.minimal_fatal_shock(s, [1.0, 0.0], g.Run(t1=6.0, dt=0.05, tail=8), directions=64, radii=20, r_max=2.0,
                               label=label)
    assert fs.unknown > 0
    assert 1.0 <= fs.upper < 1.06 and fs.lower <= 1.0
    lab, _ = g.label_members(s, np.array([[1.0, 0.0]]) + fs.shock, g.Run(t1=6.0, dt=0.05, tail=8), label=label)
    assert lab[0] == 1  # the shock reported reaches the other attractor


def test_bad_arguments_of_the_geometry_measures_are_refused():
    s = g.Flow(lambda t, y: y - y ** 3)
    run = g.Run(t1=10.0, tail=32)
    for kw in (dict(r_max=-1.0), dict(r_max=math.inf), dict(radii=0), dict(directions=0), dict(refine=-1),
               dict(radii=2.5)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            g.minimal_fatal_shock(s, [1.0], run, **kw)
    img = np.zeros((10, 10), int)
    img[:, 5:] = 1
    for box in (0, 2.5, True):
        with pytest.raises(ValueError, match="box"):
            g.basin_entropy(img, box)
    for eps in ([0, 1, 2, 3, 4], [-3, 4, 5, 6, 7], [3, 4, 5, 6, 11], [2.5, 3, 4, 5, 6], []):
        with pytest.raises(ValueError, match="eps"):
            g.uncertainty_exponent(img, eps)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default box sizes fit a small image (they ran past it: empty means)
        ex = g.uncertainty_exponent(np.zeros((3, 3), int))
    assert math.isnan(ex.alpha) and list(ex.eps) == [3]


def test_cli_geometry_refuses_a_tail_below_two_in_one_line(tmp_path, capsys):
    from attnflow.cli import main

    cfg = tmp_path / "g.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\n'
                   'time = "discrete"\nalpha = 0.1\ntokens = 3\nsteps = 300\n[geometry]\nresolution = 12\nbox = 4\n'
                   'tail = 1\n')
    assert main(["--no-compile-cache", "geometry", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tail" in err[0]


def test_a_fixed_points_verdict_is_exact_on_a_triangular_defective_jacobian():
    # y' = A y, A block lower bidiagonal: 32 diagonal blocks C (eigenvalues -0.2 +- 0.436 i), coupled to the next:
    # every eigenvalue is C's, repeated 32 times and defective; eigvals of A has errors of about eps^(1/32) and
    # called the node 0 unstable (max Re > 0: its members counted unknown, as on a saddle)
    C = np.array([[-0.3, 0.5], [-0.4, -0.1]])
    A = np.kron(np.eye(32), C) + np.kron(np.eye(32, k=-1), np.array([[1.0, 0.3], [0.2, 1.0]]))
    m = 64
    assert np.linalg.eigvals(A).real.max() > 0  # what NumPy's eigvals of the whole matrix says
    fr = g.basin_fractions(g.Flow(lambda t, y: jnp.asarray(A) @ y), np.zeros((2, m)), g.Run(t1=1.0, dt=0.1, tail=4))
    assert [a.verdict for a in fr.attractors] == ["stable"] and fr.counts == {0: 2}
