"""The ``attnflow`` command line. Thin: parse, call the public API, print/write.

Each subcommand is a module ``attnflow.cli.<name>`` with ``add_parser(subparsers)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ._common import UsageError

COMMANDS = ("simulate", "demo", "stability", "basins", "energy", "transformer", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The ``attnflow`` argument parser with one subcommand per entry of COMMANDS."""
    from .. import __version__

    p = argparse.ArgumentParser(
        prog="attnflow",
        description="Self-attention dynamics of transformers at scale: simulate token ensembles, find and certify "
        "equilibria, measure basins of attraction, analyse real transformer weights.",
    )
    p.add_argument("--version", action="version", version=f"attnflow {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"attnflow.cli.{name}")
        sp = mod.add_parser(sub)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv=None) -> int:
    """Run the ``attnflow`` command line; returns the exit status (2 on bad input, with one line on stderr)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from ..io.config import ConfigError

    try:
        return int(args._run(args) or 0)
    except (ConfigError, UsageError) as e:
        print(f"attnflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
