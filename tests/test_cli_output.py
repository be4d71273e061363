"""Output a reader can use without the source: help texts, the demo's printed model and tables, figures' helpers,
and no side effects when the figure modules are imported."""

import subprocess
import sys

import numpy as np
import pytest

from attnflow.cli import COMMANDS, build_parser


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_help_texts_render(cmd, capsys):
    text = _help(["--help"] if cmd is None else [cmd, "--help"], capsys)
    assert "%%" not in text and "%(" not in text, text
    assert len(text.splitlines()) > 3


def test_basins_help_shows_percent_signs(capsys):
    text = " ".join(_help(["basins", "--help"], capsys).split())
    assert "95% interval" in text and "i % P" in text


def test_demo_prints_its_model_with_the_readme_v():
    from attnflow.cli.demo import model_lines, model_record, models

    mods, V = models(0)
    np.testing.assert_array_equal(V, np.diag([1.0, 0.4, -0.3]))
    text = "\n".join(model_lines(mods, 10))
    for needle in ("V = diag(1, 0.4, -0.3)", "alpha = 0.1", "beta = 1", "n = 10", "d = 3", "Q = I", "K = diag(1, 0.4, -0.3)"):
        assert needle in text, needle
    # the five heads' printed matrices are the model's, and their layer matrix is V
    r = model_record(mods["five heads"])
    assert r["heads"] == 5
    np.testing.assert_allclose(np.array(r["W"]), V, atol=1e-5)
    assert f"[{' '.join(f'{x:+.2f}' for x in r['Q'][2][1])}]" in text


def test_demo_report_tables_have_headers_and_names():
    from attnflow.cli.demo import report_lines

    summary = {"samples": 10, "steps": 3000, "models": {"single head": {
        "unconverged": 0, "paths": ["consensus +v1", "bipartite v1 3:7"],
        "attractors": [{"name": "consensus +v1", "fraction": 0.7, "ci95": [0.4, 0.9], "count": 7},
                       {"name": "bipartite v1 3:7", "fraction": 0.3, "ci95": [0.1, 0.6], "count": 3}],
        "equilibria": [{"name": "consensus +v1", "verdict": "stable", "spectral_radius": 0.95},
                       {"name": "bipartite v1 1:9", "verdict": "unstable", "spectral_radius": 1.03}],
        "local_radius": {"bipartite v1 5:5": 0.3, "consensus +v1": 2.0}}}}
    lines = report_lines(summary)
    head = [i for i, ln in enumerate(lines) if "attractor" in ln and "fraction" in ln and "count" in ln]
    assert head and "consensus +v1" in lines[head[0] + 1]
    vhead = [i for i, ln in enumerate(lines) if "verdict" in ln and "spectral radius" in ln]
    assert vhead and lines[vhead[0] + 1].split()[-2] == "stable" and "unstable" in lines[vhead[0] + 2]
    assert any(">= 2" in ln for ln in lines)


def test_demo_picks_a_non_consensus_member_when_there_is_one():
    from attnflow.cli.demo import _pick_members

    names = ["consensus +v1"] * 5 + ["consensus -v1"] * 4 + ["bipartite v1 4:6"]
    pick = _pick_members(names, 4)
    assert len(pick) == 4 and len(set(pick)) == 4
    assert [names[i] for i in pick[:3]] == ["consensus +v1", "bipartite v1 4:6", "consensus -v1"]
    names = ["bipartite v1 5:5", "consensus -v1", "bipartite v1 3:7", "consensus -v1", "bipartite v1 3:7", "consensus +v1"]
    assert [names[i] for i in _pick_members(names, 3)] == ["consensus -v1", "bipartite v1 3:7", "bipartite v1 5:5"]
    assert _pick_members(["consensus +v1"] * 3, 4) == [0, 1, 2]


def test_plots_import_without_side_effects():
    code = ("import sys, matplotlib\n"
            "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
            "import attnflow.plots, attnflow.plots.basins, attnflow.plots.energy, attnflow.plots.spectral, "
            "attnflow.plots.stability, attnflow.plots.trajectories\n"
            "assert dict.__getitem__(matplotlib.rcParams, 'backend') is before, 'backend changed'\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
            "import tempfile, os, numpy as np\n"
            "from attnflow.plots.basins import fractions\n"
            "p = fractions([{'label': 'a', 'fraction': 0.5, 'ci95': [0.4, 0.6]}], os.path.join(tempfile.mkdtemp(), 'f.png'))\n"
            "assert p.stat().st_size > 0 and 'matplotlib.pyplot' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]


def test_settle_time_and_crop_against_a_known_curve():
    from attnflow.plots import crop_time, settle_time, subplots

    ts = np.arange(0, 2001, 10.0)
    y = 1 - np.exp(-ts / 10.0)  # within 2e-3 of its end once exp(-t/10) <= 2e-3, i.e. t >= 62.1
    assert settle_time(ts, y[:, None]) == 70.0
    assert settle_time(ts, np.ones((len(ts), 2))) == 0.0
    assert settle_time(ts, ts[:, None]) == 2000.0  # still moving at the end
    fig, ax = subplots()
    ax.plot(ts, y)
    assert crop_time(ax, ts, y[:, None])
    assert ax.get_xlim() == (0.0, 105.0)
    fig, ax = subplots()
    assert not crop_time(ax, ts, ts[:, None])


def test_paths_are_drawn_on_the_sphere():
    from attnflow.plots.trajectories import geodesic

    a, b = np.array([1.0, 0, 0]), np.array([0, 0, 2.0])
    P = geodesic(np.stack([a, b, b]), per_segment=10)
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(P[0], a)
    np.testing.assert_allclose(P[-1], b / 2)
    # equal angular steps along the quarter circle from e1 to e3
    ang = np.arccos(np.clip(np.sum(P[1:11] * P[:10], axis=1), -1, 1))
    np.testing.assert_allclose(ang, np.pi / 20, atol=1e-12)


def test_spectra_margin_is_measured_from_the_leading_eigenvalue():
    from attnflow.plots.stability import _margin

    meas, margin, lam = _margin(np.array([0.5, 0.9967, -0.2 + 0.1j]), True)
    assert meas == pytest.approx(0.9967) and margin == pytest.approx(0.0033) and lam == 0.9967
    meas, margin, lam = _margin(np.array([-0.5 + 2j, -0.01 - 1j]), False)
    assert meas == pytest.approx(-0.01) and margin == pytest.approx(0.01) and lam == -0.01 - 1j


def test_figures_render(tmp_path):
    """Every figure this package draws for the CLI writes a PNG from small synthetic inputs (no pyplot needed)."""
    from attnflow.plots.basins import sphere_by_label
    from attnflow.plots.stability import spectra
    from attnflow.plots.trajectories import pairwise_cosines, sphere_trajectories

    e1 = np.array([1.0, 0, 0])
    finals = np.stack([np.tile(e1, (4, 1)), np.tile(-e1, (4, 1)), np.concatenate([np.tile(e1, (1, 1)), np.tile(-e1, (3, 1))])])
    paths = [sphere_by_label(finals, ["consensus +v1", "consensus -v1", "bipartite v1 1:3"], tmp_path / "s.png"),
             spectra([("a", np.array([0.9967, 0.5 + 0.1j]), True), ("b", np.array([1.2, 0.3]), False)], tmp_path / "sp.png", discrete=True),
             spectra([("c", np.array([-0.01 + 1j, -2.0]), True)], tmp_path / "spf.png", discrete=False)]
    ts = np.arange(0, 2001, 20.0)
    traj = np.stack([np.stack([np.cos(t / 50 * np.arange(1, 4)), np.sin(t / 50 * np.arange(1, 4)), np.ones(3)], -1) for t in ts])[:, None]
    paths += [pairwise_cosines(traj, ts, tmp_path / "c.png"), sphere_trajectories(traj, tmp_path / "p.png", titles=["x"])]
    for p in paths:
        assert p.stat().st_size > 5000, p
