"""Audit of the naming of equilibria (docs/model.md sections 6 and 10) against an independent NumPy reference.

The reference (`_ref_name`) is written from section 10 alone: clusters are the connected components of
|x_i - x_j| < tol; two clusters closer than 10 tol are unresolved (``not converged``); an axis is the eigenvector of
a simple real eigenvalue of W (float64 ``numpy.linalg.eig``, sorted by descending real part, ties by descending
imaginary part, sign: largest-magnitude entry positive); a token is on the axis when ||cos(x_i, v_k)| - 1| < tol;
every token on an axis: one cluster is a consensus, two clusters on either side a bipartite state, anything else
unresolved; off every axis: one cluster is ``consensus (off-axis)``, several are ``polygonal`` (sum within tol of 0)
or ``clustering``, with their sizes, descending.

Tolerances: cluster tol 1e-3 (the classifier's default) for float32 and float64 states alike; states whose
distances or cosines lie within 10% of a threshold are skipped (their name is decided by rounding). Eigenvalue
tolerances are those of attnflow.analysis.eigen: 1e-8 (float64), 1e-4 (float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis import classify as cl
from attnflow.analysis import equilibria as eq
from attnflow.analysis.eigen import is_real, is_simple
from attnflow.analysis.spectral import eigenpairs

TOL = 1e-3


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _ref_axes(W):
    """(vectors or None per eigenvalue, simple-real mask), in section 6's "real" order, float64."""
    vals, vecs = np.linalg.eig(np.asarray(W, np.float64))
    real = np.abs(vals.imag) <= 1e-8 * np.maximum(1, np.abs(vals))
    order = sorted(range(len(vals)), key=lambda i: (-vals[i].real, -(0.0 if real[i] else vals[i].imag)))
    vals, vecs, real = vals[order], vecs[:, order], real[order]
    simple = np.array([np.sum(np.abs(vals - v) <= 1e-8 * max(1, abs(v))) == 1 for v in vals])
    out = []
    for k in range(len(vals)):
        if not real[k]:
            out.append(None)
            continue
        v = np.real(vecs[:, k] * np.exp(-1j * np.angle(vecs[np.argmax(np.abs(vecs[:, k])), k])))
        v = _unit(v)
        out.append(v * np.sign(v[np.argmax(np.abs(v))]))
    return out, real & simple


def _ref_name(W, X, tol=TOL, margin=0.1):
    """(name by section 10, ambiguous)."""
    X = np.asarray(X, np.float64)
    n = len(X)
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)
    lab = np.arange(n)
    for _ in range(n):  # connected components of D < tol: min-label propagation, written out in NumPy
        lab = np.array([lab[D[i] < tol].min() for i in range(n)])
    amb = bool(np.any(np.abs(D - tol) < margin * tol) or np.any(np.abs(D - 10 * tol) < margin * 10 * tol))
    if np.any((lab[:, None] != lab[None]) & (D < 10 * tol)):
        return "not converged", amb
    sizes = sorted(np.unique(lab, return_counts=True)[1].tolist(), reverse=True)
    V, ok = _ref_axes(W)
    dirs = _unit(X)
    for k in range(len(V)):
        if not ok[k]:
            continue
        dev = np.abs(np.abs(dirs @ V[k]) - 1)
        amb |= bool(np.any(np.abs(dev - tol) < margin * tol))
        if np.all(dev < tol):
            npos = int(np.sum(dirs @ V[k] > 0))
            if len(sizes) == 1:
                return f"consensus {'+' if npos == n else '-'}v{k + 1}", amb
            if len(sizes) == 2 and 0 < npos < n:
                return f"bipartite v{k + 1} {npos}:{n - npos}", amb
            return "not converged", amb
    if len(sizes) == 1:
        return "consensus (off-axis)", amb
    s = np.abs(X.sum(0)).max()
    amb |= bool(abs(s - tol) < margin * tol)
    return f"{'polygonal' if s < tol else 'clustering'} {':'.join(map(str, sizes))}", amb


def _random_W(rng, d):
    t = rng.integers(6)
    R = rng.normal(size=(d, d))
    if t == 0:
        return R  # complex pairs as they come
    if t == 1:
        return R + R.T
    lam = rng.normal(size=d)
    if t == 2 and d >= 2:
        lam[1] = lam[0]  # a repeated eigenvalue
    if t == 3 and d >= 2:
        lam[1] = -lam[0]  # +-lambda
    if t == 4:
        return np.linalg.qr(R)[0] @ np.diag(lam) @ np.linalg.qr(R)[0].T
    return R @ np.diag(lam) @ np.linalg.inv(R)


def _random_state(rng, W, n, d):
    V, _ = _ref_axes(W)
    axes = [k for k in range(d) if V[k] is not None]
    t = rng.integers(7)
    u = _unit(rng.normal(size=d))
    if t in (0, 1, 2) and axes:
        u = V[rng.choice(axes)]
    if t == 0:  # consensus
        X = np.tile(u, (n, 1)) * rng.choice([1, -1])
    elif t in (1, 3):  # bipartite, every split (0 and n included)
        m = rng.integers(0, n + 1)
        X = np.concatenate([np.tile(u, (m, 1)), np.tile(-u, (n - m, 1))])
    elif t == 2:  # spread about an axis: clusters 10-40 tol apart, every |cos| within tol of 1
        X = _unit(u + 0.02 * rng.normal(size=(n, d)) * rng.choice([1, -1], size=(n, 1)))
        X = X * np.sign(X @ u)[:, None] * rng.choice([1, -1], size=(n, 1))
    elif t == 4:  # random clusters
        P = _unit(rng.normal(size=(int(rng.integers(2, n + 2)), d)))
        X = P[rng.integers(0, len(P), n)]
    elif t == 5 and d >= 2 and n >= 2:  # a regular polygon in a random plane
        c = rng.integers(2, n + 1)
        ang = 2 * np.pi * np.arange(c) / c
        P = np.stack([np.cos(ang), np.sin(ang)], 1) @ np.linalg.qr(rng.normal(size=(d, 2)))[0].T
        X = P[np.arange(n) % c]
    else:
        X = np.tile(u, (n, 1))
    sig = rng.choice([0.0, 1e-6, 1e-4, 3e-4, 2e-3, 6e-3])
    return _unit(X + sig * rng.normal(size=X.shape))[rng.permutation(n)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_names_match_an_independent_reference_and_ignore_token_order(dtype):
    """Random W (complex pairs, repeated and +-lambda eigenvalues, symmetric) and states (consensus, bipartite with
    every split, clusters, polygons, tokens spread about an axis, noise below and above tol and 10 tol, n = 1, 2, 5,
    d = 1, 2, 3): the classifier's name (its Gram suffix aside) is the reference's, and a permutation of the tokens
    changes no row. The old code named a state spread about an axis in 3+ clusters 'clustering gram []'."""
    rng = np.random.default_rng(7)
    checked = 0
    for d in (1, 2, 3):
        for n in (1, 2, 5):
            for _ in range(3):
                W = _random_W(rng, d)
                X = np.stack([_random_state(rng, W, n, d) for _ in range(10)]).astype(dtype)
                c = cl.classifier(W)
                L = cl.classify(c, jnp.asarray(X))
                names = L.names()
                perm = rng.permutation(n)
                np.testing.assert_array_equal(L.rows(), cl.classify(c, jnp.asarray(X[:, perm])).rows())
                for i in range(len(X)):
                    ref, amb = _ref_name(W, X[i])
                    if not amb:
                        checked += 1
                        assert names[i].split(" gram")[0] == ref, (W, X[i])
    assert checked > 220


def test_every_token_on_an_axis_but_neither_consensus_nor_bipartite_is_not_converged():
    """Section 10: two clusters on one side of an eigenvector axis are no equilibrium resolved at tol. Three clusters
    0.02 apart about +v1 (every |cos| within 2e-4 of 1) were named 'clustering gram []' (sizes and axis dropped from
    the row, the name saying neither); two about +v1 and one at -v1 too."""
    W = np.diag([1.0, 0.4, -0.3])

    def tilt(a, b=0.0):
        return _unit(np.array([np.cos(a), np.sin(a), b]))

    spread = np.stack([tilt(0.0), tilt(0.02), tilt(-0.02), tilt(0.0), tilt(0.0, 0.02)])
    split = np.stack([tilt(0.0), tilt(0.02), -tilt(0.0), -tilt(0.0), tilt(0.0)])
    for dtype in (np.float64, np.float32):
        X = np.stack([spread, split]).astype(dtype)
        assert [_ref_name(W, x)[0] for x in X] == ["not converged"] * 2
        assert cl.classify(W, X).names() == ["not converged"] * 2


def test_float32_eigenpairs_judge_real_with_float32_tolerance():
    """A float32 matrix R diag(lambda) R^-1 with a repeated eigenvalue has eigenvalues that NumPy's float64
    reference puts within 1e-4 max(1, |lambda|) of the real axis (float32's tolerance, docs section 5); eigenpairs
    reported a complex pair (|Im| ~ 1e-8 to 1e-7) in 12 of these 200 matrices. Genuinely complex ones stay complex."""
    rng = np.random.default_rng(0)
    wrong = 0
    for _ in range(200):
        d = int(rng.integers(3, 6))
        lam = rng.normal(size=d)
        lam[1] = lam[0]
        R = rng.normal(size=(d, d))
        W = (R @ np.diag(lam) @ np.linalg.inv(R)).astype(np.float32)
        ref = np.linalg.eigvals(W.astype(np.float64))
        if np.all(np.abs(ref.imag) <= 1e-4 * np.maximum(1, np.abs(ref))):
            wrong += int(np.any(eigenpairs(W, order="real").values.imag != 0))
    assert wrong == 0
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]], np.float32)  # +-i exactly
    assert np.sum(eigenpairs(rot, order="real").values.imag != 0) == 2
    # the helpers take the tolerance of the values' own precision: complex64 -> 1e-4, complex128 -> 1e-8
    assert is_real(np.array([1 + 3e-8j], np.complex64))[0] and not is_real(np.array([1 + 3e-8j]))[0]
    assert not is_simple(np.array([1.0, 1 + 3e-8], np.float32)).any() and is_simple(np.array([1.0, 1 + 3e-8])).all()


def _float32_repeated(seed):
    Q = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0]
    return Q, (Q @ np.diag([1.0, 1.0, 0.5]) @ Q.T).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 7])
def test_a_float32_models_repeated_eigenvalue_names_no_axis(seed):
    """W = Q diag(1, 1, 0.5) Q^T built in float32: rounding splits the double eigenvalue by 3.6e-8 (seed 0) and
    4.1e-8 (seed 7), above float64's tolerance 1e-8, and the classifier called both simple: a consensus on the
    arbitrary basis vectors eig returned was 'consensus +v1' / '+v2', elsewhere in the same eigenspace
    'consensus (off-axis)' (three names for one family of equilibria). Section 10: only simple real eigenvalues
    name an axis, judged at the precision W was computed in (float32: 1e-4)."""
    Q, W = _float32_repeated(seed)
    heads = af.Heads.single(jnp.asarray(W))
    _, V = eq.eigenpairs(heads)
    n = 4
    points = [np.real(V[:, 0]), np.real(V[:, 1]), _unit(Q[:, 0] + 2 * Q[:, 1])]
    for model in (heads, W):
        for u in points:
            X = np.tile(u, (n, 1)).astype(np.float32)
            B = np.concatenate([X[:1], -X[1:]])
            assert cl.classify(model, np.stack([X, -X, B])).names() == ["consensus (off-axis)"] * 2 + [
                "clustering 3:1 gram [4.0]"]
        X = np.tile(Q[:, 2] * np.sign(Q[np.argmax(np.abs(Q[:, 2])), 2]), (n, 1)).astype(np.float32)
        assert cl.classify(model, np.stack([X, np.concatenate([X[:1], -X[1:]])])).names() == [
            "consensus +v3", "bipartite v3 1:3"]


def test_float64_repeated_eigenvalue_consensus_and_antipodal_pairs_off_axis():
    """W = diag(1, 1, 0.5), every token at (1, 1, 0)/sqrt 2: an exact consensus off any simple axis is
    'consensus (off-axis)', for every n; two antipodal clusters there are 'clustering m:(n-m)' (sizes descending,
    whichever side holds m) or 'polygonal m:m' when they sum to zero (section 10). The float64 classifier already
    named these right; the old code fails here only on the Gram suffix that polygonal names now carry (see
    test_zero_sum_states_with_equal_sizes_but_different_shapes_have_different_names)."""
    W = np.diag([1.0, 1.0, 0.5])
    u = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    c = cl.classifier(W)
    for n in (1, 2, 3, 4, 5):
        states, want = [np.tile(u, (n, 1))], ["consensus (off-axis)"]
        for m in range(1, n):
            states.append(np.concatenate([np.tile(u, (m, 1)), np.tile(-u, (n - m, 1))]))
            big, small = max(m, n - m), min(m, n - m)
            want.append(f"{'polygonal' if big == small else 'clustering'} {big}:{small} gram [{float(n)}]")
        assert cl.classify(c, np.stack(states)).names() == want


def test_zero_sum_states_with_equal_sizes_but_different_shapes_have_different_names():
    """A square and a regular tetrahedron of 4 tokens both sum to zero with sizes 1:1:1:1: two rows (their Gram
    spectra differ, [2, 2] and [4/3, 4/3, 4/3]) that were both named 'polygonal 1:1:1:1', so a basin study reported
    two attractors under one name."""
    W = np.diag([1.0, 0.4, -0.3])
    R = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    square = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0.0]]) @ R.T
    tetra = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1.0]]) / np.sqrt(3) @ R.T
    L = cl.classify(W, np.stack([square, tetra]))
    ref = [np.round(np.linalg.eigvalsh(X @ X.T), 3) for X in (square, tetra)]
    assert not np.array_equal(ref[0], ref[1])
    names = L.names()
    assert names[0] != names[1] and all(nm.startswith("polygonal 1:1:1:1") for nm in names)


def test_an_off_axis_bipartite_name_does_not_depend_on_which_side_is_counted():
    """Without an axis there is no sign: split 2 or 3 of 5 is one state; it was 'bipartite (off-axis) 2:3' or '3:2'."""
    assert cl.equilibrium_name("bipartite", None, split=2, tokens=5) == "bipartite (off-axis) 3:2"
    assert cl.equilibrium_name("bipartite", None, split=3, tokens=5) == "bipartite (off-axis) 3:2"
    assert cl.equilibrium_name("bipartite", 1, split=2, tokens=5) == "bipartite v2 2:3"


def test_a_layernorm_maps_fixed_points_on_an_axis_are_named_by_it():
    """A layer map normalised by layernorm has fixed points with rows of norm sqrt(d) (section 4): with W's v1 in the
    hyperplane sum = 0, sqrt(3) v1 at every token (and sqrt(3) v1 / -sqrt(3) v1 split 1:3) are fixed points (residual
    < 1e-15, checked), on the v1 axis. They were 'consensus (off-axis)' and 'clustering 3:1': |x . v1| = sqrt 3 was
    compared with 1 as if it were a cosine."""
    from attnflow.model.norms import LayerNorm

    v1, v2, v3 = np.array([1, -1, 0]) / np.sqrt(2), np.array([1, 1, -2]) / np.sqrt(6), np.ones(3) / np.sqrt(3)
    Q = np.stack([v1, v2, v3], 1)
    W = Q @ np.diag([1.0, 0.3, -0.5]) @ Q.T
    dyn = af.LayerMap(af.SelfAttention(af.Heads.single(jnp.asarray(W)), af.Attention("softmax"), 1.0), 0.5,
                      norm=LayerNorm())
    s = np.real(eq.eigenpairs(dyn).vectors[:, 0])
    X = np.tile(np.sqrt(3) * s, (4, 1))
    B = np.concatenate([X[:1], -X[1:]])
    for Y in (X, B):
        assert np.abs(np.asarray(dyn.step(None, jnp.asarray(Y))) - Y).max() < 1e-12
    assert cl.classify(dyn, np.stack([X, B])).names() == ["consensus +v1", "bipartite v1 1:3"]


# --- the tie rules of attnflow/analysis/spectral.py --------------------------------------------------------------


def test_modulus_order_of_plus_and_minus_lambda_is_fixed():
    """W = Q diag(2, -2, 1) Q^T: the modulus order put -2 first in 99 of 200 random Q (|2| and |-2| differ by rounding
    only), and diag(-2, 2, 1) and diag(2, -2, 1) differ. Intended rule: keys within the dtype's tolerance tie, ties by
    descending imaginary part, then descending real part, so +2 comes first."""
    rng = np.random.default_rng(0)
    Ws = [np.diag([-2.0, 2.0, 1.0]), np.diag([2.0, -2.0, 1.0])]
    Ws += [q @ np.diag([2.0, -2.0, 1.0]) @ q.T for q in (np.linalg.qr(rng.normal(size=(3, 3)))[0] for _ in range(50))]
    assert all(eigenpairs(W, order="modulus").values[0].real > 0 for W in Ws)


def test_sign_of_an_eigenvector_with_tied_largest_entries_is_fixed():
    """W = [[a, b], [b, a]]: eigenvectors (1, 1)/sqrt 2 and (1, -1)/sqrt 2 have two largest entries of equal
    magnitude; the sign rule picked whichever LAPACK rounded larger, so the signs of eigenpairs(W) and
    eigenpairs(c W) (same eigenvectors) differed in 100 of 300 random (a, b, c), and with them 'consensus +v2' /
    '-v2' and 'bipartite v2 m:(n-m)' / '(n-m):m'. Intended rule: the first entry within the dtype's tolerance of
    the largest magnitude is positive."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        a, b = rng.normal(size=2)
        W = np.array([[a, b], [b, a]])
        for c in (1.0, rng.uniform(0.5, 3.0)):
            V = np.real(eigenpairs(c * W, order="real").vectors)
            assert np.all(V[0] > 0)


def test_a_non_finite_state_is_never_named_as_an_equilibrium():
    """States given alone (no outcome, as local.py names an equilibrium) with non-finite entries were named as
    equilibria, the entries read as 0: a consensus on e1 with one NaN entry 'consensus +v1', every entry inf
    'consensus (off-axis)' (a token of NaNs in a consensus: 'clustering 3:1 gram [3.0]'). They are outcome
    ``nonfinite``; a state with an outcome other than converged keeps it."""
    W = np.diag([1.0, 0.4, -0.3])
    X = np.tile(np.array([1.0, 0.0, 0.0]), (4, 1))
    Y = X.copy()
    Y[0, 1] = np.nan
    Z = np.full_like(X, np.inf)
    for dtype in (np.float64, np.float32):
        S = np.stack([X, Y, Z]).astype(dtype)
        assert cl.classify(W, S).names() == ["consensus +v1", "nonfinite", "nonfinite"]
        nc = af.OUTCOMES.index("not_converged")
        assert cl.classify(W, S, np.array([1, nc, 1])).names() == ["consensus +v1", "not converged", "nonfinite"]


def test_alignment_and_clustering_search_skip_repeated_eigenvalues():
    """equilibria.alignment took any real eigenvector as an axis: tokens at e1 of W = diag(1, 1, 0.5) came back on
    'axis 0', an arbitrary vector of the eigenspace of the double eigenvalue 1; and find_clusterings(clusters=2)
    returned a consensus among its two-cluster states. Reference: the distinct positions counted in NumPy."""
    from attnflow.analysis import equilibria as eq

    m = af.SphereFlow(af.SelfAttention(af.Heads.single(np.diag([1.0, 1.0, 0.5])), af.Attention("softmax"), 1.0))
    k, signs = eq.alignment(m, np.tile([1.0, 0.0, 0.0], (4, 1)))
    assert k == -1 and not signs.any()
    # the simple eigenvalue 0.5 still names its axis (index 2 in the order of section 6)
    k, signs = eq.alignment(m, np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]))
    assert k == 2 and signs.tolist() == [1, -1, 1]
    found = eq.find_clusterings(m, jax.random.PRNGKey(0), 4, clusters=2)
    assert found
    for X in found:
        X = np.asarray(X)
        d = np.abs(X[:, None, :] - X[None, :, :]).max(-1)
        assert len({tuple(np.flatnonzero(row < 1e-6)) for row in d}) == 2


def test_certificate_axes_follow_the_classifiers_rule_for_a_float32_model():
    """The study's certificates looked for equilibria on every real eigenvector simple at float64's tolerance, so a
    float32 model's double eigenvalue (split by rounding by 3.6e-8 here) gave two axes of its eigenspace: a member
    certified there would be named 'consensus +v1' while the classifier names the same state 'consensus (off-axis)'.
    Only the simple eigenvalue 0.5 gives an axis."""
    from attnflow.analysis.basins.certify import candidate_axes

    q = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    W = (q @ np.diag([1.0, 1.0, 0.5]) @ q.T).astype(np.float32)
    m = af.SphereFlow(af.SelfAttention(af.Heads.single(W), af.Attention("softmax"), 1.0))
    axes = candidate_axes(m)
    assert len(axes) == 1
    assert abs(abs(float(axes[0] @ q[:, 2])) - 1.0) < 1e-5
