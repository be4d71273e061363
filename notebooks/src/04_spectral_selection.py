# %% [markdown]
# # 04 · Spectral selection in symmetric self-attention [SS]
#
# Kuehn & Yoon, *Spectral selection in symmetric self-attention dynamics* (arXiv 2604.26085); formulas in
# `docs/model.md` sections 6-7. With Q^T K = V = V^T the flow on the sphere is a gradient flow of the energy E, and:
#
# - **dominant positive eigenvalue**: tokens align with the dominant eigendirection: every token ends at +v_1 or -v_1;
# - **negative-definite V**: sign-split polarisation between +v_d and -v_d (v_d the most negative direction).
#
# docs/model.md section 6 adds (checked numerically there): "alignment" means the **axis**: both consensus and sign-split states on
# the v_1 axis are reached. We measure the shares. `ATTNFLOW_SMOKE=1` shrinks every sample count.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import attnflow as af

jax.config.update("jax_enable_x64", True)
SMOKE = bool(os.environ.get("ATTNFLOW_SMOKE"))
SAMPLES = 64 if SMOKE else 2000
n, d = 6, 3
rng = np.random.default_rng(1)
Qm, _ = np.linalg.qr(rng.normal(size=(d, d)))


def symmetric_flow(eigs, kind, beta=1.0):
    """Single head with Q = I and K = V = Qm diag(eigs) Qm^T, so M = Q^T K = V (symmetric)."""
    V = Qm @ np.diag(eigs) @ Qm.T
    return af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention(kind), beta)), V


def axis_shares(final, v, tol=1e-3):
    """Share of samples with every token at +-v, split into consensus and sign-split."""
    c = np.einsum("bnd,d->bn", np.asarray(final), v)
    on_axis = np.all(np.abs(c) > 1 - tol, axis=1)
    consensus = on_axis & (np.all(c > 0, axis=1) | np.all(c < 0, axis=1))
    return on_axis.mean(), consensus.mean(), (on_axis & ~consensus).mean()


def wilson(k, N, z=1.96):
    p = k / N
    c = (p + z * z / (2 * N)) / (1 + z * z / N)
    h = z * np.sqrt(p * (1 - p) / N + z * z / (4 * N * N)) / (1 + z * z / N)
    return c - h, c + h


# %% [markdown]
# ## 1. Dominant positive eigenvalue: the v_1 axis attracts almost every sample

# %%
x0 = af.sample.sphere(jax.random.PRNGKey(0), (SAMPLES, n, d))
results = {}
for kind in ("softmax", "unnormalized"):
    flow, V = symmetric_flow([1.0, 0.3, -0.2], kind)
    w, U = np.linalg.eigh(V)
    v1 = U[:, np.argmax(w)]
    sol = af.simulate(flow, x0, t1=400.0, dt=0.05, tol=1e-7)
    on, cons, split = axis_shares(sol.final, v1)
    k = int(round(on * SAMPLES))
    lo, hi = wilson(k, SAMPLES)
    results[kind] = (on, cons, split)
    print(f"{kind:12s}: on the v_1 axis {on:.3f} (95% CI [{lo:.3f}, {hi:.3f}]) = consensus {cons:.3f} + sign split {split:.3f};"
          f" converged {sol.outcome_counts()['converged']}/{SAMPLES}")

# %% [markdown]
# **[SS] claim:** alignment with the dominant eigendirection. **attnflow measured:** the table above. Both consensus
# and sign-split states on the v_1 axis occur, as docs/model.md section 6 notes; what [SS] calls alignment is alignment with the axis.

# %% [markdown]
# ## 2. Negative-definite V: sign-split polarisation on +-v_d

# %%
for kind in ("softmax", "unnormalized"):
    flow, V = symmetric_flow([-0.2, -0.5, -1.0], kind)
    w, U = np.linalg.eigh(V)
    vd = U[:, np.argmin(w)]
    sol = af.simulate(flow, x0, t1=400.0, dt=0.05, tol=1e-7)
    on, cons, split = axis_shares(sol.final, vd)
    lo, hi = wilson(int(round(split * SAMPLES)), SAMPLES)
    print(f"{kind:12s}: sign split on +-v_d {split:.3f} (95% CI [{lo:.3f}, {hi:.3f}]), consensus on v_d {cons:.3f}")

# %% [markdown]
# ## 3. Trajectories and the energy along them
# The flow is a gradient flow of E = 1/(2 beta n^2) sum_ij exp(beta x_i^T V x_j) (docs/model.md section 7), so E rises
# along every trajectory; `af.diagnose` evaluates the exact rate dE/dt by autodiff at each saved state.

# %%
flow, V = symmetric_flow([1.0, 0.3, -0.2], "softmax")
sol = af.simulate(flow, x0[:4], t1=40.0, dt=0.05, saves=200)
tr = af.energy_trace(flow, sol.trajectory, sol.ts)
print("energy monotone in every member:", bool(tr.monotone.all()), "; min exact dE/dt:", float(tr.rate.min()))
fig = plt.figure(figsize=(11, 4))
ax = fig.add_subplot(1, 2, 1, projection="3d")
w, U = np.linalg.eigh(V)
v1 = U[:, np.argmax(w)]
for i in range(n):
    p = np.asarray(sol.trajectory[:, 0, i])
    ax.plot(*p.T, lw=1)
    ax.scatter(*p[-1], color="crimson", s=30)
ax.plot(*np.stack([-v1, v1]).T, "k--", lw=1, label="v_1 axis")
ax.set(xlabel="x1", ylabel="x2", zlabel="x3", title="tokens move to the v_1 axis")
ax.legend()
ax2 = fig.add_subplot(1, 2, 2)
ax2.plot(tr.ts, tr.energy)
ax2.set(xlabel="time t", ylabel="energy E", title="E rises along the flow (4 members)")
fig.tight_layout()

# %% [markdown]
# ## Next
# - Basin fractions with intervals, local basin sizes and continuation: notebook 02 and `attnflow basins`.
# - Equilibria and their stability (consensus on v_1 stable, the rest unstable): notebook 01 and `attnflow stability`.
