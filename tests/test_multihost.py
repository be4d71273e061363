"""Multi-host basins through ``jax.distributed``: two local CPU processes against one process."""

import json
import socket
import subprocess
import sys

import pytest

CONFIG = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
K = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
alpha = 0.1
tokens = 6
steps = 1000
[basins]
samples = 500
chunk_size = 100
seed = 3
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "attnflow", "basins", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _by_label(result):
    return {a["name"]: (a["count"], a["fraction"]) for a in result["attractors"]}


@pytest.mark.slow  # three subprocesses: run by the second CI step (pytest -m slow)
def test_two_processes_equal_one(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG)
    port = _free_port()
    procs = [_cli(str(cfg), "--out", str(tmp_path / "multi"), "--json", "--coordinator", f"127.0.0.1:{port}",
                  "--num-processes", "2", "--process-id", str(i), "--no-progress") for i in range(2)]
    outs = [p.communicate(timeout=280) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    assert outs[1][0].strip() == ""  # only process 0 reports
    multi = json.loads(outs[0][0])
    one = _cli(str(cfg), "--out", str(tmp_path / "single"), "--json")
    o, e = one.communicate(timeout=280)
    assert one.returncode == 0, e[-2000:]
    single = json.loads(o)
    assert multi["samples"] == single["samples"] == 500
    assert multi["not_converged"] == single["not_converged"]
    assert _by_label(multi) == _by_label(single)
    # each chunk was computed exactly once, by process i % 2, into the shared run directory
    chunks = sorted(p.name for p in (tmp_path / "multi" / "chunks").glob("*.parquet"))
    assert chunks == [f"{i:05d}.parquet" for i in range(5)]
    assert json.loads((tmp_path / "multi" / "manifest.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "multi" / "result.json").read_text())["samples"] == 500
    assert not (tmp_path / "multi" / "summary.json").exists()  # one result file


def test_tally_merge_roundtrip_equals_one_tally():
    import numpy as np

    from attnflow.analysis.basins import Tally, summarize

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(300, 5 + 2 * 5))  # outcome 0-2, then the label fields
    steps = rng.integers(1, 500, size=300)
    whole, parts = Tally(5), [Tally(5), Tally(5), Tally(5)]
    whole.add(rows, steps)
    for k, part in enumerate(parts):
        part.add(rows[k * 100:(k + 1) * 100], steps[k * 100:(k + 1) * 100])
    merged = Tally(5)
    for part in parts:
        merged.merge(Tally.from_bytes(part.to_bytes()))
    a, b = summarize(whole, {}), summarize(merged, {})
    assert a.to_json() == b.to_json() and a.unclassified == b.unclassified > 0 and len(a.attractors) > 1


def test_partial_distributed_flags_are_refused(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG)
    p = _cli(str(cfg), "--coordinator", "127.0.0.1:1")
    o, e = p.communicate(timeout=120)
    assert p.returncode == 2 and "go together" in e
