"""Worker processes of a study (:mod:`attnflow.evolve.workers`): every member's name, outcome, steps and final state
are identical in worker processes and in this process (tolerance: none, float32 and float64, the map and the
adaptive flow on their CPU default backend); a dead worker is an error, not a hang, and the next study starts new
ones; bad settings are refused."""

import os
import signal
import time

import jax
import numpy as np
import pytest

import attnflow as af
from attnflow.evolve import workers as W
from attnflow.io.results import RunDirWriter, read_members


@pytest.fixture(autouse=True)
def _no_live_workers():
    yield
    W.drop_all()  # other tests must not find this module's workers


def _study(tmp_path, name, model, dtype, execution, certify=True, **kw):
    d = tmp_path / name
    sampler = af.basins.Sphere(4, 3, dtype)
    with RunDirWriter(d) as w:
        r = af.basin_fractions(model, jax.random.PRNGKey(3), 90, sampler=sampler, stop=af.Stop(1e-6, certify=certify),
                               run_dir=w, execution=execution, **kw)
    m = read_members(d)
    return r, (m["name"].tolist(), m["outcome"].tolist(), m["steps"].tolist())


@pytest.mark.slow  # workers run only when asked for (the default is tests/test_cores.py's one-thread clients)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_members_identical_in_workers_and_in_process(tmp_path, dtype):
    V = np.diag([1.0, 0.5, -0.3]).astype(dtype)
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    cases = {"map": (af.LayerMap(att, 0.1), dict(budget=af.Budget(max_steps=300), certify=False)),
             "adaptive": (af.SphereFlow(att), dict(budget=af.Budget(max_steps=300)))}
    for mode, (model, kw) in cases.items():
        r0, one = _study(tmp_path, f"{mode}_0", model, dtype, af.Execution(workers=0, chunk=40), **kw)
        assert len(set(one[0])) >= 3 and len(set(one[2])) >= 10  # several names and step counts: the test has teeth
        # two workers (kept for the second mode), other pool and group sizes: shares of 20 members
        r, got = _study(tmp_path, f"{mode}_2", model, dtype, af.Execution(workers=2, chunk=40, pool=5, group=3), **kw)
        assert got == one, f"{mode} {dtype}: worker processes differ from this process"
        np.testing.assert_array_equal(r.members.finals, r0.members.finals)
        assert r.members.names == r0.members.names
        assert [(a.name, a.count) for a in r.attractors] == [(a.name, a.count) for a in r0.attractors]


def test_workers_keep_the_parents_settings_and_are_reused():
    w = W.workers(1)
    assert w.settings["jax_enable_x64"] is True  # this test session's (conftest)
    assert W.workers(1) is w  # warm: the same processes
    pid = w.procs[0].submit("pid").result(timeout=60)
    assert pid == w.procs[0].proc.pid and pid != os.getpid()


@pytest.mark.slow  # workers run only when asked for
def test_a_dead_worker_is_an_error_and_the_next_study_starts_new_ones(tmp_path):
    w = W.workers(1)
    w.procs[0].submit("pid").result(timeout=60)
    os.kill(w.procs[0].proc.pid, signal.SIGKILL)
    fut = w.procs[0].submit("pid")
    with pytest.raises(W.WorkerError, match="died"):
        fut.result(timeout=60)
    t = time.time()
    while not w.procs[0].dead and time.time() - t < 30:
        time.sleep(0.05)
    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    r, got = _study(tmp_path, "after", model, "float64", af.Execution(workers=1), budget=af.Budget(max_steps=700))
    assert r.samples == 90 and len(got[0]) == 90
    assert W.workers(1) is not w


def test_worker_errors_reach_the_caller():
    w = W.workers(1)
    s = w.begin({"dyn": None}, None)  # a context the worker cannot use
    with pytest.raises(Exception):
        s.result(0, s.block(0, np.zeros((1, 4, 3)), np.zeros(1, np.int32), 0, True, None))


@pytest.mark.parametrize("bad", [-1, 1.5, True, 65, "2"])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="workers"):
        af.Execution(workers=bad)


def test_workers_and_several_devices_are_refused(no_compute):
    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    from attnflow.analysis.basins import study

    with pytest.raises(ValueError, match="devices or workers"):
        study.basin_fractions(model, jax.random.PRNGKey(0), 10, tokens=4, budget=af.Budget(max_steps=10),
                              execution=af.Execution(workers=2, devices=2))


class _MainMap(af.LayerMap):
    """A model class as a script or a notebook defines it (in ``__main__``)."""


_MainMap.__module__ = "__main__"


def test_what_cannot_be_sent_to_a_worker_is_named():
    V = np.diag([1.0, 0.5, -0.3])
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    assert W.unsent((af.LayerMap(att, 0.1), af.Adaptive(), af.Budget(max_steps=5))) is None
    assert "_MainMap is defined in __main__" in W.unsent(_MainMap(att, 0.1))
    assert "cannot be pickled" in W.unsent(lambda x: x)


@pytest.mark.slow  # workers run only when asked for
def test_a_model_of_main_runs_in_this_process_and_is_refused_for_workers(monkeypatch):
    V = np.diag([1.0, 0.5, -0.3])
    model = _MainMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    with pytest.raises(ValueError, match="define it in a module, or pass workers=0"):
        af.basin_fractions(model, jax.random.PRNGKey(0), 20, tokens=4, budget=af.Budget(max_steps=50),
                           execution=af.Execution(workers=2))
    monkeypatch.setattr(W, "cores", lambda: 2)
    r = af.basin_fractions(model, jax.random.PRNGKey(0), 20, tokens=4, budget=af.Budget(max_steps=50))
    assert r.samples == 20 and "w" not in W._LIVE  # run here, no worker started (workers only when asked for)
    r2 = af.basin_fractions(af.LayerMap(model.attn, 0.1), jax.random.PRNGKey(0), 20, tokens=4,
                            budget=af.Budget(max_steps=50), execution=af.Execution(workers=2))
    assert "w" in W._LIVE and W._LIVE["w"].count == 2  # the same study of an importable model: in workers
    assert [(a.name, a.count) for a in r2.attractors] == [(a.name, a.count) for a in r.attractors]


def test_cores_respect_the_cgroup_quota(monkeypatch, tmp_path):
    f = tmp_path / "cpu.max"
    monkeypatch.setattr(W, "CGROUP_CPU_MAX", str(f))
    monkeypatch.setattr(W.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert W.cores() == 16  # no file: the affinity mask
    f.write_text("max 100000\n")
    assert W.cores() == 16
    f.write_text("200000 100000\n")
    assert W.cores() == 2
    f.write_text("50000 100000\n")
    assert W.cores() == 1


class _Elsewhere:
    """A class whose module exists in this process only (as one added to sys.modules at run time)."""


def test_a_call_the_worker_cannot_read_fails_alone(monkeypatch):
    import sys
    import types

    mod = types.ModuleType("attnflow_test_only_here")
    mod._Elsewhere = _Elsewhere
    monkeypatch.setitem(sys.modules, "attnflow_test_only_here", mod)
    monkeypatch.setattr(_Elsewhere, "__module__", "attnflow_test_only_here")
    w = W.workers(1)
    with pytest.raises(ModuleNotFoundError, match="attnflow_test_only_here"):
        w.procs[0].submit("pid", _Elsewhere()).result(timeout=60)
    assert w.procs[0].submit("pid").result(timeout=60) == w.procs[0].proc.pid  # the worker lives on


@pytest.mark.slow  # workers run only when asked for
def test_studies_in_threads_share_the_workers_each_on_its_own_model(tmp_path):
    """Two studies at once on the same workers (each names its stream): each gets its own model's members."""
    import threading

    V = np.diag([1.0, 0.5, -0.3])
    att = af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0)
    models = {"a": af.LayerMap(att, 0.1), "b": af.LayerMap(att, 0.3)}  # same shapes, other members' fates
    alone = {k: _study(tmp_path, f"{k}0", m, "float64", af.Execution(workers=0, chunk=30), certify=False,
                       budget=af.Budget(max_steps=300))[1] for k, m in models.items()}
    assert alone["a"] != alone["b"]
    got, errors = {}, []

    def run(k):
        try:
            got[k] = _study(tmp_path, f"{k}2", models[k], "float64", af.Execution(workers=2, chunk=30, pool=4, group=2),
                            certify=False, budget=af.Budget(max_steps=300))[1]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in models]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert not errors, errors
    assert got == alone


def test_a_dead_worker_is_one_line_in_the_cli(monkeypatch, tmp_path, capsys):
    """`attnflow basins` whose worker process is killed: one line naming it and --resume, exit 2 (it was a
    60-line traceback and exit 1)."""
    from attnflow.analysis import basins as bs
    from attnflow.cli import main

    def killed(*a, **k):
        raise W.WorkerError("a worker process of this study died (exit status -9: killed, or out of memory?); "
                            "the blocks finished before are kept in a run directory")

    monkeypatch.setattr(bs, "basin_fractions", killed)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\ntokens = 4\n"
                   "steps = 20\n[basins]\nsamples = 6\nworkers = 2\n")
    assert main(["basins", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "worker process of this study died" in err[0] and "--resume" in err[0], err


class _Token:
    """An argument that pickles as 0 (so the worker can read it) and can be watched by a weak reference."""

    def __reduce__(self):
        return (int, (0,))


def test_the_writer_thread_keeps_no_message_it_has_sent():
    """A sent call is not kept alive by the writer thread: it holds the model's JAX arrays, and a daemon thread that
    drops the last reference to one while the interpreter exits aborts the process (exit status 134, "FATAL:
    exception not rethrown", seen in one of three runs of a 10^5-member study). Old code: the writer's loop variable
    held the last message until the next one came."""
    import gc
    import weakref

    w = W.workers(1)
    token = _Token()
    ref = weakref.ref(token)
    fut = w.procs[0].submit("pid", token)
    with pytest.raises(TypeError):
        fut.result(timeout=120)
    del token, fut
    for _ in range(100):  # the writer lets go right after sending, long before the answer is back
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.01)
    assert ref() is None


def test_a_ctrl_c_while_a_worker_starts_leaves_it_to_the_parent():
    # a terminal's Ctrl-C reaches the whole process group; a worker still importing JAX died of it with a
    # KeyboardInterrupt traceback. It now ignores SIGINT from its first statement, started with SIGINT blocked
    import os
    import signal
    import time

    from attnflow.evolve import workers as W

    w = W._Worker({})
    try:
        for _ in range(12):  # SIGINTs over the worker's first 0.6 s: interpreter start, imports
            os.kill(w.proc.pid, signal.SIGINT)
            time.sleep(0.05)
        time.sleep(2.0)
        assert w.proc.poll() is None  # alive, waiting for calls
    finally:
        w.close()
    assert w.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # ended by close()
