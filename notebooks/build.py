"""Build the notebooks: notebooks/src/NN_name.py (percent format) -> notebooks/NN_name.ipynb, executed.

    python notebooks/build.py            # build and execute every notebook at full size
    python notebooks/build.py 01 03      # only these
    ATTNFLOW_SMOKE=1 python notebooks/build.py --check   # execute at smoke size without writing

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown, every line prefixed by ``# ``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def parse(src: str):
    """Percent-format text -> list of (kind, source)."""
    cells, kind, lines = [], None, []

    def flush():
        if kind is not None:
            text = "\n".join(lines).strip("\n")
            if kind == "markdown":
                text = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in text.splitlines())
            if text.strip():
                cells.append((kind, text))

    for line in src.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def to_notebook(src_path: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, text in parse(src_path.read_text()):
        nb.cells.append(nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text))
    return nb


def execute(nb, cwd: Path, timeout: int = 1800):
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(argv):
    check = "--check" in argv
    wanted = [a for a in argv if not a.startswith("--")]
    srcs = sorted((HERE / "src").glob("*.py"))
    if wanted:
        srcs = [s for s in srcs if any(s.name.startswith(w) for w in wanted)]
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for s in srcs:
        print(f"executing {s.name} ({'smoke' if os.environ.get('ATTNFLOW_SMOKE') else 'full'} size)", flush=True)
        nb = execute(to_notebook(s), HERE)
        if not check:
            out = HERE / (s.stem + ".ipynb")
            nbformat.write(nb, out)
            print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
