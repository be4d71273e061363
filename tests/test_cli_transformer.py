"""`attnflow transformer`: JSON against the library, figures, one-line errors (exit 2)."""

import json
import pathlib
import shutil
import subprocess
import sys

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
        # BERT's 16 position embeddings place at most 16 tokens; RoBERTa's 18 too (its positions start at pad + 1 = 2)
        ([str(FIX / "bert"), "--embedding", "--tokens", "17"], "at most 16"),
        ([str(FIX / "roberta"), "--embedding", "--tokens", "17"], "at most 16"),
    ],
)
def test_errors(argv, msg, capsys):
    rc = main(["transformer", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "change, msg",
    [
        ({"num_attention_heads": 0}, "'num_attention_heads' must be >= 1, got 0"),
        ({"hidden_size": "eight"}, "'hidden_size' must be an integer, got 'eight'"),
        ({"num_hidden_layers": -1}, "'num_hidden_layers' must be in [1, 10000], got -1"),
        ({"layer_norm_eps": [1e-12]}, "'layer_norm_eps' must be a finite number"),
        ({"hidden_size": None}, "'hidden_size' must be an integer, got None"),
        ("drop hidden_size", "missing key 'hidden_size'"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_config_json(tmp_path, change, msg, capsys):
    """A broken config.json: exit 2, exactly one line on stderr naming the file, no traceback."""
    d = tmp_path / "m"
    shutil.copytree(FIX / "bert", d)
    cfg = json.loads((d / "config.json").read_text())
    if change == "drop hidden_size":
        del cfg["hidden_size"]
    if isinstance(change, dict):
        cfg.update(change)
    (d / "config.json").write_text("{'hidden_size': 8" if change == "not json" else json.dumps(cfg))
    rc = main(["transformer", str(d)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in cap.err and not cap.out, cap.err
    assert msg in lines[0] and "config.json" in lines[0], lines[0]


def test_refused_weights_only_bin_subprocess():
    """A pytorch_model.bin that torch's weights-only loader refuses (fixture: tests/fixtures/hf/refused), in a real
    process: exit 2, one short line of ours on stderr; none of torch's message, ANSI escapes or unpickling advice."""
    p = subprocess.run([sys.executable, "-m", "attnflow", "transformer", str(FIX / "refused")],
                       capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "pytorch_model.bin" in lines[0] and len(lines[0]) < 300
    assert "\x1b" not in p.stderr and "weights_only=False" not in p.stderr and "trust" not in p.stderr


COLUMN_NAMES = ("Re l1", "Im l1", "gap", "c", "c_bar", "Delta", "D_bar", "p", "p_bar")


def _defined(text):
    """Column names that a legend line defines: the name at the start of an indented line, then its meaning."""
    out = set()
    for line in text.splitlines():
        if line.startswith("  ") and "  " in line.strip():
            name, meaning = line.strip().split("  ", 1)
            if meaning.strip():
                out.update(n.strip() for n in name.split(","))
    return out


def test_help_defines_every_column(capsys):
    assert main(["transformer", "--help"]) == 0
    text = capsys.readouterr().out
    assert set(COLUMN_NAMES) <= _defined(text), _defined(text)
    assert "%%" not in text and "[PM] (Li and Altafini" in " ".join(text.split())


def test_table_has_legend_and_header(capsys):
    rc = main(["transformer", str(FIX / "gpt2"), "--tokens", "3", "--samples", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["layer"])
    assert set(COLUMN_NAMES) <= _defined("\n".join(lines[:head]))  # the legend comes first
    assert [w for w in lines[head].replace("Re l1", "Re_l1").replace("Im l1", "Im_l1").split()] == \
        ["layer", "Re_l1", "Im_l1", "gap", "c", "c_bar", "Delta", "D_bar", "p", "p_bar"]
    rows = lines[head + 1 : head + 3]
    assert [r.split()[0] for r in rows] == ["1", "2"] and all(len(r.split()) == 10 for r in rows)


@pytest.mark.parametrize("argv, msg", [
    (["--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in"),
    (["--tie", "nan"], "--tie must be a finite number >= 0"),
    (["--samples", str(10**9), "--tokens", "1000"], "reduce --samples or --tokens"),
])
def test_more_input_errors(argv, msg, capsys):
    rc = main(["transformer", str(FIX / "bert"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_unsupported_ffn_activation(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(FIX / "bert", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_act"] = "prelu"
    (d / "config.json").write_text(json.dumps(cfg))
    rc = main(["transformer", str(d), "--ffn", "--tokens", "3", "--samples", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "unsupported FFN activation 'prelu'" in err and len(err.strip().splitlines()) == 1, err
