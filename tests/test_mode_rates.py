"""Growth rates of the Fourier modes of the mean-field attention flow on the circle (d = 2, Q = K = V = I),
linearised around the uniform density: lambda_k = k^2 I_k(beta) / (beta I_0(beta)) (softmax), k^2 I_k(beta) / beta
(unnormalized). Checked against three independent references:

- scipy's Bessel functions (the plain-NumPy Bessel ratios of the module, to 1e-10 relative);
- the linearised velocity integral by direct quadrature (to 1e-6 relative);
- attnflow's own particle simulation: the log-growth rate of the k-th empirical Fourier amplitude of n tokens
  placed with density ~ (1 + eps cos k theta) / (2 pi), eps = 1e-3 (to 1e-5 relative; measured <= 6.3e-7 softmax,
  <= 1.5e-6 unnormalized: the O(eps^2) nonlinear correction, ~1e-8 with eps = 1e-4).
"""

import math

import numpy as np
import pytest
import scipy.special as sp

import attnflow as af
from attnflow.analysis.metastability._modes import bessel_ratios, fastest_mode, log_i0, mode_rates

BETAS = (0.1, 1.0, 5.0, 20.0, 100.0)


# --- Bessel functions against scipy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", BETAS)
def test_bessel_ratios_match_scipy(beta):
    k = np.arange(65)
    want = sp.iv(k, beta) / sp.iv(0, beta)
    got = bessel_ratios(beta, 64)
    assert got.shape == (65,) and got[0] == 1.0
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("beta", (*BETAS, 200.0, 500.0, 1000.0))
def test_bessel_ratios_and_log_i0_at_large_beta(beta):
    """Scaled functions (ive) so that the reference does not overflow: beta up to 1000, k up to 64."""
    k = np.arange(65)
    np.testing.assert_allclose(bessel_ratios(beta, 64), sp.ive(k, beta) / sp.ive(0, beta), rtol=1e-10, atol=0)
    assert log_i0(beta) == pytest.approx(beta + math.log(sp.ive(0, beta)), rel=1e-13, abs=1e-14)


@pytest.mark.parametrize("beta", BETAS)
def test_rates_are_the_closed_forms(beta):
    k = np.arange(33)
    soft = mode_rates(beta, 32)
    unnorm = mode_rates(beta, 32, kind="unnormalized")
    assert soft.shape == unnorm.shape == (33,) and soft[0] == unnorm[0] == 0.0
    np.testing.assert_allclose(soft[1:], (k**2 * sp.iv(k, beta) / (beta * sp.iv(0, beta)))[1:], rtol=1e-10, atol=0)
    np.testing.assert_allclose(unnorm[1:], (k**2 * sp.iv(k, beta) / beta)[1:], rtol=1e-10, atol=0)
    assert np.all(soft[1:] > 0)


def test_small_beta_limit():
    """beta -> 0: lambda_1 -> 1/2 (both kinds), lambda_k ~ k^2 (beta/2)^k / (k! beta); no 0/0 at tiny beta."""
    for beta in (1e-3, 1e-8, 1e-200):
        r = mode_rates(beta, 3)
        assert r[1] == pytest.approx(0.5, rel=1e-2 * beta + 1e-15)
        assert r[2] == pytest.approx(4 * (beta / 2) ** 2 / 2 / beta, rel=1e-2 * beta + 1e-15)
        assert mode_rates(beta, 1, kind="unnormalized")[1] == pytest.approx(0.5, rel=1e-2 * beta + 1e-15)


# --- the linearised velocity by quadrature --------------------------------------------------------------------------

def _quadrature_rate(beta: float, k: int, kind: str, m: int = 512, eps: float = 1e-4) -> float:
    """d eps / dt / eps for rho = (1 + eps cos k theta) / (2 pi), from the velocity integral itself.

    v(theta) = int e^{beta cos(phi - theta)} sin(phi - theta) rho(phi) dphi / int e^{beta cos(phi - theta)} rho(phi)
    dphi (the denominator is 1 for the unnormalized kernel), each integral by the trapezoid rule on m equally spaced
    points (spectrally accurate for smooth periodic integrands); d_t rho = -d_theta(rho v) by FFT differentiation;
    the rate is the cos(k theta) coefficient of d_t rho divided by that of rho. A central difference in eps (the
    result at +eps and -eps) removes the even-order terms. Both integrals are linear in rho, so each is summed
    separately over the uniform part and the perturbation: otherwise the rounding of the O(1) uniform part (~1e-16)
    swamps the perturbation's contribution to the tiny high-mode rates at small beta (lambda_6(0.1) ~ 8e-9)."""
    th = 2 * np.pi * np.arange(m) / m
    diff = th[None, :] - th[:, None]  # phi_j - theta_i
    w = np.exp(beta * np.cos(diff)) * (2 * np.pi / m)  # trapezoid weights included
    rho0 = np.full(m, 1 / (2 * np.pi))
    rho1 = np.cos(k * th) / (2 * np.pi)
    freq = np.fft.fftfreq(m, d=1.0 / m)

    def coefficient(e):
        rho = rho0 + e * rho1
        num = (w * np.sin(diff)) @ rho0 + e * ((w * np.sin(diff)) @ rho1)
        den = w @ rho0 + e * (w @ rho1) if kind == "softmax" else 1.0
        flux = rho * num / den
        drho = -np.real(np.fft.ifft(1j * freq * np.fft.fft(flux)))
        return np.mean(drho * np.cos(k * th)) * 2 * (2 * np.pi)  # cos-coefficient of d_t rho, times 2 pi

    return (coefficient(eps) - coefficient(-eps)) / (2 * eps)


@pytest.mark.parametrize("kind", ("softmax", "unnormalized"))
@pytest.mark.parametrize("beta", BETAS)
def test_rates_match_the_linearised_velocity_integral(beta, kind):
    want = mode_rates(beta, 6, kind=kind)
    got = np.array([_quadrature_rate(beta, k, kind) for k in range(1, 7)])
    np.testing.assert_allclose(got, want[1:], rtol=1e-6, atol=0)


# --- the fastest mode -----------------------------------------------------------------------------------------------

# computed with scipy.special.ive (argmax over k = 1..399 of k^2 ive(k, beta)); k* changes from m to m + 1 at
# beta = 1.0445, 3.1654, 6.2113, 10.2285, 15.2363, 21.2405, 28.2430 (m = 1..7)
K_STAR = {0.1: 1, 0.5: 1, 1: 1, 1.5: 2, 2: 2, 3: 2, 4: 3, 5: 3, 6: 3, 8: 4, 10: 4, 12: 5, 15: 5, 20: 6, 30: 8,
          50: 10, 100: 14, 200: 20}


@pytest.mark.parametrize("kind", ("softmax", "unnormalized"))
def test_fastest_mode_table(kind):
    assert fastest_mode(5) == 3  # Bruno, Pasqualotto and Agazzi 2024 (arXiv 2410.23228): 3 clusters at d = 2, beta = 5
    k = np.arange(1, 400)
    for beta, want in K_STAR.items():
        assert int(k[np.argmax(k**2 * sp.ive(k, beta))]) == want  # the table itself, from scipy
        got = fastest_mode(beta, kind=kind)
        assert type(got) is int and got == want, (beta, got, want)


def test_fastest_mode_large_beta():
    """k* ~ sqrt(2 beta); the search range grows by itself."""
    for beta in (500.0, 1000.0, 5000.0):
        k = np.arange(1, 1000)
        assert fastest_mode(beta) == int(k[np.argmax(k**2 * sp.ive(k, beta))])
        assert abs(fastest_mode(beta) - math.sqrt(2 * beta)) < 2


# --- argument checks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", (0.0, -1.0, math.nan, math.inf, -math.inf, "x", None))
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        mode_rates(beta)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        fastest_mode(beta)


@pytest.mark.parametrize("kmax", (0, -3, 1.5, 2.0, True, "4", None))
def test_bad_kmax(kmax):
    with pytest.raises(ValueError, match="kmax must be an integer >= 1"):
        mode_rates(1.0, kmax)


@pytest.mark.parametrize("kind", ("relu", "uniform", "Softmax", "", None))
def test_bad_kind(kind):
    with pytest.raises(ValueError, match="unknown attention kind"):
        mode_rates(1.0, 4, kind=kind)
    with pytest.raises(ValueError, match="unknown attention kind"):
        fastest_mode(1.0, kind=kind)


def test_kmax_one_and_numpy_integers():
    np.testing.assert_allclose(mode_rates(2.0, 1), [0.0, sp.iv(1, 2.0) / (2.0 * sp.iv(0, 2.0))], rtol=1e-12)
    np.testing.assert_allclose(mode_rates(np.float32(2.0), np.int64(3)), mode_rates(2.0, 3), rtol=1e-15)


# --- attnflow's particle simulation ---------------------------------------------------------------------------------

# (kind, t1, dt): the unnormalized rates at beta = 5 are ~ 18, so it runs 10x shorter with 10x smaller steps
SIM = {"softmax": (0.5, 0.05), "unnormalized": (0.05, 0.005)}


@pytest.mark.parametrize("kind", tuple(SIM))
def test_simulation_growth_rates(kind):
    """n tokens at theta_j = phi_j - (eps / k) sin(k phi_j), phi_j equally spaced: density (1 + eps cos k theta) /
    (2 pi) to first order, empirical amplitude |mean_j exp(i k theta_j)| = eps / 2. Evolved with attnflow (RK4, 10
    steps), the log of the amplitude grows linearly at lambda_k: a least-squares fit over the 11 saved times.

    For equally spaced phi_j the particle sums are the trapezoid rule of the mean-field integrals, exact up to
    O(I_{n-k}(beta) / I_0(beta)), so the particle rates do not depend on n (n = 64 gives the same digits) and the
    deviation is the O(eps^2) nonlinear correction. Measured relative deviations over k = 1..4 (the same digits
    with n = 2000): softmax beta = 1: 4.5e-7 .. 5.7e-7, beta = 5: 1.4e-7 .. 6.2e-7; unnormalized beta = 1:
    2.7e-7 .. 5.0e-7, beta = 5: 3.5e-7 .. 1.5e-6 (the amplitude grows 2.5x there). k = 1 (the mode that moves
    the mean direction) is no exception."""
    n, eps, betas, ks = 1000, 1e-3, np.array([1.0, 5.0]), np.arange(1, 5)
    t1, dt = SIM[kind]
    phi = 2 * np.pi * np.arange(n) / n
    theta0 = np.stack([phi - eps / k * np.sin(k * phi) for k in ks])  # (4, n): one member per k
    x0 = np.stack([np.cos(theta0), np.sin(theta0)], axis=-1)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), attention=af.Attention(kind=kind), beta=1.0))
    sol = af.sweep(flow, x0, beta=betas, budget=af.Budget(t1=t1, dt=dt), solver=af.RK4(), saves=10)
    X = np.asarray(sol.trajectory)  # (p, s, b, n, 2)
    assert X.shape == (2, 11, 4, n, 2)
    theta = np.arctan2(X[..., 1], X[..., 0])
    amp = np.abs(np.mean(np.exp(1j * ks[None, None, :, None] * theta), axis=-1))  # (p, s, b)
    np.testing.assert_allclose(amp[:, 0], eps / 2, rtol=1e-6)
    ts = np.asarray(sol.ts)
    for p, beta in enumerate(betas):
        fit = np.array([np.polyfit(ts, np.log(amp[p, :, b]), 1)[0] for b in range(len(ks))])
        want = mode_rates(beta, 4, kind=kind)[1:]
        np.testing.assert_allclose(fit, want, rtol=1e-5, atol=0, err_msg=f"{kind}, beta = {beta}")
        assert np.max(amp[p, -1]) < 1e-2  # still in the linear regime at the end
