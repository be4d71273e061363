"""Fault injection: every bad input, damaged file or concurrent writer gets one line on stderr and exit status 2
(or, for damage that can be repaired, a one-line notice and the uninterrupted result), never a traceback and
never partial or mixed output. One test per case of the run-integrity issue; a hypothesis test fuzzes the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import attnflow.cli._common as common
from attnflow.cli import main

ROOT = Path(__file__).resolve().parents[1]

MODEL = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
"""
DYN = """
[dynamics]
tokens = 4
steps = 30
batch = 3
"""
BASINS = """
[basins]
samples = 40
chunk_size = 10
"""


def toml(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(capsys, argv, *needles, out=None):
    """Run the CLI in-process and assert a clean refusal: exit 2, one stderr line, no traceback, empty stdout,
    and nothing written under ``out`` (when given) beyond what was there before."""
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out is not None and out.exists() else None
    rc = main([str(a) for a in argv])
    o, e = capsys.readouterr()
    assert rc == 2, (rc, o, e)
    lines = e.strip().splitlines()
    assert len(lines) == 1, e
    assert "Traceback" not in e and "\x1b[" not in e
    assert o == ""
    for n in needles:
        assert n in e, (n, e)
    if before is not None:
        after = sorted(p.relative_to(out) for p in out.rglob("*") if not p.name.startswith(".lock"))
        assert after == [p for p in before if not p.name.startswith(".lock")], (before, after)
    return e


# --------------------------------------------------------------------------------- schema: tables and types
@pytest.mark.parametrize("table,hint", [("dynamic", "dynamics"), ("basin", "basins"), ("stabilty", "stability"),
                                        ("energie", "energy"), ("modle", "model")])
def test_misspelled_table_refused_with_did_you_mean(tmp_path, capsys, no_compute, table, hint):
    text = MODEL + DYN + f"\n[{table}]\nsteps = 5\n"
    if table == "modle":
        text = MODEL.replace("[model]", "[modle]") + DYN
    refused(capsys, ["simulate", toml(tmp_path, text)], f"[{table}]", f"did you mean '{hint}'")


@pytest.mark.parametrize("line,needles", [
    ('relu_normalize = "false"', ["relu_normalize", "true or false"]),
    ("heads = 1.0", ["heads", "integer"]),
    ("d = true", ["d must be an integer"]),
])
def test_model_strict_types(tmp_path, capsys, no_compute, line, needles):
    key = line.split(" =")[0]
    text = MODEL.replace("d = 3", "d = 3" if key != "d" else line) + ("" if key == "d" else line + "\n") + DYN
    refused(capsys, ["simulate", toml(tmp_path, text)], *needles)


@pytest.mark.parametrize("value,needle", [("10.7", "integer"), ("true", "integer"), ('"many"', "integer"), ("0", "in [1, 2147483647], got 0")])
def test_basins_samples_strict(tmp_path, capsys, no_compute, value, needle):
    text = MODEL + DYN + BASINS.replace("samples = 40", f"samples = {value}")
    refused(capsys, ["basins", toml(tmp_path, text), "--out", tmp_path / "run"], "[basins] samples", needle, out=tmp_path / "run")


def test_basins_chunk_size_zero(tmp_path, capsys, no_compute):
    refused(capsys, ["basins", toml(tmp_path, MODEL + DYN + BASINS.replace("chunk_size = 10", "chunk_size = 0"))], "chunk_size", "in [1, 2147483647]")


@pytest.mark.parametrize("extra,needles", [
    ('sampler = {around = "circle"}', ["around", "'consensus', 'bipartite'"]),
    ('sampler = "gaussian"', ["sampler"]),
    ('sampler = {around = "bipartite", eigenvector = 0, split = 0}', ["split"]),
    ("sampler = {eigenvector = 7}", ["eigenvector = 7", "out of range"]),
    ('sampler = {around = "bipartite", split = 9}', ["split = 9", "out of range"]),
    ('continuation = {param = "beta", values = [1.0, -0.5]}', ["continuation values[1]", "> 0"]),
    ('continuation = {values = [1.0]}', ["continuation needs param"]),
    ('tol = "tight"', ["[basins] tol", "number"]),
    ("local = {q = 1.5}", ["local q", "(0, 1)"]),
    ("cluster_tol = nan", ["cluster_tol", "finite"]),
    ("seed = 4294967296", ["seed", "[0, 4294967295]"]),
])
def test_basins_table_refusals(tmp_path, capsys, no_compute, extra, needles):
    text = MODEL + DYN + BASINS + extra + "\n"
    refused(capsys, ["basins", toml(tmp_path, text)], *needles)


@pytest.mark.parametrize("extra,needles", [
    ('tol = "tight"', ["[stability] tol", "number"]),
    ('clustering = {starts = "many"}', ["clustering starts", "integer"]),
    ("continuation = {start = 0.5, stop = 2.0, eigenvector = 3}", ["eigenvector = 3", "out of range"]),
    ("continuation = {start = 0.5, stop = 2.0, split = 4}", ["split = 4", "out of range"]),
    ("continuation = {start = -0.5, stop = 2.0}", ["start", "> 0"]),
    ("continuation = {stop = 2.0}", ["needs start"]),
    ("bogus = 1", ["unknown key 'bogus'"]),
])
def test_stability_table_refusals(tmp_path, capsys, no_compute, extra, needles):
    refused(capsys, ["stability", toml(tmp_path, MODEL + DYN + "[stability]\n" + extra + "\n")], *needles)


@pytest.mark.parametrize("line,needles", [
    ("alpha = 1e300", ["alpha", "overflows float32"]),
    ("seed = 4294967296", ["seed", "[0, 4294967295]"]),
    ("seed = 9223372036854775808", ["seed", "[0, 4294967295]"]),
    ("seed = -1", ["seed", "[0, 4294967295]"]),
    ('dtype = "float16"', ["dtype"]),
    ('backend = "gpu"', ["backend", "'auto'"]),
    ("steps = 10.0", ["steps", "integer"]),
    ("tokens = 0", ["tokens", "in [1, 2147483647]"]),
    ('batch = "3"', ["batch", "integer"]),
])
def test_dynamics_refusals(tmp_path, capsys, no_compute, line, needles):
    k = line.split(" =")[0]
    dyn = "\n".join(ln for ln in DYN.splitlines() if not ln.startswith(k + " ="))
    refused(capsys, ["simulate", toml(tmp_path, MODEL + dyn + "\n" + line + "\n"), "--out", tmp_path / "o"], *needles, out=tmp_path / "o")
    assert not (tmp_path / "o" / "trajectories.npz").exists()


def test_beta_overflowing_float32_refused_but_fine_in_float64(tmp_path, capsys, no_compute):
    refused(capsys, ["simulate", toml(tmp_path, MODEL + "beta = 1e300\n" + DYN)], "beta", "overflows float32")
    from attnflow.io.config import load_config

    assert load_config(toml(tmp_path, MODEL + "beta = 1e300\n" + DYN + 'dtype = "float64"\n')).beta == 1e300


def test_t1_dt_too_many_steps_refused(tmp_path, capsys, no_compute):
    text = MODEL + '[dynamics]\ntime = "continuous"\nt1 = 1e6\ndt = 1e-9\ntokens = 3\nbatch = 2\n'
    refused(capsys, ["simulate", toml(tmp_path, text)], "t1 / dt", "steps")


def test_seeds_cover_their_range_without_collisions():
    import jax

    keys = {tuple(np.asarray(jax.random.key_data(jax.random.PRNGKey(s))).tolist()) for s in (0, 1, 2**31, 2**32 - 1)}
    assert len(keys) == 4


# ------------------------------------------------------------------------------------------- input files
def _weights(tmp_path, name="w.npz", **arrays):
    np.savez(tmp_path / name, **arrays)
    return MODEL.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", f'weights = "{name}"')


def test_complex_weights_refused(tmp_path, capsys, no_compute):
    e = np.eye(3)[None]
    text = _weights(tmp_path, Q=e, K=e, V=e * (1 + 1j))
    refused(capsys, ["simulate", toml(tmp_path, text + DYN)], "complex")


def test_float64_weights_overflowing_float32_refused(tmp_path, capsys, no_compute):
    e = np.eye(3)[None]
    text = _weights(tmp_path, Q=e, K=e, V=e * 1e39)
    refused(capsys, ["simulate", toml(tmp_path, text + DYN)], "V", "overflows float32")


def test_weights_npy_instead_of_npz(tmp_path, capsys, no_compute):
    np.save(tmp_path / "x.npy", np.eye(3))
    text = MODEL.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", 'weights = "x.npy"')
    refused(capsys, ["simulate", toml(tmp_path, text + DYN)], "x.npy", ".npz archive")


def test_weights_garbage_and_pickled_npz(tmp_path, capsys, no_compute):
    (tmp_path / "g.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    text = MODEL.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", 'weights = "g.npz"')
    refused(capsys, ["simulate", toml(tmp_path, text + DYN)], "g.npz")
    np.savez(tmp_path / "p.npz", Q=np.array([{"a": 1}], dtype=object))
    refused(capsys, ["simulate", toml(tmp_path, text.replace("g.npz", "p.npz") + DYN)], "p.npz")


def test_init_npz_instead_of_npy(tmp_path, capsys, no_compute):
    np.savez(tmp_path / "x.npz", x=np.ones((3, 4, 3)))
    refused(capsys, ["simulate", toml(tmp_path, MODEL + DYN + 'init = "x.npz"\n')], "init", ".npz archive", ".npy")


@pytest.mark.parametrize("bad,needle", [(np.full((3, 4, 3), np.nan), "non-finite"), (np.ones((2, 4, 3)), "shape"),
                                        (np.ones((3, 4, 3), complex), "complex"), (np.array(["a"]), "dtype")])
def test_init_wrong_content(tmp_path, capsys, no_compute, bad, needle):
    np.save(tmp_path / "x.npy", bad)
    refused(capsys, ["simulate", toml(tmp_path, MODEL + DYN + 'init = "x.npy"\n')], "init", needle)


@pytest.mark.parametrize("kind", ["npz", "nan", "shape", "text"])
def test_stability_states_of_the_wrong_kind(tmp_path, capsys, no_compute, kind):
    p = tmp_path / "s.npy"
    if kind == "npz":
        np.savez(p.with_suffix(".npz"), s=np.ones((4, 3)))
        os.replace(p.with_suffix(".npz"), p)
    elif kind == "nan":
        np.save(p, np.full((4, 3), np.nan))
    elif kind == "shape":
        np.save(p, np.ones((5, 3)))
    else:
        p.write_text("1 2 3\n")
    refused(capsys, ["stability", toml(tmp_path, MODEL + DYN + '[stability]\nstates = "s.npy"\n')], "[stability] states")


def test_config_file_errors(tmp_path, capsys):
    refused(capsys, ["simulate", tmp_path / "none.toml"], "not found")
    refused(capsys, ["simulate", tmp_path], "directory")
    (tmp_path / "b.toml").write_bytes(b"\xff\xfe\x00garbage")
    refused(capsys, ["simulate", tmp_path / "b.toml"])
    refused(capsys, ["simulate", toml(tmp_path, "[model\nd = 3")], "malformed TOML")


def test_usage_errors_are_one_line(tmp_path, capsys):
    refused(capsys, ["simulate", "--chunk-size", "many", "c.toml"], "--chunk-size")
    refused(capsys, ["simulate", toml(tmp_path, MODEL + DYN), "--chunk-size", "0"], "--chunk-size")
    refused(capsys, ["basins", toml(tmp_path, MODEL + DYN), "--resume"], "--resume needs --out")


# ----------------------------------------------------------------------------------- fail before computing
def test_out_that_is_a_file_is_refused_first(tmp_path, capsys, no_compute):
    (tmp_path / "f").write_text("x")
    cfg = toml(tmp_path, MODEL + DYN)
    refused(capsys, ["simulate", cfg, "--out", tmp_path / "f"], "not a directory")
    refused(capsys, ["simulate", cfg, "--out", tmp_path / "f" / "sub"], "not writable")
    refused(capsys, ["basins", cfg, "--out", tmp_path / "f" / "sub"], "not writable")


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys, no_compute, monkeypatch):
    """Also for root (who may write anywhere): a directory whose probe write fails is refused before computing."""
    from pathlib import Path

    real = Path.write_bytes

    def deny(self, data):
        if self.name.startswith(".attnflow-probe"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", deny)
    cfg = toml(tmp_path, MODEL + DYN + BASINS)
    (tmp_path / "done").mkdir()
    for cmd in (["simulate", cfg, "--out", tmp_path / "ro"], ["basins", cfg, "--out", tmp_path / "done", "--resume"],
                ["energy", cfg, "--out", tmp_path / "ro"], ["stability", cfg, "--out", tmp_path / "ro"]):
        refused(capsys, cmd, "not writable")


@pytest.fixture
def small_memory(monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda: (1 << 30, 1 << 30))


@pytest.mark.parametrize("line,needles", [("batch = 10000000", ["batch = 10000000", "reduce batch"]),
                                          ("batch = 1000000000", ["reduce batch"]),
                                          ("tokens = 100000", ["one member", "reduce tokens"])])
def test_size_guard_refuses_before_allocating(tmp_path, capsys, no_compute, small_memory, line, needles):
    text = MODEL + DYN.replace("batch = 3", "").replace("tokens = 4", "") + line + "\n"
    if "tokens" not in line:
        text += "tokens = 10\n"
    refused(capsys, ["simulate", toml(tmp_path, text)], *needles)


def test_size_guard_suggests_a_chunk_size(tmp_path, capsys, no_compute, small_memory):
    text = MODEL + DYN.replace("tokens = 4", "tokens = 2000").replace("batch = 3", "batch = 100")
    e = refused(capsys, ["simulate", toml(tmp_path, text), "--chunk-size", "100"], "use --chunk-size")
    suggested = int(e.split("use --chunk-size ")[1].split()[0])
    assert 1 <= suggested < 100 and suggested * common.member_bytes(_cfg(tmp_path, text)) <= (1 << 29)
    refused(capsys, ["basins", toml(tmp_path, text + BASINS + "pool_size = 100\n")], "use pool_size =")
    refused(capsys, ["stability", toml(tmp_path, MODEL + DYN.replace("tokens = 4", "tokens = 100000"))], "reduce tokens")


def _cfg(tmp_path, text):
    from attnflow.io.config import load_config

    return load_config(toml(tmp_path, text, "probe.toml"))


def test_size_guard_chooses_chunks_when_it_can(tmp_path, capsys, monkeypatch):
    """A batch that does not fit at once is simulated in chunks (with a notice), with the unchunked result."""
    text = MODEL + DYN.replace("batch = 3", "batch = 8") + 'dtype = "float64"\n'
    assert main(["simulate", str(toml(tmp_path, text)), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    one = common.member_bytes(_cfg(tmp_path, text))
    monkeypatch.setattr(common, "available_memory", lambda: (2 * 3 * one, 1 << 30))  # 3 members per chunk
    assert main(["simulate", str(toml(tmp_path, text)), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "chunks of 2" in err
    got = json.loads(out)
    for k in ("outcomes", "steps_mean", "consensus_fraction", "mean_min_cos"):
        assert got[k] == ref[k]


def test_basins_pool_shrinks_to_fit_with_the_same_result(tmp_path, capsys, monkeypatch):
    """The member pool sets memory, never the result: a default pool that does not fit is made smaller."""
    cfg = _basins_cfg(tmp_path)
    rc, ref, _ = _basins(capsys, cfg, tmp_path / "a")
    assert rc == 0
    one = common.member_bytes(_cfg(tmp_path, cfg.read_text()))
    monkeypatch.setattr(common, "available_memory", lambda: (2 * 10 * one, 1 << 30))
    rc, out, err = _basins(capsys, cfg, tmp_path / "b")
    assert rc == 0 and "using pool_size = 8" in err
    assert json.loads(out) == json.loads(ref)


# ------------------------------------------------------------------------------ run directories (basins)
def _basins_cfg(tmp_path, weights_scale=1.0):
    e = np.eye(3)[None]
    np.savez(tmp_path / "w.npz", Q=e, K=e, V=np.diag([1.0, 0.5, -0.3])[None] * weights_scale)
    return toml(tmp_path, MODEL.replace("V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]", 'weights = "w.npz"')
                + DYN + BASINS, "b.toml")


def _basins(capsys, cfg, out, *extra):
    rc = main(["basins", str(cfg), "--out", str(out), "--json", "--no-progress", *extra])
    o, e = capsys.readouterr()
    return rc, o, e


def test_resume_refuses_changed_input_contents(tmp_path, capsys):
    cfg = _basins_cfg(tmp_path)
    rc, o, e = _basins(capsys, cfg, tmp_path / "run")
    assert rc == 0, e
    chunks = sorted((tmp_path / "run" / "chunks").iterdir())
    (tmp_path / "run" / "chunks" / chunks[-1].name).unlink()  # as if killed before the last chunk
    _basins_cfg(tmp_path, weights_scale=2.0)  # same path, other contents
    e = refused(capsys, ["basins", cfg, "--out", tmp_path / "run", "--resume", "--json"], "input file weights changed",
                "sha256", out=tmp_path / "run")
    assert len(e) < 300 and "{" not in e


def test_resume_refusal_names_the_changed_key(tmp_path, capsys):
    cfg = _basins_cfg(tmp_path)
    assert _basins(capsys, cfg, tmp_path / "run")[0] == 0
    cfg.write_text(cfg.read_text().replace("[dynamics]", "[dynamics]\nalpha = 0.2"))
    e = refused(capsys, ["basins", cfg, "--out", tmp_path / "run", "--resume"], "[dynamics] alpha", "0.2", out=tmp_path / "run")
    assert len(e) < 300
    text = cfg.read_text().replace("alpha = 0.2\n", "")
    cfg.write_text(text.replace("[dynamics]", '[dynamics]\nbackend = "xla"'))  # the computing path is identity too
    refused(capsys, ["basins", cfg, "--out", tmp_path / "run", "--resume"], "backend", "xla", out=tmp_path / "run")
    cfg.write_text(text)
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())["identity"]
    assert {"config", "inputs", "dtype", "backend", "platform", "attnflow"} <= set(m)
    assert len(m["inputs"]["weights"]) == 64 and m["dtype"] == "float32"


def test_damaged_chunk_is_recomputed_with_a_notice(tmp_path, capsys):
    cfg = _basins_cfg(tmp_path)
    rc, ref, _ = _basins(capsys, cfg, tmp_path / "run")
    assert rc == 0
    c = tmp_path / "run" / "chunks"
    first, second, third = sorted(c.glob("*.parquet"))[:3]
    first.write_bytes(first.read_bytes()[: len(first.read_bytes()) // 2])  # truncated
    second.write_bytes(b"garbage")  # corrupt
    import shutil

    shutil.copy(third, second.with_name("00003.parquet"))  # a chunk with another index: foreign
    rc, out, err = _basins(capsys, cfg, tmp_path / "run", "--resume")
    assert rc == 0, err
    notices = [ln for ln in err.splitlines() if "is damaged" in ln and "recomputing" in ln]
    assert len(notices) == 3 and "Traceback" not in err  # the study's notices: reading a chunk never deletes it
    assert json.loads(out) == json.loads(ref)
    from attnflow.io.results import read_members

    members = read_members(tmp_path / "run")  # repaired in place: every chunk verified (stamp, columns, checksum)
    np.testing.assert_array_equal(members["index"], np.arange(40))


@pytest.mark.parametrize("damage", ["truncated", "empty", "not an object", "missing"])
def test_damaged_manifest_is_one_line(tmp_path, capsys, damage):
    cfg = _basins_cfg(tmp_path)
    assert _basins(capsys, cfg, tmp_path / "run")[0] == 0
    m = tmp_path / "run" / "manifest.json"
    if damage == "truncated":
        m.write_text(m.read_text()[:50])
    elif damage == "empty":
        m.write_text("")
    elif damage == "not an object":
        m.write_text("[1, 2]")
    else:
        m.unlink()
    refused(capsys, ["basins", cfg, "--out", tmp_path / "run", "--resume"], "manifest.json", "new --out", out=tmp_path / "run")


def test_second_writer_is_refused(tmp_path, capsys):
    from filelock import FileLock

    cfg = _basins_cfg(tmp_path)
    assert _basins(capsys, cfg, tmp_path / "run")[0] == 0
    held = FileLock(str(tmp_path / "run" / ".lock"))  # another process's lock (a separate descriptor)
    with held:
        refused(capsys, ["basins", cfg, "--out", tmp_path / "run", "--resume"], "in use by another attnflow process",
                out=tmp_path / "run")
    rc, _, err = _basins(capsys, cfg, tmp_path / "run", "--resume")  # free again
    assert rc == 0, err


def test_second_writer_process_is_refused(tmp_path):
    """Two processes: the one that holds the directory wins, the other gets one line and exit 2."""
    cfg = _basins_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); "
                               "l.acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path / "run" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run([sys.executable, "-m", "attnflow", "basins", str(cfg), "--out", str(tmp_path / "run"), "--resume"],
                           capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "in use" in r.stderr and "Traceback" not in r.stderr


def test_temporary_names_are_unique(tmp_path):
    from attnflow.io.results import _tmp

    names = {_tmp(tmp_path / "chunks" / "00000.parquet").name for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n for n in names)


# ----------------------------------------------------------------------------- checkpoints (transformer)
def _hf_dir(tmp_path, family="gpt2", **changes):
    import shutil

    src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", family)
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(changes)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


@pytest.mark.parametrize("family,changes", [("bert", {"num_attention_heads": 0}), ("bert", {"hidden_size": "eight"}),
                                            ("bert", {"num_hidden_layers": -1}), ("gpt2", {"n_head": 0}),
                                            ("gpt2", {"n_embd": "eight"}), ("gpt2", {"n_layer": -1})])
def test_transformer_config_json_values(tmp_path, capsys, family, changes):
    refused(capsys, ["transformer", _hf_dir(tmp_path, family, **changes), "--samples", "2", "--tokens", "3"], "config.json")


def _pickle_bin(p):
    import pickle

    with zipfile.ZipFile(p, "w") as z:  # a torch zip checkpoint whose pickle needs an arbitrary global
        z.writestr("archive/data.pkl", pickle.dumps(zipfile.ZipInfo("x"), protocol=2))
        z.writestr("archive/version", "3\n")


def test_refused_torch_bin_through_the_cli(tmp_path, capsys):
    pytest.importorskip("torch")
    d = _hf_dir(tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    _pickle_bin(d / "pytorch_model.bin")
    e = refused(capsys, ["transformer", d, "--samples", "2", "--tokens", "3"], "pytorch_model.bin", "safetensors")
    assert "weights_only=False" not in e


def test_refused_torch_bin_is_one_plain_line(tmp_path):
    pytest.importorskip("torch")
    from attnflow.io.weights import WeightsError, load_torch_bin

    p = tmp_path / "pytorch_model.bin"
    _pickle_bin(p)
    with pytest.raises(WeightsError) as ei:
        load_torch_bin(p)
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b[" not in msg and "weights_only=False" not in msg and "safetensors" in msg


# ------------------------------------------------------------------------------------------------ fuzzing
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CAPSYS_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.differing_executors]

WRONG = st.sampled_from([True, "x", "false", [], [1, "a"], {}, {"a": 1}, 10.7, -1, 0, 2**40, 2**70, float("nan"),
                         float("inf"), -1e300, 1e-320])
POOLS = {  # per key: values that are valid and cheap, or hostile; never a valid but huge budget
    ("model", "beta"): [0.5, 1.0, 1e300, -1.0, 0.0, 1e-45],
    ("model", "attention"): ["softmax", "relu", "sinkhorn", "uniform", "unnormalized", "cosine"],
    ("model", "mask"): ["full", "causal", "window:1", "window:0", "window:x", "windows:2"],
    ("model", "sinkhorn_iters"): [1, 3, 0],
    ("model", "relu_normalize"): [True, False],
    ("model", "heads"): [1, 2],
    ("dynamics", "time"): ["discrete", "continuous", "discret"],
    ("dynamics", "alpha"): [0.1, 1.0, 1e300, 0.0],
    ("dynamics", "norm"): ["l2", "layernorm", "none", "sphere", "flat", "L2"],
    ("dynamics", "tokens"): [1, 2, 3, 2**40],
    ("dynamics", "steps"): [1, 3, 6, 2**31, 2**40],
    ("dynamics", "t1"): [0.05, 0.1, 1e300, 0.0],
    ("dynamics", "dt"): [0.01, 0.05, 1e-12, 0.0],
    ("dynamics", "solver"): ["rk4", "euler", "adaptive", "heun"],
    ("dynamics", "saves"): [1, 2, 3, 7, 2**40],
    ("dynamics", "tol"): [1e-3, 1e-300, 0.0],
    ("dynamics", "batch"): [1, 2, 2**40, 2**62],
    ("dynamics", "dtype"): ["float32", "float64", "float16"],
    ("dynamics", "seed"): [0, 1, 2**32 - 1, 2**32, 2**63, -1],
    ("dynamics", "backend"): ["auto", "xla", "gpu"],
    ("dynamics", "rtol"): [1e-3, 0.0],
    ("dynamics", "atol"): [1e-6, -1.0],
}
BASE = {"model": {"d": 2, "V": [[1.0, 0.0], [0.0, -0.5]]},
        "dynamics": {"tokens": 2, "steps": 3, "t1": 0.05, "dt": 0.01, "batch": 2, "seed": 0}}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v) if abs(v) < 2**63 else f'"{v}"'  # TOML integers are 64-bit: a larger one as a string
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"


def _dump(cfg: dict) -> str:
    return "\n".join(f"[{t}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in tab.items()) for t, tab in cfg.items()) + "\n"


@st.composite
def configs(draw):
    cfg = json.loads(json.dumps(BASE))
    for (t, k), pool in POOLS.items():
        if draw(st.integers(0, 4)) == 0:  # perturb about one key in five
            cfg[t][k] = draw(st.one_of(st.sampled_from(pool), WRONG) if draw(st.booleans()) else st.sampled_from(pool))
    if draw(st.integers(0, 5)) == 0:
        cfg[draw(st.sampled_from(["model", "dynamics", "dynamic", "basins", "stabilty"]))] = {draw(st.sampled_from(["sead", "d", "samples"])): 1}
    return cfg


def _clean(rc, err):
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    else:
        assert "Traceback" not in err and "error" not in err.lower(), err


@settings(max_examples=25, suppress_health_check=CAPSYS_OK)  # capsys is read (and so emptied) in every example
@given(cfg=configs())
def test_fuzz_config_values_simulate(tmp_path_factory, capsys, cfg):
    p = tmp_path_factory.mktemp("fz") / "c.toml"
    p.write_text(_dump(cfg))
    rc = main(["simulate", str(p), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    _clean(rc, err)
    if rc == 0:
        assert json.loads(out)["batch"] == cfg["dynamics"]["batch"]
    else:
        assert out == ""


TABLE_POOLS = {
    "basins": {"samples": [1, 10, 0, 10.7, True], "seed": [0, 2**32, -3], "chunk_size": [1, 5, 0], "tol": [1e-7, "tight"],
               "cluster_tol": [1e-3, -1.0], "ci_width": [0.1, 1.5], "max_steps": [10, 0],
               "sampler": ["uniform", "gaussian", {"around": "circle"}, {"around": "bipartite", "split": 1}, {"eigenvector": 5},
                           {"around": "consensus", "radius": -1.0}],
               "continuation": [{"param": "beta", "values": [0.5, 1.0]}, {"param": "beta", "values": [-1.0]},
                                {"param": "gamma", "values": [1.0]}, {"values": []}],
               "local": [{"q": 0.9}, {"q": 2.0}, {"split": 7}, {"samples": "many"}]},
    "stability": {"states": ["s.npy", "w.npz", "missing.npy"], "tol": [1e-8, "tight", 0.0],
                  "clustering": [{"starts": 4}, {"starts": "many"}, {"clusters": 9}],
                  "continuation": [{"start": 0.5, "stop": 1.0}, {"start": -1.0, "stop": 1.0}, {"stop": 1.0},
                                   {"start": 0.5, "stop": 1.0, "eigenvector": 2}]},
    "energy": {"tol": [1e-10, -1.0], "members": [1, 0, 1.5], "eps": [1e-3, 2.0], "rho0": [0.0, 1.0], "points": [2, 1],
               "beta_max": [5.0, 0.0], "w": [[1.0], [1.0, "a"], []], "m": [[1.0], [2.0, 3.0]]},
}


@settings(max_examples=60)
@given(data=st.data())
def test_fuzz_command_tables_load_or_refuse(tmp_path_factory, data):
    """Every table of the schema: a draw either loads, or is refused with one ConfigError line (never another error)."""
    from attnflow.io.config import ConfigError, load_config

    d = tmp_path_factory.mktemp("ft")
    np.save(d / "s.npy", np.eye(2)[None].repeat(1, 0) * np.array([[1.0], [1.0]]))
    np.savez(d / "w.npz", Q=np.eye(2)[None])
    cfg = json.loads(json.dumps(BASE))
    for table, pool in TABLE_POOLS.items():
        keys = data.draw(st.lists(st.sampled_from(sorted(pool)), max_size=3, unique=True))
        if keys:
            cfg[table] = {k: data.draw(st.one_of(st.sampled_from(pool[k]), WRONG)) for k in keys}
    (d / "c.toml").write_text(_dump(cfg))
    try:
        load_config(d / "c.toml")
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


def _valid_npz() -> bytes:
    import io as _io

    b = _io.BytesIO()
    np.savez(b, Q=np.eye(2)[None], K=np.eye(2)[None], V=np.diag([1.0, -0.5])[None])
    return b.getvalue()


@settings(max_examples=25, suppress_health_check=CAPSYS_OK)
@given(which=st.sampled_from(["weights", "init"]), cut=st.integers(0, 2000), flips=st.lists(st.integers(0, 2000), max_size=4),
       kind=st.sampled_from(["truncate", "flip", "array"]),
       arr=st.sampled_from([np.eye(2)[None], np.ones((2, 2, 2)), np.ones((2, 2, 2), np.float32) * 1e38, np.ones((2, 2, 2), complex),
                            np.full((2, 2, 2), np.inf), np.array([True, False]), np.arange(8).reshape(2, 2, 2)]))
def test_fuzz_input_file_contents(tmp_path_factory, capsys, which, cut, flips, kind, arr):
    """Damaged or odd weights / init files: the CLI succeeds or refuses in one line."""
    import io as _io

    d = tmp_path_factory.mktemp("ff")
    if which == "weights":
        data = _valid_npz()
        if kind == "array":
            b = _io.BytesIO()
            np.savez(b, Q=np.eye(2)[None], K=np.eye(2)[None], V=arr if arr.ndim == 3 and arr.shape[1:] == (2, 2) and len(arr) == 1 else arr)
            data = b.getvalue()
        name = "w.npz"
    else:
        b = _io.BytesIO()
        np.save(b, arr if kind == "array" else np.ones((2, 2, 2)) / np.sqrt(2))
        data = b.getvalue()
        name = "x.npy"
    if kind == "truncate":
        data = data[: cut % (len(data) + 1)]
    elif kind == "flip":
        ba = bytearray(data)
        for f in flips:
            if ba:
                ba[f % len(ba)] ^= 0xFF
        data = bytes(ba)
    (d / name).write_bytes(data)
    text = dict(json.loads(json.dumps(BASE)))
    if which == "weights":
        text["model"] = {"d": 2, "weights": name}
    else:
        text["dynamics"]["init"] = name
    (d / "c.toml").write_text(_dump(text))
    rc = main(["simulate", str(d / "c.toml"), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    _clean(rc, err)


def _bf16_safetensors() -> bytes:
    import struct

    arr = (np.arange(6, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
    return struct.pack("<Q", len(header)) + header + arr.tobytes()


@settings(max_examples=40)
@given(src=st.sampled_from(["fixture", "bf16", "npz"]), cut=st.integers(0, 10**6), flips=st.lists(st.integers(0, 10**6), max_size=6))
def test_fuzz_weight_readers(tmp_path_factory, src, cut, flips):
    """Damaged checkpoints: the readers return arrays or raise one-line WeightsError, nothing else."""
    from attnflow.io.weights import WeightsError, load_arrays

    d = tmp_path_factory.mktemp("fw")
    if src == "fixture":
        data = (next(iter(sorted((ROOT / "tests" / "fixtures" / "hf" / "gpt2").glob("*.safetensors"))))).read_bytes()
        name = "m.safetensors"
    elif src == "bf16":
        data, name = _bf16_safetensors(), "m.safetensors"
    else:
        data, name = _valid_npz(), "w.npz"
    data = data[: cut % (len(data) + 1)] if cut % 3 == 0 else data
    ba = bytearray(data)
    for f in flips:
        if ba:
            ba[f % len(ba)] ^= 0x5A
    (d / name).write_bytes(bytes(ba))
    try:
        out = load_arrays(d / name)
    except WeightsError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(out, dict)


# ------------------------------------------------- overflow, strict JSON, hostile sizes, files and hosts
V_LINE = "V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]"


def strict_json(text: str):
    """Parse JSON, refusing NaN, Infinity and -Infinity (which Python's json accepts by default)."""
    def constant(c):
        raise AssertionError(f"non-standard JSON constant {c} in {text[:200]}")

    return json.loads(text, parse_constant=constant)


def as_user(argv) -> int:
    """The CLI in-process as a user's process runs a float32 config: with JAX's x64 mode off (the test suite turns
    it on; a float64 config turns it on itself). Set globally, not with the thread-local ``jax.enable_x64``
    context: a command may run in another thread than the caller's."""
    import jax

    was = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", False)
    try:
        return main([str(a) for a in argv])
    finally:
        jax.config.update("jax_enable_x64", was)


def _scaled(scale: str) -> str:
    return MODEL.replace(V_LINE, f"V = [[{scale}, 0.0, 0.0], [0.0, {scale}, 0.0], [0.0, 0.0, {scale}]]")


OVERFLOWS = {"alpha 1e20 float32": MODEL + DYN + "alpha = 1e20\n", "V 1e30 float32": _scaled("1e30") + DYN,
             "V 1e300 float64": _scaled("1e300") + DYN + 'dtype = "float64"\n'}


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_simulate_overflow_gives_strict_json(tmp_path, capsys, case):
    """An ensemble that overflows its dtype is a result (every member's status says so), and its JSON is strict:
    statistics without a value are null, never NaN."""
    rc = as_user(["simulate", toml(tmp_path, OVERFLOWS[case]), "--json", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0 and "Traceback" not in err and "Warning" not in err, err
    doc = strict_json(out)
    assert sum(doc["outcomes"].values()) == 3
    assert doc["mean_min_cos"] is None or -1 <= doc["mean_min_cos"] <= 1


@pytest.mark.parametrize("case", ["alpha 1e20 float32", "V 1e30 float32"])
def test_stability_overflow_reports_unknown_verdicts(tmp_path, capsys, case):
    """Non-finite Jacobians: each such equilibrium has verdict 'unknown' and no spectrum, in strict JSON and in
    the text table; never a traceback."""
    cfg = toml(tmp_path, OVERFLOWS[case])
    assert as_user(["stability", cfg, "--json"]) == 0
    out, err = capsys.readouterr()
    doc = strict_json(out)
    entries = doc["equilibria"]
    assert {e["verdict"] for e in entries} <= {"stable", "unstable", "neutral", "unknown"}
    assert doc["summary"]["unknown"] == sum(e["verdict"] == "unknown" for e in entries) >= 1
    assert all(e["spectral_radius"] is None and not e["stable"] for e in entries if e["verdict"] == "unknown")
    assert as_user(["stability", cfg]) == 0
    out, err = capsys.readouterr()
    assert "unknown" in out and "Traceback" not in err


def test_stability_zero_states_refused(tmp_path, capsys, no_compute):
    np.save(tmp_path / "z.npy", np.zeros((4, 3)))
    refused(capsys, ["stability", toml(tmp_path, MODEL + DYN + '[stability]\nstates = "z.npy"\n')],
            "[stability] states", "norm 0")


def test_energy_overflow_gives_strict_json(tmp_path, capsys):
    """[energy] beta_max = 1e30: T_eps overflows; strict JSON, the quantities without a value as null."""
    text = MODEL + DYN.replace("steps = 30", "steps = 4").replace("batch = 3", "batch = 1") + "[energy]\nbeta_max = 1e30\npoints = 3\n"
    assert as_user(["energy", toml(tmp_path, text), "--json"]) == 0
    out, err = capsys.readouterr()
    doc = strict_json(out)
    assert None in doc["clustering"]["T_eps"] and "Traceback" not in err


def test_transformer_overflow_gives_strict_json(tmp_path, capsys):
    """--steer 1e30: the steered tokens overflow float32; strict JSON on stdout and in pm.json, no warnings."""
    fixture = ROOT / "tests" / "fixtures" / "hf" / "gpt2"
    argv = ["transformer", fixture, "--steer", "1e30", "--samples", "2", "--tokens", "3", "--json", "--out", tmp_path / "o"]
    assert as_user(argv) == 0
    out, err = capsys.readouterr()
    assert strict_json(out)["steering"]["final_cos"] is None and "Traceback" not in err and "Warning" not in err
    strict_json((tmp_path / "o" / "pm.json").read_text())


def test_cli_json_writer_is_the_strict_one():
    assert common.to_json({"a": float("nan"), "b": np.float32("inf"), "c": np.arange(2)}) == '{"a": null, "b": null, "c": [0, 1]}'


@pytest.mark.parametrize("line,needle", [
    ("round_steps = 1099511627776", "[basins] round_steps must be in [1, 2147483647], got 1099511627776"),
    ("samples = 1000000000000", "[basins] samples must be in [1, 2147483647]"),
    ("pool_size = 4294967296", "[basins] pool_size must be in [1, 2147483647]"),
    ("max_steps = 2147483648", "[basins] max_steps must be in [1, 2147483647]"),
    ("local = {samples = 2147483648}", "[basins] local samples must be in [1, 2147483647]"),
])
def test_int32_counters_are_bounded_at_load(tmp_path, capsys, no_compute, line, needle):
    refused(capsys, ["basins", toml(tmp_path, MODEL + DYN + BASINS.replace("samples = 40\n", "") + line + "\n")], needle)


@pytest.mark.parametrize("mask,needle", [("window:10^20", "integer W >= 1"),
                                         ("window:100000000000000000000", "W in [1, 2147483647]"),
                                         ("window:" + "9" * 5000, "W in [1, 2147483647]"),
                                         ("window:\u00b2", "integer W >= 1"), ("window:0", "W in [1, 2147483647]")])
def test_huge_or_odd_window_mask_is_one_line(tmp_path, capsys, no_compute, mask, needle):
    e = refused(capsys, ["simulate", toml(tmp_path, MODEL + f'mask = "{mask}"\n' + DYN)], "[model] mask", needle)
    assert len(e) < 300


@pytest.mark.parametrize("value,needle", [("[" * 5000 + "1" + "]" * 5000, "nested too deeply"),
                                          ("{a = " * 3000 + "1" + "}" * 3000, "nested too deeply"),
                                          ("[" * 40 + "1" + "]" * 40, "[model] V is nested more than 16 levels")])
def test_deeply_nested_values_are_one_line(tmp_path, capsys, no_compute, value, needle):
    refused(capsys, ["simulate", toml(tmp_path, MODEL.replace(V_LINE, "V = " + value) + DYN)], "c.toml", needle)


def test_nested_dict_is_refused_by_parse_config_too():
    from attnflow.io.config import ConfigError, parse_config

    deep = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"\[model\] V is nested more than 16 levels deep"):
        parse_config({"model": {"d": 3, "V": deep}}, "x.toml")


def _npy_bytes(shape, dtype="<f8", data=b"") -> bytes:
    import io as _io

    b = _io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": dtype, "fortran_order": False, "shape": shape})
    return b.getvalue() + data


@pytest.fixture
def no_array_read(monkeypatch):
    """Reading any array's data fails: a refusal from the headers must come before."""
    def boom(*a, **k):
        raise AssertionError("an array was read before its size was checked")

    monkeypatch.setattr(np.lib.format, "read_array", boom)


def test_npz_that_inflates_is_refused_from_its_headers(tmp_path, capsys, no_compute, no_array_read, monkeypatch):
    """The zip directory's sizes (a small archive whose extra array inflates) and the .npy header's shape x dtype
    (a member that declares 8 TB) are checked before any array is read."""
    import attnflow.io.weights as W

    e = np.eye(3)[None]
    monkeypatch.setattr(W, "MAX_ARRAY_BYTES", 1 << 20)
    np.savez_compressed(tmp_path / "w.npz", Q=e, K=e, V=e, extra=np.zeros(1 << 18))  # 2 MiB unpacked, ~2 KB file
    assert (tmp_path / "w.npz").stat().st_size < 20_000
    text = MODEL.replace(V_LINE, 'weights = "w.npz"') + DYN
    refused(capsys, ["simulate", toml(tmp_path, text)], "w.npz", "2 MiB once unpacked", "limit of 1 MiB")
    monkeypatch.setattr(W, "MAX_ARRAY_BYTES", 2 << 30)
    with zipfile.ZipFile(tmp_path / "w.npz", "w") as z:
        z.writestr("Q.npy", _npy_bytes((1, 3, 3), data=bytes(72)))
        z.writestr("extra.npy", _npy_bytes((10**12,), data=bytes(16)))
    refused(capsys, ["simulate", toml(tmp_path, text)], "w.npz", "7.28 TiB once unpacked", "limit of 2 GiB")


def test_npy_header_declaring_a_huge_array_is_refused(tmp_path, capsys, no_compute, no_array_read):
    (tmp_path / "x.npy").write_bytes(_npy_bytes((10**6, 10**6, 3), data=bytes(64)))
    refused(capsys, ["simulate", toml(tmp_path, MODEL + DYN + 'init = "x.npy"\n')], "[dynamics] init", "once unpacked")
    (tmp_path / "x.npy").write_bytes(_npy_bytes((3, 4, 3), data=bytes(64)))
    refused(capsys, ["simulate", toml(tmp_path, MODEL + DYN + 'init = "x.npy"\n')], "[dynamics] init", "truncated")


def _hostile(tmp_path, kind: str, limit: int) -> str:
    """A path that must never be read: a device, a FIFO, a directory or a (sparse) file over the size limit."""
    if kind == "device":
        return "/dev/zero"
    p = tmp_path / f"hostile-{kind}"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    else:
        with open(p, "wb") as f:
            f.truncate(limit + 1)
    return str(p)


@pytest.mark.parametrize("where,kind", [("config", "device"), ("config", "fifo"), ("config", "dir"), ("config", "huge"),
                                        ("weights", "device"), ("weights", "fifo"), ("weights", "huge"),
                                        ("init", "device"), ("init", "dir"), ("states", "fifo"), ("states", "huge")])
def test_only_regular_files_of_bounded_size_are_read(tmp_path, capsys, no_compute, where, kind):
    from attnflow.io.config import MAX_CONFIG_BYTES, MAX_INPUT_BYTES

    p = _hostile(tmp_path, kind, MAX_CONFIG_BYTES if where == "config" else MAX_INPUT_BYTES)
    needle = {"device": "not a regular file", "fifo": "not a regular file", "dir": "is a directory",
              "huge": "more than the limit of"}[kind]
    if where == "config":
        refused(capsys, ["simulate", p], "config file", needle)
        return
    text = {"weights": MODEL.replace(V_LINE, f'weights = "{p}"') + DYN, "init": MODEL + DYN + f'init = "{p}"\n',
            "states": MODEL + DYN + f'[stability]\nstates = "{p}"\n'}[where]
    refused(capsys, ["stability" if where == "states" else "simulate", toml(tmp_path, text)], where, needle)


def test_empty_out_is_refused(tmp_path, capsys, no_compute, monkeypatch):
    cfg = toml(tmp_path, MODEL + DYN)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for cmd in ("simulate", "stability", "energy", "basins"):
        refused(capsys, [cmd, cfg, "--out", ""], "--out needs a directory name")
    assert not any((tmp_path / "cwd").iterdir())


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path, capsys, no_compute, monkeypatch):
    """JAX aborts the process (exit -6, after 300 s) when the coordinator never answers: the port is probed first,
    and nothing answering within --coordinator-timeout is one line and exit status 2."""
    import time

    import jax

    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("joined")))
    cfg = toml(tmp_path, MODEL + DYN + BASINS)
    t0 = time.monotonic()
    refused(capsys, ["basins", cfg, "--coordinator", f"127.0.0.1:{_closed_port()}", "--num-processes", "2",
                     "--process-id", "1", "--coordinator-timeout", "1"], "no coordinator answered within 1 s")
    assert time.monotonic() - t0 < 10
    dist = ["--num-processes", "2", "--process-id", "1"]
    refused(capsys, ["basins", cfg, "--coordinator", "127.0.0.1", *dist], "HOST:PORT")
    refused(capsys, ["basins", cfg, "--coordinator", "127.0.0.1:99999", *dist], "HOST:PORT")
    refused(capsys, ["basins", cfg, "--coordinator", "127.0.0.1:1", *dist, "--coordinator-timeout", "nan"],
            "--coordinator-timeout")


def test_identity_compares_values_not_spelling(tmp_path):
    """beta = 1 and beta = 1.0, a default written out or left out, another order: one identity (strict JSON)."""
    from attnflow.io.config import load_config

    a = load_config(toml(tmp_path, MODEL + "beta = 1\n" + DYN + BASINS, "a.toml")).identity()
    b = load_config(toml(tmp_path, MODEL + "heads = 1\nbeta = 1.0\n" + DYN + 'norm = "l2"\nseed = 0\n'
                         + BASINS + "seed = 0\ncluster_tol = 0.001\n", "b.toml")).identity()
    assert a == b and json.loads(json.dumps(a, allow_nan=False)) == a
    assert a["config"]["model"]["beta"] == 1.0 and isinstance(a["config"]["dynamics"]["steps"], int)
    c = load_config(toml(tmp_path, MODEL + "beta = 2\n" + DYN + BASINS, "c.toml")).identity()
    assert c != a


def test_resume_with_another_spelling_recomputes_nothing(tmp_path, capsys):
    """A run made with beta = 1, resumed with beta = 1.0: the same run, every chunk already done."""
    cfg = toml(tmp_path, MODEL + "beta = 1\n" + DYN.replace("steps = 30", "steps = 10") + BASINS.replace("40", "20"))
    rc, ref, err = _basins(capsys, cfg, tmp_path / "run")
    assert rc == 0, err
    strict_json(ref)
    strict_json((tmp_path / "run" / "result.json").read_text())

    def chunks():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "run").rglob("*.parquet")}

    before = chunks()
    assert before
    cfg.write_text(cfg.read_text().replace("beta = 1\n", "beta = 1.0\n"))
    rc, out, err = _basins(capsys, cfg, tmp_path / "run", "--resume")
    assert rc == 0, err
    assert chunks() == before and "recomputing" not in err
    assert strict_json(out) == strict_json(ref)


@pytest.mark.parametrize("cmd, extra", [("simulate", "[dynamics]\ntokens = 4\nsteps = 20\nbatch = 4\ntol = 1e-8\n"),
                                        ("basins", "[dynamics]\ntokens = 4\nsteps = 20\n[basins]\nsamples = 4\ntol = 1e-8\n"),
                                        ("basins", "[dynamics]\ntime = 'continuous'\nsolver = 'rk4'\nt1 = 1.0\ndt = 0.05\ntokens = 4\n[basins]\nsamples = 4\ntol = 1e-6\n"),
                                        ("basins", "[dynamics]\ntime = 'continuous'\ntokens = 4\n[basins]\nsamples = 4\ntol = 1e-7\n")])
def test_tol_below_the_dtype_floor_is_one_line(tmp_path, capsys, no_compute, cmd, extra):
    """float32 cannot resolve a per-step change below one rounding of a unit coordinate (1.2e-7; 2.4e-6 for a flow
    with dt = 0.05; for the adaptive solver, a flow study's default, |f| itself below 4.8e-7 for |W| = 1): such a tol
    would never fire, and is refused in one line that names the floor."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(MODEL + extra)
    refused(capsys, [cmd, cfg], "tol", "is below", "float32")


def test_bad_numbers_are_refused_in_one_line_not_answered():
    """Inputs that were accepted and gave a wrong-looking answer (or a raw error): beta or alpha <= 0 in an array or
    through with_params (alpha = 0 retired every member after one step), negative or NaN tolerances (a stable
    consensus reported unstable), the adaptive solver's settings, a Wilson interval with k > N, and a basin study
    with tokens = 0, cluster_tol <= 0, a sampler of another d, or d = 1."""
    import jax

    import attnflow as af
    from attnflow.analysis.basins.intervals import wilson

    V = np.diag([1.0, 0.4, -0.3])
    attn = af.SelfAttention(af.Heads.single(V, K=V))
    lm = af.LayerMap(attn, 0.1)
    key = jax.random.PRNGKey(0)
    b = af.Budget(max_steps=50)
    cases = [
        (lambda: af.SelfAttention(af.Heads.single(V), beta=np.array([-1.0])), "beta must be a finite number > 0"),
        (lambda: af.LayerMap(attn, alpha=np.array([0.0])), "alpha must be a finite number > 0"),
        (lambda: lm.with_params(alpha=0.0), "alpha must be"),
        (lambda: af.SphereFlow(attn).with_params(beta=float("nan")), "beta must be"),
        (lambda: af.analyse(lm, af.consensus(lm, 0, 4)[None], tol=-1), "tol must be a finite number >= 0"),
        (lambda: af.monotonicity_condition(attn, tol=float("nan")), "tol must be"),
        (lambda: af.Adaptive(rtol=-1.0), "rtol must be"),
        (lambda: af.Adaptive(max_steps=0), "max_steps must be"),
        (lambda: af.Adaptive(dt0=-1.0), "dt0 must be"),
        (lambda: wilson(11, 10), "0 <= k <= N"),
        (lambda: af.basin_fractions(lm, key, 10, tokens=0, budget=b), "tokens must be an integer >= 1"),
        (lambda: af.basin_fractions(lm, key, 10, tokens=4, cluster_tol=0.0, budget=b), "cluster_tol must be"),
        (lambda: af.basin_fractions(lm, key, 10, sampler=af.basins.Sphere(5, 4), budget=b), "d = 4, but the model"),
        (lambda: af.basin_fractions(af.LayerMap(af.SelfAttention(af.Heads.single(np.eye(1))), 0.1), key, 10,
                                    tokens=3, budget=b), "needs d >= 2"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError, match=needle):
            call()
    # positive arrays (sweeps) still pass
    assert af.SphereFlow(attn).with_params(beta=np.array([0.5, 2.0])).attn.beta.shape == (2,)


@pytest.mark.parametrize("cmd, text, needle", [
    ("stability", '[model]\nd = 1\nV = [[1.0]]\n[dynamics]\ntokens = 3\nsteps = 10\n', "needs d >= 2"),
    ("basins", '[model]\nd = 1\nV = [[1.0]]\n[dynamics]\ntokens = 3\nsteps = 10\n', "needs d >= 2"),
    ("geometry", '[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[geometry]\n'
     'resolution = 8\nbox = 50\n', "box = 50 is larger than the image"),
    ("metastability", '[model]\nd = 2\nV = [[1.0, 0.0], [0.0, 1.0]]\n[dynamics]\ntime = "continuous"\n'
     '[metastability]\nt1 = 0.05\ndt = 0.1\n', "shorter than one step"),
    ("energy", '[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\ntokens = 3\n'
     'steps = 10\n[energy]\nw = [1.0, 2.0]\nm = [1.0, 1.0]\n', "one per head"),
])
def test_config_inputs_that_were_answered_are_refused(tmp_path, capsys, cmd, text, needle):
    from attnflow.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert main([cmd, str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
