"""The benchmark suite at a tiny size: JSON shape, peers checked against attnflow, CLI. No timing assertions.

``attnflow bench`` runs ``python -m benchmarks.run`` from the source checkout in a subprocess; the whole suite (every
peer, torch.compile included) is marked slow and runs in the second CI step."""

import json

import numpy as np
import pytest

from attnflow.cli import main
from attnflow.cli._common import UsageError
from attnflow.cli.bench import source_root
from benchmarks import peers
from benchmarks import run as suite

KEYS = {"workload", "impl", "B", "steps", "token_steps_per_s"}


def test_cli_forwards_its_options_to_the_suite(tmp_path):
    from attnflow.cli import build_parser
    from attnflow.cli.bench import command

    args = build_parser().parse_args(["bench", "--tiny", "--json", "--workloads", "toy", "--impls", "numpy_batched",
                                      "--out", "rel", "--no-plot"])
    cmd = command(args)
    assert cmd[1:3] == ["-m", "benchmarks.run"]
    assert cmd[3:] == ["--tiny", "--json", "--no-plot", "--workloads", "toy", "--impls", "numpy_batched", "--out",
                       __import__("os").path.abspath("rel")]
    assert "--out" not in command(build_parser().parse_args(["bench"]))  # the suite's default: benchmarks/results


def test_bench_outside_a_source_checkout_is_one_line(tmp_path):
    fake = tmp_path / "site-packages" / "attnflow" / "cli" / "bench.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    with pytest.raises(UsageError) as e:
        source_root(fake)
    assert "source checkout" in str(e.value) and "\n" not in str(e.value)
    assert (source_root() / "benchmarks" / "run.py").is_file()


@pytest.mark.slow  # the suite with every peer (torch.compile included): run by the second CI step
def test_suite_json_shape(capsys, tmp_path):
    rc = main(["bench", "--tiny", "--json", "--workloads", "toy", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    recs = json.loads(capsys.readouterr().out)
    assert isinstance(recs, list) and recs
    for r in recs:
        assert set(r) == KEYS
        assert r["token_steps_per_s"] > 0 and np.isfinite(r["token_steps_per_s"])
        assert isinstance(r["B"], int) and isinstance(r["steps"], int)
    impls = {r["impl"] for r in recs}
    assert {"attnflow", "numpy_loop", "numpy_batched", "jax_plain"} <= impls
    if peers.torch_available():
        assert {"torch", "torch_compile"} <= impls
    assert {r["workload"] for r in recs} == {"toy"}
    saved = json.loads((tmp_path / "suite_cpu_tiny.json").read_text())
    for k in ("machine", "device", "jax", "numpy", "date", "matmul_flops_per_s"):
        assert k in saved["info"]


def test_unknown_workload_is_usage_error(capsys):
    assert main(["bench", "--tiny", "--workloads", "nope", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert "unknown workload" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("H,dh,d", [(1, 3, 3), (2, 3, 3), (2, 2, 5)])
def test_peers_agree_with_plain_loop_float64(H, dh, d):
    """The batched NumPy, plain JAX and attnflow maps against the per-ensemble loop, in float64."""
    w = suite.make_weights(H, dh, d, seed=3, beta=1.5, alpha=0.7)
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    x = suite.initial(3, 5, d, seed=2).astype(np.float64)
    ref = peers.numpy_loop(w)(x, 7)
    np.testing.assert_allclose(peers.numpy_batched(w)(x, 7), ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(peers.jax_plain(w)(x, 7)), ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(suite.attnflow_impl(w, "map", None)(x, 7)), ref, atol=1e-12)


def test_flop_count_toy():
    # one head, d = dh = 3, n = 10: 4 projections 72, attention 2*10*3+30+2*10*3 = 150, residual+norm 17
    assert suite.flops_per_token_step(1, 3, 3, 10) == 72 + 150 + 17


def test_fused_sass_step_loop_finds_the_innermost_largest_loop():
    """benchmarks/fused_sass.py reads the step loop out of a SASS listing (the compile itself needs triton)."""
    from benchmarks.fused_sass import predict, step_loop

    def line(addr, ins):
        return f"        /*{addr:04x}*/                   {ins} ;   /* 0x000000000000794d */"

    body = [line(0x00, "MOV R1, c[0x0][0x28]")]
    body += [line(0x10 + 16 * i, "FFMA R2, R3, R4, R2") for i in range(5)]  # outer loop 0x10..0x100
    body += [line(0x60 + 16 * i, ins) for i, ins in enumerate(["FADD R5, R5, R6", "MUFU.EX2 R7, R8", "@!P1 FFMA.FTZ R2, R2, R3, R4"])]
    body += [line(0x90, "@P0 BRA 0x60")]  # inner loop: 0x60..0x90, 4 instructions
    body += [line(0xa0, "@P1 BRA 0x10")]
    body += [line(0xb0, "EXIT")]
    body.sort(key=lambda s: int(s.split("/*")[1].split("*/")[0], 16))
    loop = step_loop("\n".join(body))
    assert loop["instructions"] == 4
    assert loop["by_opcode"] == {"FADD": 1, "MUFU": 1, "FFMA": 1, "BRA": 1}
    p = predict(2437, 120, 10)["H100 SXM5"]
    assert abs(p["issue_bound_token_steps_per_s"] - 132 * 1.98e9 * 128 / 2437 * 10) < 1e3
