"""The layout shows the architecture: imports flow one way, model -> evolve -> analysis -> (plots, io) -> cli, and the
library has no hidden switches (no environment variables outside the CLI, no side effects at import)."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "attnflow"
RANK = {"_types": 0, "model": 1, "evolve": 2, "analysis": 3, "plots": 4, "io": 4, "cli": 5}
"""A module may import modules of its own rank or lower; plots and io are siblings that do not import each other."""


def _layer(parts):
    return parts[0] if parts and parts[0] in RANK else None


def _imports(path: Path):
    rel = path.relative_to(PKG).with_suffix("").parts
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
            elif node.module and node.module.startswith("attnflow"):
                names = [node.module.split(".")[1:]]
            else:
                continue
            for t in names:
                yield node.lineno, t
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("attnflow."):
                yield node.lineno, arg.value.split(".")[1:]  # a dynamic import is still a dependency
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("attnflow."):
                    yield node.lineno, a.name.split(".")[1:]


def test_imports_flow_one_way():
    bad = []
    for path in PKG.rglob("*.py"):
        src = _layer(path.relative_to(PKG).parts)
        if src is None:
            continue
        for line, target in _imports(path):
            dst = _layer(target)
            if dst is None or dst == src:
                continue
            if RANK[dst] > RANK[src] or (RANK[dst] == RANK[src]):
                bad.append(f"{path.relative_to(PKG)}:{line} imports attnflow.{'.'.join(target)} ({src} -> {dst})")
    assert not bad, "\n".join(bad)


PASSED_ON = {"evolve/workers.py": {'        env = dict(os.environ, PJRT_NPROC="1", JAX_PLATFORMS="cpu")'},
             "_cache.py": {'    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_", "PJRT_", "TF_CPP")))'},
             "_device.py": {"            before = os.environ.get(\"PJRT_NPROC\")",
                            '            os.environ["PJRT_NPROC"] = "1"  # read by XLA\'s CPU client when it is made',
                            "                os.environ.pop(\"PJRT_NPROC\") if before is None else os.environ.update(PJRT_NPROC=before)"}}
"""The uses of the environment outside the CLI: a study's worker process gets this process's environment as it
is, plus the two variables XLA reads when it starts (a one-thread pool, the CPU); a one-thread CPU client of this
process is made with the first of them set, and the environment put back as it was; and the disk cache's key holds
the variables JAX and XLA read, so that an entry is never used under other settings. Nothing else is read from it."""


def test_the_library_reads_no_environment_variables():
    """Paths and behaviour never depend on hidden state: only the CLI reads the environment."""
    hits = [
        f"{p.relative_to(PKG)}:{i}"
        for p in PKG.rglob("*.py")
        if _layer(p.relative_to(PKG).parts) != "cli"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if ("os.environ" in line or "getenv" in line) and line not in PASSED_ON.get(p.relative_to(PKG).as_posix(), ())
    ]
    assert not hits, hits


def test_import_has_no_side_effects():
    """Importing attnflow (plots and io included) neither switches JAX to float64 nor picks a matplotlib backend."""
    code = (
        "import jax, matplotlib\n"
        "import attnflow, attnflow.plots, attnflow.io.config, attnflow.cli\n"
        "assert not jax.config.jax_enable_x64, 'x64 switched on at import'\n"
        "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.rcParams._get_backend_or_none()\n"
    )
    env = {"PATH": "", "HOME": "/tmp"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
