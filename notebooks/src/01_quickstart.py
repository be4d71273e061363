# %% [markdown]
# # 01 · Quickstart: a model, an ensemble, its attractors and their stability
#
# attnflow separates **what** the dynamics are (a model for one configuration X of shape (n, d)) from **how** they
# are evolved (`af.simulate`, batched with `vmap` inside one `jit`). This notebook defines a model, simulates an
# ensemble, plots trajectories on the sphere, labels the final states and certifies the equilibria they reach.
# `ATTNFLOW_SMOKE=1` shrinks the sample counts (CI runs it that way).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import attnflow as af

jax.config.update("jax_enable_x64", True)
SMOKE = bool(os.environ.get("ATTNFLOW_SMOKE"))
B = 200 if SMOKE else 5000

# %% [markdown]
# ## A model
# One softmax head with value matrix V (symmetric, eigenvalues 1, 0.5, -0.3) and score matrix M = Q^T K = V, as the
# discrete layer map x_i <- x_i + alpha u_i, normalised to the sphere (docs/model.md section 3).

# %%
V = np.diag([1.0, 0.5, -0.3])
model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), beta=1.0), alpha=0.1)
print("layer matrix W =\n", model.attn.heads.layer_matrix())

# %% [markdown]
# ## Simulate an ensemble
# `tol` stops each member once its per-step change is below it; `outcome` reports per member whether it converged.

# %%
x0 = af.sample.sphere(jax.random.PRNGKey(0), (B, 6, 3))
sol = af.simulate(model, x0, steps=4000, tol=1e-8)
print(sol.outcome_counts(), "median steps:", int(np.median(sol.steps)))

traj = af.simulate(model, x0[:3], steps=1500, saves=150)
fig = plt.figure(figsize=(12, 4))
for b in range(3):
    ax = fig.add_subplot(1, 3, b + 1, projection="3d")
    for i in range(6):
        p = np.asarray(traj.trajectory[:, b, i])
        ax.plot(*p.T, lw=1)
        ax.scatter(*p[-1], color="crimson", s=25)
    ax.set(xlabel="x1", ylabel="x2", zlabel="x3", title=f"member {b}")
fig.suptitle("token paths on the sphere (red: final positions)")
fig.tight_layout()

# %% [markdown]
# ## Label the final states
# `af.classify.classify` labels each state (consensus / bipartite / clustering / polygonal / not converged) with the
# eigenvector of W it is aligned to; labels do not depend on token order. `af.basin_fractions` does the same for a
# whole study, with 95% Wilson intervals.

# %%
from attnflow.analysis.classify import describe, equilibrium_name, label_rows

rows = label_rows(af.classify.classify(model, sol.final, sol.outcome))
uniq, counts = np.unique(rows, axis=0, return_counts=True)
for r, c in sorted(zip(uniq, counts), key=lambda t: -t[1]):
    print(f"{describe(r, 6)['name']:22s} {c / B:.3f}")

# %% [markdown]
# ## Certify the equilibria
# The intrinsic Jacobian (autodiff, restricted to the tangent space of the product of spheres) decides stability:
# spectral radius < 1 for a map. docs/model.md's closed form at consensus is built in as a cross-check.

# %%
states = [(equilibrium_name("consensus", 0, sign=1), af.consensus(model, 0, 6)),  # names as docs/model.md: v1 first
          (equilibrium_name("consensus", 1, sign=1), af.consensus(model, 1, 6)),
          (equilibrium_name("bipartite", 0, split=3, tokens=6), af.bipartite(model, 0, 3, 6)),
          (equilibrium_name("bipartite", 2, split=3, tokens=6), af.bipartite(model, 2, 3, 6))]
stab = af.analyse(model, np.stack([X for _, X in states]))
for (name, _), rho, v in zip(states, stab.measure, stab.verdict):
    print(f"{name:18s} spectral radius {rho:.6f}  {['stable', 'unstable', 'neutral'][v]}")
cf = af.consensus_closed_form(model, 0, 6, alpha=0.1)
print("closed form vs autodiff at consensus +v1:", np.max(np.abs(np.sort_complex(cf) - np.sort_complex(stab.eigenvalues[0]))))

# %% [markdown]
# **Reading:** the ensemble splits between consensus on +-v_1 and sign splits on the v_1 axis, and exactly those
# equilibria are certified stable: docs/model.md section 5's observation that M = V makes bipartite consensus on v_1
# stable. Next: notebook 02 (multistability and basins), `attnflow stability`, `attnflow basins`.
