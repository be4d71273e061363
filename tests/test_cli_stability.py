"""attnflow stability: JSON shape, figures, exit code 2 on bad input."""

import json

import pytest

from attnflow.cli import main


def test_cli_stability_json_and_errors(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.2, 0], [0, 0, -3.0]]\n[dynamics]\nalpha = 0.1\ntokens = 3\ndtype = "float64"\n'
                   '[stability]\ncontinuation = {param = "alpha", start = 0.2, stop = 1.6, num = 4}\n')
    assert main(["stability", str(cfg), "--json", "--out", str(tmp_path / "o")]) == 0
    out = json.loads(capsys.readouterr().out)
    eqs = out["equilibria"]
    assert {"kind", "eigenvector", "sign", "split", "stable", "spectral_radius", "eigenvalues"} <= set(eqs[0])
    assert [e["stable"] for e in eqs if e["kind"] == "consensus"] == [True, True, False, False, False, False]
    assert len(eqs[0]["eigenvalues"]) == 3 * 2 and len(eqs[0]["eigenvalues"][0]) == 2
    assert out["continuation"]["changes"][0] == pytest.approx(1.0, abs=1e-7)
    assert (tmp_path / "o" / "spectra.png").exists() and (tmp_path / "o" / "continuation.png").exists()
    bad = tmp_path / "b.toml"
    bad.write_text(cfg.read_text() + "bogus = 1\n")
    assert main(["stability", str(bad)]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_cli_stability_default_json_is_exact(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.5, 0], [0, 0, -0.3]]\n[dynamics]\ntime = "continuous"\ntokens = 3\ndtype = "float64"\n')
    assert main(["stability", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"equilibria"}
    eqs = out["equilibria"]
    assert len(eqs) == 3 * (2 + 2)  # per eigenvector: 2 consensus + (n-1) bipartite splits
    for e in eqs:
        assert set(e) == {"kind", "eigenvector", "sign", "split", "stable", "max_real", "eigenvalues"}
    c = [e for e in eqs if e["kind"] == "consensus"]
    assert [e["stable"] for e in c] == [True, True, False, False, False, False]
    assert c[0]["max_real"] == pytest.approx(-0.5, abs=1e-10)  # lambda_2 - lambda_1
    assert main(["stability", str(tmp_path / "missing.toml")]) == 2
