"""attnflow stability: JSON shape, names and verdicts, the text check, figures, exit code 2 on bad input."""

import json

import numpy as np
import pytest

from attnflow.cli import main

DISC = ('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.2, 0], [0, 0, -3.0]]\n[dynamics]\nalpha = 0.1\ntokens = 3\ndtype = "float64"\n'
        '[stability]\ncontinuation = {param = "alpha", start = 0.2, stop = 1.6, num = 4}\n')
KEYS = {"name", "kind", "eigenvector", "sign", "split", "verdict", "stable", "neutral", "unstable_directions", "residual", "eigenvalues"}


def test_cli_stability_json_and_errors(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text(DISC)
    assert main(["stability", str(cfg), "--json", "--out", str(tmp_path / "o")]) == 0
    out = json.loads(capsys.readouterr().out)
    eqs = out["equilibria"]
    assert KEYS | {"spectral_radius"} == set(eqs[0])
    assert [e["stable"] for e in eqs if e["kind"] == "consensus"] == [True, True, False, False, False, False]
    assert [e["name"] for e in eqs if e["kind"] == "consensus"] == [f"consensus {s}v{k}" for k in (1, 2, 3) for s in "+-"]
    assert {e["verdict"] for e in eqs} <= {"stable", "unstable", "neutral"}
    assert len(eqs[0]["eigenvalues"]) == 3 * 2 and len(eqs[0]["eigenvalues"][0]) == 2
    assert out["summary"]["stable"] == sum(e["stable"] for e in eqs) and out["summary"]["total"] == len(eqs)
    # the step-size threshold of docs/model.md section 5: |1 + alpha lambda_3| = 1 + alpha lambda_1 at alpha = 2 / (3 - 1)
    c = out["continuation"]
    assert c["changes"][0] == pytest.approx(1.0, abs=1e-7) and c["equilibrium"] == "consensus +v1"
    assert c["transitions"] == [{"at": c["changes"][0], "from": "stable", "to": "unstable", "direction": "increasing"}]
    assert (tmp_path / "o" / "spectra.png").exists() and (tmp_path / "o" / "continuation.png").exists()
    bad = tmp_path / "b.toml"
    bad.write_text(cfg.read_text() + "bogus = 1\n")
    assert main(["stability", str(bad)]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_cli_stability_text_reads_as_a_check(tmp_path, capsys):
    """Header, the meaning of rho, one row per equilibrium with its verdict by name, the summary line, and the
    continuation line naming the equilibrium and the direction."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(DISC.replace("start = 0.2, stop = 1.6", "start = 1.6, stop = 0.2"))
    assert main(["stability", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attnflow stability: 12 candidate equilibria")
    assert any(line.startswith("rho = spectral radius") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("equilibrium"))
    assert lines[header].split() == ["equilibrium", "verdict", "rho", "neutral", "residual"]
    rows = lines[header + 1 : header + 13]
    assert rows[0].split()[:3] == ["consensus", "+v1", "stable"] and rows[2].split()[:4] == ["bipartite", "v1", "1:2", "stable"]
    assert "split" not in "\n".join(lines) and "v0" not in "\n".join(lines)
    assert "4 of 12 equilibria stable (0 neutral, 8 unstable)" in lines
    cont = [line for line in lines if line.startswith("continuation:")]
    assert len(cont) == 1 and "consensus +v1: unstable -> stable at alpha = 1 as alpha decreases" in cont[0]


def test_cli_stability_default_json_is_exact(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0, 0], [0, 0.5, 0], [0, 0, -0.3]]\n[dynamics]\ntime = "continuous"\ntokens = 3\ndtype = "float64"\n')
    assert main(["stability", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"equilibria", "summary"}
    assert out["summary"]["measure"] == "max Re" and "max Re < 0" in out["summary"]["meaning"]
    eqs = out["equilibria"]
    assert len(eqs) == 3 * (2 + 2)  # per eigenvector: 2 consensus + (n-1) bipartite splits
    for e in eqs:
        assert set(e) == KEYS | {"max_real"}
        assert e["residual"] < 1e-12 and e["neutral"] >= 0
    c = [e for e in eqs if e["kind"] == "consensus"]
    assert [e["stable"] for e in c] == [True, True, False, False, False, False]
    assert c[0]["max_real"] == pytest.approx(-0.5, abs=1e-10)  # lambda_2 - lambda_1
    # the verdict follows from the measure and the counts (flows: max Re < 0 and no neutral direction)
    for e in eqs:
        lam = np.array(e["eigenvalues"])
        assert e["max_real"] == pytest.approx(lam[:, 0].max(), abs=1e-12)
        assert e["unstable_directions"] == int(np.sum(lam[:, 0] > 1e-8))
        assert (e["verdict"] == "stable") == (lam[:, 0].max() < -1e-8)
    assert main(["stability", str(tmp_path / "missing.toml")]) == 2
