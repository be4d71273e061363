"""Output a reader can use without the source: help texts, the demo's printed model and tables, figures' helpers,
and no side effects when the figure modules are imported."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from attnflow.cli import COMMANDS, build_parser


def _help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


#: The config tables whose keys each command's --help lists (README "Config files").
HELP_TABLES = {"simulate": ("model", "dynamics"), "stability": ("stability",), "basins": ("basins",), "energy": ("energy",)}


def _subparser(cmd):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[cmd]


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    text, err = capsys.readouterr()
    assert e.value.code == 0 and err == ""
    assert text.startswith("usage: attnflow") and "%(" not in text
    for cmd in COMMANDS:
        assert re.search(rf"^\s+{cmd}\s+\S", text, flags=re.M), cmd  # listed with its one-line help
    assert "--version" in text


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_names_every_option_and_config_key(cmd, capsys):
    """`attnflow CMD --help` exits 0 with nothing on stderr, shows its usage line, every option the parser accepts (with
    its help), every positional argument, and, for the commands that read a config, every key of its tables."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"usage: attnflow {cmd}")
    assert "%%" not in out and "%(" not in out
    flat = " ".join(out.split())
    dense = "".join(out.split())  # argparse may wrap a help line at a hyphen
    for action in _subparser(cmd)._actions:
        if action.help == argparse.SUPPRESS:
            continue
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), f"{cmd} --help does not name {name}"
        if action.help and action.option_strings:
            first = "".join(action.help.split("%(")[0].split())[:25].replace("%%", "%")
            assert first in dense, f"{cmd} --help lacks the help of {names[0]}: {first!r}"
    from attnflow.io.config import keys_of

    for table in HELP_TABLES.get(cmd, ()):
        assert f"[{table}] keys:" in flat, f"{cmd} --help does not list the [{table}] keys"
        section = flat.split(f"[{table}] keys:", 1)[1].split("keys:", 1)[0]
        missing = [k for k in keys_of(table) if not re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", section)]
        assert not missing, f"{cmd} --help misses [{table}] keys {missing}"


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
        "not_converged": 0, "max_steps": 30000, "paths": ["consensus +v1", "bipartite v1 3:7"],
        "attractors": [{"name": "consensus +v1", "fraction": 0.7, "interval": [0.4, 0.9], "count": 7},
                       {"name": "bipartite v1 3:7", "fraction": 0.3, "interval": [0.1, 0.6], "count": 3}],
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
            "from types import SimpleNamespace\n"
            "from attnflow.plots.basins import fractions\n"
            "p = os.path.join(tempfile.mkdtemp(), 'f.png')\n"
            "fig = fractions([SimpleNamespace(name='a', kind='consensus', count=5, fraction=0.5, interval=(0.4, 0.6))], p)\n"
            "assert os.path.getsize(p) > 0 and len(fig.axes[0].patches) == 1 and 'matplotlib.pyplot' not in sys.modules\n")
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


# ------------------------------------------------------------------------------------------------ figure contents
# Every figure function returns the Figure it drew (written and closed): its axes, texts and artists are checked here.

PNG = b"\x89PNG\r\n\x1a\n"


def _written(path):
    data = path.read_bytes()
    assert data[:8] == PNG and data.rstrip()[-8:].endswith(b"IEND\xaeB`\x82"), path  # a complete PNG
    return data


def _attractor(name, kind, count, samples, interval):
    """A record with only the fields the fractions figure may rely on."""
    return SimpleNamespace(name=name, kind=kind, count=count, fraction=count / samples, interval=interval)


def test_fractions_figure_has_one_bar_per_attractor(tmp_path):
    from attnflow.plots.basins import fractions

    recs = [_attractor("consensus +v1", "consensus", 70, 200, (0.29, 0.42)),
            _attractor("consensus -v1", "consensus", 60, 200, (0.24, 0.37)),
            _attractor("bipartite v1 3:7", "bipartite", 50, 200, (0.19, 0.32)),
            _attractor("not converged", "not_converged", 20, 200, (0.066, 0.15))]
    fig = fractions(recs, tmp_path / "f.png", title="c.toml: 200 samples")
    _written(tmp_path / "f.png")
    (ax,) = fig.axes
    assert ax.get_title() == "c.toml: 200 samples" and ax.get_xlabel().startswith("basin fraction (95% interval")
    bars = ax.patches
    assert len(bars) == len(recs)
    top_down = sorted(bars, key=lambda b: -b.get_y())  # the first record is drawn on top
    np.testing.assert_allclose([b.get_width() for b in top_down], [r.fraction for r in recs])
    ticks = sorted(zip(ax.get_yticks(), (lab.get_text() for lab in ax.get_yticklabels())), key=lambda yl: -yl[0])
    assert [lab for _, lab in ticks] == [r.name for r in recs]
    np.testing.assert_allclose([y for y, _ in ticks], [b.get_y() + b.get_height() / 2 for b in top_down])  # name at its bar
    from matplotlib.container import ErrorbarContainer

    (err,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segs = sorted(err.lines[2][0].get_segments(), key=lambda s: -s[0][1])  # one interval per bar, top first
    np.testing.assert_allclose([[s[0][0], s[1][0]] for s in segs], [r.interval for r in recs])
    assert sorted(x.get_text() for x in ax.texts) == sorted(f"{r.fraction:.3f}" for r in recs)
    assert ax.get_xlim() == (0.0, 1.0)
    fig = fractions(recs, tmp_path / "g.png", top=2)
    assert len(fig.axes[0].patches) == 2 and fig.axes[0].get_title() == "basins of attraction"


def test_sphere_by_label_draws_one_panel_per_attractor(tmp_path):
    from attnflow.plots.basins import sphere_by_label

    e1 = np.array([1.0, 0, 0])
    finals = np.stack([np.tile(e1, (4, 1)), np.tile(e1, (4, 1)), np.tile(-e1, (4, 1)), np.concatenate([e1[None], np.tile(-e1, (3, 1))])])
    names = ["consensus +v1", "consensus +v1", "consensus -v1", "bipartite v1 1:3"]
    fig = sphere_by_label(finals, names, tmp_path / "s.png")
    _written(tmp_path / "s.png")
    titles = [ax.get_title() for ax in fig.axes]
    # the most frequent first, ties by name
    assert titles == ["consensus +v1\n2 of 4 samples", "bipartite v1 1:3\n1 of 4 samples", "consensus -v1\n1 of 4 samples"]
    marks = [sorted(t.get_text() for t in ax.texts if t.get_text().startswith("x")) for ax in fig.axes]
    assert marks == [["x4"], ["x1", "x3"], ["x4"]]  # one sample's tokens, with how many coincide there
    assert "final tokens by attractor" in fig._suptitle.get_text()
    fig = sphere_by_label(finals, names, tmp_path / "s2.png", panels=2)
    assert len(fig.axes) == 2 and "1 rarer attractor not drawn" in fig._suptitle.get_text()


def test_spectra_figure_titles_points_and_margins(tmp_path):
    from attnflow.plots.stability import spectra

    entries = [("consensus +v1", np.array([0.9967, 0.5 + 0.1j, 0.5 - 0.1j]), True), ("consensus +v2", np.array([1.2, 0.3]), False)]
    fig = spectra(entries, tmp_path / "sp.png", discrete=True)
    _written(tmp_path / "sp.png")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["consensus +v1: stable", "consensus +v2: not stable"]
    assert "rho = 0.9967, margin +0.0033" in panels[0].get_title() and "rho = 1.2, margin -0.2" in panels[1].get_title()
    for ax, (_, eigs, _) in zip(panels, entries):
        assert ax.get_xlabel() == "Re" and ax.get_ylabel() == "Im"
        pts = ax.collections[0].get_offsets()
        np.testing.assert_allclose(np.asarray(pts), np.stack([eigs.real, eigs.imag], 1))
    assert "unit circle" in fig._suptitle.get_text()
    fig = spectra([("c", np.array([-0.01 + 1j, -0.01 - 1j, -2.0]), True)], tmp_path / "spf.png", discrete=False)
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_title() == "c: stable\nmax Re = -0.01, margin +0.01" and "Re = 0" in fig._suptitle.get_text()
    assert len(ax.collections[0].get_offsets()) == 3


def _spiral(ts, n=3):
    """(s, 1, n, 3) unit tokens moving on circles of latitude."""
    return np.stack([np.stack([np.cos(t / 50 * np.arange(1, n + 1)), np.sin(t / 50 * np.arange(1, n + 1)), np.ones(n)], -1) / np.sqrt(2)
                     for t in ts])[:, None]


def test_trajectory_figures_draw_one_curve_per_token_and_pair(tmp_path):
    from attnflow.plots.trajectories import pairwise_cosines, sphere_trajectories

    ts = np.arange(0, 2001, 20.0)
    traj = np.concatenate([_spiral(ts), _spiral(ts)[:, :, ::-1]], axis=1)  # (s, 2 members, 3 tokens, 3)
    fig = sphere_trajectories(traj, tmp_path / "p.png", titles=["consensus +v1", "other"], title="paths")
    _written(tmp_path / "p.png")
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["consensus +v1\n(o start, * end)", "other\n(o start, * end)"]
    assert fig._suptitle.get_text() == "paths"
    for b, ax in enumerate(fig.axes):
        assert len(ax.lines) == 3  # one path per token, drawn along great circles
        for i, line in enumerate(ax.lines):
            P = np.stack(line.get_data_3d(), 1)
            np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-12)
            np.testing.assert_allclose(P[-1], traj[-1, b, i], atol=1e-12)
        ends = np.stack(ax.collections[-1]._offsets3d, 1)  # the end markers: the final tokens
        np.testing.assert_allclose(ends, traj[-1, b], atol=1e-12)
        assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == ("x1", "x2", "x3")
    fig = sphere_trajectories(traj, tmp_path / "p1.png", select=[1])
    assert [ax.get_title() for ax in fig.axes] == ["member 1\n(o start, * end)"]
    fig = pairwise_cosines(traj, ts, tmp_path / "c.png")
    _written(tmp_path / "c.png")
    (ax,) = fig.axes
    assert ax.get_title() == "pairwise cosines, member 0 (3 pairs)"
    assert ax.get_xlabel() == "layer step k" and ax.get_ylabel() == "cos(x_i, x_j)" and ax.get_ylim() == (-1.05, 1.05)
    assert len(ax.lines) == 3
    X = traj[:, 0]
    want = {(i, j): np.sum(X[:, i] * X[:, j], -1) for i in range(3) for j in range(i + 1, 3)}
    for line, (i, j) in zip(ax.lines, sorted(want)):
        np.testing.assert_allclose(line.get_ydata(), want[(i, j)], atol=1e-12)
    fig = pairwise_cosines(traj[:, :, :4] * 1.0, ts / 7.0, tmp_path / "c2.png", member=1, title="flow")
    assert fig.axes[0].get_xlabel() == "time t" and fig.axes[0].get_title() == "flow"


def test_continuation_figures(tmp_path):
    from attnflow.plots import basins as pb, stability as ps

    from attnflow.analysis.basins import Continuation

    cont = Continuation("beta", (0.5, 1.0, 1.5), {"consensus +v1": [0.6, 0.5, 0.4], "bipartite v1 3:7": [0.4, 0.5, 0.6]}, ())
    fig = pb.continuation(cont, tmp_path / "bc.png")
    _written(tmp_path / "bc.png")
    (ax,) = fig.axes
    assert ax.get_title() == "basin fractions vs beta" and ax.get_xlabel() == "beta" and ax.get_ylabel() == "basin fraction"
    assert len(ax.collections) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == list(cont.fractions)
    branch = SimpleNamespace(values=np.linspace(0.2, 1.6, 8), measure=np.linspace(0.9, 1.3, 8), verdict=np.array([0] * 4 + [1] * 4),
                             discrete=True, changes=[1.0], param="alpha")
    fig = ps.continuation(branch, tmp_path / "sc.png", label="consensus +v1")
    _written(tmp_path / "sc.png")
    (ax,) = fig.axes
    assert ax.get_title() == "consensus +v1" and ax.get_xlabel() == "alpha" and ax.get_ylabel() == "spectral radius"
    assert [len(c.get_offsets()) for c in ax.collections] == [4, 4]  # stable and not stable points
    assert [t.get_text() for t in ax.texts] == ["alpha = 1"]  # one marked change
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["stable", "not stable"]


def _trace(s=30, b=2, H=2, n=4):
    ts = np.arange(s, dtype=float)
    E = 1 + 0.1 * np.tanh(ts / 5)[:, None] * np.ones(b)
    return SimpleNamespace(ts=ts, energy=E, entropy=np.log(n) * (1 - np.exp(-ts / 5))[:, None] * np.ones(b),
                           head_entropy=np.zeros((s, b, H, n)), first_violation=np.array([7, -1]), monotone=np.array([False, True]),
                           relative_drop=np.array([1e-3, 0.0]), head_energy=np.stack([E / 2, E / 2], -1),
                           head_monotone=np.array([[True, False], [True, True]]), head_rate=np.ones((s, b, H)),
                           terms_flat=np.ones((s, b, H, H)), terms_radial=np.zeros((s, b, H, H)))


def test_energy_figures(tmp_path):
    from attnflow.plots import energy as pe

    tr = _trace()
    fig = pe.energy_entropy(tr, tmp_path / "e.png", title="c.toml")
    _written(tmp_path / "e.png")
    a1, a2 = fig.axes
    assert a1.get_title().startswith("energy, member 0: NOT monotone (drop 1.00e-03)") and a1.get_ylabel() == "energy E"
    assert [t.get_text() for t in a1.get_legend().get_texts()] == ["E = sum_h E_h", "first decrease (t = 7)"]
    assert a2.get_title() == "attention entropy" and a2.get_ylabel() == "entropy (nats)" and len(a2.lines) == 2
    assert fig._suptitle.get_text() == "c.toml"
    fig = pe.head_contributions(tr, tmp_path / "h.png")
    _written(tmp_path / "h.png")
    a1, a2 = fig.axes
    assert [t.get_text() for t in a1.get_legend().get_texts()] == ["E_0", "E_1 (decreases)"]
    assert len(a2.lines) == 2 * 3 + 1  # own, cross-head, radial shadow per head, and the zero line
    assert a2.get_ylabel() == "contribution to dE_h/dt"
    betas = np.linspace(0.1, 3, 20)
    fig = pe.clustering_time(betas, np.exp(betas), 1.2, tmp_path / "t.png", eps=1e-3, rho0=0.1, n=8, speed_ratio=1 / (1 + betas))
    _written(tmp_path / "t.png")
    ax, ax2 = fig.axes
    assert ax.get_title() == "equiangular start rho0 = 0.1, n = 8" and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "inverse temperature beta" and ax.get_ylabel() == "clustering time T_eps (eps = 0.001)"
    assert "beta_c = 1.2" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_transformer_figures(tmp_path):
    from attnflow.plots import spectral as psp

    L = 4
    r = np.linspace(0.1, 0.4, L)
    m = SimpleNamespace(c=r, c_std=r / 10, c_bar=r / 2, delta=r / 5, delta_std=r / 50, delta_bar=r / 10, p=0.5 + r, p_bar=0.5 + r / 4,
                        eigenvalues=np.array([[2.0 + 1j, 2.0 - 1j, 1.0]] * L), c_cum=r, c_cum_bar=r / 3)
    res = SimpleNamespace(metrics=m, model="bert", samples=8, tokens=16, order="real")
    fig = psp.alignment(res, tmp_path / "a.png")
    _written(tmp_path / "a.png")
    assert [ax.get_ylabel() for ax in fig.axes] == ["correlation c", "increment Delta", "probability"]
    assert fig.axes[2].get_xlabel() == "layer l" and "bert: alignment with v1(l), 8 x 16 tokens" in fig._suptitle.get_text()
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), r)
    fig = psp.eigenvalues(res, tmp_path / "ev.png")
    assert [len(ax.lines) for ax in fig.axes] == [3, 3] and [ax.get_ylabel() for ax in fig.axes] == ["real part", "modulus"]
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), np.sqrt(5.0))
    fig = psp.cumulative(res, tmp_path / "cu.png")
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_title() == "bert: cumulative products"
    fig = psp.steering_curve([(0.0, 0.2), (0.5, 0.6), (2.0, 0.995)], tmp_path / "st.png")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "gain gamma" and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "mean final |cos(x, u)|", "gamma = 0: 0.200", "target 0.99"]
    for f in ("ev.png", "cu.png", "st.png"):
        _written(tmp_path / f)


def test_figure_writes_are_atomic_and_go_through_one_helper(tmp_path, monkeypatch):
    """A figure is rendered into a unique temporary file next to its target and moved into place: an interrupted
    write leaves the previous file (or none) and no temporary file. Every figure module writes through
    attnflow.plots.save / write_atomic (the only place that calls savefig)."""
    import matplotlib.figure

    import attnflow.plots as plots
    from attnflow.plots.basins import fractions

    recs = [_attractor("consensus +v1", "consensus", 1, 2, (0.1, 0.9))]
    target = tmp_path / "f.png"
    fractions(recs, target)
    good = _written(target)

    def interrupted(self, f, **kw):
        f.write(PNG + b"half a picture")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fractions(recs + recs, target)
    with pytest.raises(KeyboardInterrupt):
        fractions(recs, tmp_path / "new.png")
    assert target.read_bytes() == good and sorted(os.listdir(tmp_path)) == ["f.png"]
    monkeypatch.undo()
    src = {f.name: f.read_text() for f in Path(plots.__file__).parent.glob("*.py")}
    assert [name for name, text in src.items() if "savefig(" in text] == ["__init__.py"]
    assert all("save(fig, path)" in text for name, text in src.items() if name != "__init__.py")


def test_readme_ten_lines_build_the_demo_single_head():
    """The README's "Ten lines" and `attnflow demo` print basin fractions of one and the same model."""
    from attnflow.cli.demo import models

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("## Ten lines", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    lines = code.strip().splitlines()
    assert len([ln for ln in lines if ln.strip()]) == 10
    upto = next(i for i, ln in enumerate(lines) if ln.startswith("model ="))
    ns = {}
    exec("\n".join(lines[: upto + 1]), ns)
    mine, demo = ns["model"], models(0)[0]["single head"]
    for k in ("Q", "K", "V", "O"):
        np.testing.assert_array_equal(np.asarray(getattr(mine.attn.heads, k)), np.asarray(getattr(demo.attn.heads, k)), err_msg=k)
    assert float(mine.alpha) == float(demo.alpha) and float(mine.attn.beta) == float(demo.attn.beta)
    assert (mine.attn.attention, type(mine.norm)) == (demo.attn.attention, type(demo.norm))
    assert "single head of `attnflow demo`" in lines[upto - 1]


def test_time_left_is_measured_from_the_first_block(monkeypatch, capsys):
    """The one-line estimate of a run without a progress bar takes its rate from the first finished block on: the
    start (compiling) does not count (it said "6.76 minutes to go" for a run of 20 s)."""
    import time

    from attnflow.cli.basins import _estimate

    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    report = _estimate()
    clock[0] = 90.0  # 90 s to compile, then the first block of 1000 samples
    report(1000, 100_000)
    clock[0] = 95.0
    report(1500, 100_000)  # not yet 10 s of measured work
    assert capsys.readouterr().err == ""
    clock[0] = 101.0
    report(2100, 100_000)  # 1100 samples in 11 s: 100 samples/s, 97 900 left: 979 s
    err = capsys.readouterr().err.strip()
    assert err.endswith("100 samples/s; about 16.3 minutes to go"), err
    clock[0] = 200.0
    report(5000, 100_000)  # said once
    assert capsys.readouterr().err == ""


# ---- output directories: bad input writes nothing; a run that starts afresh leaves no earlier result beside its own

_BAD = ('[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\nalpha = 0.1\n'
        'tokens = 6\nsteps = 200\n[basins]\nsamples = -5\n')


@pytest.mark.parametrize("command", ["basins", "simulate", "energy", "stability", "metastability", "geometry"])
def test_bad_input_writes_nothing_into_out(tmp_path, capsys, command):
    from attnflow.cli import main

    cfg = tmp_path / "bad.toml"
    cfg.write_text(_BAD.replace("samples = -5", "samples = -5\n[geometry]\nresolution = 1") if command == "geometry"
                   else _BAD if command == "basins" else _BAD.replace("[basins]\nsamples = -5\n", "[dynamics2]\n"))
    out = tmp_path / "new" / "out"
    assert main(["--no-compile-cache", command, str(cfg), "--out", str(out)]) == 2
    assert not (tmp_path / "new").exists()  # the directories it made are gone (they held the marker, the lock)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["--no-compile-cache", command, str(cfg), "--out", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no marker claims it for the command
    capsys.readouterr()


def test_directories_of_metastability_and_geometry_are_known_by_their_files(tmp_path):
    from attnflow.io.results import RunDirError, claim_dir, clear_outputs

    for command, name in (("metastability", "metastability.json"), ("metastability", "episodes_n8.npz"),
                          ("geometry", "geometry.json"), ("geometry", "map_partial.npz")):
        d = tmp_path / f"{command}-{name}"
        d.mkdir()
        (d / name).write_text("x")  # no marker: written before markers existed, or the marker lost
        with pytest.raises(RunDirError, match=command):
            claim_dir(d, "basins")
    d = tmp_path / "afresh"
    d.mkdir()
    for name in ("metastability.json", "first_plateau.csv", "episodes_n8.npz", "phase_n_beta.json", "dwell_n8.png",
                 "settings.json", "notes.txt"):
        (d / name).write_text("x")
    clear_outputs(d, "metastability", keep={"settings.json"})
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt", "settings.json"]


def test_an_interrupted_geometry_run_with_other_settings_leaves_no_earlier_result(tmp_path, monkeypatch, capsys):
    from attnflow.cli import geometry, main

    cfg = tmp_path / "g.toml"
    cfg.write_text('[model]\nd = 3\nV = [[1.0, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, -0.3]]\n[dynamics]\n'
                   'time = "discrete"\nalpha = 0.5\ntokens = 3\nsteps = 200\n[geometry]\nresolution = 4\nbox = 2\n'
                   'rows_per_block = 2\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / ".attnflow").write_text('{"command": "geometry"}\n')
    for name in ("geometry.json", "basin_map.npz", "basin_map.png"):  # a finished run of other settings
        (out / name).write_text("an earlier run's")

    def stop(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(geometry, "_save_partial", stop)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(["--no-compile-cache", "geometry", str(cfg), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    capsys.readouterr()
