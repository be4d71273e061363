"""Metastable episodes found inside the compiled loop, against a plain NumPy loop with its own state machine written
from docs/model.md section 11 (float64: times and counts exactly, energies at entry to 1e-9 relative, at exit and
plateau speeds to 1e-6: rounding grows across a saddle)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import attnflow as af
from attnflow.analysis.metastability import Plateaus, cluster_labels, find_plateaus


def _np_vf(X, beta):
    S = beta * X @ X.T
    A = np.exp(S - S.max(1, keepdims=True))
    A /= A.sum(1, keepdims=True)
    U = A @ X
    return U - np.sum(U * X, 1, keepdims=True) * X


def _np_rk4(X, beta, dt):
    k1 = _np_vf(X, beta)
    k2 = _np_vf(X + dt / 2 * k1, beta)
    k3 = _np_vf(X + dt / 2 * k2, beta)
    k4 = _np_vf(X + dt * k3, beta)
    Y = X + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return Y / np.linalg.norm(Y, axis=1, keepdims=True)


def _np_reading(X, Xp, dt, beta, eps):
    speed = math.sqrt(np.mean(np.sum((X - Xp) ** 2, 1))) / dt
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = []
    for i in range(len(X)):  # the smallest j with cos > 1 - eps
        labels.append(next(j for j in range(len(X)) if j == i or U[i] @ U[j] > 1 - eps))
    count = len(set(labels))  # distinct labels (docs/model.md 11.1)
    sizes = sorted(np.bincount(labels, minlength=len(X)).tolist(), reverse=True)
    n = len(X)
    energy = np.exp(beta * X @ X.T).sum() / (2 * beta * n * n)
    return speed, count, sizes, energy


def _np_episodes(x0, beta, dt, t1, rule):
    """The state machine of docs/model.md section 11, written out in Python."""
    every = max(1, round(rule.check / dt))
    n_checks = math.ceil(t1 / (every * dt) - 1e-9)
    X = x0.copy()
    episodes, on, peak, cand = [], False, 0.0, None
    for c in range(1, n_checks + 1):
        for _ in range(every):
            Xp, X = X, _np_rk4(X, beta, dt)
        t = c * every * dt
        speed, count, sizes, energy = _np_reading(X, Xp, dt, beta, rule.eps)
        if on:
            ep = episodes[-1]
            if count != ep["count"]:
                ep.update(exit=t, energy_exit=energy)
                on, peak = False, speed
                continue
            ep["speeds"].append(speed)
            continue
        peak = max(peak, speed)
        if speed < rule.fraction * peak:
            if cand is None or cand["count"] != count:
                cand = dict(entry=t, count=count, energy_entry=energy, speeds=[speed])
            else:
                cand["speeds"].append(speed)
            if t - cand["entry"] >= rule.min_duration * (1 - 1e-6):
                episodes.append(dict(cand, sizes=sizes[: rule.max_sizes], exit=math.inf, energy_exit=math.nan))
                on, cand = True, None
                if count == 1:  # stop_at_one
                    return episodes, t
        else:
            cand = None
    return episodes, n_checks * every * dt


@pytest.fixture(scope="module")
def small_case():
    rng = np.random.default_rng(1)
    th = rng.uniform(0, 2 * np.pi, (4, 20))
    x0 = np.stack([np.cos(th), np.sin(th)], -1)
    beta, dt, t1 = 8.0, 0.05, 60.0
    rule = Plateaus(fraction=0.1, min_duration=1.0, eps=1e-2, check=0.25, max_episodes=6, max_sizes=4)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=beta, key_block=None))
    ep, series = find_plateaus(flow, x0, t1=t1, dt=dt, rule=rule, trace=4)
    return x0, beta, dt, t1, rule, ep, series


def test_episodes_equal_a_numpy_loop(small_case):
    x0, beta, dt, t1, rule, ep, _ = small_case
    total = 0
    for b in range(len(x0)):
        ref, t_end = _np_episodes(x0[b], beta, dt, t1, rule)
        assert int(ep.num[b]) == len(ref), b
        assert float(ep.t_end[b]) == pytest.approx(t_end, abs=1e-9)
        for e, r in enumerate(ref):
            assert float(ep.entry[b, e]) == pytest.approx(r["entry"], abs=1e-9)
            assert float(ep.exit[b, e]) == pytest.approx(r["exit"], abs=1e-9) or (math.isinf(r["exit"]) and math.isinf(ep.exit[b, e]))
            assert int(ep.count[b, e]) == r["count"]
            got = np.asarray(ep.sizes[b, e]).tolist()
            assert got == (r["sizes"] + [0] * rule.max_sizes)[: rule.max_sizes]
            assert float(ep.energy_entry[b, e]) == pytest.approx(r["energy_entry"], rel=1e-9)
            if math.isfinite(r["exit"]):
                # a plateau is a saddle: rounding differences grow across it (1e-14 -> ~1e-9 at the exit)
                assert float(ep.energy_exit[b, e]) == pytest.approx(r["energy_exit"], rel=1e-6)
            # a plateau's speed is a difference of nearly equal states (|dX| ~ 1e-6): rounding of the two loops
            # (about 1e-14 after thousands of steps) leaves it ~1e-8 relative
            assert float(ep.speed[b, e]) == pytest.approx(np.mean(r["speeds"]), rel=1e-6)
        assert bool(ep.open[b]) == (len(ref) > 0 and math.isinf(ref[-1]["exit"]))
        total += len(ref)
    assert total >= 6  # the case has episodes that open and close, not only final ones
    assert any(np.isfinite(ep.exit[b, 0]) for b in range(len(x0)))


def test_energy_rises_across_episodes_of_the_softmax_flow(small_case):
    """docs/model.md section 7: the energy of a V = I softmax flow never decreases; the episodes' energies are
    ordered in time."""
    *_, ep, series = small_case
    for b in range(ep.num.shape[0]):
        k = min(int(ep.num[b]), ep.entry.shape[1])
        e_in = np.asarray(ep.energy_entry[b, :k])
        assert np.all(np.diff(e_in) >= -1e-12)
        assert np.all(np.diff(np.asarray(ep.count[b, :k])) < 0)  # clusters only merge
    assert np.all(np.diff(series.energy, axis=0) >= -1e-12)


def test_series_holds_the_last_reading_after_a_member_stops(small_case):
    *_, ep, series = small_case
    for m in range(series.count.shape[1]):
        stopped = series.t > float(ep.t_end[m]) + 1e-9
        if stopped.any():
            assert np.all(series.count[stopped, m] == 1)


def test_cluster_labels_are_the_smallest_close_index():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [np.cos(0.01), np.sin(0.01)], [np.cos(1.57), np.sin(1.57)], [-1.0, 0.0]])
    assert np.asarray(cluster_labels(jnp.asarray(X), 1e-3)).tolist() == [0, 1, 0, 1, 4]


def test_count_is_the_number_of_distinct_labels_when_closeness_is_not_transitive():
    """A chain on the circle: tokens 0-1 and 1-2 closer than eps, 0-2 not. Labels 0 0 1 (token 2's smallest close
    index is 1), then 3 and 4: four distinct labels, sizes 2 1 1 1 (docs/model.md 11.1). The count was the number of
    tokens that are their own label (3), which disagreed with the sizes."""
    from attnflow.analysis.metastability._plateaus import read

    eps = 1e-2
    th = 0.8 * math.acos(1 - eps)
    ang = np.array([0.0, th, 2 * th, 2.0, 4.0])
    X = jnp.asarray(np.stack([np.cos(ang), np.sin(ang)], 1))
    assert np.asarray(cluster_labels(X, eps)).tolist() == [0, 0, 1, 3, 4]
    r = read(af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0)), X, X, 0.1, eps, 4)
    assert int(r.count) == 4 and np.asarray(r.sizes).tolist() == [2, 1, 1, 1]
    assert int(r.count) == int(np.sum(np.asarray(r.sizes) > 0))


def test_beta_sweep_equals_separate_runs(small_case):
    x0, beta, dt, t1, rule, ep, _ = small_case
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0, key_block=None))
    swept, _ = find_plateaus(flow, x0, t1=t1, dt=dt, rule=rule, beta=[2.0, beta])
    np.testing.assert_array_equal(swept.num[1], ep.num)
    np.testing.assert_allclose(swept.entry[1], ep.entry, atol=1e-12)
    np.testing.assert_array_equal(swept.count[1], ep.count)


def test_bad_rules_and_inputs_are_refused():
    with pytest.raises(ValueError, match="fraction"):
        Plateaus(fraction=1.5)
    with pytest.raises(ValueError, match="min_duration"):
        Plateaus(min_duration=0)
    with pytest.raises(ValueError, match="eps"):
        Plateaus(eps=0.0)
    with pytest.raises(ValueError, match="max_episodes"):
        Plateaus(max_episodes=0)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2, dtype=np.float32)), beta=1.0))
    x0 = (np.ones((1, 3, 2)) / np.sqrt(2)).astype(np.float32)
    with pytest.raises(ValueError, match="below .* float32"):
        find_plateaus(flow, x0, t1=1.0, rule=Plateaus(eps=1e-7))
    with pytest.raises(ValueError, match="batch, tokens, d"):
        find_plateaus(flow, x0[0], t1=1.0)
    with pytest.raises(ValueError, match="stop_after"):
        find_plateaus(flow, x0, t1=1.0, stop_after=0)


@pytest.mark.slow
def test_first_plateau_of_500_tokens_at_beta_5_has_the_fastest_mode_3():
    """docs/model.md section 11: the fastest linear mode on the circle at beta = 5 is k* = 3 (Bruno, Pasqualotto
    and Agazzi 2024 report 3 metastable clusters there); over 20 members of 500 tokens uniform on the circle the most
    frequent count at the first plateau is 3 (single members show 2 or 4)."""
    import jax

    from attnflow.analysis.metastability import fastest_mode, metastability

    assert fastest_mode(5.0) == 3
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2, dtype=np.float32)), beta=5.0))
    res = metastability(flow, jax.random.PRNGKey(0), tokens=[500], betas=[5.0], members=20, t1=40.0, dt=0.1,
                        trace=0, stop_after=1)
    cell = res.cell(500, 5.0)
    assert cell.no_plateau == 0
    assert cell.mode == 3, cell.first_counts
    assert cell.k_star == 3


@pytest.mark.slow  # three subprocesses that compile (about 30 s): run by the second CI step
def test_cli_metastability_writes_resumes_and_refuses(tmp_path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "m.toml"
    cfg.write_text('[model]\nd = 2\nV = [[1.0, 0.0], [0.0, 1.0]]\n[dynamics]\ntime = "continuous"\n'
                   "[metastability]\ntokens = [8, 12]\nbetas = [3.0, 5.0]\nmembers = 4\nt1 = 12.0\n")
    out = tmp_path / "out"
    run = lambda *a: subprocess.run([sys.executable, "-m", "attnflow", "--no-compile-cache", "metastability", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert {c["tokens"] for c in first["cells"]} == {8, 12} and len(first["cells"]) == 4
    for name in ("metastability.json", "first_plateau.csv", "phase_t_beta.png", "phase_tokens_beta.png",
                 "phase_t_beta.json", "phase_tokens_beta.json",
                 "staircase_n8.png", "dwell_n12.png", "episodes_n8.npz", "episodes_n12.npz"):
        assert (out / name).exists(), name
    (out / "episodes_n12.npz").unlink()  # as if interrupted before n = 12 finished
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    again = json.loads(r.stdout)
    assert again["cells"] == first["cells"]  # a resumed run gives the same answer
    assert again["phase"] == first["phase"]
    # a saved n is loaded only for its own run and n: swapped files, a truncated one, or files whose settings.json
    # is lost are computed again (they were loaded for the wrong n, raised BadZipFile, or mixed into another run)
    a, b = out / "episodes_n8.npz", out / "episodes_n12.npz"
    a.rename(tmp_path / "t.npz"), b.rename(a), (tmp_path / "t.npz").rename(b)
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["cells"] == first["cells"]
    b.write_bytes(b.read_bytes()[:300])
    (out / "settings.json").unlink()
    r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 0 and "resuming" not in r.stderr and "starting afresh" in r.stderr, r.stderr
    assert json.loads(r.stdout)["cells"] == first["cells"]
    # one process per directory
    from filelock import FileLock

    with FileLock(str(out / ".lock")):
        r = run(str(cfg), "--out", str(out), "--json")
    assert r.returncode == 2 and "in use by another attnflow process" in r.stderr, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nd = 2\nV = [[1.0, 0.0], [0.0, 1.0]]\n[metastability]\neps = 1e-9\n')
    r = run(str(bad))
    assert r.returncode == 2 and "eps" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_phase_diagram_equals_numpy_readings_and_clustering_time_grows_with_beta():
    from attnflow.analysis.metastability import phase_t_beta

    rng = np.random.default_rng(5)
    th = rng.uniform(0, 2 * np.pi, (6, 10))
    x0 = np.stack([np.cos(th), np.sin(th)], -1)
    betas, dt, t1, eps = [0.5, 2.0, 8.0], 0.05, 20.0, 1e-2
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0, key_block=None))
    ph = phase_t_beta(flow, None, tokens=10, betas=betas, members=6, t1=t1, dt=dt, eps=eps, check=1.0, x0=x0)
    assert ph.pairs.shape == (3, 20) and np.allclose(ph.cols, np.arange(1, 21))
    for i, beta in enumerate(betas):  # the NumPy loop, read at t = 1, 2, ..., 20
        pairs, counts = np.zeros((20, 6)), np.zeros((20, 6))
        for b in range(6):
            X = x0[b].copy()
            for c in range(20):
                for _ in range(20):
                    X = _np_rk4(X, beta, dt)
                G = X @ X.T
                pairs[c, b] = (np.sum(G > 1 - eps) - 10) / 90
                counts[c, b] = _np_reading(X, X, dt, beta, eps)[1]
        np.testing.assert_allclose(ph.pairs[i], pairs.mean(1), atol=1e-12)
        np.testing.assert_allclose(ph.clusters[i], counts.mean(1), atol=1e-12)
    ct = ph.clustering_time()
    assert np.isfinite(ct[0]) and np.all(np.diff(np.where(np.isnan(ct), np.inf, ct)) >= 0), ct
    assert ct[0] < ct[-1] or np.isnan(ct[-1])


def test_causal_attention_with_v_identity_ends_in_one_cluster_through_metastable_ones():
    """Karagodin, Polyanskiy and Rigollet 2024: causal attention with V = I collapses to one cluster (token 1 never
    moves; every other token follows the ones before it), with metastable clusters on the way."""
    rng = np.random.default_rng(2)
    th = rng.uniform(0, 2 * np.pi, (6, 12))
    x0 = np.stack([np.cos(th), np.sin(th)], -1)
    attn = af.SelfAttention(af.Heads.single(np.eye(2)), beta=3.0, attention=af.Attention("softmax", "causal"),
                            key_block=None)
    ep, series = find_plateaus(af.SphereFlow(attn), x0, t1=400.0, dt=0.1, rule=Plateaus(check=0.5), trace=6)
    num = np.asarray(ep.num)
    for b in range(6):
        k = min(int(num[b]), ep.entry.shape[1])
        assert int(ep.count[b, k - 1]) == 1 and bool(ep.open[b])  # ends on one cluster
        assert np.all(np.diff(np.asarray(ep.count[b, :k])) < 0)
    assert np.all(num >= 2)  # every member passes through metastable clusters first (measured: 6 of 6)
    assert np.all(np.asarray(ep.count)[:, 0] >= 2)
    # token 1 attends only to itself: it never moves
    np.testing.assert_allclose(series.count[-1], 1)
    np.testing.assert_array_equal(ep.t1, 400.0)  # the end of the run, where absorbed members are censored


@pytest.mark.parametrize("block", [7, 64])
def test_blocked_readings_equal_dense_ones(block):
    """Above READ_DENSE_MAX tokens the readings stream over blocks of tokens: labels and close pairs exactly equal
    to the dense ones, the energy to 1e-12 relative (float64), for heads with biases and separate Q, K too."""
    from attnflow.analysis.metastability import _plateaus as pl

    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    X[10:20] = X[10] + 1e-4 * rng.normal(size=(10, 3))  # a tight cluster
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    heads = af.Heads(Q=rng.normal(size=(2, 2, 3)), K=rng.normal(size=(2, 2, 3)), V=rng.normal(size=(2, 2, 3)),
                     O=rng.normal(size=(2, 3, 2)), bq=rng.normal(size=(2, 2)), bk=rng.normal(size=(2, 2)))
    for attn in (af.SelfAttention(heads, beta=0.7), af.SelfAttention(af.Heads.single(np.eye(3)), beta=3.0)):
        dyn = af.SphereFlow(attn)
        lab_b, close_b, e_b = pl._pairs_blocked(dyn, jnp.asarray(X), 0.05, block)
        lab_d, close_d, e_d = pl._pairs_dense(dyn, jnp.asarray(X), 0.05)
        np.testing.assert_array_equal(lab_b, lab_d)
        assert int(close_b) == int(close_d) and int(close_d) >= 90
        assert float(e_b) == pytest.approx(float(e_d), rel=1e-12)


def test_kaplan_meier_median_equals_scipy_and_is_a_bound_when_unreached():
    from scipy import stats

    from attnflow.analysis.metastability import km_median

    rng = np.random.default_rng(4)
    for trial in range(20):
        d = np.round(rng.exponential(5.0, 40), 1)
        c = np.minimum(d, rng.uniform(2, 15, 40))  # censoring times
        observed = d <= c
        t = np.where(observed, d, c)
        sf = stats.ecdf(stats.CensoredData(uncensored=t[observed], right=t[~observed])).sf
        q = sf.quantiles  # the distinct times, where S steps
        below = np.nonzero(sf.probabilities <= 0.5)[0]
        value, known = km_median(t, observed)
        if below.size:
            assert known and value == pytest.approx(q[below[0]]), trial
        else:
            assert not known and value == t.max()
    assert km_median(np.array([1.0, 2.0, 3.0]), np.array([False, False, False])) == (3.0, False)


def test_first_keeps_the_beta_axis_and_few_exits_give_an_open_interval(small_case):
    x0, beta, dt, t1, rule, ep, _ = small_case
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0, key_block=None))
    swept, _ = find_plateaus(flow, x0, t1=t1, dt=dt, rule=rule, beta=[2.0, beta])
    f = swept.first()
    assert f["count"].shape == (2, 4)
    np.testing.assert_array_equal(f["count"][1], ep.first()["count"])
    from attnflow.analysis.metastability._study import MIN_EVENTS, _median_with_interval

    d, o, g = np.array([5.0, 7.0, 9.0]), np.array([True, True, True]), np.array([0, 1, 2])
    m = _median_with_interval(d, o, g, np.random.default_rng(0), 4)
    assert m.known and m.value == 7.0 and m.lo == 7.0 and math.isinf(m.hi) and m.events < MIN_EVENTS


# ----------------------------------------------------------------------------------------- audit fixes (section 11)
def _km_median_exact(d, o):
    """Kaplan-Meier median in exact fractions (the reference): the first duration where S <= 1/2, events before
    censorings at equal times; (largest duration, False) when S stays above 1/2."""
    from fractions import Fraction

    rows = sorted(zip(d.tolist(), (~o).tolist()))  # (time, censored): events first at ties
    S, r = Fraction(1), len(rows)
    for t, cens in rows:
        if not cens:
            S *= Fraction(r - 1, r)
            if S <= Fraction(1, 2):
                return t, True
        r -= 1
    return max(d.tolist()), False


def test_kaplan_meier_median_is_exact_at_one_half():
    """2m uncensored durations 1..2m: S = 1/2 exactly after the m-th, so the median is m. The float product came to
    0.5000000000000001 for 49 of the 100 even n up to 200 and the median was m + 1. With censoring and ties the
    median equals an exact-fraction Kaplan-Meier."""
    from attnflow.analysis.metastability import km_median

    for n in range(2, 201, 2):
        assert km_median(np.arange(1.0, n + 1), np.ones(n, bool)) == (n / 2, True), n
    rng = np.random.default_rng(8)
    for trial in range(200):
        m = int(rng.integers(1, 40))
        d = rng.integers(1, 12, m).astype(float)  # many ties
        o = rng.random(m) < 0.7
        assert km_median(d, o) == _km_median_exact(d, o), trial


def _hand_episodes(first_count, entry, exit_, t_end, t1):
    """Episodes of one episode per member, built by hand."""
    from attnflow.analysis.metastability import Episodes

    B = len(first_count)
    col = lambda v, dt=float: np.asarray(v, dt)[:, None]  # noqa: E731
    nan = np.full((B, 1), np.nan)
    end = {"t1": np.full(B, float(t1))} if "t1" in Episodes.__dataclass_fields__ else {}  # (older Episodes: none)
    return Episodes(entry=col(entry), exit=col(exit_), count=col(first_count, int), sizes=np.zeros((B, 1, 2), int),
                    energy_entry=nan, energy_exit=nan, speed=nan, num=np.ones(B, int),
                    open=~np.isfinite(np.asarray(exit_)), t_end=np.asarray(t_end, float), finite=np.ones(B, bool),
                    **end)


def test_members_stopped_on_one_cluster_never_escape():
    """A first plateau of one cluster is never left (exit +inf): the member is censored at the end of the run t1, not
    where it stopped (entry + ~min_duration). With 6 of 10 members absorbed the escape median is a lower bound (t1,
    known False), as the exact-fraction Kaplan-Meier of (escape times, censored at t1) says; it was a finite, known
    5.0. With 3 of 10 absorbed it is a value, equal to the reference."""
    from attnflow.analysis.metastability._study import summarise

    t1 = 50.0
    for absorbed in (6, 3):
        k = 10 - absorbed
        entry = np.r_[np.linspace(2.0, 4.5, absorbed), np.full(k, 1.0)]
        exit_ = np.r_[np.full(absorbed, np.inf), 5.0 + 2.0 * np.arange(k)]
        t_end = np.r_[entry[:absorbed] + 1.0, exit_[absorbed:]]  # stop_at_one: about entry + min_duration
        ep = _hand_episodes([1] * absorbed + [2] * k, entry, exit_, t_end, t1)
        cell = summarise(ep, 8, 2.0, None, np.random.default_rng(0))
        o = np.isfinite(exit_)
        want = _km_median_exact(np.where(o, exit_, t1), o)
        assert (cell.escape.value, cell.escape.known) == want, absorbed
        assert (cell.escape.events, cell.escape.censored) == (k, absorbed)
        want = _km_median_exact(np.where(o, exit_, t1) - entry, o)
        assert (cell.first_dwell.value, cell.first_dwell.known) == want, absorbed
        if absorbed > 5:
            assert cell.escape.value == t1 and not cell.escape.known and math.isinf(cell.escape.hi)
        else:
            assert cell.escape.known
    np.testing.assert_array_equal(ep.first()["dwell"][:absorbed], t1 - entry[:absorbed])


def test_episodes_past_the_cap_are_counted_and_followed_exactly(small_case):
    """max_episodes = 1 stores one episode but must find the same ones: num, open and t_end as the NumPy state
    machine (the second episode was compared with the stored first one's count: spurious exits, num 3 for 2)."""
    x0, beta, dt, t1, rule, ep16, _ = small_case
    import dataclasses

    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=beta, key_block=None))
    ep, _ = find_plateaus(flow, x0, t1=t1, dt=dt, rule=dataclasses.replace(rule, max_episodes=1))
    assert int(np.max(ep16.num)) >= 2  # the case has members with more episodes than the cap
    for b in range(len(x0)):
        ref, t_end = _np_episodes(x0[b], beta, dt, t1, rule)
        assert int(ep.num[b]) == len(ref), b
        assert bool(ep.open[b]) == (len(ref) > 0 and math.isinf(ref[-1]["exit"])), b
        assert float(ep.t_end[b]) == pytest.approx(t_end, abs=1e-9)
        if ref:
            assert float(ep.entry[b, 0]) == pytest.approx(ref[0]["entry"], abs=1e-9)
            assert int(ep.count[b, 0]) == ref[0]["count"]
            assert float(ep.exit[b, 0]) == pytest.approx(ref[0]["exit"], abs=1e-9) or (
                len(ref) == 1 and math.isinf(ep.exit[b, 0]))


def test_run_ends_at_t1_when_it_is_not_a_whole_number_of_checks():
    """t1 = 1.1 with checks every 0.25: readings at 0.25, 0.5, 0.75, 1.0 and 1.1 (the run went to 1.25), the last
    one equal to a NumPy RK4 of 22 steps (float64: speed and energy to 1e-9 relative); t1 not a whole number of steps is rounded down, never up."""
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(1, 5, 2))
    x0 /= np.linalg.norm(x0, axis=-1, keepdims=True)
    beta, dt = 5.0, 0.05
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=beta, key_block=None))
    ep, ser = find_plateaus(flow, x0, t1=1.1, dt=dt, trace=1)
    np.testing.assert_allclose(ser.t, [0.25, 0.5, 0.75, 1.0, 1.1], rtol=0, atol=1e-12)
    assert float(ep.t_end[0]) == pytest.approx(1.1, abs=1e-12) and float(ep.t1[0]) == pytest.approx(1.1, abs=1e-12)
    X = x0[0]
    for _ in range(22):
        Xp, X = X, _np_rk4(X, beta, dt)
    speed, count, _, energy = _np_reading(X, Xp, dt, beta, 1e-2)
    assert float(ser.speed[-1, 0]) == pytest.approx(speed, rel=1e-9)
    # the two RK4 loops round differently (~1e-11 here): the tolerance of the episode test above
    assert float(ser.energy[-1, 0]) == pytest.approx(energy, rel=1e-9) and int(ser.count[-1, 0]) == count
    from attnflow.analysis.metastability._plateaus import run_steps

    assert (run_steps(1.1, 0.05), run_steps(0.3, 0.1), run_steps(1.0, 0.3), run_steps(60, 1.0)) == (22, 3, 3, 60)
    with pytest.raises(ValueError, match="shorter than one step"):
        find_plateaus(flow, x0, t1=0.01, dt=dt)


def test_phase_at_time_reads_the_state_at_that_time():
    """time = 2.3, dt = 0.1: the diagram equals NumPy readings after 23 RK4 steps (it read at 2.5 and said 2.3)."""
    import jax

    from attnflow.analysis.metastability import phase_at_time
    from attnflow.evolve.sample import sphere

    n, M, betas, eps, key = 12, 6, [1.0, 4.0], 1e-2, jax.random.PRNGKey(5)
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), beta=1.0, key_block=None))
    P = phase_at_time(flow, key, over="tokens", values=[n], betas=betas, members=M, time=2.3, dt=0.1, eps=eps)
    assert P.time == pytest.approx(2.3, abs=1e-12)
    X0 = np.asarray(sphere(jax.random.split(key, 1)[0], (M, n, 2), dtype=np.float64))
    for i, beta in enumerate(betas):
        pairs, counts = [], []
        for m in range(M):
            X = X0[m]
            for _ in range(23):
                X = _np_rk4(X, beta, 0.1)
            pairs.append((np.sum(X @ X.T > 1 - eps) - n) / (n * (n - 1)))
            counts.append(_np_reading(X, X, 0.1, beta, eps)[1])
        assert P.pairs[i, 0] == pytest.approx(np.mean(pairs), abs=1e-12)
        assert P.clusters[i, 0] == pytest.approx(np.mean(counts), abs=1e-12)
        assert P.pairs_se[i, 0] == pytest.approx(np.std(pairs, ddof=1) / math.sqrt(M), abs=1e-12)


def test_series_keeps_the_last_finite_reading_after_a_blow_up():
    """An unnormalized flat flow blows up: after its last finite reading (t_end) the traced readings repeat it, never
    NaN (they held NaN from the blow-up on)."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2, 6, 2))
    att = af.SelfAttention(af.Heads.single(0.5 * np.eye(2)), af.Attention(kind="unnormalized"), beta=0.3,
                           key_block=None)
    ep, ser = find_plateaus(af.FlatFlow(att), X, t1=10.0, dt=0.1, rule=Plateaus(min_duration=1.0), trace=2)
    assert not np.any(np.asarray(ep.finite))
    for b in range(2):
        i = int(np.argmin(np.abs(ser.t - float(ep.t_end[b]))))
        assert ser.t[i] == pytest.approx(float(ep.t_end[b])) and i < len(ser.t) - 1
        for a in (ser.speed, ser.energy, ser.pairs, ser.count):
            assert np.all(np.isfinite(a[:, b]))
            np.testing.assert_array_equal(a[i:, b], a[i, b])


@pytest.mark.parametrize("dtype, beta, rel", [(np.float64, 705.0, 1e-12), (np.float32, 85.0, 1e-4)])
def test_energy_is_finite_while_it_is_representable(dtype, beta, rel):
    """n = 100 identical tokens: E = n^2 e^beta / (2 beta n^2) = e^beta / (2 beta), representable, but exp of the
    log-sum-exp (beta + log n^2) overflowed before the division (dense and blocked readings, head_energies)."""
    from attnflow.analysis.metastability._plateaus import _pairs_blocked, read

    X = jnp.asarray(np.tile(np.array([[1.0, 0.0]], dtype), (100, 1)))
    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2, dtype=dtype)), beta=np.asarray(beta, dtype),
                                          key_block=None))
    want = math.exp(beta - math.log(2 * beta))
    assert math.log(want) < math.log(float(np.finfo(dtype).max)) < beta + math.log(100**2)
    for got in (read(flow, X, X, 1.0, 1e-2, 4).energy, _pairs_blocked(flow, X, 1e-2, 7)[2],
                af.head_energies(flow, X)[0]):
        assert float(got) == pytest.approx(want, rel=rel)


def test_sweeps_refuse_what_no_diagram_is_made_of(tmp_path, capsys):
    from attnflow.analysis.metastability import metastability, phase_at_time, phase_t_beta
    from attnflow.cli import main

    import jax

    flow = af.SphereFlow(af.SelfAttention(af.Heads.single(np.eye(2)), af.Attention("softmax"), 1.0))
    x0 = np.tile(np.array([[1.0, 0.0], [0.0, 1.0]]), (3, 1, 1))
    for beta in ([-1.0], [np.nan], []):  # a negative beta was run (one member even got an episode)
        with pytest.raises(ValueError, match="beta must be finite numbers > 0"):
            find_plateaus(flow, x0, t1=2.0, beta=beta)
    key = jax.random.PRNGKey(0)
    for kw, msg in ((dict(betas=[-1.0], members=2, tokens=4), "betas"), (dict(betas=[1.0], members=0, tokens=4), "members"),
                    (dict(betas=[1.0], members=2, tokens=1), "tokens")):
        with pytest.raises(ValueError, match=msg):
            phase_t_beta(flow, key, t1=1.0, **kw)
    with pytest.raises(ValueError, match="time must be"):
        phase_at_time(flow, key, over="tokens", values=[4], betas=[1.0], members=2, time=0.0)
    with pytest.raises(ValueError, match="each n once"):
        metastability(flow, key, tokens=[4, 4], betas=[2.0], members=2, t1=1.0)
    cfg = tmp_path / "c.toml"  # two cells of n = 4 drew different members; the second's file replaced the first's
    cfg.write_text('[model]\nd = 2\nV = [[1.0, 0.0], [0.0, 1.0]]\n[dynamics]\ntime = "continuous"\n[metastability]\n'
                   'tokens = [4, 4]\nbetas = [2.0]\nmembers = 6\nt1 = 10.0\nphase = false\n')
    assert main(["--no-compile-cache", "metastability", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "each value once" in capsys.readouterr().err and not (tmp_path / "out").exists()
