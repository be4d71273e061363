# %% [markdown]
# # 05 · Multi-head energies, radial shadows and the equiangular theory [MH]
#
# Pendharkar, *Gradient flow structure and quantitative dynamics of multi-head self-attention*
# (arXiv 2605.04279). Formulas: `docs/model.md` section 7. This notebook reproduces, with attnflow:
#
# 1. the energy E = sum_h E_h is non-decreasing along the unnormalized flow when W_h = M_h is symmetric
#    (any number of heads), and along the softmax flow with one head;
# 2. with several softmax heads E can decrease, and the culprit is a **radial shadow** term;
# 3. the equiangular reduction, its critical inverse temperature beta_c, super-additive clustering rates
#    for heterogeneous heads, and ReLU vs softmax clustering times;
# 4. attention entropy along trajectories.
#
# Set `ATTNFLOW_SMOKE=1` to run everything at a tiny size (CI does).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import attnflow as af
from attnflow import equiangular as eq

jax.config.update("jax_enable_x64", True)
SMOKE = bool(os.environ.get("ATTNFLOW_SMOKE"))
MODELS, STARTS = (3, 4) if SMOKE else (20, 16)
rng = np.random.default_rng(0)


def symmetric_heads(Ms):
    """Heads with Q_h = I, K_h = V_h = M_h, O_h = I, so W_h = M_h = Q_h^T K_h."""
    eye = np.eye(Ms[0].shape[0])
    return af.Heads(Q=np.stack([eye] * len(Ms)), K=np.stack(Ms), V=np.stack(Ms), O=np.stack([eye] * len(Ms)))


def random_symmetric(d, scale=1.0):
    A = rng.normal(size=(d, d)) * scale
    return (A + A.T) / 2


# %% [markdown]
# ## 1. Monotone cases: unnormalized heads (1 to 4) and one softmax head
# **[MH]/[SS] claim:** dE/dt = (1/n) sum_i |P(x_i) u_i|^2 >= 0 for the unnormalized kernel with any number of
# symmetric heads W_h = M_h; one softmax head is a gradient flow in a rescaled metric.
# **attnflow:** `af.diagnose` simulates and evaluates the exact energy rate (autodiff) at every saved state.

# %%
rows = []
for kind, H in [("unnormalized", 1), ("unnormalized", 2), ("unnormalized", 4), ("softmax", 1)]:
    flow = af.SphereFlow(af.SelfAttention(symmetric_heads([random_symmetric(3, 0.5) for _ in range(H)]), af.Attention(kind), 1.0))
    x0 = af.sample.sphere(jax.random.PRNGKey(H), (STARTS, 7, 3))
    tr = af.diagnose(flow, x0, t1=5.0, dt=0.005, saves=100)
    rows.append((kind, H, int(tr.monotone.sum()), STARTS, float(tr.rate.min())))
print(f"{'kernel':14s} heads  monotone   min exact dE/dt")
for kind, H, mono, tot, rmin in rows:
    print(f"{kind:14s} {H:5d}  {mono:3d}/{tot:<3d}   {rmin: .2e}")

# %% [markdown]
# ## 2. Several softmax heads: E can decrease, and radial shadows are why
# **docs/model.md section 7:** two symmetric softmax heads (d = 3, n = 7, beta = 1.5) gave a relative drop of 3.6e-3.
# **attnflow:** over random models, the diagnostic finds where E first falls, which head breaks it, and which term
# of that head's rate is negative (own gradient part, cross-head part, or the radial shadow <x_i, f_i^g>).

# %%
drops, causes, example = [], [], None
for trial in range(MODELS):
    flow = af.SphereFlow(af.SelfAttention(symmetric_heads([random_symmetric(3) for _ in range(2)]), af.Attention("softmax"), 1.5))
    tr = af.diagnose(flow, af.sample.sphere(jax.random.PRNGKey(100 + trial), (STARTS, 7, 3)), t1=10.0, dt=0.01, saves=200)
    drops.extend(tr.relative_drop[~tr.monotone])
    for m in np.flatnonzero(~tr.monotone):
        causes.append(tr.explain(int(m)))
        if example is None:
            example = (flow, tr, int(m))
print(f"non-monotone runs: {len(drops)} of {MODELS * STARTS}")
if drops:
    print(f"relative drop: median {np.median(drops):.2e}, max {np.max(drops):.2e} (docs/model.md section 7 quotes 3.6e-3 for one unnamed model)")
    print("first explanation:", causes[0])

# %%
if example is not None:
    flow, tr, m = example
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(tr.ts, tr.energy[:, m], "k", label="E (total)")
    for h in range(tr.head_energy.shape[-1]):
        ax[0].plot(tr.ts, tr.head_energy[:, m, h], label=f"E_{h}")
    ax[0].axvline(tr.ts[tr.first_violation[m]], color="crimson", ls="--", label="first decrease")
    ax[0].set(xlabel="time t", ylabel="energy", title="two softmax heads: E is not monotone")
    ax[0].legend()
    ax[1].plot(tr.ts, tr.rate[:, m], "k", label="exact dE/dt")
    ax[1].axhline(0, color="0.5", lw=0.8)
    ax[1].set(xlabel="time t", ylabel="dE/dt (autodiff)", title="exact rate along the trajectory")
    ax[1].legend()
    fig.tight_layout()

# %% [markdown]
# ## 3. The sufficient condition on the score matrices
# `af.monotonicity_condition` checks the weights alone. Derivation in its docstring: with W_h = M_h symmetric, the
# per-head gradients are c_i^h times head h's output; equal weights c (unnormalized kernel, or one head) make the
# cross and shadow terms sum to a square, for any number of heads. Orthogonal heads (M_h M_g = 0) certify each E_h on the
# **flat** flow only; on the sphere the shadow products survive, and the softmax weights differ per head.
# **Disagreement with docs/model.md section 7 / [MH] as summarised there:** orthogonality alone does not certify the total E on the
# sphere for softmax; attnflow finds decreasing states (below).

# %%
e1, e2, e3 = np.eye(3)
orth = [3 * np.outer(e1, e1), 3 * np.outer(e2, e2)]
for name, kind, Ms in [("unnormalized, 3 random heads", "unnormalized", [random_symmetric(3) for _ in range(3)]),
                       ("softmax, orthogonal heads", "softmax", orth)]:
    model = af.SelfAttention(symmetric_heads(Ms), af.Attention(kind), 3.0)
    c = af.monotonicity_condition(model)
    print(f"{name}: total E certified on sphere: {bool(c.total_sphere)}, flat: {bool(c.total_flat)} -- {c.reason}")
flow = af.SphereFlow(af.SelfAttention(symmetric_heads(orth), af.Attention("softmax"), 3.0))
found = af.find_energy_decrease(flow, jax.random.PRNGKey(0), tokens=5, num=64 if SMOKE else 512)
print(f"orthogonal softmax heads on the sphere: most negative relative rate dE/dt / E = {found['relative_rate']:.3g} "
      f"({'E decreases there' if found['relative_rate'] < 0 else 'no decrease found'})")

# %% [markdown]
# ## 4. Equiangular theory: beta_c, clustering time, super-additivity, ReLU vs softmax
# For scalar heads W_h = w_h I, M_h = m_h I started with all <x_i, x_j> = rho0, the state stays equiangular and
# d rho/dt = 2 (1-rho)(1+(n-1)rho) sum_h w_h a_o^h(rho) (docs/model.md section 7; checked against full simulations to 1e-9
# in `tests/test_equiangular.py`). attnflow derives beta_c = log(n-1)/(m(1-rho0)): the temperature at which a token
# gives half its attention to itself, so the initial clustering speed halves relative to the all-to-others speed.
# Below we measure the initial speed of **full** simulations over a beta sweep and see where it crosses n/(2(n-1)).

# %%
n, d, rho0, w, m = 6, 6, 0.0, [1.0], [1.0]
bc = eq.critical_beta(n=n, rho0=rho0, m=m)
step = 0.1 if SMOKE else 0.02
betas = np.concatenate([[1e-8], np.arange(step, 3 * bc, step)])
X0 = af.sample.equiangular(n, d, rho0, key=jax.random.PRNGKey(2))
h = 1e-3
sol = af.sweep(af.SphereFlow(af.SelfAttention(eq.scalar_heads(w, m, d), af.Attention("softmax"), 1.0)), X0[None], beta=betas, t1=2 * h, dt=h, saves=2)
r = eq.equiangular_rho(sol.trajectory[:, :, 0])
ratio = ((-3 * r[:, 0] + 4 * r[:, 1] - r[:, 2]) / (2 * h)) / ((-3 * r[0, 0] + 4 * r[0, 1] - r[0, 2]) / (2 * h))
k = int(np.argmax(ratio < eq.critical_speed_ratio(n)))
print(f"closed form beta_c = {bc:.4f}; simulated transition between beta = {betas[k-1]:.2f} and {betas[k]:.2f}")

bgrid = np.linspace(0.05, 4 * bc, 12 if SMOKE else 40)
T = np.asarray(eq.clustering_time(1e-3, rho0, n=n, beta=bgrid, w=w, m=m))
fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
ax[0].plot(betas, ratio, ".-", label="full simulation")
ax[0].axhline(eq.critical_speed_ratio(n), color="0.5", ls=":", label="n / (2(n-1))")
ax[0].axvline(bc, color="crimson", ls="--", label=f"beta_c = {bc:.3f}")
ax[0].set(xlabel="beta", ylabel="initial speed / its beta->0 value", title="initial clustering speed")
ax[0].legend()
ax[1].semilogy(bgrid, T, label="T_eps (reduced ODE), eps = 1e-3")
ax[1].axvline(bc, color="crimson", ls="--", label="beta_c")
ax[1].set(xlabel="beta", ylabel="clustering time T_eps", title=f"n = {n}, rho0 = {rho0}")
ax[1].legend()
fig.tight_layout()

# %%
print("super-additivity gain R_12/(R_1+R_2) - 1 for two softmax heads (n=6, beta=2, rho0=0):")
for m1, m2 in [(1, 1), (1, 2), (1, 3), (0.5, 3)]:
    g = eq.superadditivity_gain(1e-3, 0.0, n=6, beta=2.0, heads_a=([1.0], [m1]), heads_b=([1.0], [m2]))
    print(f"  m = ({m1}, {m2}): {g:.3f}")
print("linearised clustering times, ReLU vs softmax (n=6, beta=2):")
for r0 in (1e-2, 1e-4, 1e-6):
    lt = eq.linearised_times(1e-3, r0, n=6, beta=2.0, w=[1.0], m=[1.0])
    print(f"  rho0 = {r0:g}: softmax {float(lt['total_softmax']):.2f}, relu {float(lt['total_relu']):.2f}, ratio relu/softmax {float(lt['ratio']):.2f}")

# %% [markdown]
# ## 5. Attention entropy
# **docs/model.md section 7:** entropy rises toward log n as tokens cluster ([MH]: monotone).
# **attnflow measured:** true in the equiangular regime, but **not in general**: with one symmetric softmax head (where E is
# monotone) the mean entropy often falls. `EnergyTrace.entropy_rate` is exact (autodiff), not a finite difference.

# %%
flow = af.SphereFlow(af.SelfAttention(symmetric_heads([random_symmetric(3)]), af.Attention("softmax"), 1.5))
tr = af.diagnose(flow, af.sample.sphere(jax.random.PRNGKey(7), (STARTS, 7, 3)), t1=10.0, dt=0.01, saves=200)
falls = np.any(np.diff(tr.entropy, axis=0) < -1e-9, axis=0)
print(f"energy monotone in {int(tr.monotone.sum())}/{STARTS} runs; mean entropy falls somewhere in {int(falls.sum())}/{STARTS}")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(tr.ts, tr.entropy[:, :4])
ax.axhline(np.log(7), color="0.5", ls=":", label="log n")
ax.set(xlabel="time t", ylabel="mean attention entropy", title="one softmax head: entropy is not monotone")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Next
# - `af.energy_trace(model, sol.trajectory, sol.ts)` for any saved trajectory; `tr.explain(member)` in words.
# - `attnflow energy CONFIG.toml --json --out DIR` runs the same diagnostic from a config file.
# - `attnflow.equiangular` has the reduced ODE (`solve_reduced`), `clustering_time`, `critical_beta`, rates.
