"""The [PM] experiment on real transformer weights, and rank-1 steering of the last layer.

Formulas: docs/model.md section 8; [PM] section 2.2-2.3, 3 and appendix B.

Reduced dynamics (the default): per layer x_i <- x_i + alpha u_i (attention + skip), then l2
normalisation, alpha = 1, no FFN, no embedding, standard-normal initial tokens. Options keep the FFN,
the embedding and/or the original LayerNorm (a :class:`attnflow.model.transformer.TransformerBlock` per layer;
the layer classes and :func:`build_stack` live in :mod:`attnflow.model.transformer`, re-exported here).

Metric conventions. For layer l (0-based here, layer l maps x(l) to x(l+1)) with principal subspace
B_l of W_l (span v_1, or span(Re v_1, Im v_1) for a complex pair, or span(v_1, v_2) under a near tie),
and per token:

- ``c``      = |P_l x(l+1)| / |x(l+1)|, the alignment of the layer's output with v_1(l);
- ``delta``  = |P_l x(l+1)| / |x(l+1)| - |P_l x(l)| / |x(l)|; ``p`` = P(delta > 0) over tokens;
- ``c_bar``, ``delta_bar``, ``p_bar``: the same averaged over every eigen-direction of W_l (a complex pair
  counted once as its real 2D subspace).

Eigendecompositions run on the host (NumPy LAPACK, see :mod:`attnflow.analysis.spectral`); the time
evolution is one :func:`attnflow.simulate` call on the :class:`attnflow.LayerStack`.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..evolve.simulate import simulate
from ..model.heads import Heads
from ..model.transformer import (  # re-exported: the model classes' old import path
    _ACTS as _ACTS,
    FFN as FFN,
    InverseAffine as InverseAffine,
    TransformerBlock as TransformerBlock,
    build_stack as build_stack,
    layer_heads as layer_heads,
)
from . import spectral as sp

# ----------------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class LayerMetrics:
    """Per-layer results of :func:`power_method_experiment` (arrays over layers, length L)."""

    lambda1: np.ndarray  # complex (L,)
    eigenvalues: np.ndarray  # complex (L, k) the first k sorted eigenvalues
    gap: np.ndarray
    c: np.ndarray
    c_std: np.ndarray
    c_bar: np.ndarray
    delta: np.ndarray
    delta_std: np.ndarray
    delta_bar: np.ndarray
    p: np.ndarray
    p_bar: np.ndarray
    subspace_dim: np.ndarray  # 1 (real v1), 2 (complex pair or near tie)
    c_cum: np.ndarray  # |cos(x(l+1), principal eigvec of W_l ... W_1)|
    c_cum_bar: np.ndarray


@dataclasses.dataclass(frozen=True)
class PMResult:
    """Result of :func:`power_method_experiment`: per-layer metrics and the saved trajectory ``(L+1, S, n, d)``."""

    model: str
    order: str
    tokens: int
    samples: int
    metrics: LayerMetrics
    trajectory: np.ndarray  # (L+1, S, n, d)

    def to_json(self) -> dict:
        """The JSON form printed by ``attnflow transformer --json``."""
        m = self.metrics
        layers = []
        for l in range(len(m.c)):
            layers.append({
                "layer": l + 1, "lambda1": [float(m.lambda1[l].real), float(m.lambda1[l].imag)], "gap": float(m.gap[l]),
                "c": float(m.c[l]), "c_bar": float(m.c_bar[l]), "delta": float(m.delta[l]),
                "delta_bar": float(m.delta_bar[l]), "p": float(m.p[l]), "p_bar": float(m.p_bar[l]),
                "c_std": float(m.c_std[l]), "delta_std": float(m.delta_std[l]), "subspace_dim": int(m.subspace_dim[l]),
                "c_cum": float(m.c_cum[l]), "c_cum_bar": float(m.c_cum_bar[l]),
            })
        return {"model": self.model, "order": self.order, "tokens": self.tokens, "samples": self.samples, "layers": layers}


def _corr_all(X, bases):
    """|P_k x| / |x| for every basis k: X (N, d), bases (m, d, 2) -> (m, N)."""
    nx = np.linalg.norm(X, axis=-1)
    m, d, k = bases.shape
    proj = (X @ bases.transpose(1, 0, 2).reshape(d, m * k)).reshape(-1, m, k)
    return (np.linalg.norm(proj, axis=-1) / nx[:, None]).T


def layer_metrics(trajectory, Ws, *, order: str, tie: float | None = None, keep: int = 5) -> LayerMetrics:
    """c, Delta, p and their all-eigenvector baselines from saved states.

    **Arguments:**

    - `trajectory`: ``(L+1, ..., d)`` states before layer 1 .. after layer L (tokens of all samples).
    - `Ws`: ``(L, d, d)`` the layer matrices used.
    - `order`, `tie`: as in :func:`attnflow.analysis.spectral.eigenpairs` / ``principal_subspace``.
    - `keep`: number of leading eigenvalues to keep for the Fig. 6 plot.
    """
    traj = np.asarray(trajectory, dtype=np.float64)
    L = len(Ws)
    d = traj.shape[-1]
    X = traj.reshape(traj.shape[0], -1, d)
    out = {k: [] for k in LayerMetrics.__dataclass_fields__}
    cum = sp.cumulative_principal(list(Ws), order=order)
    for l in range(L):
        e = sp.eigenpairs(np.asarray(Ws[l], dtype=np.float64), order=order)
        B = sp.principal_subspace(e, tie=tie)
        cin = sp.subspace_correlation(X[l], B)
        cout = sp.subspace_correlation(X[l + 1], B)
        dl = cout - cin
        allb = sp.eigen_bases(e)
        ain = _corr_all(X[l], allb)
        aout = _corr_all(X[l + 1], allb)
        dall = aout - ain
        out["lambda1"].append(e.lambda1)
        out["eigenvalues"].append(np.pad(e.values[:keep], (0, max(0, keep - e.values.size)), constant_values=np.nan))
        out["gap"].append(sp.spectral_gap(e))
        out["c"].append(cout.mean())
        out["c_std"].append(cout.std())
        out["c_bar"].append(aout.mean())
        out["delta"].append(dl.mean())
        out["delta_std"].append(dl.std())
        out["delta_bar"].append(dall.mean())
        out["p"].append(np.mean(dl > 0))
        out["p_bar"].append(np.mean(dall > 0))
        out["subspace_dim"].append(B.shape[1])
        ec = cum[l]
        out["c_cum"].append(sp.subspace_correlation(X[l + 1], sp.principal_subspace(ec, tie=tie)).mean())
        out["c_cum_bar"].append(_corr_all(X[l + 1], sp.eigen_bases(ec)).mean())
    return LayerMetrics(**{k: np.asarray(v) for k, v in out.items()})


def initial_tokens(model, key, *, tokens: int, samples: int, embedding: bool = False, dtype=jnp.float32):
    """``(samples, tokens, d)`` initial states: standard normal, or embedded random token ids."""
    if not embedding:
        return jax.random.normal(key, (samples, tokens, model.d), dtype)
    vocab = model.embedding["word"].shape[0]
    ids = np.asarray(jax.random.randint(key, (samples, tokens), 0, vocab))
    return jnp.asarray(np.stack([model.embed(i) for i in ids]), dtype)


def power_method_experiment(model, *, key, tokens: int = 10, samples: int = 100, order: str = "real",
                            tie: float | None = None, biases: bool = False, fold_layernorm: bool = False,
                            ffn: bool = False, embedding: bool = False, layernorm: bool = False,
                            extra_layers: int = 0, heads=None, dtype=jnp.float32) -> PMResult:
    """Run the [PM] experiment: random tokens through the (reduced) layers, per-layer alignment metrics.

    **Arguments:** `model`: an :class:`attnflow.io.hf.HFModel`; `key`: PRNG key; `tokens`, `samples`: n and the
    number of independent prompts; `order`/`tie`: principal-eigenvalue order and near-tie tolerance; the
    remaining flags as in :func:`build_stack`; `heads`: optional replacement heads per layer (steering).

    **Returns:** a :class:`PMResult` (metrics per layer and the saved trajectory).
    """
    if tokens < 1 or samples < 1:
        raise ValueError(f"tokens and samples must be >= 1, got {tokens}, {samples}")
    if embedding and tokens > model.max_tokens:
        raise ValueError(f"embedding=True places {tokens} tokens, but {model.name} has position embeddings for at "
                         f"most {model.max_tokens}")
    if heads is None:  # folded heads in the experiment's dtype: a float64 one as exact as with the raw heads
        heads = layer_heads(model, biases=biases, fold_layernorm=fold_layernorm, extra_layers=extra_layers,
                            dtype=np.float64 if jnp.dtype(dtype) == jnp.float64 else None, layernorm=layernorm)
    stack = build_stack(model, biases=biases, fold_layernorm=fold_layernorm, ffn=ffn, layernorm=layernorm,
                        extra_layers=extra_layers, heads=heads)
    x0 = initial_tokens(model, key, tokens=tokens, samples=samples, embedding=embedding, dtype=dtype)
    L = stack.num_layers
    sol = simulate(stack, x0, steps=L, saves=L)
    Ws = np.stack([np.asarray(h.layer_matrix(), np.float64) for h in heads])
    traj = np.asarray(sol.trajectory)
    return PMResult(model=model.name, order=order, tokens=tokens, samples=samples,
                    metrics=layer_metrics(traj, Ws, order=order, tie=tie), trajectory=traj)


# ----------------------------------------------------------------------------------------- steering


@dataclasses.dataclass(frozen=True)
class Steering:
    """A steered layer: `heads` with O' = O + gamma lambda_1 u w^T V_cat^+, so W' = W + gamma lambda_1 u (P w)^T
    (P the projector on the row space of V_cat; P = I when V_cat is square and invertible).

    - `lambda1`: principal eigenvalue of the unmodified W; `w`: the vector used (w^T u = 1 for the left
      principal eigenvector choice); `predicted`: (1 + gamma) lambda_1, the new principal eigenvalue when
      w is the left principal eigenvector (the rest of the spectrum is unchanged); `achieved`: the principal
      eigenvalue of the realised W'; `v1`: its eigenvector; `W`: the realised W'.
    """

    heads: Heads
    u: np.ndarray
    w: np.ndarray
    gamma: float
    lambda1: complex
    predicted: complex
    achieved: complex
    v1: np.ndarray
    W: np.ndarray


def steer_heads(heads: Heads, u, gamma: float, *, order: str = "real", w: str = "left") -> Steering:
    """Rank-1 modification of the output matrix steering the layer's principal eigenvector toward u.

    Derivation (w = ``"left"``): let y_1 be the left principal eigenvector of W (y_1^T W = lambda_1 y_1^T) and
    w = y_1 / (y_1^T u). Then W' = W + gamma lambda_1 u w^T satisfies w^T W' = lambda_1 (1 + gamma) w^T,
    and W' v_k = lambda_k v_k for every other right eigenvector (y_1^T v_k = 0): the spectrum is unchanged
    except lambda_1 -> (1 + gamma) lambda_1, whose right eigenvector is ((1 + gamma) lambda_1 I - W)^{-1} u -> u
    as gamma grows. ``w="u"`` uses w = u (then W' -> gamma lambda_1 u u^T for large gamma, all eigenvalues move).
    For a complex lambda_1 only ``w="u"`` keeps W' real; |lambda_1| is used as the scale.

    **Arguments:** `heads`: the layer's heads; `u`: ``(d,)`` target direction; `gamma`: gain >= 0;
    `order`: principal-eigenvalue order; `w`: ``"left"`` or ``"u"``.
    """
    if w not in ("left", "u"):
        raise ValueError(f"w must be 'left' or 'u', got {w!r}")
    if not (np.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma}")
    u = np.asarray(u, np.float64)
    if u.shape != (heads.dim,) or not np.linalg.norm(u) > 0:
        raise ValueError(f"u must be a non-zero vector of shape ({heads.dim},), got shape {u.shape}")
    u = u / np.linalg.norm(u)
    W = np.asarray(heads.layer_matrix(), np.float64)
    e = sp.eigenpairs(W, order=order)
    lam = e.lambda1
    real = e.is_real(0)
    if w == "left" and real:
        el = sp.eigenpairs(W.T, order=order)
        k = int(np.argmin(np.abs(el.values - lam)))
        y = el.vectors[:, k].real
        if abs(y @ u) < 1e-12:
            raise ValueError("u is orthogonal to the left principal eigenvector; use w='u'")
        wv = y / (y @ u)
        scale = lam.real
        predicted = (1 + gamma) * lam
    else:
        wv = u.copy()
        scale = abs(lam)
        predicted = complex("nan")
    H, dh, d = heads.V.shape
    V = np.asarray(heads.V, np.float64).reshape(H * dh, d)  # V_cat
    O = np.asarray(heads.O, np.float64).transpose(1, 0, 2).reshape(d, H * dh)  # [O_1 ... O_H]
    O2 = O + gamma * scale * np.outer(u, wv) @ np.linalg.pinv(V)
    new_O = O2.reshape(d, H, dh).transpose(1, 0, 2).astype(np.asarray(heads.O).dtype)
    new = eqx.tree_at(lambda h: h.O, heads, jnp.asarray(new_O))
    Wn = O2 @ V
    en = sp.eigenpairs(Wn, order=order)
    return Steering(heads=new, u=u, w=wv, gamma=float(gamma), lambda1=lam, predicted=predicted,
                    achieved=en.lambda1, v1=en.v1, W=Wn)


@dataclasses.dataclass(frozen=True)
class SteeringResult:
    """Result of :func:`steer_experiment`: the steering, the final mean and minimum |cos(x, u)|, the experiment."""

    steering: Steering
    final_cos: float  # mean over tokens of |cos(x(L), u)|
    final_cos_min: float
    result: PMResult


def steer_experiment(model, u, gamma: float, *, key, tokens: int = 10, samples: int = 100, order: str = "real",
                     w: str = "left", biases: bool = False, **kw) -> SteeringResult:
    """Steer the last layer toward u with gain gamma and run the [PM] experiment on the modified model.

    **Returns:** the :class:`Steering`, the achieved mean and minimum final |cos(x, u)| over all tokens and samples,
    and the experiment result (whose last-layer c is the alignment with the new principal eigenvector).
    """
    heads = layer_heads(model, biases=biases, fold_layernorm=kw.get("fold_layernorm", False), extra_layers=kw.get("extra_layers", 0),
                        layernorm=kw.get("layernorm", False))
    st = steer_heads(heads[-1], u, gamma, order=order, w=w)
    heads = heads[:-1] + [st.heads]
    res = power_method_experiment(model, key=key, tokens=tokens, samples=samples, order=order, biases=biases, heads=heads, **kw)
    xf = res.trajectory[-1].reshape(-1, model.d)
    cos = np.abs(xf @ st.u) / np.linalg.norm(xf, axis=-1)
    return SteeringResult(steering=st, final_cos=float(cos.mean()), final_cos_min=float(cos.min()), result=res)


def find_steering_gain(model, u, *, key, target: float = 0.99, gammas=None, refine: int = 5, **kw):
    """The smallest gamma on a grid whose mean final |cos(x, u)| exceeds `target`, then `refine`
    geometric bisection steps inside the bracketing grid interval (assumes the curve is monotone there).

    **Returns:** ``(gamma or None, [(gamma, final_cos), ...])`` (the trace lists every gamma tried, sorted).
    """
    if gammas is None:
        gammas = [0.0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    trace = []

    def f(g):
        c = steer_experiment(model, u, float(g), key=key, **kw).final_cos
        trace.append((float(g), c))
        return c

    lo = None
    for g in gammas:
        if f(g) > target:
            hi = float(g)
            if lo is not None and lo > 0:
                for _ in range(refine):
                    mid = math.sqrt(lo * hi)
                    if f(mid) > target:
                        hi = mid
                    else:
                        lo = mid
            return hi, sorted(trace)
        lo = float(g)
    return None, sorted(trace)
