"""``attnflow bench``: the benchmark suite of ``benchmarks/`` (run from a source checkout)."""

from __future__ import annotations

import argparse
import os
import sys

from ._common import UsageError


def add_parser(sub) -> argparse.ArgumentParser:
    """Register this subcommand on the ``attnflow`` parser."""
    p = sub.add_parser("bench", help="benchmark attnflow against NumPy, PyTorch and plain JAX peers",
                       description="Run every workload (toy, toy_mh, albert, continuous) against every peer "
                       "available; print token-steps/s and ratios; write JSON and a plot to benchmarks/results/.")
    p.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on a 2-core CPU)")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (smoke test)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {workload, impl, B, steps, token_steps_per_s}")
    p.add_argument("--workloads", default=None, help="comma-separated subset: toy,toy_mh,albert,continuous")
    p.add_argument("--impls", default=None, help="comma-separated subset of implementations")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; '' writes nothing)")
    p.add_argument("--no-plot", action="store_true")
    return p


def _suite():
    try:
        from benchmarks import run as suite
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
            raise UsageError("the benchmark suite lives in the source checkout's benchmarks/ folder, not found")
        sys.path.insert(0, root)
        from benchmarks import run as suite
    return suite


def run(args) -> int:
    """Run this subcommand; returns the exit status."""
    suite = _suite()
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(suite.__file__)), "results")
    try:
        return suite.run_cli(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
