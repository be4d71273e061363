"""Run directories (attnflow.io.results): one lock held by a context manager, reading without side effects,
checksummed chunks, stale temporary files, the per-sample table, lazy pyarrow, and output directories that belong
to one command."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock, Timeout

from attnflow.io import results as R
from attnflow.io.results import RunDir, RunDirError, RunDirWriter, claim_dir, dir_owners, read_members

FIX = Path(__file__).parent / "fixtures" / "hf"
MAN = {"identity": {"samples": 6, "chunk_size": 3}}


def columns(lo: int, n: int = 3, *, initial: bool = True) -> dict:
    """A basin study's per-sample table for samples lo .. lo + n - 1 (every kind of column the writer stores)."""
    idx = np.arange(lo, lo + n, dtype=np.int64)
    rep = np.full((n, 6), np.nan)
    rep[0] = np.linspace(-1, 1, 6) + lo
    cols = {
        "index": idx,
        "name": np.array(["consensus +v1", "bipartite v1 3:7", "not converged"])[idx % 3],
        "outcome": np.array(["converged", "converged", "max_steps"], dtype=object)[idx % 3],
        "steps": (idx * 7).astype(np.int32),
        "flag": idx % 2 == 0,
        "row": np.stack([idx, -idx, idx * 0]).T.astype(np.int64),
        "rep": rep,
    }
    if initial:
        cols["initial"] = (np.arange(n * 6, dtype=np.float32).reshape(n, 6) + lo) / 7
    return cols


def same(a: dict, b: dict) -> None:
    """Equal tables: same columns, values (NaN == NaN), shapes and dtypes (strings as NumPy str arrays)."""
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.dtype.kind == "O":
            x = x.astype(str)
        assert y.shape == x.shape and (y.dtype == x.dtype if x.dtype.kind != "U" else y.dtype.kind == "U"), (k, x.dtype, y.dtype)
        np.testing.assert_array_equal(y, x, err_msg=k)


def lock_is_free(path: Path) -> bool:
    """Whether another holder (a separate lock object, as another process would have) can take DIR/.lock now."""
    other = FileLock(str(path / ".lock"))
    try:
        other.acquire(timeout=0)
    except Timeout:
        return False
    other.release()
    return True


# ------------------------------------------------------------------------------------------------ imports
def test_import_attnflow_loads_neither_pyarrow_nor_matplotlib():
    code = "import attnflow, sys; print(sorted(m for m in ('pyarrow', 'matplotlib') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "[]", r.stdout


# ------------------------------------------------------------------------------------------------ the lock
def test_run_dir_holds_one_lock_and_releases_it_on_exit(tmp_path):
    with RunDir(tmp_path / "r", MAN) as rd:
        assert not lock_is_free(rd.path)
    assert lock_is_free(rd.path) and rd.closed
    rd.close()  # idempotent
    with pytest.raises(RunDirError, match="closed"):
        rd.write_chunk(0, columns(0))
    rd = RunDir(tmp_path / "r", MAN, resume=True)
    assert not lock_is_free(rd.path)
    del rd
    gc.collect()  # collected without close: released all the same
    assert lock_is_free(tmp_path / "r")
    assert "__del__" not in vars(RunDir) and "__del__" not in vars(RunDirWriter)


def test_writer_takes_the_lock_when_created_and_releases_it_on_exit(tmp_path):
    run = tmp_path / "r"
    with RunDirWriter(run, manifest={"config_path": "c.toml"}) as w:
        assert not lock_is_free(run)  # before open: a second writer is refused before any work
        w.open({"samples": 6})
        w.write_chunk(0, columns(0))
        assert w.done(0) and w.damaged(0) is None
    assert lock_is_free(run)
    w.close()
    with pytest.raises(RunDirError, match="closed"):
        w.open({"samples": 6})
    other = FileLock(str(run / ".lock"))
    with other:  # another process's lock
        with pytest.raises(RunDirError, match="in use by another attnflow process") as e:
            RunDirWriter(run, resume=True)
        assert "\n" not in str(e.value)
    joined = RunDirWriter(run, resume=True, lock=False)  # a process > 0 of a jax.distributed job
    joined.open({"samples": 6})
    assert joined.done(0) and lock_is_free(run)
    joined.close()


# ------------------------------------------------------------------------------------------------ reading
def test_done_and_damaged_read_only_and_repair_is_explicit(tmp_path):
    with RunDir(tmp_path / "r", MAN) as rd:
        assert not rd.done(0) and rd.damaged(0) is None  # absent
        for i in range(4):
            rd.write_chunk(i, columns(3 * i))
        assert all(rd.done(i) and rd.damaged(i) is None for i in range(4))
        p = [rd.chunk_path(i) for i in range(4)]
        p[0].write_bytes(p[0].read_bytes()[: p[0].stat().st_size // 2])  # truncated
        p[1].write_bytes(b"garbage")
        p[3].write_bytes(p[2].read_bytes())  # chunk 2's table under chunk 3's name
        before = {q: q.read_bytes() for q in p}
        assert not rd.done(0) and "unreadable" in rd.damaged(0)
        assert not rd.done(1) and "unreadable" in rd.damaged(1)
        assert not rd.done(3) and rd.damaged(3) == "it is stamped as chunk 2, not 3"
        assert {q: q.read_bytes() for q in p} == before  # nothing deleted or written
        for i in (0, 1, 3):
            assert "\n" not in rd.damaged(i)
            with pytest.raises(RunDirError, match="damaged"):
                rd.read_chunk(i)
            rd.write_chunk(i, columns(3 * i))  # the repair: recompute, overwrite atomically
        assert all(rd.done(i) for i in range(4))
        same(columns(9), rd.read_chunk(3))
    with RunDir(tmp_path / "other", {"identity": {"samples": 7}}) as other:  # another run's chunk
        (other.chunks / "00002.parquet").write_bytes(p[2].read_bytes())
        assert other.damaged(2) == "it belongs to another run" and not other.done(2)


def test_altered_values_or_a_dropped_column_with_the_stamp_kept_are_damaged(tmp_path):
    import pyarrow.parquet as pq

    with RunDir(tmp_path / "r", MAN) as rd:
        rd.write_chunk(0, columns(0))
        rd.write_chunk(1, columns(3))
        p0, p1 = rd.chunk_path(0), rd.chunk_path(1)
        t = pq.read_table(p0)
        steps = t.column("steps").to_numpy().copy()
        steps[1] += 1
        pq.write_table(t.set_column(t.column_names.index("steps"), "steps", [steps]).replace_schema_metadata(t.schema.metadata), p0)
        assert pq.read_table(p0).schema.metadata == t.schema.metadata  # identity stamp kept
        assert not rd.done(0) and rd.damaged(0) == "its contents do not match their SHA-256 checksum"
        t1 = pq.read_table(p1)
        pq.write_table(t1.drop_columns(["rep"]).replace_schema_metadata(t1.schema.metadata), p1)
        assert not rd.done(1) and rd.damaged(1) == "column 'rep' is missing"
        with pytest.raises(RunDirError, match="column 'rep' is missing") as e:
            rd.read_chunk(1)
        assert "\n" not in str(e.value)
    with pytest.raises(RunDirError, match="00000.parquet is damaged"):
        read_members(tmp_path / "r")


# ------------------------------------------------------------------------------------------------ the table
def test_every_kind_of_column_round_trips_with_its_dtype_and_shape(tmp_path):
    with RunDir(tmp_path / "r", MAN) as rd:
        rd.write_chunk(0, columns(0))
        got = rd.read_chunk(0)
    same(columns(0), got)
    assert got["name"].dtype.kind == "U" and got["outcome"].dtype.kind == "U"  # strings as NumPy str arrays
    assert got["row"].shape == (3, 3) and got["initial"].dtype == np.float32 and np.isnan(got["rep"][1:]).all()
    with RunDir(tmp_path / "r", MAN, resume=True) as rd:  # another process reading it back
        same(columns(0), rd.read_chunk(0))
        rd.write_chunk(1, {k: v[:0] for k, v in columns(3).items()})  # an empty chunk keeps its column kinds
        empty = rd.read_chunk(1)
        assert empty["rep"].shape == (0, 6) and empty["name"].dtype.kind == "U" and empty["steps"].dtype == np.int32


def test_arrow_columns_are_read_from_their_buffers_at_any_offset():
    """The buffer-level conversion equals pyarrow's own (``pa.array`` / ``to_pylist``), for every type attnflow
    writes, on slices of arrays (a nonzero offset into the buffers), including empty ones and non-ASCII text."""
    import pyarrow as pa

    cases = [np.array(["a", "", "bipartite v1 3:7", "µ→ü", "x" * 40]), np.array([True, False, True, True, False, False, True, True, False]),
             np.arange(-4, 5, dtype=np.int32), np.arange(9, dtype=np.uint64) * 2**40, np.linspace(-1, 1, 9, dtype=np.float32),
             np.array([np.nan, np.inf, -0.0, 1e-300, 3.5])]
    for a in cases:
        arr = R._to_arrow(a)
        ref = pa.array(a.tolist(), type=arr.type)
        assert arr.type == ref.type and repr(arr.to_pylist()) == repr(ref.to_pylist())  # (repr: NaN equals NaN)
        for lo, hi in ((0, len(a)), (1, len(a)), (2, 4), (3, 3)):
            got = R._from_arrow(arr[lo:hi])
            assert got.dtype == a.dtype or (a.dtype.kind == "U" and got.dtype.kind == "U")
            np.testing.assert_array_equal(got, a[lo:hi])  # NaN equals NaN here; -0.0 == 0.0, so the bits too:
            assert got.tobytes() == a[lo:hi].astype(got.dtype).tobytes() or a.dtype.kind == "U"


def test_writing_and_reading_chunks_does_not_import_pandas(tmp_path):
    """pyarrow imports pandas (0.2 s) for ``pa.array``, ``to_numpy`` and ``pq.read_table``; chunks go through
    Arrow buffers instead, so a study's first chunk does not pay for it."""
    code = ("import sys, numpy as np; from attnflow.io.results import RunDir; "
            f"rd = RunDir({str(tmp_path / 'r')!r}, {{'identity': {{'samples': 3}}}}).__enter__(); "
            "rd.write_chunk(0, {'i': np.arange(3), 's': np.array(['a', 'b', 'c']), 'b': np.ones(3, bool), "
            "'x': np.ones((3, 2), np.float32)}); c = rd.read_chunk(0); assert c['s'].tolist() == ['a', 'b', 'c']; "
            "print('pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("bad,error", [({"name": np.array([1, "a"], dtype=object)}, TypeError),
                                       ({"x": np.zeros((2, 2, 2))}, ValueError), ({"z": np.zeros(2, complex)}, TypeError),
                                       ({"a": np.zeros(2), "b": np.zeros(3)}, ValueError), ({"w": np.zeros((2, 0))}, ValueError)])
def test_columns_that_cannot_be_stored_are_refused(tmp_path, bad, error):
    with RunDir(tmp_path / "r", MAN) as rd:
        with pytest.raises(error):
            rd.write_chunk(0, bad)
        assert not rd.chunk_path(0).exists() and not any(rd.chunks.iterdir())


def test_read_members_concatenates_finished_chunks_sorted_by_index(tmp_path):
    with RunDirWriter(tmp_path / "r", initial=True) as w:
        w.open({"samples": 9})
        assert read_members(tmp_path / "r") == {}
        for i in (2, 0, 1):
            c = columns(3 * i)
            w.write_chunk(i, {k: v[::-1] for k, v in c.items()})  # rows in any order
    m = read_members(tmp_path / "r")
    np.testing.assert_array_equal(m["index"], np.arange(9))
    full = {k: np.concatenate([columns(3 * i)[k] for i in range(3)]) for k in columns(0)}
    same(full, m)
    (tmp_path / "r" / "manifest.json").write_text("{")
    with pytest.raises(RunDirError, match="manifest.json is damaged"):
        read_members(tmp_path / "r")


def test_the_writer_stores_initial_states_only_when_asked(tmp_path):
    with RunDirWriter(tmp_path / "a") as w:
        w.open({"samples": 3})
        w.write_chunk(0, columns(0))
        assert "initial" not in w.read_chunk(0)
    with RunDirWriter(tmp_path / "b", initial=True) as w:
        w.open({"samples": 3})
        w.write_chunk(0, columns(0))
        same(columns(0), w.read_chunk(0))
    with RunDirWriter(tmp_path / "a", resume=True, initial=True) as w:  # one run's chunks hold the same columns
        with pytest.raises(RunDirError, match="initial was '<absent>', now True"):
            w.open({"samples": 3})


# ------------------------------------------------------------------------------------------------ stale temporaries
def test_stale_temporary_files_are_removed_by_the_lock_holder_only(tmp_path, capsys):
    run = tmp_path / "r"
    with RunDir(run, MAN) as rd:
        rd.write_chunk(0, columns(0))
    stale = [run / "chunks" / ".00001.parquet.4242.0123456789ab.tmp", run / ".manifest.json.77.fedcba987654.tmp"]
    keep = [run / "chunks" / ".notes", run / "chunks" / "00001.parquet.tmp", run / ".attnflow-probe.1.ab"]
    for f in stale + keep:
        f.write_bytes(b"x")
    capsys.readouterr()
    with RunDir(run, MAN, resume=True, lock=False):  # a process > 0 of a jax.distributed job: does not clean
        pass
    assert all(f.exists() for f in stale) and capsys.readouterr().err == ""
    with RunDir(run, MAN, resume=True) as rd:
        assert rd.done(0)
    err = capsys.readouterr().err
    assert err == f"attnflow: removed 2 stale temporary files from {run} and {run / 'chunks'}\n"
    assert not any(f.exists() for f in stale) and all(f.exists() for f in keep)
    stale[0].write_bytes(b"x")
    with RunDirWriter(run, resume=True) as w:
        w.open(MAN["identity"])
    assert capsys.readouterr().err == f"attnflow: removed 1 stale temporary file from {run / 'chunks'}\n"


def test_temporary_files_being_written_are_not_stale(tmp_path):
    seen = []

    def write(tmp):
        tmp.write_bytes(b"partial")
        assert R.remove_stale_temporaries(tmp_path) == 0  # this process's own file, in flight
        seen.append(tmp.exists())

    R._write_atomic(tmp_path / "x.json", write)
    assert seen == [True] and (tmp_path / "x.json").read_bytes() == b"partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# ------------------------------------------------------------------------------------------------ output ownership
CONFIG = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
tokens = 4
steps = 20
batch = 3
[basins]
samples = 6
chunk_size = 3
"""


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(CONFIG)
    return p


def refused(capsys, argv, *needles):
    from attnflow.cli import main

    rc = main([str(a) for a in argv])
    o, e = capsys.readouterr()
    assert rc == 2 and o == "" and len(e.strip().splitlines()) == 1 and "Traceback" not in e, (rc, o, e)
    for n in needles:
        assert n in e, (n, e)
    return e


def listing(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def basins_run(d: Path, *, marker: bool = True) -> Path:
    """A finished basin run directory (written through the writer, as the study does)."""
    d.mkdir(parents=True, exist_ok=True)
    if marker:
        claim_dir(d, "basins")
    with RunDirWriter(d) as w:
        w.open({"samples": 6})
        w.write_chunk(0, columns(0))
        w.write_chunk(1, columns(3))
        w.write_json("result.json", {"samples": 6})
    return d


@pytest.mark.parametrize("command", ["simulate", "stability", "energy", "demo", "transformer"])
def test_other_commands_refuse_a_basins_run_directory(tmp_path, capsys, cfg, no_compute, command):
    run = basins_run(tmp_path / "run")
    before = listing(run)
    args = {"demo": ["demo", "--samples", "1"], "transformer": ["transformer", FIX / "bert", "--samples", "1", "--tokens", "3"]}
    refused(capsys, args.get(command, [command, cfg]) + ["--out", run], "holds the output of 'attnflow basins'",
            f"'attnflow {command}'")
    assert listing(run) == before


def test_a_basins_run_without_its_marker_is_still_recognised(tmp_path, capsys, cfg, no_compute):
    run = basins_run(tmp_path / "run", marker=False)
    assert dir_owners(run) == ["basins"] and not (run / R.MARKER).exists()
    refused(capsys, ["simulate", cfg, "--out", run], "attnflow basins")


@pytest.mark.parametrize("legacy", [False, True])
def test_basins_refuses_a_simulate_output(tmp_path, capsys, cfg, no_compute, legacy):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "trajectories.npz").write_bytes(b"npz")
    (out / "sphere.png").write_bytes(b"png")  # a name both commands write
    if not legacy:
        claim_dir(out, "simulate")
    before = listing(out)
    refused(capsys, ["basins", cfg, "--out", out], "holds the output of 'attnflow simulate'")
    refused(capsys, ["basins", cfg, "--out", out, "--resume"], "holds the output of 'attnflow simulate'")
    assert listing(out) == before and not (out / "chunks").exists() and not (out / "manifest.json").exists()


def test_a_damaged_marker_is_refused_in_one_line(tmp_path, capsys, cfg, no_compute):
    out = tmp_path / "o"
    out.mkdir()
    (out / R.MARKER).write_text("not json")
    refused(capsys, ["simulate", cfg, "--out", out], ".attnflow is damaged")


def test_claim_writes_the_marker_and_lets_a_command_reuse_its_own_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")  # unrelated files are not another command's output
    claim_dir(d, "simulate")
    assert json.loads((d / R.MARKER).read_text()) == {"command": "simulate"}
    claim_dir(d, "simulate")
    assert dir_owners(d) == ["simulate"] and sorted(p.name for p in d.iterdir()) == [".attnflow", "notes.txt"]
    with pytest.raises(RunDirError, match="attnflow simulate") as e:
        claim_dir(d, "energy")
    assert "\n" not in str(e.value)
    (d / "chunks").mkdir()  # an empty chunks/ folder is nobody's output
    assert dir_owners(d) == ["simulate"]


def test_simulate_overwrites_its_own_output(tmp_path, capsys, cfg):
    from attnflow.cli import main

    out = tmp_path / "o"
    out.mkdir()
    claim_dir(out, "simulate")
    (out / "trajectories.npz").write_bytes(b"an earlier run")
    assert main(["simulate", str(cfg), "--out", str(out), "--json", "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((out / R.MARKER).read_text()) == {"command": "simulate"}
    assert set(np.load(out / "trajectories.npz")) >= {"final", "outcome", "steps"}


def test_basins_reusing_its_own_directory_needs_resume(tmp_path, capsys, cfg):
    run = basins_run(tmp_path / "run")
    refused(capsys, ["basins", cfg, "--out", run], "already holds a run", "--resume")


def test_basins_resume_of_a_directory_without_a_run_says_it_starts_one(tmp_path, capsys, cfg):
    """--resume where no run is (a mistyped directory) starts one, and says so (it was silent)."""
    from attnflow.cli import main

    out = tmp_path / "typo"
    assert main(["basins", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert f"{out} holds no run yet; starting one" in capsys.readouterr().err
    assert main(["basins", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "holds no run" not in capsys.readouterr().err


def test_basins_resumes_with_other_settings_of_speed_only(tmp_path, capsys, cfg, monkeypatch):
    """[basins] workers, pool_size and round_steps change speed only (schema: speed_only): a run resumes with other
    values, to the uninterrupted result. A run whose manifest recorded them (as before they were marked) resumes too,
    keeping its finished chunks (stamped with that identity), not recomputing them."""
    import os

    from attnflow.cli import main
    from attnflow.io.config import schema

    def run(text, out, *extra):
        p = tmp_path / "b.toml"
        p.write_text(text)
        assert main(["basins", str(p), "--out", str(out), "--json", "--no-progress", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    base = CONFIG.replace("samples = 6", "samples = 9")
    ref = run(base, tmp_path / "ref")
    other = base + "pool_size = 64\nround_steps = 2\nworkers = 0\n"
    for old_manifest in (False, True):
        out = tmp_path / f"run{old_manifest}"
        with monkeypatch.context() as m:
            if old_manifest:
                m.setattr(schema, "SPEED_ONLY", ())
                m.setattr("attnflow.io.config.run.SPEED_ONLY", ())
            run(base, out)
        ident = json.loads((out / "manifest.json").read_text())["identity"]["config"]["basins"]
        assert ("workers" in ident) == old_manifest
        (out / "result.json").unlink()
        (out / "chunks" / "00002.parquet").unlink()
        kept = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.parquet")}
        assert run(other, out, "--resume") == ref
        assert {p.name: p.stat().st_mtime_ns for p in (out / "chunks").glob("*.parquet") if p.name in kept} == kept
        assert sorted(os.listdir(out / "chunks")) == sorted(os.listdir(tmp_path / "ref" / "chunks"))
    # a change that is not speed only is still refused
    (tmp_path / "b.toml").write_text(base.replace("chunk_size = 3", "chunk_size = 9"))
    refused(capsys, ["basins", tmp_path / "b.toml", "--out", tmp_path / "ref", "--resume"], "chunk_size")


@pytest.mark.parametrize("name", ["run:1", "file:fx"])
def test_a_relative_path_with_a_colon_is_a_path_not_a_uri(tmp_path, monkeypatch, name):
    """pyarrow reads a path string with a colon as a URI ("file:fx", "run:1": an unknown scheme); chunks are written
    and read through native files, so a relative --out like these works like any other."""
    monkeypatch.chdir(tmp_path)
    with RunDirWriter(Path(name)) as w:
        w.open({"samples": 6})
        w.write_chunk(0, columns(0))
        w.write_chunk(1, columns(3))
        assert w.done(0) and w.done(1)
    np.testing.assert_array_equal(read_members(Path(name))["index"], np.arange(6))


def test_a_resumed_study_keeps_the_same_members_for_figures(tmp_path):
    """The members kept for figures (the lowest sample indices) are the same after a resume, partial or of a run
    whose every chunk is written, as without a break: their final states are stored in the chunks (column
    ``final``; NaN beyond them). Before, a full resume had none (no sphere.png) and a partial one other members."""
    import jax

    import attnflow as af

    V = np.diag([1.0, 0.5, -0.3])
    model = af.LayerMap(af.SelfAttention(af.Heads.single(V, K=V), af.Attention("softmax"), 1.0), 0.1)
    kw = dict(tokens=4, budget=af.Budget(max_steps=500), execution=af.Execution(chunk=20, workers=0))
    ref = af.basin_fractions(model, jax.random.PRNGKey(3), 60, run_dir=tmp_path / "ref", **kw)
    assert ref.members is not None and len(ref.members.names) == 60
    final = read_members(tmp_path / "ref")["final"]
    np.testing.assert_array_equal(final, ref.members.finals.reshape(60, -1))
    for drop in ([1], [0, 1, 2], []):
        run = tmp_path / f"run{len(drop)}"
        af.basin_fractions(model, jax.random.PRNGKey(3), 60, run_dir=run, **kw)
        for b in drop:
            (run / "chunks" / f"{b:05d}.parquet").unlink()
        res = af.basin_fractions(model, jax.random.PRNGKey(3), 60, run_dir=run, resume=True, **kw)
        assert res.members.names == ref.members.names
        np.testing.assert_array_equal(res.members.index, ref.members.index)
        np.testing.assert_array_equal(res.members.finals, ref.members.finals)


def test_figure_temporaries_are_named_like_the_run_directorys(tmp_path, monkeypatch):
    """A figure being written has a temporary name that a resume removes as stale and an interrupted process removes
    as its own (.NAME.PID.UUID.tmp, results.TMP_NAME); figures had their own pattern, left behind by every kill."""
    import os

    import attnflow.plots as P
    from attnflow._files import TMP_NAME, tmp_name

    seen = []
    monkeypatch.setattr(P, "tmp_name", lambda p: seen.append(tmp_name(p)) or seen[-1])
    fig = P.figure()
    P.write_atomic(fig, tmp_path / "sphere.png")
    assert (tmp_path / "sphere.png").exists() and len(seen) == 1
    assert TMP_NAME.match(seen[0].name) and f".{os.getpid()}." in seen[0].name
    assert R._TMP is TMP_NAME


def test_read_members_reads_each_chunk_once_whatever_copies_lie_beside_it(tmp_path):
    """Only the names the writer gives ({i:05d}.parquet) are chunks: a copy saved as 3.parquet or 000001.parquet
    was read as that chunk a second time (rows duplicated, no warning)."""
    import shutil

    run = basins_run(tmp_path / "run")
    shutil.copy(run / "chunks" / "00001.parquet", run / "chunks" / "000001.parquet")
    shutil.copy(run / "chunks" / "00001.parquet", run / "chunks" / "1.parquet")
    np.testing.assert_array_equal(read_members(run)["index"], np.arange(6))
    assert R._CHUNK.match("00001.parquet") and R._CHUNK.match("123456.parquet") and not R._CHUNK.match("0123456.parquet")


def test_a_file_that_cannot_replace_its_path_is_named_not_its_temporary(tmp_path):
    """A directory where a chunk goes: the error names the chunk's path (it named the temporary file)."""
    with RunDirWriter(tmp_path / "run") as w:
        w.open({"samples": 6})
        (tmp_path / "run" / "chunks" / "00000.parquet").mkdir()
        with pytest.raises(OSError) as e:
            w.write_chunk(0, columns(0))
    assert e.value.filename == str(tmp_path / "run" / "chunks" / "00000.parquet")
    assert not list((tmp_path / "run" / "chunks").glob(".*.tmp"))


def test_a_file_past_the_runs_last_chunk_is_named_and_removed_by_a_resume(tmp_path):
    import shutil

    with RunDirWriter(tmp_path / "r") as w:
        w.open({"samples": 9, "chunk_size": 3})
        for i in range(3):
            w.write_chunk(i, columns(3 * i))
    shutil.copy(tmp_path / "r" / "chunks" / "00001.parquet", tmp_path / "r" / "chunks" / "00099.parquet")
    # it said: resume to recompute chunk 99, and a resume never touched it (the run has chunks 0-2)
    with pytest.raises(RunDirError, match="no chunk of this run, which has 3"):
        read_members(tmp_path / "r")
    with RunDirWriter(tmp_path / "r", resume=True) as w:
        w.open({"samples": 9, "chunk_size": 3})
        assert w.done(0) and w.done(2)
    assert sorted(p.name for p in (tmp_path / "r" / "chunks").iterdir()) == [f"0000{i}.parquet" for i in range(3)]
    np.testing.assert_array_equal(read_members(tmp_path / "r")["index"], np.arange(9))
