"""``attnflow bench``: runs the benchmark suite of a source checkout (``python -m benchmarks.run``) in a subprocess.

The suite is not part of the installed package: it lives in ``benchmarks/`` next to the ``attnflow`` package folder
of a source checkout (``git clone`` + ``pip install -e .``). This command finds it there and runs it with the same
interpreter; it never edits ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path

from ._common import UsageError

_ERROR = "python -m benchmarks.run: error: "


def add_parser(sub) -> argparse.ArgumentParser:
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser("bench", help="benchmark attnflow against NumPy, PyTorch and plain JAX peers (source checkout)",
                       description="Run every workload (toy, toy_mh, albert, continuous) against every peer "
                       "available; print token-steps/s and ratios; write JSON and a plot to benchmarks/results/. "
                       "Runs `python -m benchmarks.run` from the source checkout this attnflow was installed from "
                       "(pip install -e .); the suite is not part of an installed wheel.")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on a 2-core CPU)")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (smoke test)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {workload, impl, B, steps, token_steps_per_s}")
    p.add_argument("--workloads", default=None, help="comma-separated subset: toy,toy_mh,albert,continuous")
    p.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; '' writes nothing)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON but no plot")
    return p


def source_root(package_file: str | Path = __file__) -> Path:
    """The source checkout that holds ``benchmarks/run.py`` next to the ``attnflow`` package.

    **Arguments:** `package_file` this module's file (``attnflow/cli/bench.py``) in the installation to look at.

    **Returns:** its root folder. **Raises:** :class:`UsageError` (one line) when attnflow is not installed from a
    source checkout.
    """
    root = Path(package_file).resolve().parent.parent.parent
    if not (root / "benchmarks" / "run.py").is_file() or not (root / "benchmarks" / "__init__.py").is_file():
        raise UsageError(f"the benchmark suite is not installed with the package: it needs a source checkout "
                         f"(git clone, then pip install -e .), and {root / 'benchmarks' / 'run.py'} does not exist")
    return root


def command(args) -> list[str]:
    """The ``python -m benchmarks.run ...`` command line for the parsed arguments."""
    cmd = [sys.executable, "-m", "benchmarks.run"]
    cmd += [f"--{k}" for k in ("quick", "tiny", "json") if getattr(args, k)]
    if args.no_plot:
        cmd.append("--no-plot")
    for k in ("workloads", "impls"):
        if getattr(args, k):
            cmd += [f"--{k}", getattr(args, k)]
    if args.out is not None:
        cmd += ["--out", os.path.abspath(args.out) if args.out else ""]
    return cmd


def run(args) -> int:
    """Run this subcommand; returns the exit status (that of the suite)."""
    root = source_root()
    proc = subprocess.Popen(command(args), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    errors: list[str] = []

    def pump_err():
        for line in proc.stderr:
            if line.startswith(_ERROR):
                errors.append(line[len(_ERROR):].strip())
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    t = threading.Thread(target=pump_err, daemon=True)
    t.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    t.join()
    if errors:
        raise UsageError(errors[-1])
    return rc
