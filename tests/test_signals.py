"""Ctrl-C (SIGINT) and SIGTERM stop every command at any moment, the first XLA compile included: one line on stderr,
exit status 130 or 143 within seconds, no traceback, no crash; finished chunks are kept and --resume gives the
uninterrupted result (attnflow.cli._interrupt)."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from attnflow.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXIT_WITHIN_S = 5.0  # after the signal; measured: < 0.2 s at every moment

BASINS = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
K = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
alpha = 0.1
tokens = 6
steps = 2000
[basins]
samples = 3000
chunk_size = 100
"""

SIMULATE = """
[model]
d = 3
V = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, -0.3]]
[dynamics]
alpha = 0.1
tokens = 6
steps = 20000
batch = 4000
saves = 10
"""


@pytest.fixture(scope="module")
def basins_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("signals") / "b.toml"
    p.write_text(BASINS)
    return p


@pytest.fixture(scope="module")
def reference(basins_cfg, tmp_path_factory):
    """The uninterrupted run's --json output (in this process: the resumes below reuse its compiled programs)."""
    return _json_run(["basins", str(basins_cfg), "--out", str(tmp_path_factory.mktemp("full")), "--json", "--no-progress"])


def _json_run(argv) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return json.loads(buf.getvalue())


def _chunks(run: Path) -> list[str]:
    return sorted(n for n in os.listdir(run / "chunks") if n.endswith(".parquet")) if (run / "chunks").is_dir() else []


def _interrupt(argv, sig, *, after=None, until=None, limit=180.0):
    """Start ``python -m attnflow ARGV``, send `sig` `after` seconds later or once `until()` holds; returns
    (returncode, stdout, stderr, seconds from the signal to the exit, process id)."""
    # --no-compile-cache: the signal must meet a command that compiles, as a first run does
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", "--no-compile-cache", *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        if until is None:
            time.sleep(after)
        else:
            while not until() and proc.poll() is None and time.monotonic() - t0 < limit:
                time.sleep(0.02)
        assert proc.poll() is None, f"the command ended before the signal: {proc.returncode}"
        ts = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        te = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{argv[0]} {sig.name} at {ts - t0:.2f} s: exit {proc.returncode} {te - ts:.3f} s later; {err.strip()!r}")
    return proc.returncode, out, err, te - ts, proc.pid


def _one_line(command, sig, rc, out, err, took) -> str:
    assert rc == 128 + sig, (rc, err[-2000:])
    assert took < EXIT_WITHIN_S, took
    lines = [s for s in err.splitlines() if s.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith(f"attnflow {command}: interrupted ({sig.name})"), lines
    assert out == ""
    return lines[0]


def _check_run_dir(run: Path, line: str, pid: int) -> None:
    """No result; a temporary file left behind (a chunk finished in the last microseconds before the exit) is named
    with the process id, so that a resume can tell it is stale."""
    assert all(f".{pid}." in p.name for p in run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    if "--resume" in line:  # (a manifest written in the last microseconds may be left unmentioned)
        assert line.endswith(f"; finished chunks are kept in {run}, continue with --resume"), line
        assert (run / "manifest.json").exists()
    assert not (run / "result.json").exists()


def _resumed_equals(basins_cfg, run, reference) -> None:
    assert _json_run(["basins", str(basins_cfg), "--out", str(run), "--resume", "--json", "--no-progress"]) == reference


# ------------------------------------------------------------------------------------------ the default run
def test_basins_sigint_while_starting_then_resume(basins_cfg, reference, tmp_path):
    """1 s after the start (Python imports JAX, or the first compile): exit 130, one line; --resume completes it."""
    run = tmp_path / "r"
    rc, out, err, took, pid = _interrupt(["basins", str(basins_cfg), "--out", str(run), "--no-progress"], signal.SIGINT, after=1.0)
    line = _one_line("basins", signal.SIGINT, rc, out, err, took)
    _check_run_dir(run, line, pid)
    _resumed_equals(basins_cfg, run, reference)


def test_basins_sigint_during_first_compile_then_resume(basins_cfg, reference, tmp_path):
    """Once the run directory is opened and before any chunk is done: the first XLA compile (the moment that crashed)."""
    run = tmp_path / "r"
    rc, out, err, took, pid = _interrupt(["basins", str(basins_cfg), "--out", str(run), "--no-progress"], signal.SIGINT,
                                       until=lambda: (run / "manifest.json").exists())
    line = _one_line("basins", signal.SIGINT, rc, out, err, took)
    _check_run_dir(run, line, pid)
    assert "continue with --resume" in line
    _resumed_equals(basins_cfg, run, reference)


def test_basins_sigterm_mid_run_keeps_chunks_then_resume(basins_cfg, reference, tmp_path):
    run = tmp_path / "r"
    rc, out, err, took, pid = _interrupt(["basins", str(basins_cfg), "--out", str(run), "--no-progress"], signal.SIGTERM,
                                       until=lambda: len(_chunks(run)) >= 3)
    line = _one_line("basins", signal.SIGTERM, rc, out, err, took)
    _check_run_dir(run, line, pid)
    assert 3 <= len(_chunks(run)) < 30
    _resumed_equals(basins_cfg, run, reference)


def test_a_refused_run_exits_with_its_line_not_an_abort(basins_cfg, reference, tmp_path):
    """A refusal raised while the pool program still compiles in the study's other thread (a rerun without
    --resume): exit 2 and one line. The interpreter aborted under that thread at its exit before (exit 134,
    "FATAL: exception not rethrown"), every time with an empty compilation cache."""
    run = tmp_path / "run"
    _json_run(["basins", str(basins_cfg), "--out", str(run), "--json", "--no-progress"])
    proc = subprocess.run([sys.executable, "-m", "attnflow", "--no-compile-cache", "basins", str(basins_cfg), "--out",
                           str(run), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [s for s in proc.stderr.splitlines() if s.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "already holds a run" in lines[0], proc.stderr[-2000:]


def test_simulate_sigint_while_compiling(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(SIMULATE)
    rc, out, err, took, pid = _interrupt(["simulate", str(cfg), "--json", "--out", str(tmp_path / "o")], signal.SIGINT, after=2.5)
    _one_line("simulate", signal.SIGINT, rc, out, err, took)
    o = tmp_path / "o"
    assert not (o / "trajectories.npz").exists() and not [p for p in o.glob(".*") if p.suffix == ".tmp" or "probe" in p.name]


def _standalone(tmp_path, body: str) -> Path:
    """A script that runs `body` under attnflow.cli._interrupt (standard library only: loaded from its file, so the
    script starts in a few milliseconds)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("_interrupt", {str(ROOT / "attnflow" / "cli" / "_interrupt.py")!r})
        _interrupt = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_interrupt)
    """) + textwrap.dedent(body))
    return script


def test_output_is_written_whole_or_not_at_all(tmp_path):
    """A signal while the main thread writes the command's output (here 4 MB into a pipe nobody reads yet) waits until
    that write is done: a JSON document is never cut in the middle."""
    script = _standalone(tmp_path, """
        def work():
            sys.stdout.write("[" + "1," * 2_000_000 + "1]\\n")
            sys.stdout.flush()
            import time; time.sleep(60)
        sys.exit(_interrupt.call(work, command="test"))
    """)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(1)  # the write has begun, and blocks on the full pipe
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.decode() == "attnflow test: interrupted (SIGINT)\n"
    assert json.loads(first + rest) == [1] * 2_000_001


def test_child_processes_are_stopped(tmp_path):
    """A command's child process (attnflow bench runs its suite in one) does not outlive it."""
    script = _standalone(tmp_path, """
        import subprocess
        def work():
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            print(p.pid, flush=True)
            p.wait()
        sys.exit(_interrupt.call(work, command="bench"))
    """)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and err == "attnflow bench: interrupted (SIGTERM)\n"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child process outlived the command")


# ----------------------------------------------------------------------------------------- in this process
def test_in_process_main_leaves_handlers_and_stdout_as_they_were(capsys, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stdout = sys.stdout
    assert main(["basins", str(tmp_path / "missing.toml")]) == 2
    assert {s: signal.getsignal(s) for s in before} == before and sys.stdout is stdout
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnflow basins: error:")


def test_errors_in_the_command_are_raised_in_the_caller(monkeypatch, tmp_path):
    """One-line errors stay one line (exit 2); anything else is raised where main() was called, with its traceback;
    a SystemExit too."""
    from attnflow.cli import simulate

    cfg = tmp_path / "c.toml"
    cfg.write_text(SIMULATE)

    def boom(args):
        print("partial", flush=True)
        raise RuntimeError("boom in the worker")

    monkeypatch.setattr(simulate, "run", boom)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(RuntimeError, match="boom in the worker") as ei:
        main(["simulate", str(cfg)])
    assert buf.getvalue() == "partial\n"
    assert any(f.name == "boom" for f in ei.traceback)
    monkeypatch.setattr(simulate, "run", lambda args: sys.exit(3))
    with pytest.raises(SystemExit) as ei:
        main(["simulate", str(cfg)])
    assert ei.value.code == 3


def test_main_from_another_thread_runs_there(capsys, tmp_path):
    """Outside the main thread (no signal handlers there) main() runs the command in the calling thread."""
    box = {}

    def call():
        box["rc"] = main(["basins", str(tmp_path / "missing.toml")])

    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert box["rc"] == 2 and "error" in capsys.readouterr().err


def test_only_the_command_process_installs_handlers_at_import():
    import attnflow
    from attnflow.cli import _interrupt

    assert not _interrupt.is_cli_process() and not _interrupt._state.cli_process  # pytest is not the command
    assert not hasattr(attnflow, "_guard_startup")


# ------------------------------------------------------------------------------------- more moments (slow)
@pytest.mark.slow  # subprocesses at several more moments: run by the second CI step (pytest -m slow)
@pytest.mark.parametrize("sig, moment", [
    (signal.SIGINT, 0.3), (signal.SIGTERM, 0.3), (signal.SIGTERM, 1.0), (signal.SIGINT, 2.0), (signal.SIGTERM, 3.0),
    (signal.SIGTERM, "compile"), (signal.SIGINT, 3), (signal.SIGINT, 10), (signal.SIGTERM, 20),
])
def test_basins_more_moments_then_resume(basins_cfg, reference, tmp_path, sig, moment):
    """`moment`: seconds after the start (a float), "compile" (run directory opened, no chunk yet), or a number of
    finished chunks (an int)."""
    run = tmp_path / "r"
    argv = ["basins", str(basins_cfg), "--out", str(run), "--no-progress"]
    if isinstance(moment, float):
        res = _interrupt(argv, sig, after=moment)
    elif moment == "compile":
        res = _interrupt(argv, sig, until=lambda: (run / "manifest.json").exists())
    else:
        res = _interrupt(argv, sig, until=lambda: len(_chunks(run)) >= moment)
    rc, out, err, took, pid = res
    line = _one_line("basins", sig, rc, out, err, took)
    _check_run_dir(run, line, pid)
    _resumed_equals(basins_cfg, run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig, after", [(signal.SIGTERM, 0.5), (signal.SIGTERM, 1.5), (signal.SIGINT, 4.0)])
def test_simulate_more_moments(tmp_path, sig, after):
    cfg = tmp_path / "s.toml"
    cfg.write_text(SIMULATE)
    rc, out, err, took, pid = _interrupt(["simulate", str(cfg), "--json"], sig, after=after)
    _one_line("simulate", sig, rc, out, err, took)


@pytest.mark.slow
def test_the_attnflow_script_handles_signals_too(basins_cfg, reference, tmp_path):
    """The script entry point (`attnflow`, not `python -m attnflow`) handles a signal the same way."""
    exe = Path(sys.executable).with_name("attnflow")
    if not exe.exists():
        pytest.skip("no attnflow script next to this interpreter")
    run = tmp_path / "r"
    proc = subprocess.Popen([str(exe), "--no-compile-cache", "basins", str(basins_cfg), "--out", str(run), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    ts = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    line = _one_line("basins", signal.SIGINT, proc.returncode, out, err, time.monotonic() - ts)
    _check_run_dir(run, line, proc.pid)
    _resumed_equals(basins_cfg, run, reference)


def _children_of(out_dir: Path) -> list[int]:
    """The child processes of the running command whose --out is `out_dir` (found by its command line)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if str(out_dir).encode() not in f.read() or int(p) == os.getpid():
                    continue
            kids = []
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids += [int(c) for c in f.read().split()]
            return kids
        except OSError:
            continue
    return []


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie: ended, not yet reaped
    except OSError:
        return True


@pytest.mark.slow
def test_basins_in_worker_processes_stops_them_then_resume(basins_cfg, reference, tmp_path):
    """A study in worker processes (``[basins] workers = 2``): Ctrl-C ends the command and its workers (SIGTERM takes
    the same path, :func:`attnflow.cli._interrupt._die`), finished chunks are kept, and the resumed result (in
    workers again) equals the one-process reference."""
    from attnflow.evolve import workers as W

    sig = signal.SIGINT
    cfg = tmp_path / "w.toml"
    cfg.write_text(BASINS + "workers = 2\n")
    run = tmp_path / "r"
    kids: list[int] = []

    def until():
        kids[:] = _children_of(run) or kids
        return len(_chunks(run)) >= 3

    rc, out, err, took, pid = _interrupt(["basins", str(cfg), "--out", str(run), "--no-progress"], sig, until=until)
    line = _one_line("basins", sig, rc, out, err, took)
    _check_run_dir(run, line, pid)
    assert len(kids) == 2, kids
    t0 = time.monotonic()
    while not all(_gone(k) for k in kids) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert all(_gone(k) for k in kids), "a worker process outlived the command"
    try:
        _resumed_equals(cfg, run, reference)
    finally:
        W.drop_all()
