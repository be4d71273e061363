"""One-thread CPU clients of this process (``Execution.cores``, :func:`attnflow._device.core_devices`): every member's
name, outcome, steps and final state are identical on them, on JAX's own client and in any number of them
(tolerance: none, float32 and float64, the map and the adaptive flow); the pools really run there; bad settings are
refused; the default follows the rule."""

import jax
import numpy as np
import pytest

import attnflow as af
from attnflow._device import core_devices
from attnflow.evolve import pool as P, workers as W
from test_workers import _study  # a run-directory study of 90 samples: (result, (names, outcomes, steps))


@pytest.mark.filterwarnings("ignore:cores=3")
@pytest.mark.parametrize("dtype", ["float32", pytest.param("float64", marks=pytest.mark.slow)])
def test_members_identical_on_cores_and_on_jax_client(tmp_path, dtype, monkeypatch):
    seen = set()
    advance = P.advance_pool

    def spy(dyn, pool, *a, **k):
        seen.add(next(iter(pool.x.devices())))
        return advance(dyn, pool, *a, **k)

    monkeypatch.setattr(P, "advance_pool", spy)
    V = np.diag([1.0, 0.5, -0.3]).astype(dtype)
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    cases = {"map": (af.LayerMap(att, 0.1), dict(budget=af.Budget(max_steps=300), certify=False)),
             "adaptive": (af.SphereFlow(att), dict(budget=af.Budget(max_steps=300)))}
    for mode, (model, kw) in cases.items():
        seen.clear()
        r0, one = _study(tmp_path, f"{mode}_0", model, dtype, af.Execution(cores=0, chunk=40), **kw)
        assert seen == {jax.devices()[0]}
        assert len(set(one[0])) >= 3 and len(set(one[2])) >= 10  # several names and step counts: the test has teeth
        for cores in (1, 3) if dtype == "float64" else (3,):
            seen.clear()
            r, got = _study(tmp_path, f"{mode}_{cores}", model, dtype,
                            af.Execution(cores=cores, chunk=40, pool=5, group=3), **kw)
            assert seen == set(core_devices(cores)), "the pools did not run on the one-thread clients"
            assert got == one, f"{mode} {dtype}: {cores} core(s) differ from JAX's client"
            np.testing.assert_array_equal(r.members.finals, r0.members.finals)
            assert r.members.names == r0.members.names
            assert [(a.name, a.count) for a in r.attractors] == [(a.name, a.count) for a in r0.attractors]


def test_core_devices_are_clients_of_their_own():
    a, b = core_devices(2)
    assert a.platform == b.platform == "cpu"
    assert a.client is not b.client and all(a.client is not d.client for d in jax.devices())
    assert core_devices(2) == [a, b]  # made once per process
    assert core_devices(1) == [a]


@pytest.mark.parametrize("where", ["jax", "core"])
def test_a_model_committed_to_a_device_runs_on_any_client(tmp_path, where):
    dev = jax.devices()[0] if where == "jax" else core_devices(2)[1]
    V = jax.device_put(np.diag([1.0, 0.5, -0.3]), dev)  # committed to JAX's device, or to a core client's
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    assert V.committed
    kw = dict(budget=af.Budget(max_steps=300), certify=False)
    r0, one = _study(tmp_path, "jax", model, "float64", af.Execution(cores=0, chunk=40), **kw)
    r2, two = _study(tmp_path, "cores", model, "float64", af.Execution(cores=2, chunk=40, pool=5), **kw)
    assert two == one
    np.testing.assert_array_equal(r2.members.finals, r0.members.finals)


def test_more_cores_than_the_cpu_has_are_named(monkeypatch):
    from attnflow.analysis.basins.study import _execution

    monkeypatch.setattr(W, "cores", lambda: 2)
    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    span = af.Budget(max_steps=10).resolve(model, False, study=True)
    with pytest.warns(UserWarning, match="cores=3, but this process may run on 2 CPU core"):
        _execution(af.Execution(cores=3), model, af.Iterate(), 100, 4, 3, np.float64, span, None)
    with pytest.warns(UserWarning, match="workers=3, but this process may run on 2 CPU core"):
        _execution(af.Execution(workers=3), model, af.Iterate(), 100, 4, 3, np.float64, span, None)


@pytest.mark.parametrize("bad", [-1, 1.5, True, 65, "2"])
def test_bad_core_counts_are_refused(bad):
    with pytest.raises(ValueError, match="cores"):
        af.Execution(cores=bad)


@pytest.mark.parametrize("execution, match", [(dict(cores=2, workers=2), "workers or cores"),
                                              (dict(cores=2, devices=2), "devices")])
def test_cores_with_workers_or_devices_are_refused(no_compute, execution, match):
    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    from attnflow.analysis.basins import study

    with pytest.raises(ValueError, match=match):
        study.basin_fractions(model, jax.random.PRNGKey(0), 10, tokens=4, budget=af.Budget(max_steps=10),
                              execution=af.Execution(**execution))


def test_default_cores_rule(monkeypatch):
    monkeypatch.setattr(W, "cores", lambda: 2)
    kw = dict(platform="cpu", local_devices=1, processes=1)
    assert W.default_cores(10_000, 128, **kw) == 2
    assert W.default_cores(129, 128, **kw) == 2
    assert W.default_cores(128, 128, **kw) == 1  # one pool of samples: one client
    assert W.default_cores(10, 128, **kw) == 1
    assert W.default_cores(10_000, 128, platform="gpu", local_devices=1, processes=1) == 0
    assert W.default_cores(10_000, 128, platform="cpu", local_devices=2, processes=1) == 0
    assert W.default_cores(10_000, 128, platform="cpu", local_devices=1, processes=2) == 0
    monkeypatch.setattr(W, "cores", lambda: 64)
    assert W.default_cores(10**6, 128, **kw) == W.MAX_WORKERS
    monkeypatch.setattr(W, "cores", lambda: 2)  # without a compilation cache: one client below CORES_MIN_SAMPLES
    big = W.CORES_MIN_SAMPLES
    assert W.default_cores(big - 1, 128, **kw, cached=False) == 1
    assert W.default_cores(big, 128, **kw, cached=False) == 2
    assert W.default_cores(big, 128, platform="gpu", local_devices=1, processes=1, cached=False) == 0


def test_a_study_without_settings_runs_on_cores_and_with_workers_does_not(monkeypatch):
    from attnflow.analysis.basins.study import _execution

    monkeypatch.setattr(W, "cores", lambda: 2)
    V = np.diag([1.0, 0.5, -0.3])
    model = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))
    span = af.Budget().resolve(model, True, study=True)
    ex = _execution(None, model, af.Adaptive(), W.CORES_MIN_SAMPLES, 4, 3, np.float64, span, None)[0]
    assert ex.cores == 2 and not ex.workers
    if not jax.config.jax_compilation_cache_dir:
        assert _execution(None, model, af.Adaptive(), 10_000, 4, 3, np.float64, span, None)[0].cores == 1
    ex = _execution(af.Execution(workers=2), model, af.Adaptive(), 10_000, 4, 3, np.float64, span, None)[0]
    assert ex.cores == 0 and ex.workers == 2


@pytest.mark.slow  # 8 s; the cores' member identity runs in the default suite
def test_studies_in_threads_share_the_cores_each_on_its_own_model(tmp_path):
    """Three studies at once on the same two one-thread clients (their pools' programs run at once there): each gets
    its own model's members, and none hangs."""
    import threading

    V = np.diag([1.0, 0.5, -0.3])
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    models = {"a": af.LayerMap(att, 0.1), "b": af.LayerMap(att, 0.3), "c": af.SphereFlow(att)}
    kw = dict(certify=False, budget=af.Budget(max_steps=300))
    alone = {k: _study(tmp_path, f"{k}0", m, "float64", af.Execution(cores=0, chunk=30), **kw)[1]
             for k, m in models.items()}
    assert len({str(v) for v in alone.values()}) == 3
    got, errors = {}, []

    def run(k):
        try:
            for i in range(2):
                got[k, i] = _study(tmp_path, f"{k}2_{i}", models[k], "float64",
                                   af.Execution(cores=2, chunk=30, pool=4, group=2), **kw)[1]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in models]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert not any(t.is_alive() for t in threads), "a study on the cores hung"
    assert not errors, errors
    assert got == {(k, i): v for k, v in alone.items() for i in range(2)}


def test_a_jaxlib_that_cannot_make_a_client_runs_on_jax_client(monkeypatch):
    """The default is speed only: where no other CPU client can be made, a study runs on JAX's, with the same result."""
    from attnflow.analysis.basins import study

    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    kw = dict(tokens=4, budget=af.Budget(max_steps=300))
    r0 = af.basin_fractions(model, jax.random.PRNGKey(0), 200, execution=af.Execution(cores=0), **kw)

    def fail(count):
        raise RuntimeError("no client")

    monkeypatch.setattr(study, "core_devices", fail)
    span = af.Budget(max_steps=300).resolve(model, False, study=True)
    assert study._execution(None, model, af.Iterate(), 200, 4, 3, np.float64, span, None)[0].cores == 0
    r = af.basin_fractions(model, jax.random.PRNGKey(0), 200, **kw)
    assert [(a.name, a.count) for a in r.attractors] == [(a.name, a.count) for a in r0.attractors]
    np.testing.assert_array_equal(r.members.finals, r0.members.finals)


def test_cli_workers_and_cores_together_are_one_line(tmp_path, capsys):
    """Was a 46-line traceback and exit 1."""
    from attnflow.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd = 2\nV = [[1.0, 0.0], [0.0, -0.5]]\n[dynamics]\ntokens = 3\nsteps = 20\n"
                   "[basins]\nsamples = 4\nworkers = 2\ncores = 2\n")
    out = tmp_path / "o"
    assert main(["basins", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert len(err) == 1 and "workers and cores" in err[0], err
    assert not out.exists()


def test_cli_demo_refuses_more_samples_than_a_study_numbers(tmp_path, capsys):
    """Was a traceback, exit 1, and a marker left in --out."""
    from attnflow.cli import main

    out = tmp_path / "o"
    assert main(["demo", "--samples", "1000000000000", "--out", str(out)]) == 2
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert len(err) == 1 and "--samples" in err[0], err
    assert not out.exists()
