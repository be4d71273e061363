"""Every notebook executes at smoke size (ATTNFLOW_SMOKE=1), and the committed .ipynb matches its source."""

import sys
from pathlib import Path

import nbformat
import pytest

NB = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NB))
import build  # noqa: E402

SOURCES = sorted((NB / "src").glob("*.py"))


@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_committed_notebook_matches_source(src):
    committed = NB / (src.stem + ".ipynb")
    assert committed.exists(), f"run: python notebooks/build.py {src.stem[:2]}"
    got = [(c.cell_type, c.source) for c in nbformat.read(committed, 4).cells]
    assert got == build.parse(src.read_text()), f"{committed.name} is stale: run python notebooks/build.py {src.stem[:2]}"
    outputs = [o for c in nbformat.read(committed, 4).cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.output_type == "error" for o in outputs)


LONG = ("02_multistability", "03_power_method", "05_multihead_energy", "06_scaling", "07_metastability",
        "08_basin_geometry")
"""The notebooks whose smoke run takes 12-60 s on 2 cores (basin studies along a parameter, checkpoint weights,
subprocess runs, metastability and basin-map sweeps): the second CI step (pytest -m slow) executes them; the default
run keeps the quick ones, and checks every committed notebook against its source."""


@pytest.mark.parametrize("src", [pytest.param(s, marks=pytest.mark.slow) if s.stem in LONG else s for s in SOURCES],
                         ids=[s.stem for s in SOURCES])
def test_notebook_executes_at_smoke_size(src, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNFLOW_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    build.execute(build.to_notebook(src), NB, timeout=600)
