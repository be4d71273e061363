"""`attnflow transformer`: JSON against the library, figures, one-line errors (exit 2)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from attnflow.analysis import transformer as T
from attnflow.cli import main
from attnflow.io.hf import load_hf

FIX = pathlib.Path(__file__).parent / "fixtures" / "hf"


def test_json_matches_library(capsys):
    rc = main(["transformer", str(FIX / "bert"), "--tokens", "5", "--samples", "3", "--seed", "4", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] and len(doc["layers"]) == 2
    key, _ = jax.random.split(jax.random.key(4))
    lib = T.power_method_experiment(load_hf(FIX / "bert"), key=key, tokens=5, samples=3).to_json()
    for a, b in zip(doc["layers"], lib["layers"]):
        for k in ("layer", "lambda1", "gap", "c", "c_bar", "delta", "delta_bar", "p", "p_bar"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_out_figures_and_steer(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["transformer", str(FIX / "albert"), "--tokens", "4", "--samples", "2", "--extra-layers", "2",
               "--steer", "auto", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "steering: gamma" in text
    for f in ("alignment.png", "alignment_steered.png", "eigenvalues.png", "cumulative.png", "steering.png", "pm.json", "pm.npz"):
        assert (out / f).stat().st_size > 0, f
    doc = json.loads((out / "pm.json").read_text())
    assert len(doc["layers"]) == 4 and doc["steering"]["final_cos"] > 0.99


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["nonexistent_dir"], "no such checkpoint folder"),
        ([str(FIX / "bert"), "--extra-layers", "2"], "shared-weight"),
        ([str(FIX / "bert"), "--tokens", "0"], "--tokens"),
        ([str(FIX / "bert"), "--steer", "abc"], "--steer"),
    ],
)
def test_errors(argv, msg, capsys):
    rc = main(["transformer", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
