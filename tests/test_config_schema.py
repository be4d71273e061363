"""The config schema is the one source of the README's config reference and of the commands' --help; loading is
strict, has no side effects, and records input files by content."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnflow.io import config as C

ROOT = Path(__file__).resolve().parents[1]


def readme_toml() -> str:
    text = (ROOT / "README.md").read_text()
    sec = text.split("## Config files", 1)[1]
    return re.search(r"```toml\n(.*?)```", sec, re.S).group(1)


def test_readme_config_block_loads_and_names_only_schema_keys(tmp_path):
    block = readme_toml()
    (tmp_path / "c.toml").write_text(block)
    cfg = C.load_config(tmp_path / "c.toml")  # the documented example is itself a valid config
    assert cfg.d == 3 and cfg.tokens == 10
    table = None
    for line in block.splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            table = m.group(1)
            assert table in C.TABLES
        elif m := re.match(r"(\w+)\s*=", line):
            assert m.group(1) in C.keys_of(table), (table, m.group(1))
            # documented choices "a | b | c" in the comment are the schema's choices
            choices = dict((f.name, f.metadata["choices"]) for f in dataclasses.fields(C.TABLES[table]))[m.group(1)]
            comment = line.split("#", 1)[1] if "#" in line else ""
            if choices and "|" in comment:
                shown = [w.strip() for w in comment.split("|")]
                assert set(shown) == set(choices), (m.group(1), shown, choices)


def test_reference_covers_every_key_and_parses(tmp_path):
    ref = C.reference()
    for table, cls in C.TABLES.items():
        assert f"[{table}]" in ref
        for f in dataclasses.fields(cls):
            assert re.search(rf"^(# )?{f.name} =", ref, re.M), (table, f.name)
    # the uncommented reference (required keys shown with examples, V given inline) is a valid config
    text = ref.replace("# V =                   ", 'V = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]')
    (tmp_path / "r.toml").write_text(text)
    assert C.load_config(tmp_path / "r.toml").beta == 1.0


@pytest.mark.parametrize("command,table", [("simulate", "model"), ("simulate", "dynamics"), ("basins", "basins"),
                                           ("stability", "stability"), ("energy", "energy")])
def test_help_lists_the_schema_keys(command, table, capsys):
    from attnflow.cli import main

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for k in C.keys_of(table):
        assert re.search(rf"\b{k}\b", text), (command, k)


def test_loading_has_no_side_effects(tmp_path):
    """A float64 config does not switch JAX to float64 (a fresh process: conftest enables x64 in this one)."""
    (tmp_path / "c.toml").write_text('[model]\nd = 2\nV = [[1.0, 0], [0, 1.0]]\n[dynamics]\ndtype = "float64"\n')
    code = ("import sys, jax; from attnflow.io.config import load_config, ConfigError; c = load_config(sys.argv[1]); "
            "assert not jax.config.read('jax_enable_x64'); "
            "exec('try:\\n c.build()\\n print(\"built\")\\nexcept ConfigError as e:\\n print(e)')")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.toml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "jax_enable_x64" in r.stdout  # asks for the explicit step instead of building a silently-float32 model


def test_inputs_are_hashed_by_content(tmp_path):
    import hashlib

    np.savez(tmp_path / "w.npz", Q=np.eye(2)[None], K=np.eye(2)[None], V=np.eye(2)[None])
    x = np.ones((2, 3, 2)) / np.sqrt(2)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "c.toml").write_text('[model]\nd = 2\nweights = "w.npz"\n[dynamics]\ntokens = 3\nbatch = 2\ninit = "x.npy"\n')
    cfg = C.load_config(tmp_path / "c.toml")
    assert cfg.inputs["weights"]["sha256"] == hashlib.sha256((tmp_path / "w.npz").read_bytes()).hexdigest()
    assert cfg.inputs["init"]["sha256"] == hashlib.sha256((tmp_path / "x.npy").read_bytes()).hexdigest()
    np.testing.assert_array_equal(cfg.init_array, x)


def test_typed_tables_and_defaults(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nd = 2\nV = [[1.0, 0], [0, 1.0]]\n[basins]\nsamples = 7\n'
                                     'sampler = {around = "bipartite", split = 1}\ncontinuation = {param = "beta", values = [1, 2.5]}\n')
    cfg = C.load_config(tmp_path / "c.toml")
    assert cfg.basins.samples == 7 and cfg.basins.cluster_tol == 1e-3
    assert cfg.basins.sampler == C.SamplerTable(around="bipartite", split=1)
    assert cfg.basins.continuation.values == (1.0, 2.5) and isinstance(cfg.basins.continuation.values[0], float)
    assert cfg.stability == C.StabilityTable() and cfg.energy.members == 16
    assert cfg.dynamics.backend == "auto"


def test_inline_O_is_used_not_ignored(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nd = 2\nV = [[1.0, 0], [0, 1.0]]\nO = [[2.0, 0], [0, 3.0]]\n')
    cfg = C.load_config(tmp_path / "c.toml")
    np.testing.assert_array_equal(cfg.weights["O"][0], np.diag([2.0, 3.0]))


COMMAND_TABLES = {"simulate": ("model", "dynamics"), "stability": ("stability",), "basins": ("basins",), "energy": ("energy",)}
NOT_KEYS = {"table", "tables", "key", "keys"}  # "[stability] table", "[basins] keys: ..." name no key


def schema_mentions(doc: str, help_text: str) -> set[tuple[str, str]]:
    """Every (table, key) a command's texts name: ``key = ...`` lines under a ``[table]`` line of its docstring,
    ``[table] key`` phrases anywhere, and the keys of a ``[table] keys: a = 1; b (x | y); ...`` paragraph (the
    schema's own :func:`describe`, or a command's list ``a (default 1): meaning; ...``)."""
    found = set()
    table = None
    for line in doc.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"\[(\w+)\]", line):
            table = m.group(1)
        elif table and (m := re.match(r"(\w+)\s*=", line)):
            found.add((table, m.group(1)))
        elif not line.startswith("#"):
            table = None if not line else table
    text = " ".join((doc + " " + help_text).split())
    for t, k in re.findall(r"\[(\w+)\]\s+([A-Za-z_]\w*)", text):
        if k not in NOT_KEYS:
            found.add((t, k))
    for t, body in re.findall(r"\[(\w+)\] keys: (.*?)\.(?:\s|$)", text):
        for part in body.split(";"):
            if m := re.match(r"\s*([A-Za-z_]\w*)(?=\s*(?:=|\(|\{|:|$))", part):  # not "(with m; default tr(W_h)/d)"
                found.add((t, m.group(1)))
    return found


def unknown_mentions(found) -> list[tuple[str, str]]:
    """The (table, key) pairs that the schema does not have."""
    return sorted((t, k) for t, k in found if t not in C.TABLES or k not in C.keys_of(t))


def test_schema_mention_check_can_fail():
    """The check below finds misspelled keys and tables in each of the three forms (a check that cannot fail is
    no check)."""
    doc = "Optional table::\n\n    [energy]\n    tol = 1e-10\n    epsilon = 1e-3\n"
    found = schema_mentions(doc, "uses [dynamics] seeds and [basin] samples. [basins] keys: samples = 1000; chunksize; "
                                 "tol (with m; default 1).")
    assert unknown_mentions(found) == [("basin", "samples"), ("basins", "chunksize"), ("dynamics", "seeds"),
                                       ("energy", "epsilon")]
    assert ("energy", "tol") in found and ("basins", "samples") in found


@pytest.mark.parametrize("command", sorted(COMMAND_TABLES))
def test_command_texts_name_only_schema_keys(command, capsys):
    """A command's module docstring and --help name keys of its own tables, and every ``[table] key`` they name
    (docstring blocks, phrases, key lists) is a key of the schema."""
    import importlib

    from attnflow.cli import main

    doc = importlib.import_module(f"attnflow.cli.{command}").__doc__ or ""
    assert main([command, "--help"]) == 0
    found = schema_mentions(doc, capsys.readouterr().out)
    assert not unknown_mentions(found), (command, unknown_mentions(found))
    for table in COMMAND_TABLES[command]:
        named = {k for t, k in found if t == table}
        assert named, (command, table)  # at least one key of its table
        assert named == set(C.keys_of(table)), (command, table, set(C.keys_of(table)) - named)


def test_weights_file_biases_reach_heads_and_unknown_arrays_are_refused(tmp_path):
    e = np.eye(2)[None]
    np.savez(tmp_path / "w.npz", Q=e, K=e, V=e, bq=np.ones((1, 2)))
    (tmp_path / "c.toml").write_text('[model]\nd = 2\nweights = "w.npz"\n')
    cfg = C.load_config(tmp_path / "c.toml")
    np.testing.assert_array_equal(np.asarray(cfg.heads.bq), np.ones((1, 2)))
    np.savez(tmp_path / "w.npz", Q=e, K=e, V=e, bq=np.ones((1, 3)))  # a bias of the wrong shape: Heads says so
    with pytest.raises(C.ConfigError, match=r"\[model\] bq must have shape"):
        C.load_config(tmp_path / "c.toml")
    np.savez(tmp_path / "w.npz", Q=e, K=e, V=e, W=e)
    with pytest.raises(C.ConfigError, match="unexpected arrays W"):
        C.load_config(tmp_path / "c.toml")


def test_key_block_is_a_model_key():
    import tomllib

    import attnflow.io.config as c

    base = '[model]\nd = 2\nV = [[1.0, 0.0], [0.0, 1.0]]\n'
    assert c.parse_config(tomllib.loads(base)).build().attn.key_block == "auto"
    assert c.parse_config(tomllib.loads(base + 'key_block = "dense"\n')).build().attn.key_block is None
    assert c.parse_config(tomllib.loads(base + "key_block = 64\n")).build().attn.key_block == 64
    for bad, msg in (("0", r"\[1, "), ('"blocks"', "one of"), ("true", "integer or a string")):
        with pytest.raises(c.ConfigError, match=msg):
            c.parse_config(tomllib.loads(base + f"key_block = {bad}\n"))
