# %% [markdown]
# # 02 · Multistability of self-attention dynamics [MS]
#
# Altafini, *Multistability of self-attention dynamics in transformers* (arXiv 2511.11553): consensus, bipartite
# consensus, polygonal and clustering equilibria; several asymptotically stable equilibria often coexist; consensus and
# bipartite equilibria are aligned with eigenvectors of V, often but not only v_1. Formulas: docs/model.md sections 4-6.
# `ATTNFLOW_SMOKE=1` shrinks the sample counts.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import attnflow as af

jax.config.update("jax_enable_x64", True)
SMOKE = bool(os.environ.get("ATTNFLOW_SMOKE"))
N = 300 if SMOKE else 4000
n = 6
V = np.diag([1.0, 0.5, -0.3])
flow = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), beta=2.0))

# %% [markdown]
# ## The equilibrium classes, and which are stable
# Every consensus and bipartite consensus on each eigenvector, polygonal configurations (uniform attention), and a
# numerical search for clustering equilibria that are *not* eigenvector-aligned (Levenberg-Marquardt on the spheres).

# %%
from attnflow.analysis.classify import equilibrium_name

cands = [(equilibrium_name("consensus", k, sign=1), af.consensus(flow, k, n)) for k in range(3)]
cands += [(equilibrium_name("bipartite", k, split=m, tokens=n), af.bipartite(flow, k, m, n)) for k in range(3) for m in (1, 2, 3)]
clusters = af.find_clusterings(flow, jax.random.PRNGKey(1), n, starts=8 if SMOKE else 32)
cands += [(f"2-clustering #{i} (not aligned)", X) for i, X in enumerate(clusters[:3])]
stab = af.analyse(flow, np.stack([np.asarray(X) for _, X in cands]))
for (name, _), m, v in zip(cands, stab.measure, stab.verdict):
    print(f"{name:30s} max Re {m: .4f}  {['stable', 'unstable', 'neutral'][v]}")
uni = af.SphereFlow(af.SelfAttention(af.Heads.single(V), af.Attention("uniform")))
print("polygonal (uniform attention), n = 3..6:", [["stable", "unstable", "neutral"][int(af.analyse(uni, af.polygonal(k, 3)[None]).verdict[0])] for k in range(3, 7)])

# %% [markdown]
# **[MS] claim:** several stable equilibria coexist. **attnflow measured:** consensus on v_1 and the bipartite
# consensus states on v_1 are all stable for this V (M = V, beta = 2); everything on v_2, v_3, the polygons and the
# non-aligned clusterings found are unstable.

# %% [markdown]
# ## Basin fractions with intervals

# %%
res = af.basin_fractions(flow, jax.random.PRNGKey(0), N, tokens=n, budget=af.Budget(t1=200.0, dt=0.05))
for a in res.attractors:
    print(f"{a.name:22s} {a.fraction:.3f}  95% interval [{a.interval[0]:.3f}, {a.interval[1]:.3f}]")
fig, ax = plt.subplots(figsize=(7, 3.5))
a = res.attractors
ax.barh([x.name for x in a][::-1], [x.fraction for x in a][::-1],
        xerr=np.array([[x.fraction - x.interval[0], x.interval[1] - x.fraction] for x in a][::-1]).T, capsize=3)
ax.set(xlabel="basin fraction (95% Wilson interval)", title=f"{res.samples} uniform starts")
fig.tight_layout()

# %% [markdown]
# ## Continuation in beta
# Basin fractions over a grid of beta values, attractors matched by label across the grid; and the bipartite point
# followed by Newton continuation, with the beta where it becomes stable located by bisection.

# %%
betas = [0.3, 1.0, 2.0] if SMOKE else [0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
mp = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), alpha=0.1)
cont = af.basins.continuation(mp, jax.random.PRNGKey(2), N // 2, param="beta", values=betas, tokens=n, budget=af.Budget(steps=4000))
branch = af.continue_equilibrium(mp, af.bipartite(mp, 0, 3, n), param="beta", values=np.linspace(0.2, 1.0, 9))
print("bipartite v1 3:3 becomes stable at beta =", branch.changes)
fig, ax = plt.subplots(1, 2, figsize=(12, 4))
labels = list(cont.fractions)
ax[0].stackplot(cont.values, *[cont.fractions[k] for k in labels], labels=labels)
ax[0].set(xlabel="beta", ylabel="basin fraction", title="basin fractions vs beta (layer map)")
ax[0].legend(fontsize=7)
ax[1].plot(branch.values, branch.measure, "o-")
ax[1].axhline(1.0, color="k", ls=":")
for c in branch.changes:
    ax[1].axvline(c, color="tab:purple", ls="--", label=f"stability change at beta = {c:.4f}")
ax[1].set(xlabel="beta", ylabel="spectral radius", title="continuation of bipartite v1 3:3")
ax[1].legend()
fig.tight_layout()

# %% [markdown]
# **Reading:** below beta ~ 0.55 only consensus attracts; above it the bipartite states on v_1 become stable and their
# basins grow with beta. Next: `attnflow basins CONFIG.toml --out DIR` for large, resumable studies (notebook 06).
