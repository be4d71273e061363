"""Multi-host basins through ``jax.distributed``: two local CPU processes against one process."""

import json
import socket
import subprocess
import sys

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
    return {a["label"]: (a["count"], a["fraction"]) for a in result["attractors"]}


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
    assert multi["unconverged"] == single["unconverged"]
    assert _by_label(multi) == _by_label(single)
    # each chunk was computed exactly once, by process i % 2, into the shared run directory
    chunks = sorted(p.name for p in (tmp_path / "multi" / "chunks").glob("*.parquet"))
    assert chunks == [f"{i:05d}.parquet" for i in range(5)]
    assert json.loads((tmp_path / "multi" / "manifest.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "multi" / "summary.json").read_text())["samples"] == 500


def test_tally_merge_roundtrip_equals_one_tally():
    import numpy as np

    from attnflow.analysis.basins import _Tally

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(300, 4 + 2 * 5))
    steps = rng.integers(1, 500, size=300)
    whole, parts = _Tally(), [_Tally(), _Tally(), _Tally()]
    whole.add(rows, steps)
    for k, part in enumerate(parts):
        part.add(rows[k * 100:(k + 1) * 100], steps[k * 100:(k + 1) * 100])
    merged = _Tally()
    for part in parts:
        merged.merge(_Tally.from_bytes(part.to_bytes()))
    a, ua = whole.attractors()
    b, ub = merged.attractors()
    key = lambda t: tuple(t["row"])  # noqa: E731
    strip = lambda t: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in t.items()}  # noqa: E731
    assert ua == ub and [strip(t) for t in sorted(a, key=key)] == [strip(t) for t in sorted(b, key=key)]


def test_partial_distributed_flags_are_refused(tmp_path):
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG)
    p = _cli(str(cfg), "--coordinator", "127.0.0.1:1")
    o, e = p.communicate(timeout=120)
    assert p.returncode == 2 and "go together" in e
