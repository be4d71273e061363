"""Audit of docs/model.md sections 11.4-11.6 against references that share no code with attnflow.

- The linearisation of the particle system at n equally spaced tokens on the circle, by finite differences of a
  plain NumPy vector field, against the exact finite-n eigenvalues written in section 11.5 (aliasing included) and,
  for n large, against ``mode_rates``.
- A plain NumPy RK4 run started near the equally spaced state: the log-linear growth of each Fourier mode.
- The layer map with the l2 normalisation: its per-step multipliers 1 + alpha lambda_k / (1 + alpha C_0).
- attnflow's own simulation in float32.
- Which models get a k* in a study: only those of section 11.5, at c x beta when Q^T K = c I.
- lambda_1 -> 1/2 as beta -> 0 for every kmax; (beta, d) phase diagrams against NumPy, and their refusal of biases.
"""

import numpy as np
import pytest
import scipy.special as sp

import attnflow as af
from attnflow.analysis.metastability import fastest_mode, mode_rates


def _np_velocity(th, beta, kind):
    """dtheta_i/dt = sum_j a_ij sin(theta_j - theta_i), a_ij = e^{beta cos(theta_j - theta_i)} / Z_i."""
    D = th[None, :] - th[:, None]
    w = np.exp(beta * np.cos(D))
    return (w * np.sin(D)).sum(1) / (w.sum(1) if kind == "softmax" else len(th))


def _lattice_rates(n, beta, kind, kmax, pmax=4000, magnitude=False):
    """docs/model.md section 11.5: mu_k(n) = S_k(n) / (beta Z_n) (softmax) or S_k(n) / beta (unnormalized), with
    S_k(n) = sum_{p >= 1} p^2 I_p(beta) [1(p = k) + 1(p = -k) - 2 1(p = 0)] (mod n) and
    Z_n = I_0(beta) + 2 sum_{m >= 1} I_{mn}(beta). Computed with scipy's scaled Bessel functions. With
    `magnitude`, also the same sums of the absolute values of the terms (for small n and large beta the terms cancel:
    the rounding of the sum is about 1e-16 of that magnitude)."""
    p = np.arange(1, pmax)
    ive = sp.ive(p, beta)
    out, mag = [], []
    Z = sp.ive(0, beta) + 2 * np.sum(sp.ive(np.arange(n, pmax, n), beta))  # times e^-beta
    for k in range(1, kmax + 1):
        ind = ((p - k) % n == 0).astype(float) + ((p + k) % n == 0) - 2.0 * (p % n == 0)
        for acc, term in ((out, np.sum(p**2 * ive * ind)), (mag, np.sum(p**2 * ive * np.abs(ind)))):
            S = term / beta  # times e^-beta
            acc.append(S / Z if kind == "softmax" else S * np.exp(beta))
    return (np.array(out), np.array(mag)) if magnitude else np.array(out)


def _fd_mode_rates(step, n, h=1e-6):
    """The eigenvalue of each Fourier mode of the finite-difference Jacobian of `step` at the equally spaced state
    (the Jacobian is circulant: row 0 of J e^{ik phi} divided by e^{ik phi_0} = 1)."""
    phi = 2 * np.pi * np.arange(n) / n
    J = np.zeros((n, n))
    for m in range(n):
        e = np.zeros(n)
        e[m] = h
        J[:, m] = (step(phi + e) - step(phi - e)) / (2 * h)
    assert np.allclose(J, np.roll(np.roll(J, 1, 0), 1, 1), atol=1e-8 * np.abs(J).max())  # circulant
    return np.array([(J @ np.cos(k * phi))[0] for k in range(1, n // 2 + 1)]), J


@pytest.mark.parametrize("kind", ("softmax", "unnormalized"))
def test_lattice_jacobian_is_the_exact_finite_n_formula(kind):
    """Small n, large beta, k up to n/2: the particle rates deviate from lambda_k (aliasing), exactly as written.
    The formula agrees with the finite-difference Jacobian to 1e-6 relative, beyond the rounding of its cancelling
    terms (n = 3, beta = 20: terms ~ 1e9 sum to 7e-4 for the unnormalized kernel)."""
    for n in (3, 4, 5, 8, 16):
        for beta in (0.5, 5.0, 20.0):
            fd, J = _fd_mode_rates(lambda th: _np_velocity(th, beta, kind), n)
            want, mag = _lattice_rates(n, beta, kind, n // 2, magnitude=True)
            tol = 1e-6 * np.abs(want) + 1e-13 * mag + 1e-9 * np.abs(J).max()
            assert np.all(np.abs(fd - want) <= tol), (n, beta, fd, want)
    # the numbers quoted in section 11.5
    lam = mode_rates(20.0, 8, kind="softmax")
    mu = _lattice_rates(16, 20.0, "softmax", 8)
    assert np.argmax(lam[1:]) + 1 == 6 and np.argmax(mu) + 1 == 8  # k* = 6 mean-field, the lattice's fastest is n/2
    assert mu[5] / lam[6] - 1 == pytest.approx(0.489, abs=2e-3)
    mu8 = _lattice_rates(8, 5.0, "softmax", 4)
    assert np.argmax(mu8) + 1 == 4 and fastest_mode(5.0) == 3
    # k = n/2: both aliases hit p = n/2, the rate is about twice lambda_{n/2}
    assert _lattice_rates(64, 5.0, "softmax", 32)[-1] / mode_rates(5.0, 32)[32] == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize("kind", ("softmax", "unnormalized"))
def test_lattice_rates_are_the_mean_field_rates_for_large_n(kind):
    """n = 64: the Jacobian's rates equal mode_rates for every mode that is not negligible (rate >= 1e-4 of the
    largest) to 1e-7 relative plus 1e-9 of the largest rate (the finite-difference noise, h = 1e-6: measured up to
    3e-11 of the largest rate); the exact finite-n formula equals mode_rates to 1e-9 there (aliasing ~ I_{n-k})."""
    n = 64
    for beta in (0.5, 5.0, 20.0):
        fd, _ = _fd_mode_rates(lambda th: _np_velocity(th, beta, kind), n)
        lam = mode_rates(beta, n // 2, kind=kind)[1:]
        ok = lam >= 1e-4 * lam.max()
        assert ok.sum() >= 5
        np.testing.assert_allclose(fd[ok], lam[ok], rtol=1e-7, atol=1e-9 * lam.max(), err_msg=f"beta = {beta}")
        np.testing.assert_allclose(_lattice_rates(n, beta, kind, n // 2)[ok], lam[ok], rtol=1e-9, atol=0)


def _np_rk4(th, beta, kind, dt):
    f = lambda x: _np_velocity(x, beta, kind)  # noqa: E731
    k1 = f(th)
    k2 = f(th + dt / 2 * k1)
    k3 = f(th + dt / 2 * k2)
    k4 = f(th + dt * k3)
    return th + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@pytest.mark.parametrize("kind, t1", (("softmax", 2.0), ("unnormalized", 0.1)))
def test_numpy_simulation_near_the_uniform_state(kind, t1):
    """96 equally spaced tokens, each displaced by a sum of the modes k = 1..8 of amplitude 1e-7 with random
    phases; plain NumPy RK4 (40 steps); the modulus of the k-th DFT coefficient of the displacements grows at
    lambda_k (log-linear least squares over the 41 times). Modes with a rate >= 1e-2 of the largest (the others
    are lost in the quadratic coupling of the fast ones): agreement to 1e-4 relative (measured <= 4e-5)."""
    n, K = 96, 8
    phi = 2 * np.pi * np.arange(n) / n
    rng = np.random.default_rng(0)
    xi0 = sum(1e-7 * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in range(1, K + 1))
    for beta in (1.0, 5.0):
        th, dt, A = phi + xi0, t1 / 40, [np.abs(np.fft.fft(xi0))[1:K + 1]]
        for _ in range(40):
            th = _np_rk4(th, beta, kind, dt)
            A.append(np.abs(np.fft.fft(th - phi))[1:K + 1])
        fit = np.polyfit(dt * np.arange(41), np.log(np.array(A)), 1)[0]
        lam = mode_rates(beta, K, kind=kind)[1:]
        ok = lam >= 1e-2 * lam.max()
        assert ok.sum() >= 4
        np.testing.assert_allclose(fit[ok], lam[ok], rtol=1e-4, atol=0, err_msg=f"beta = {beta}")


@pytest.mark.parametrize("kind", ("softmax", "unnormalized"))
def test_layer_map_multipliers_and_its_fastest_mode(kind):
    """x <- (x + alpha u) / |x + alpha u| on the circle: theta_i <- theta_i + atan2(alpha S_i, 1 + alpha C_i).
    Its Jacobian at 64 equally spaced tokens multiplies mode k by 1 + alpha lambda_k / (1 + alpha C_0),
    C_0 = I_1 / I_0 (softmax) or I_1 (unnormalized): measured to 6e-11; the fastest mode is k*."""
    n = 64
    for beta, alpha in ((5.0, 1.0), (5.0, 10.0), (20.0, 0.3)):
        def step(th):
            D = th[None, :] - th[:, None]
            w = np.exp(beta * np.cos(D))
            Z = w.sum(1) if kind == "softmax" else n
            return th + np.arctan2(alpha * (w * np.sin(D)).sum(1) / Z, 1 + alpha * (w * np.cos(D)).sum(1) / Z)

        fd, _ = _fd_mode_rates(step, n)
        lam = mode_rates(beta, 12, kind=kind)[1:]
        C0 = sp.ive(1, beta) / sp.ive(0, beta) if kind == "softmax" else sp.iv(1, beta)
        np.testing.assert_allclose(fd[:12], 1 + alpha * lam / (1 + alpha * C0), rtol=1e-9)
        assert int(np.argmax(fd)) + 1 == fastest_mode(beta, kind=kind)


def test_float32_simulation_growth_rates():
    """attnflow in float32 (softmax, 256 tokens, RK4 dt = 0.1 to t = 2): the k-th empirical Fourier amplitude of
    tokens at theta_j = phi_j - (eps / k) sin(k phi_j), eps = 1e-2, grows at lambda_k to 1e-3 relative (measured
    <= 1.4e-4: the O(eps^2) correction and float32 rounding; eps = 1e-3 gives 3e-3 at beta = 1, where the amplitude
    grows only 1.2x and rounding of 6e-8 in theta is 6e-5 of it)."""
    n, eps, betas, ks = 256, 1e-2, np.array([1.0, 5.0], np.float32), np.arange(1, 5)
    phi = 2 * np.pi * np.arange(n) / n
    theta0 = np.stack([phi - eps / k * np.sin(k * phi) for k in ks])
    x0 = np.stack([np.cos(theta0), np.sin(theta0)], -1).astype(np.float32)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2, dtype=np.float32)), beta=np.float32(1.0)))
    sol = af.sweep(flow, x0, beta=betas, budget=af.Budget(t1=2.0, dt=0.1), solver=af.RK4(), saves=20)
    X = np.asarray(sol.trajectory)
    assert X.dtype == np.float32
    theta = np.arctan2(X[..., 1], X[..., 0]).astype(np.float64)
    amp = np.abs(np.mean(np.exp(1j * ks[None, None, :, None] * theta), axis=-1))
    ts = np.asarray(sol.ts, np.float64)
    for p, beta in enumerate(betas):
        fit = np.array([np.polyfit(ts, np.log(amp[p, :, b]), 1)[0] for b in range(len(ks))])
        np.testing.assert_allclose(fit, mode_rates(float(beta), 4)[1:], rtol=1e-3, atol=0)


# --- which models get a k* ------------------------------------------------------------------------------------------

def _k_stars(dynamics, beta=1.25):
    import jax

    from attnflow.analysis.metastability import metastability

    flow = getattr(dynamics, "time", "") == "continuous"
    res = metastability(dynamics, jax.random.PRNGKey(0), tokens=6, betas=[beta], members=2, t1=0.5 if flow else 3,
                        dt=0.1 if flow else None, trace=0)
    return res.cells[0].k_star


def test_k_star_only_for_the_model_of_section_11_5():
    """Q = K = 2I scores 4 beta cos: k* is that of 4 beta = 5 (3), not of beta = 1.25 (2: the old answer). A causal
    mask is another model: no k* (the old code gave k* = 2)."""
    eye = np.eye(2)
    sa = lambda heads, **kw: af.SelfAttention(heads, beta=1.0, key_block=None, **kw)  # noqa: E731
    assert fastest_mode(5.0) == 3 and fastest_mode(1.25) == 2
    assert _k_stars(af.SphereFlow(sa(af.Heads.single(eye, Q=2 * eye, K=2 * eye)))) == 3
    assert _k_stars(af.SphereFlow(sa(af.Heads.single(eye), attention=af.Attention(mask="causal")))) is None


def test_circle_scale_of_each_model():
    from attnflow.analysis.metastability._modes import circle_scale

    eye = np.eye(2)
    sa = lambda heads, **kw: af.SelfAttention(heads, beta=1.0, key_block=None, **kw)  # noqa: E731
    H = af.Heads.single(eye)
    two_heads = af.Heads(Q=np.stack([eye, eye]), K=np.stack([eye, eye]), V=np.stack([0.3 * eye, 0.7 * eye]),
                         O=np.stack([eye, eye]))  # the same a_ij in both heads, W = I
    for dyn, want in (
        (af.SphereFlow(sa(H)), 1.0),
        (af.SphereFlow(sa(af.Heads.single(eye, Q=2 * eye, K=2 * eye))), 4.0),
        (af.SphereFlow(sa(af.Heads.single(0.5 * eye))), 1.0),  # W = w I only rescales time
        (af.SphereFlow(sa(af.Heads.single(np.eye(2, dtype=np.float32)))), 1.0),
        (af.SphereFlow(sa(H, attention=af.Attention(kind="unnormalized"))), 1.0),
        (af.SphereFlow(sa(two_heads)), 1.0),
        (af.LayerMap(sa(H), alpha=2.0), 1.0),
        (af.SphereFlow(sa(af.Heads.single(np.array([[0.0, -1.0], [1.0, 0.0]])))), None),  # a rotation in V
        (af.SphereFlow(sa(af.Heads.single(eye, Q=np.diag([1.0, 2.0])))), None),  # anisotropic scores
        (af.SphereFlow(sa(af.Heads.single(-eye))), None),  # repulsive
        (af.SphereFlow(sa(af.Heads.single(eye, Q=-eye))), None),  # scores -beta cos
        (af.SphereFlow(sa(H, attention=af.Attention(mask="causal"))), None),
        (af.SphereFlow(sa(H, attention=af.Attention(kind="sinkhorn"))), None),
        (af.SphereFlow(sa(H, attention=af.Attention(kind="relu"))), None),
        (af.SphereFlow(sa(af.Heads(Q=H.Q, K=H.K, V=H.V, O=H.O, bo=np.array([0.3, 0.0])))), None),
        (af.SphereFlow(sa(af.Heads.single(np.eye(3)))), None),
        (af.FlatFlow(sa(H)), None),
        (af.LayerMap(sa(H), norm=af.NoNorm()), None),
    ):
        got = circle_scale(dyn)
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12), (dyn, got, want)


def test_phase_over_d_refuses_biases_it_would_drop():
    """A (beta, d) diagram rebuilds Q = K = V = O = I for each d: a bias would be dropped without a word (the old
    code ran it as the model without its bias)."""
    import jax

    from attnflow.analysis.metastability import phase_at_time

    H = af.Heads.single(np.eye(2))
    biased = af.Heads(Q=H.Q, K=H.K, V=H.V, O=H.O, bo=np.array([0.3, 0.0]))
    flow = af.SphereFlow(af.SelfAttention(biased, beta=1.0, key_block=None))
    with pytest.raises(ValueError, match="no biases"):
        phase_at_time(flow, jax.random.PRNGKey(0), over="d", values=[2, 3], betas=[1.0], members=2, time=0.2,
                      tokens=4, dt=0.1)


@pytest.mark.parametrize("beta", (1e-300, 1e-308, 1e-310, 5e-324))
def test_lambda_1_at_tiny_beta_for_every_kmax(beta):
    """beta -> 0: lambda_1 -> 1/2 (both kinds). With kmax = 1 the old code took r_1 / beta, which is 0 / beta once
    2 / beta overflows (beta below ~ 1e-308: lambda_1 = 0), while kmax = 2 gave 0.5."""
    for kind in ("softmax", "unnormalized"):
        for kmax in (1, 2, 5):
            assert mode_rates(beta, kmax, kind=kind)[1] == pytest.approx(0.5, rel=1e-15), (kind, kmax)


def test_phase_over_d_equals_numpy_readings():
    """A (beta, d) diagram at t = 3 (30 RK4 steps of 0.1) against a plain NumPy RK4 on the sphere in d = 2 and 3,
    from the same members (one key per d): pair fractions equal to 1e-12 (measured: equal)."""
    import jax

    from attnflow.analysis.metastability import phase_at_time
    from attnflow.evolve.sample import sphere

    def vf(X, beta):
        A = np.exp(beta * X @ X.T)
        U = (A / A.sum(1, keepdims=True)) @ X
        return U - np.sum(U * X, 1, keepdims=True) * X

    def rk4(X, beta, dt):
        k1 = vf(X, beta)
        k2 = vf(X + dt / 2 * k1, beta)
        k3 = vf(X + dt / 2 * k2, beta)
        k4 = vf(X + dt * k3, beta)
        Y = X + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return Y / np.linalg.norm(Y, axis=1, keepdims=True)

    n, M, betas, eps, key = 8, 4, [1.0, 6.0], 5e-2, jax.random.PRNGKey(3)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0, key_block=None))
    P = phase_at_time(flow, key, over="d", values=[2, 3], betas=betas, members=M, time=3.0, tokens=n, dt=0.1, eps=eps)
    assert P.time == pytest.approx(3.0) and P.pairs.shape == (2, 2)
    for i, (d, k) in enumerate(zip((2, 3), jax.random.split(key, 2))):
        X0 = np.asarray(sphere(k, (M, n, d), dtype=np.float64))
        for j, beta in enumerate(betas):
            pairs = []
            for m in range(M):
                X = X0[m]
                for _ in range(30):
                    X = rk4(X, beta, 0.1)
                pairs.append((np.sum(X @ X.T > 1 - eps) - n) / (n * (n - 1)))
            assert P.pairs[j, i] == pytest.approx(np.mean(pairs), abs=1e-12)
