"""``attnflow metastability`` and ``attnflow geometry`` identify a run by its input files' content, not their path:
a weights file replaced in place is never resumed from (docs/model.md section 11; RunConfig.identity)."""

import json
import types

import numpy as np

from attnflow.cli import main
from attnflow.cli._common import load_run_config


def _weights(path, q):
    np.savez(path, Q=q * np.eye(2)[None], K=np.eye(2)[None], V=np.eye(2)[None])


def _config(tmp_path, extra=""):
    cfg = tmp_path / "m.toml"
    cfg.write_text('[model]\nd = 2\nweights = "w.npz"\n[dynamics]\ntime = "continuous"\ndtype = "float64"\n'
                   "tokens = 3\nt1 = 1.0\ndt = 0.1\n"
                   "[metastability]\ntokens = [6]\nbetas = [3.0]\nmembers = 3\nt1 = 8.0\nphase = false\ntrace = 0\n"
                   "[geometry]\nresolution = 4\nbox = 2\n" + extra)
    return cfg


def test_settings_follow_the_weights_content_not_their_path(tmp_path):
    from attnflow.cli import geometry, metastability

    _weights(tmp_path / "w.npz", 1.0)
    cfg = _config(tmp_path)
    before = [m._settings(load_run_config(cfg)) for m in (metastability, geometry)]
    _weights(tmp_path / "w.npz", 2.0)  # same path, other content
    after = [m._settings(load_run_config(cfg)) for m in (metastability, geometry)]
    assert all(a != b for a, b in zip(before, after))
    assert metastability._stamp(before[0]) != metastability._stamp(after[0])
    other = tmp_path / "moved"  # the same content at another path is the same run
    other.mkdir()
    _weights(other / "w.npz", 2.0)
    moved = [m._settings(load_run_config(_config(other))) for m in (metastability, geometry)]
    assert moved == after
    # geometry: a partial map saved under the old weights is not loaded under the new ones
    out = tmp_path / "g"
    out.mkdir()
    geometry._save_partial(out, np.zeros((4, 4), int), 2, types.SimpleNamespace(attractors=[]), before[1])
    assert geometry._load_partial(out, before[1], (4, 4)) is not None
    assert geometry._load_partial(out, after[1], (4, 4)) is None


def test_cli_metastability_does_not_resume_from_replaced_weights(tmp_path, capsys):
    _weights(tmp_path / "w.npz", 1.0)
    cfg, out = _config(tmp_path), tmp_path / "out"

    def run(*a):
        assert main(["metastability", str(cfg), "--json", *a]) == 0
        o, e = capsys.readouterr()
        return json.loads(o)["cells"], e

    run("--out", str(out))
    _weights(tmp_path / "w.npz", 2.0)  # replaced in place: the saved episodes are another run's
    resumed, err = run("--out", str(out))
    assert "resuming" not in err and "starting afresh" in err, err
    fresh, _ = run()
    assert resumed == fresh
    again, err = run("--out", str(out))  # unchanged weights: resumed, same answer
    assert "resuming" in err and again == fresh


import pytest  # noqa: E402


@pytest.mark.parametrize("meta, match", [("t1 = 1e15\n", "at most 2^31 - 1"),
                                         ("t1 = 1.0\n", "min_duration = 2 is longer than t1 = 1")])
def test_cli_metastability_refuses_a_span_it_cannot_run_in_one_line(tmp_path, capsys, meta, match):
    """t1 / dt past int32 (was a 66-line OverflowError, exit 1, files left) and min_duration > t1 (every member
    'no_plateau', exit 0): one line, exit 2, nothing written."""
    _weights(tmp_path / "w.npz", 1.0)
    cfg = tmp_path / "m.toml"
    cfg.write_text('[model]\nd = 2\nweights = "w.npz"\n[dynamics]\ntime = "continuous"\ndtype = "float64"\n'
                   "tokens = 3\nt1 = 1.0\ndt = 0.1\n"
                   "[metastability]\ntokens = [6]\nbetas = [3.0]\nmembers = 3\nphase = false\ntrace = 0\n" + meta)
    out = tmp_path / "out"
    assert main(["metastability", str(cfg), "--out", str(out)]) == 2
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert len(err) == 1 and match in err[0], err
    assert not out.exists()
