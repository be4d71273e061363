"""attnflow's disk cache (attnflow._cache): canonical keys only for what attnflow can identify, and a study's
certificates read back from it give the study it would have computed."""

from __future__ import annotations

import os

import equinox as eqx
import jax
import numpy as np
import pytest

import attnflow as af
from attnflow import _cache
from attnflow.analysis.basins import certify, study
from attnflow.io.results import read_members


def flow(v=(1.0, 0.4, -0.3)):
    V = np.diag(v).astype(np.float32)
    return af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))


def test_canonical_identifies_attnflow_objects_and_refuses_others():
    f = flow()
    _, static = eqx.partition(f, eqx.is_array)
    assert _cache.canonical(jax.tree.structure(f)) == _cache.canonical(jax.tree.structure(flow((2.0, 1.0, 0.0))))
    assert _cache.canonical(af.Adaptive()) != _cache.canonical(af.Adaptive(rtol=1e-5))
    assert _cache.canonical(static) == _cache.canonical(eqx.partition(flow(), eqx.is_array)[1])
    # a number's type counts (a Python float is weakly typed in JAX, a NumPy float32 is not)
    assert _cache.canonical(1.0) != _cache.canonical(np.float32(1.0)) != _cache.canonical(np.float64(1.0))
    assert _cache.canonical(1) != _cache.canonical(True) != _cache.canonical(1.0)

    class UserFlow(af.SphereFlow):  # a user's class: not identified by its name
        pass

    for bad in (UserFlow(f.attn), jax.tree.structure(UserFlow(f.attn)), lambda x: x, np.zeros(3), object(),
                jax.numpy.float32, _closure()):
        with pytest.raises(_cache.NotCanonical):
            _cache.canonical(bad)


def _closure():
    a = 3

    def f(x):
        return x + a

    return f


def test_content_key_follows_contents_and_environment(monkeypatch):
    k = _cache.content_key("x", flow(), 8)
    assert k == _cache.content_key("x", flow(), 8)
    assert k != _cache.content_key("x", flow((1.0, 0.4, -0.30001)), 8)
    assert k != _cache.content_key("x", flow(), 9)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert k != _cache.content_key("x", flow(), 8)
    with pytest.raises(_cache.NotCanonical):
        _cache.content_key("x", lambda x: x)


def test_entries_are_checked_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "directory", lambda: tmp_path)
    _cache.write_arrays("k", "a", {"v": 1.5}, {"X": np.arange(6.0).reshape(2, 3)})
    meta, arrays = _cache.read_arrays("k", "a")
    assert meta == {"v": 1.5} and np.array_equal(arrays["X"], np.arange(6.0).reshape(2, 3))
    assert [p.name for p in (tmp_path / "k").iterdir()] == ["a"]  # no temporary file left
    p = tmp_path / "k" / "a"
    blob = bytearray(p.read_bytes())
    blob[-5] ^= 1
    p.write_bytes(bytes(blob))
    assert _cache.read_arrays("k", "a") is None  # a damaged entry is not read
    p.write_bytes(b"junk")
    assert _cache.read_arrays("k", "a") is None
    monkeypatch.setattr(_cache, "directory", lambda: tmp_path / "file" / "sub")
    (tmp_path / "file").write_text("not a directory")
    _cache.write_arrays("k", "b", {}, {})  # cannot be written: skipped, no error
    monkeypatch.setattr(_cache, "directory", lambda: None)
    assert _cache.read_arrays("k", "a") is None



def test_the_cache_is_bounded_and_keeps_what_was_used_last(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache, "directory", lambda: tmp_path)
    body = bytes(1000)
    for i, k in enumerate("abcd"):
        _cache.write("k", k, body)
        os.utime(tmp_path / "k" / k, ns=(10**18 + i * 10**9,) * 2)  # written in this order, a second apart
    assert _cache.read("k", "a") == body  # used now: the last to go
    monkeypatch.setattr(_cache, "MAX_BYTES", 4 * 1200)  # over it once "e" is written
    _cache.write("k", "e", body)
    left = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert left == ["a", "d", "e"]  # b and c, the least recently used, went until 3/4 of the bound was left
    assert sum(p.stat().st_size for p in (tmp_path / "k").iterdir()) <= 4 * 1200 * 3 // 4


def test_the_compile_cache_is_bounded_also_when_an_earlier_run_filled_it(tmp_path):
    import warnings

    from attnflow import cli

    saved = {n: jax.config.values[n] for n in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                                "jax_persistent_cache_min_entry_size_bytes",
                                                "jax_compilation_cache_max_size")}
    # an unbounded cache of an earlier run: programs without JAX's last-use stamps
    (tmp_path / "jit_old-0123-cache").write_bytes(b"x" * 10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # JAX warns when it cannot store a program
            cli.use_compile_cache(tmp_path)
            assert jax.config.values["jax_compilation_cache_max_size"] == cli.COMPILE_CACHE_MAX_BYTES
            assert (tmp_path / "jit_old-0123-atime").exists()
            jax.jit(lambda x: x * 11.0 + 0.25)(np.ones(3, np.float32)).block_until_ready()
        assert any(p.name.startswith("jit__lambda") for p in tmp_path.glob("*-cache"))  # stored
        # JAX opens its cache once per process: a second directory takes effect too
        other = tmp_path / "other"
        cli.use_compile_cache(other)
        jax.jit(lambda x: x * 13.0 - 0.5)(np.ones(3, np.float32)).block_until_ready()
        assert any(p.name.startswith("jit__lambda") for p in other.glob("*-cache"))
    finally:
        from jax.experimental.compilation_cache import compilation_cache

        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_study_with_stored_certificates_is_the_same_study(tmp_path, monkeypatch, dtype):
    """A study whose certificates come from the disk cache (a new process: the in-memory ones cleared) names,
    decides and steps every member as the study that computed them; a damaged entry is recomputed."""
    monkeypatch.setattr(_cache, "directory", lambda: tmp_path)
    V = np.diag([1.0, 0.4, -0.3]).astype(dtype)
    dyn = af.SphereFlow(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0))
    key = jax.random.PRNGKey(3)

    runs = iter(range(10))

    def run():
        study._CERTS.clear()
        out = tmp_path / f"run{next(runs)}"
        r = af.basin_fractions(dyn, key, 300, sampler=af.basins.Sphere(5, 3, dtype), run_dir=out)
        return r, read_members(out)

    calls = []
    real = certify.certificates
    monkeypatch.setattr(certify, "certificates", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, m1 = run()
    assert calls == [1] and len(list((tmp_path / "certificates").iterdir())) == 1
    second, m2 = run()
    assert calls == [1]  # read back, not computed
    assert set(m1) == set(m2) and "certified" in set(m1["outcome"])
    for c in m1:
        assert np.array_equal(m1[c], m2[c], equal_nan=m1[c].dtype.kind == "f"), c
    assert first.attractors == second.attractors
    (entry,) = (tmp_path / "certificates").iterdir()
    entry.write_bytes(entry.read_bytes()[:-3])
    third, m3 = run()
    assert calls == [1, 1]  # damaged: computed again
    for c in m1:
        assert np.array_equal(m1[c], m3[c], equal_nan=m1[c].dtype.kind == "f"), c


def _members(tmp_path, name, dyn, dtype="float32", samples=300):
    out = tmp_path / name
    af.basin_fractions(dyn, jax.random.PRNGKey(5), samples, sampler=af.basins.Sphere(5, 3, dtype), run_dir=out)
    return read_members(out)


def _same(a, b):
    assert set(a) == set(b)
    for c in a:
        assert np.array_equal(a[c], b[c], equal_nan=a[c].dtype.kind == "f"), c


def test_pool_program_is_loaded_from_its_export_without_tracing(tmp_path, monkeypatch):
    """With the disk cache on, a study's pool program is stored as a jax.export; a later process (here: the
    in-memory programs cleared) loads it without tracing the pool (the traced function raises), and its members are
    those of the study that exported it; a damaged entry is exported again."""
    from attnflow.evolve import pool

    monkeypatch.setattr(_cache, "directory", lambda: tmp_path / "cache")
    monkeypatch.setattr(pool._advance, "_memory", {})
    dyn = flow((1.0, 0.3, -0.2))
    first = _members(tmp_path, "a", dyn)
    (entry,) = (tmp_path / "cache" / "programs").iterdir()
    monkeypatch.setattr(pool._advance, "_memory", {})
    real = pool._advance.impl

    def traced(*a):
        raise AssertionError("the pool was traced")

    monkeypatch.setattr(pool._advance, "impl", traced)
    _same(first, _members(tmp_path, "b", dyn))
    entry.write_bytes(entry.read_bytes()[:-10])
    monkeypatch.setattr(pool._advance, "_memory", {})
    monkeypatch.setattr(pool._advance, "impl", real)
    _same(first, _members(tmp_path, "c", dyn))
    monkeypatch.setattr(_cache, "directory", lambda: None)  # the cache off: the same members
    monkeypatch.setattr(pool._advance, "_memory", {})
    _same(first, _members(tmp_path, "d", dyn))


def test_a_model_of_the_users_own_is_not_stored(tmp_path, monkeypatch):
    """A subclass defined by the user is not identified by its name: its program is not stored (it is compiled and
    runs as any other)."""
    from attnflow.evolve import pool

    class Mine(af.SphereFlow):
        pass

    monkeypatch.setattr(_cache, "directory", lambda: tmp_path / "cache")
    monkeypatch.setattr(pool._advance, "_memory", {})
    base = flow()
    mine = _members(tmp_path, "a", Mine(base.attn))
    assert not (tmp_path / "cache" / "programs").exists()
    assert not (tmp_path / "cache" / "certificates").exists()
    _same(mine, _members(tmp_path, "b", base))


def test_worker_processes_share_the_bound():
    # a worker storing programs into a bounded cache without JAX's last-use stamps would make this process fail to
    # store any further program there: workers take the bound with the rest of the cache settings
    from attnflow.evolve import workers

    assert "jax_compilation_cache_max_size" in workers._settings()
    assert "jax_compilation_cache_dir" in workers._settings()


def test_a_cache_directory_that_cannot_be_written_is_not_used(tmp_path):
    from attnflow import cli

    from pathlib import Path

    before = jax.config.values["jax_compilation_cache_dir"]
    ro = tmp_path / "file"
    ro.write_text("a file, not a directory")
    cli.use_compile_cache(ro / "cache")  # cannot be made: no cache
    assert jax.config.values["jax_compilation_cache_dir"] == before
    if Path("/proc/self").is_dir():  # a directory nobody can write, root included (a read-only mount behaves so)
        cli.use_compile_cache(Path("/proc/self"))  # was used: JAX warned at every program it could not store
        assert jax.config.values["jax_compilation_cache_dir"] == before
